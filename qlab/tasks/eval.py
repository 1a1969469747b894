"""task=eval: quality through lm-evaluation-harness, of a base quantized as configured, with or
without a training run's LoRA adapter (unmerged), or of the model a full fine-tuning run saved;
and `qlab eval`, which composes that config from a run directory or a model name.

    python -m qlab.run task=eval model=tiny-llama quant=nf4 eval.tasks=[qlab_wiki_ppl] eval.limit=20
    qlab eval results/adhoc/<id> [--tasks qlab_wiki_ppl,qlab_chitchat_mc] [--quant bf16] [--limit 20]
    qlab eval smollm2-135m --quant nf4+dq --tasks hellaswag,arc_easy     # registry tasks need the hub
    qlab eval smollm2-135m --quant hqq-int4                              # any quant label (quant_labels.py)

One harness call per task (each task's time is its own). Tasks are qlab's local ones
(qlab/reference/lm_eval_tasks.py, offline) or names in lm-eval's registry, checked from the
installed package before anything loads. Beside result.json the run writes the harness's own
results (lm_eval_results.json) and one line per item in samples/<task>.jsonl, for paired
statistics across arms; result.json's metrics hold `lm_eval.<task>.<metric>` and `eval.<task>.*`.
Metrics, units and caveats: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from qlab import config, tasks
from qlab.reference import lm_eval_tasks
from qlab.results import store
from qlab.run.data import DataError
from qlab.tasks import Outcome, failure, generate, quant_labels
from qlab.tasks.generate import model_overrides, override_value, quant_overrides

LM_EVAL = "lm-eval==0.4.13"
INSTALL = f"pip install 'qlab[eval]' (or {LM_EVAL}; `make install` installs it)"
SAMPLES = "samples"
HARNESS_RESULTS = "lm_eval_results.json"
# what the harness reports per task beside its metrics (not numbers of the model)
NOT_METRICS = ("alias", "name", "sample_len", " ")

log = logging.getLogger("qlab")


@dataclass
class Inputs:
    tasks: list[str]
    task_manager: object  # lm_eval.tasks.TaskManager over the registry (when named) and qlab's task dirs
    task_sha256: dict[str, str] = field(default_factory=dict)  # local task -> its content hash
    adapter: Path | None = None  # a run's adapter/ (generate.load reads this)
    model_dir: Path | None = None  # a full fine-tuning run's model/: loaded in place of the base
    adapter_metrics: dict = field(default_factory=dict)  # where the adapter / model came from


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise config.ConfigError("task", f"task=eval runs lm-evaluation-harness, which is not installed: {INSTALL}")


def task_manager(names: list[str]):
    """(TaskManager, {local task: sha256}): qlab's local tasks built (once, into the cache) and,
    when another name is asked for, lm-eval's registry indexed from its installed files (no
    network; ~10 s). An unknown name or a local task whose wheel is missing is a ConfigError."""
    from lm_eval.tasks import TaskManager

    local = [t for t in names if t in lm_eval_tasks.LOCAL_TASKS]
    dirs, hashes = [], {}
    for name in local:
        try:
            d = lm_eval_tasks.task_dir(name)
        except lm_eval_tasks.TaskDataError as e:
            raise config.ConfigError("eval.tasks", str(e)) from None
        dirs.append(str(d))
        hashes[name] = lm_eval_tasks.manifest(d)["sha256"]
    registry = len(local) < len(names)
    manager = TaskManager(include_path=dirs or None, include_defaults=registry)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise config.ConfigError("eval.tasks", f"unknown task(s) {', '.join(map(repr, unknown))}: neither qlab's local "
                                               f"tasks ({', '.join(lm_eval_tasks.LOCAL_TASKS)}) nor in the registry of "
                                               f"the installed lm-eval (list it: lm-eval ls tasks)")
    return manager, hashes


def read_training_run(run: Path, cfg: DictConfig) -> tuple[Path | None, Path | None, dict]:
    """(adapter, model_dir, metrics) of eval.adapter_run: a full fine-tuning run's model/, else its
    adapter/, checked against the base (ConfigError naming eval.adapter_run)."""
    key = "eval.adapter_run"
    result = store.read_result(run)
    if result is None:
        raise config.ConfigError(key, f"{run}: no result.json; pass the directory of a qlab training run")
    model_dir = run / "model"
    if model_dir.is_dir():
        for f in ("config.json", "tokenizer_config.json"):
            if not (model_dir / f).is_file():
                raise config.ConfigError(key, f"{model_dir}: no {f}; not a model saved with its tokenizer")
        sha = store.files_sha256(sorted(model_dir.glob("*.safetensors")))[:16]
        return None, model_dir, {**generate.trained_by(result), "model_weights_sha256": sha}
    adapter, metrics = generate.checked_adapter(run, cfg.model, key)
    return adapter, None, metrics


def prepare(cfg: DictConfig) -> Inputs:
    """lm-eval installed, every task known (local ones built), the model available, the run's
    adapter or model present and fitting: otherwise a ConfigError (exit 2) before any weights load."""
    from qlab.run import models  # imports torch: lazy, so `qlab eval --help` starts fast

    require_lm_eval()
    models.check_available(cfg.model)
    manager, hashes = task_manager(list(cfg.eval.tasks))
    inputs = Inputs(list(cfg.eval.tasks), manager, hashes)
    if cfg.eval.adapter_run:
        inputs.adapter, inputs.model_dir, inputs.adapter_metrics = read_training_run(
            Path(config.resolve_path(cfg.eval.adapter_run)), cfg)
    return inputs


def load_config(cfg: DictConfig, model_dir: Path | None) -> DictConfig:
    """`cfg`, or with a full fine-tuning run's model/ as the model to load (and quantize)."""
    if model_dir is None:
        return cfg
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in ("preset", "base", "gguf"):  # whichever way the config named the base: not this time
        if key in out.model:
            out.model[key] = None
    out.model.name_or_path = str(model_dir)
    return out


def harness(model, tokenizer, e: DictConfig):
    """The HFLM around the loaded model; max_length no larger than the model's context."""
    from lm_eval.models.huggingface import HFLM

    context = getattr(model.config, "max_position_embeddings", None)
    max_length = e.max_length if e.max_length is None or context is None else min(e.max_length, context)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=e.batch_size, max_length=max_length)


def flatten(out: dict) -> dict:
    """The harness's results (and group results) as `lm_eval.<task>.<metric>[.<filter>]`."""
    m = {}
    for section in ("results", "groups"):
        for task, values in (out.get(section) or {}).items():
            for key, v in values.items():
                if key in NOT_METRICS or "," not in key or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue  # "N/A" stderr (perplexity has none), labels
                metric, filt = key.split(",", 1)
                m[f"lm_eval.{task}.{metric}" + ("" if filt == "none" else f".{filt}")] = float(v)
    return m


def item(sample: dict, output_type: str, lm) -> dict:
    """One document's or item's record for samples/<task>.jsonl."""
    doc = sample.get("doc")
    rec = {"doc_id": sample["doc_id"], "id": doc.get("id") if isinstance(doc, dict) else None,
           "doc_hash": sample.get("doc_hash")}
    resps = sample.get("filtered_resps")
    if output_type == "loglikelihood_rolling":
        (text,) = sample["arguments"][0]
        rec.update(loglikelihood=float(resps[0]), tokens=len(lm.tok_encode(text)),
                   words=sample["word_perplexity"][1] if "word_perplexity" in sample else len(text.split()),
                   bytes=len(text.encode("utf-8")))
    elif output_type == "multiple_choice":
        lls, args = [float(r[0]) for r in resps], sample["arguments"]
        n = len(lls) // 2 if "acc_mutual_info" in sample.get("metrics", ()) else len(lls)
        # a choice's tokens: those of context + choice beyond the context's (as the harness splits them)
        rec.update(choice_loglikelihoods=lls[:n],
                   choice_tokens=[len(lm.tok_encode(c + x)) - len(lm.tok_encode(c)) for c, x in args[:n]],
                   gold=sample.get("target"), pred=max(range(n), key=lls.__getitem__))
        if n < len(lls):  # mutual information: each choice's loglikelihood without the context too
            rec["choice_unconditional_loglikelihoods"] = lls[n:]
        rec.update({k: sample[k] for k in sample.get("metrics", ()) if k in sample})  # acc, acc_norm
    else:
        rec.update(target=sample.get("target"), filtered_resps=resps,
                   **{k: sample[k] for k in sample.get("metrics", ()) if k in sample})
    return rec


def rolling_summary(records: list[dict]) -> dict:
    """Sums over a perplexity task's documents, and the token-level perplexity they give."""
    ll, tokens = sum(r["loglikelihood"] for r in records), sum(r["tokens"] for r in records)
    return {"loglikelihood_sum": ll, "tokens": tokens, "words": sum(r["words"] for r in records),
            "bytes": sum(r["bytes"] for r in records), "token_perplexity": math.exp(-ll / tokens) if tokens else None}


def evaluate(lm, inputs: Inputs, cfg: DictConfig, directory: Path) -> tuple[dict, dict]:
    """Each task through simple_evaluate; (merged harness output without samples, metrics).
    Samples are written to directory/samples/<task>.jsonl as each task ends."""
    import lm_eval

    e, merged, metrics = cfg.eval, {}, {}
    (directory / SAMPLES).mkdir(exist_ok=True)
    for name in inputs.tasks:
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=inputs.task_manager, limit=e.limit,
                                      num_fewshot=e.num_fewshot, log_samples=True, random_seed=cfg.seed,
                                      numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                                      fewshot_random_seed=cfg.seed)
        seconds = time.perf_counter() - t0
        samples = out.pop("samples", {})
        for key, value in out.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            else:
                merged.setdefault(key, value)
        items = 0
        for task, rows in samples.items():
            kind = (out.get("configs") or {}).get(task, {}).get("output_type")
            records = [item(s, kind, lm) for s in sorted(rows, key=lambda s: s["doc_id"])]
            with open(directory / SAMPLES / f"{task}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, default=str) + "\n" for r in records)
            items += len(records)
            if kind == "loglikelihood_rolling" and records:
                metrics.update({f"eval.{task}.{k}": v for k, v in rolling_summary(records).items()})
        metrics.update({f"eval.{name}.items": items, f"eval.{name}.seconds": seconds,
                        f"eval.{name}.seconds_per_item": seconds / items if items else None})
        if name in inputs.task_sha256:
            metrics[f"eval.{name}.task_sha256"] = inputs.task_sha256[name]
        log.info("eval %s: %d items in %.1f s", name, items, seconds)
    return merged, {**flatten(merged), **metrics}


def run(cfg: DictConfig, inputs: Inputs, recorder) -> Outcome:
    from transformers import set_seed

    from qlab.run import measure  # imports torch: lazy, so `qlab eval --help` starts fast
    from qlab.run.device import resolve_device

    metrics = {**inputs.adapter_metrics, "eval_tasks": list(inputs.tasks), "pid": os.getpid()}
    window = None
    try:
        from lm_eval.utils import handle_non_serializable

        set_seed(cfg.seed)
        device = metrics["device"] = resolve_device(cfg.train.device)
        model, tok, loaded = generate.load(load_config(cfg, inputs.model_dir), inputs, device)
        model.config.use_cache = False  # scoring, not generating: no KV cache
        metrics.update(loaded)
        lm = harness(model, tok, cfg.eval)
        metrics.update(lm_eval_version=version("lm_eval"), lm_eval_max_length=lm.max_length,
                       lm_eval_batch_size=cfg.eval.batch_size, lm_eval_prefix_token=tok.decode([lm.prefix_token_id]),
                       tokenizer_adds_bos=bool(tok.bos_token_id is not None
                                               and tok("a").input_ids[:1] == [tok.bos_token_id]))
        window = measure.MemoryWindow(device)
        with window:
            harness_out, numbers = evaluate(lm, inputs, cfg, recorder.dir)
        metrics.update({k: v for k, v in window.peaks.items() if v is not None})
        metrics.update(numbers)
        with open(recorder.dir / HARNESS_RESULTS, "w", encoding="utf-8") as f:
            json.dump(harness_out, f, indent=2, default=handle_non_serializable)
    except Exception as e:
        if window is not None:
            metrics.update({k: v for k, v in window.read().items() if v is not None})
        return failure(e, metrics)
    return Outcome("ok", metrics)


# ---------------------------------------------------------------- qlab eval

def overrides(args) -> list[str]:
    """The config of `qlab eval`: a training run's model and quantization with its adapter or
    model/, or a model by name (--quant, default bf16). A run's quantization is forwarded whole
    (type, DQ, backend, block size, compute dtype; keys its result predates at their defaults), so
    the adapter meets the base it trained on: an HQQ run is evaluated on HQQ, a /b128 run at block
    size 128. --quant (any quant_labels spelling) replaces it, with a warning where it differs."""
    target = Path(args.target)
    run = target if (target / store.RESULT).is_file() else None
    out = ["task=eval", *model_overrides(argparse.Namespace(model=None if run else args.target, run=run))]
    quant = quant_labels.setting(args.quant or "bf16")
    if run is not None:
        trained = quant_labels.stored(store.read_result(run))
        label = config.quant_label(trained)
        if args.quant and config.quant_label(quant) != label:
            warnings.warn(f"{run} was trained on a {label} base; evaluating on {config.quant_label(quant)}",
                          stacklevel=2)
        quant = {**(quant if args.quant else {k: trained[k] for k in quant_labels.KEYS}),
                 "compute_dtype": trained.get("compute_dtype", "auto")}
        if not args.no_adapter:
            out.append(f"eval.adapter_run={override_value(str(run.resolve()))}")
    v = override_value
    return [*out, *quant_overrides(quant), f"eval.tasks=[{','.join(args.tasks)}]",
            f"eval.limit={v(args.limit)}", f"eval.batch_size={args.batch_size}", f"eval.max_length={v(args.max_length)}",
            f"eval.num_fewshot={v(args.num_fewshot)}", f"train.device={args.device}", f"seed={args.seed}",
            f"tracker.results_dir={v(str(args.results_dir.resolve()))}", f"tracker.sweep={v(args.sweep)}"]


def summary(result: dict) -> list[str]:
    """One line per task: its harness metrics (stderr beside), items and time."""
    m, lines = result.get("metrics") or {}, []
    for task in result["config"]["eval"]["tasks"]:
        prefix = f"lm_eval.{task}."
        values = [f"{k[len(prefix):]} {v:.4g}" + (f" ± {m[k + '_stderr']:.2g}" if k + "_stderr" in m else "")
                  for k, v in m.items() if k.startswith(prefix) and "_stderr" not in k]
        tp = m.get(f"eval.{task}.token_perplexity")
        values += [f"token perplexity {tp:.4g}"] if tp else []
        n, s = m.get(f"eval.{task}.items"), m.get(f"eval.{task}.seconds")
        lines.append(f"  {task}: " + ", ".join(values) + (f" ({n} items, {s:.1f} s)" if n is not None else ""))
    return lines


def parse_tasks(text: str) -> list[str]:
    out = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not out:
        raise argparse.ArgumentTypeError("name at least one task")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qlab eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="RUN_OR_MODEL",
                   help="a qlab training run's directory (its model, quantization and adapter or model/), or a "
                        "model: a conf/model/ name, preset, local directory or hub id")
    p.add_argument("--tasks", type=parse_tasks, default=list(lm_eval_tasks.LOCAL_TASKS),
                   help="comma-separated: qlab's local tasks (default: all of them, "
                        f"{', '.join(lm_eval_tasks.LOCAL_TASKS)}) and/or lm-eval registry tasks (hub access)")
    p.add_argument("--quant", type=quant_labels.parse,
                   help="the base's quantization (default: the run's, all of it, else bf16); another than the "
                        f"run's warns: {quant_labels.CHOICES}")
    p.add_argument("--no-adapter", action="store_true", help="a run's base model and quantization, without its adapter")
    p.add_argument("--limit", type=int, help="the first N documents / items of each task (default: all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=2048,
                   help="tokens per window / sequence (default 2048; at most the model's context)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples of registry tasks (default: the task's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=Path("results"))
    p.add_argument("--sweep", default="eval", help="results/<sweep>/ (default eval)")
    p.add_argument("--force", action="store_true", help="run even when a complete result exists")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        ov = overrides(args)
        config.check_overrides(ov)
        cfg = config.compose(ov)
        where = None if args.force else store.complete_result(cfg)
        if where is None:
            started = time.time()
            result = store.asdict(tasks.execute(cfg))
            where = store.fresh_dir(store.run_dir(cfg), started)  # beside an earlier complete one if it failed
        else:
            result = store.read_result(where)
            print(f"qlab eval: complete result in {where} (--force runs again)", file=sys.stderr)
    except (config.ConfigError, DataError) as e:
        print(f"qlab eval: invalid, nothing was run: {e}", file=sys.stderr)
        return tasks.EXIT["invalid"]
    status = result["status"]
    print(f"qlab eval: {status} -> {where}")
    if status == "ok":
        print("\n".join(summary(result)))
    elif result.get("error"):
        print(f"  {result['error']['type']}: {result['error']['message']}")
    return tasks.EXIT[status]


if __name__ == "__main__":
    sys.exit(main())
