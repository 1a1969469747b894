"""lm-evaluation-harness tasks over qlab's local text and chat data: no hub, no download at run time.

    qlab_wiki_ppl         rolling loglikelihood (perplexity) of the Wikipedia articles   (texts "wiki")
    qlab_c4_ppl           ... of the C4 web documents                                      (texts "c4")
    qlab_tinystories_ppl  ... of the TinyStories stories                                   (texts "tinystories")
    qlab_chitchat_mc      4-way multiple choice: the true next reply of a held-out chitchat
                          conversation among three replies from other held-out conversations

Each task is an ordinary lm-eval YAML task (`dataset_path: json` over one local JSONL file),
written on first use into `$QLAB_CACHE/lm_eval_tasks/<task>-<hash>/` (<task>.yaml + data.jsonl +
qlab-task.json). The hash is the SHA-256 of the task's content: its YAML with the data file named
relatively, then its data bytes; equal content means an equal directory on every machine, and a
changed builder or source lands in a new one. The YAML must name its data by absolute path
(datasets resolves data_files against the working directory, not the YAML), so it holds the
directory it was written into; `task_dir(name)` is what `TaskManager(include_path=...)` and
`lm_eval --include_path` take.

Perplexity tasks: one document per item (`texts.documents`, file order), scored by lm-eval's
`loglikelihood_rolling` in disjoint windows of the model's max_length tokens, each window's first
token conditioned on the previous window's last one (the document's first on lm-eval's prefix
token); metrics as lm-eval's wikitext: word_perplexity = exp(-sum LL / sum words) with words
= whitespace-separated pieces, byte_perplexity = exp(-sum LL / sum UTF-8 bytes), bits_per_byte
= -sum LL / (sum bytes x ln 2), every sum over the documents.

The multiple-choice task: `chitchat.multiple_choice_items(eval split, all 212, seed 0)`, with
the context bounded so an item costs a few hundred tokens: the last MC_CONTEXT_TURNS exchanges
before the cut (whole exchanges, older ones dropped while the rendering is over MC_CONTEXT_CHARS;
a single message longer than that keeps its last MC_CONTEXT_CHARS characters) and each reply's
first MC_CHOICE_CHARS characters (97% of the replies are shorter: median 60 characters, the
longest 34,641). Metrics: acc (argmax of the choices' summed loglikelihoods), acc_norm (of
loglikelihood per character) and acc_mutual_info (of loglikelihood given the context minus
loglikelihood alone: how much the conversation raises the reply, which discounts generic replies
such as "Hello?" that are likely anywhere; costs one short extra sequence per choice); chance
is 0.25.

The data are calibration samples and a chat corpus, not official evaluation splits, and may be
inside a model's pretraining data: compare quantization arms of one model, not models with the
literature (docs/evaluation.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from qlab.reference import chitchat, texts
from qlab.run.presets import build_once, cache_root

BUILD_VERSION = 1  # bump when what a task holds changes without its content changing the hash
MARKER = "qlab-task.json"  # written last: its presence means the directory is complete
DATA = "data.jsonl"
PPL = {"qlab_wiki_ppl": "wiki", "qlab_c4_ppl": "c4", "qlab_tinystories_ppl": "tinystories"}
MC = "qlab_chitchat_mc"
LOCAL_TASKS = (*PPL, MC)
MC_SEED = 0
MC_CONTEXT_TURNS = 3   # exchanges of history kept before the cut: 399 characters on average
MC_CONTEXT_CHARS = 1000  # ~250 tokens of English chat
MC_CHOICE_CHARS = 400


class TaskDataError(RuntimeError):
    """A local task that is unknown or whose source wheel is missing or altered."""


def check_available(name: str) -> None:
    """Raise TaskDataError (saying what to install) unless task `name`'s source is installed."""
    try:
        if name in PPL:
            texts.path(PPL[name])
        elif name == MC:
            chitchat.source_path()
        else:
            raise TaskDataError(f"unknown local task {name!r}; known: {', '.join(LOCAL_TASKS)}")
    except (texts.TextError, chitchat.ChitchatError) as e:
        raise TaskDataError(f"{name}: {e}") from None


def bounded_context(history: list[dict], message: str) -> str:
    """The conversation before the reply, as chitchat.render writes it, cut to the last
    MC_CONTEXT_TURNS exchanges and then to MC_CONTEXT_CHARS characters (older exchanges first)."""
    history = history[-MC_CONTEXT_TURNS:]
    while history and len(chitchat.render(history, message)) > MC_CONTEXT_CHARS:
        history = history[1:]
    if len(chitchat.render([], message)) > MC_CONTEXT_CHARS:
        message = message[-(MC_CONTEXT_CHARS - len(chitchat.render([], ""))):]
    return chitchat.render(history, message)


def records(name: str) -> list[dict]:
    """The task's documents (perplexity) or items (multiple choice), in order."""
    check_available(name)
    if name in PPL:
        return [{"id": d.id, "title": d.title, "text": d.text} for d in texts.documents(PPL[name])]
    _, held = chitchat.build()
    return [{"id": it["id"], "context": bounded_context(it["history"], it["message"]),
             "choices": [c[:MC_CHOICE_CHARS] for c in it["choices"]], "gold": it["gold"]}
            for it in chitchat.multiple_choice_items(held, None, MC_SEED)]


def task_config(name: str, data_file: str) -> dict:
    """The lm-eval task config of `name` reading `data_file`."""
    common = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data_file}},
              "test_split": "test"}
    if name in PPL:
        return {**common, "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
                "metadata": {"version": BUILD_VERSION, "source": texts.TEXTS[PPL[name]]["source"],
                             "licence": texts.TEXTS[PPL[name]]["licence"]}}
    return {**common, "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm", "acc_mutual_info")],
            "metadata": {"version": BUILD_VERSION, "source": f"{chitchat.PACKAGE} {chitchat.VERSION} held-out split",
                         "licence": chitchat.LICENCE, "seed": MC_SEED, "context_turns": MC_CONTEXT_TURNS,
                         "context_chars": MC_CONTEXT_CHARS, "choice_chars": MC_CHOICE_CHARS}}


def yaml_bytes(cfg: dict) -> bytes:
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=1000).encode("utf-8")


def _jsonl(recs: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8")


def content(name: str) -> tuple[str, bytes]:
    """(sha256, data bytes) of task `name`: the hash over its YAML with the data named relatively
    and its data, so it does not depend on where the cache is."""
    data = _jsonl(records(name))
    digest = hashlib.sha256(yaml_bytes(task_config(name, DATA)) + b"\0" + data).hexdigest()
    return digest, data


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def task_dir(name: str) -> Path:
    """The directory holding task `name` (YAML + data), written on first use; raises
    TaskDataError when its source is not installed."""
    digest, data = content(name)
    target = cache_root() / "lm_eval_tasks" / f"{name}-{digest[:12]}"

    def make(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / DATA).write_bytes(data)
        # the absolute path of the data where the directory will be once renamed into place
        (tmp / f"{name}.yaml").write_bytes(yaml_bytes(task_config(name, str(target / DATA))))
        items = data.count(b"\n")
        (tmp / MARKER).write_text(json.dumps({"task": name, "sha256": digest, "items": items,
                                              "build_version": BUILD_VERSION}, indent=1) + "\n")

    return build_once(target, is_complete, make)


def manifest(path: Path) -> dict:
    """What qlab-task.json records of a task directory: task, sha256, items, build_version."""
    return json.loads((Path(path) / MARKER).read_text())
