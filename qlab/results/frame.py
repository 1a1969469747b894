"""result.json files -> one tidy pandas DataFrame (one row per run), and the names the
report, the statistics and the plots share: axis orders, quantization labels, metrics.

Every run found is a row, oom and failed ones included (`status`). Each row carries its
comparability group (`GROUP_KEYS`, and its `kind`: results of two tasks never share one); runs
are only compared inside a group. A training run's speed path (`speed_label`) is an axis like
the quantization, named in its `quant_label` (`nf4+DQ · fast`) so that every consumer keeps
them apart. The quantization's backend and block size are in its labels (config.quant_label:
`hqq int4`, `nf4+DQ/b128`), the adapter's initialization and DoRA in its `adapter` label
(`all_linear+loftq`, `qv+DoRA`); keys a result predates count as their defaults, so those
results keep the labels they always had. Reading is all this module does; nothing here computes
a statistic or draws.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from qlab import config
from qlab.reference.lm_eval_tasks import LOCAL_TASKS
from qlab.results import store
from qlab.results.store import ADDED_KEYS, NON_IDENTITY_KEYS, RECIPE, RESULT, TASK_SECTIONS, peak_bytes

GiB = 2**30
MiB = 2**20
ADAPTER_BYTES_PER_PARAM = 4  # LoRA A/B matrices are trained in float32: 4 bytes/param

# Natural order of each axis' values in tables and plots; unknown values sort after, by name. A
# quantization's block size (`/b128`) sorts after its label at the default one, an adapter's form
# (`+loftq`) after its targets with peft's default.
ORDER = {
    "quant": ["bf16", "int8", "nf4", "fp4", "torchao nf4", "hqq int4"],
    "quant_label": ["bf16", "int8", "nf4", "nf4+DQ", "fp4", "fp4+DQ", "torchao nf4+DQ", "hqq int4"],
    "dq": ["off", "on"],
    "optim": ["adamw", "paged_adamw_32bit", "adamw_8bit", "paged_adamw_8bit"],
    "adapter": ["qv", "all_linear", "full", "none", "lora"],  # full: full fine-tuning; none/lora: generation and eval
    "adapter_form": ["", "DoRA", "loftq", "pissa"],  # after the targets: LoRA as peft initializes it first
    "speed": ["trainer", "recipe", "fast"],  # trainer: the HF Trainer's loop (train.runner=hf_trainer)
}
SPEED_SEP = " · "  # quant label · speed label
# Keys that define a comparability group (besides hardware): column -> dotted config key.
GROUP_KEYS = {"model": "model.name", "data": "data.name", "max_seq_len": "data.max_seq_len", "pad_to": "data.pad_to",
              "batch_size": "train.batch_size", "steps": "train.steps"}
# Config keys that are the ablation axes (they vary *inside* a group) or don't change what a
# run measures; every other config key must match for runs to share a group.
AXIS_CONFIG_KEYS = ("quant.type", "quant.double_quant", "quant.backend", "quant.blocksize", "optim.name",
                    "adapter.targets", "adapter.init", "adapter.dora", "seed", "speed",
                    "train.runner")  # the runner is part of the speed path (trainer)
# Generation and eval results: the adapter is an axis (`adapter`), its config does not split a group.
KIND_AXIS_CONFIG_KEYS = {"generate": ("adapter",), "eval": ("adapter",)}
KINDS = ("train", "generate", "compare", "eval")  # sections in this order
# Residual config keys a group's label names already, per kind
LABEL_KEYS = {"generate": ("bench.new_tokens", "bench.batch_sizes", "bench.prompts", "bench.repeats"),
              "eval": ("eval.limit", "eval.max_length_used", "eval.batch_size")}
VERSIONS = ("python", "torch", "transformers", "peft", "bitsandbytes", "cuda")


def differing_versions(runs: pd.DataFrame) -> list[str]:
    """The VERSIONS that take more than one value across `runs` (env_<name> columns)."""
    return [k for k in VERSIONS if f"env_{k}" in runs and runs[f"env_{k}"].dropna().astype(str).nunique() > 1]


@dataclass(frozen=True)
class Metric:
    """One reported metric: `source` column of the runs frame, divided by `scale`."""

    name: str
    source: str
    scale: float
    header: str
    decimals: int
    delta: bool = False  # show % change vs the baseline arm
    tested: bool = False  # compared across ablation pairs in the statistics
    run_ci: tuple[str, str] | None = None  # one run's own 95% interval (columns), used for an arm of one run
    quality: bool = False  # loss-based: says nothing on random weights (`quality_metrics`)


METRICS = (
    Metric("peak_gib", "peak_bytes", GiB, "peak mem (GiB)", 2, delta=True, tested=True),
    Metric("torch_peak_gib", "peak_allocated_bytes", GiB, "torch peak alloc (GiB)", 2),
    Metric("weights_gib", "weight_bytes", GiB, "weights (GiB)", 2, delta=True),
    Metric("tok_s", "tokens_per_s", 1, "tok/s [95% CI]", 0, delta=True, tested=True,
           run_ci=("tokens_per_s_run_ci95_low", "tokens_per_s_run_ci95_high")),
    Metric("train_loss_final", "train_loss_final", 1, "final train loss", 4, tested=True, quality=True),
    Metric("eval_loss", "eval_loss", 1, "eval loss", 4, delta=True, tested=True, quality=True),
    Metric("eval_ppl", "eval_perplexity", 1, "eval ppl", 1, quality=True),
    Metric("trainable_m", "trainable_params", 1e6, "trainable params (M)", 1),
)
METRIC = {m.name: m for m in METRICS}


def random_weights(runs: pd.DataFrame) -> bool:
    """Every run of `runs` trained a random-init preset (`model_weights`): their losses are not quality."""
    return len(runs) > 0 and "model_weights" in runs and bool((runs.model_weights == "random").all())


def quality_metrics(runs: pd.DataFrame) -> tuple[Metric, ...]:
    """METRICS, less the loss-based ones where the runs trained random weights."""
    return tuple(m for m in METRICS if not (m.quality and random_weights(runs)))


def byte_unit(largest: float) -> tuple[str, int]:
    """(unit, bytes per unit) of a table's byte columns: MiB when every value is below 1 GiB (tiny models)."""
    return ("GiB", GiB) if not math.isfinite(largest) or largest >= GiB else ("MiB", MiB)


def generation_batch_sizes(runs: pd.DataFrame) -> list[int]:
    """The batch sizes whose throughput the generation results hold, ascending."""
    prefix, suffix = "e2e_tokens_per_s_b", "_median_tok"
    return sorted(int(c[len(prefix):-len(suffix)]) for c in runs.columns
                  if c.startswith(prefix) and c.endswith(suffix) and runs[c].notna().any())


def generation_metrics(runs: pd.DataFrame) -> tuple[Metric, ...]:
    """The columns of a generation table, for the batch sizes the runs hold: each run's median over its
    timed generate calls with the 95% t-interval of their mean (`stats.summarize`)."""
    unit, scale = byte_unit(pd.concat([runs[c] for c in ("weight_bytes", "peak_bytes") if c in runs]).max())
    out = [
        Metric("load_s", "load_time_s", 1, "load (s)", 2),
        Metric("weights", "weight_bytes", scale, f"weights ({unit})", 2, delta=True),
        Metric("peak", "peak_bytes", scale, f"peak mem ({unit})", 2, delta=True),
        Metric("torch_peak", "peak_allocated_bytes", scale, f"torch peak alloc ({unit})", 2),
        Metric("ttft_ms", "ttft_median_s", 1e-3, "TTFT b1 (ms) [95% CI]", 1, delta=True,
               run_ci=("ttft_ci95_low_s", "ttft_ci95_high_s")),
    ]
    sizes = generation_batch_sizes(runs)
    for b in sizes:
        p = f"decode_tokens_per_s_b{b}"
        out.append(Metric(f"decode_tok_s_b{b}", f"{p}_median_tok", 1, f"decode tok/s b{b} [95% CI]", 0, delta=True,
                          run_ci=(f"{p}_ci95_low_tok", f"{p}_ci95_high_tok")))
    for b in sizes:
        p = f"e2e_tokens_per_s_b{b}"
        out.append(Metric(f"e2e_tok_s_b{b}", f"{p}_median_tok", 1, f"end-to-end tok/s b{b}", 0, delta=True))
    return tuple(out)


# An eval table's column per task: the first of these the task reports, else its first metric
# (acc_mutual_info: qlab's chitchat choice, where generic replies are likely without any context)
EVAL_MAIN_METRICS = ("word_perplexity", "acc_mutual_info", "acc", "exact_match")


def eval_metrics(runs: pd.DataFrame) -> tuple[Metric, ...]:
    """The columns of an eval table: per task the runs asked for (qlab's local tasks first), its main
    metric (EVAL_MAIN_METRICS, `lm_eval.<task>.<metric>`) and the harness's standard error of it."""
    asked = {t for v in runs.get("eval_tasks", pd.Series(dtype=object)).dropna() for t in str(v).split("+")}
    if not asked:  # a result without the list: every task it has numbers for
        asked = {c.split(".")[1] for c in runs.columns if c.startswith("lm_eval.")}
    order = [t for t in LOCAL_TASKS if t in asked] + sorted(asked - set(LOCAL_TASKS))
    out = []
    for task in order:
        prefix = f"lm_eval.{task}."
        names = sorted(c[len(prefix):] for c in runs.columns
                       if c.startswith(prefix) and not c.endswith("_stderr") and runs[c].notna().any())
        if not names:
            continue
        metric = next((m for m in EVAL_MAIN_METRICS if m in names), names[0])
        decimals = 2 if "perplexity" in metric else 4
        out.append(Metric(f"{task}.{metric}", prefix + metric, 1, f"{task} {metric}", decimals, delta=True))
        out.append(Metric(f"{task}.{metric}_stderr", f"{prefix}{metric}_stderr", 1, "stderr", decimals))
    return tuple(out)


# Metric keys the report reads: a run without one (a CPU run's GPU peaks, a failed run's loss) gets NaN.
READ_METRICS = ("weight_bytes", "quantized_weight_bytes", "quant_state_bytes", "unquantized_weight_bytes",
                "weight_bytes_after_prepare", "trainable_params", "total_params", "peak_allocated_bytes",
                "peak_reserved_bytes", "nvml_peak_device_used_bytes", "rss_peak_bytes", "optimizer_state_bytes",
                "tokens_per_s", "step_time_mean_s", "train_loss_first", "train_loss_final", "eval_loss",
                "eval_perplexity")


def _position(column: str, value) -> tuple:
    order = ORDER.get(column, [])
    return (order.index(value), "") if value in order else (len(order), str(value))


def rank(column: str, value) -> tuple:
    """A value's place in its axis' order (ORDER). A quant label sorts by its label at the default
    block size, then its block size, then its speed path (none first): nf4+DQ, nf4+DQ · fast,
    nf4+DQ/b128; an adapter label by its targets, then its form: all_linear, all_linear+loftq."""
    if column in ("quant", "quant_label") and isinstance(value, str):
        base, _, speed = value.partition(SPEED_SEP)
        base, _, size = base.partition(config.BLOCK_SEP)
        key = (*_position(column, base), int(size) if size.isdigit() else config.DEFAULT_BLOCKSIZE)
        return (*key, rank("speed", speed)) if speed else key
    if column == "adapter" and isinstance(value, str) and config.FORM_SEP in value:
        targets, _, form = value.partition(config.FORM_SEP)
        return (*_position(column, targets), _position("adapter_form", form))
    return _position(column, value)


def quant_label(quant: dict | None, speed: str | None = None) -> str | None:
    """A stored quant config's label, config.quant_label's (its backend and block size where not
    the defaults, keys the result predates counting as those); with a speed path other than the
    recipe, named after it: nf4+DQ · fast. None without a quantization (a comparison's row)."""
    if not quant or quant.get("type") is None:
        return None
    label = config.quant_label(quant)
    return label if speed in (None, RECIPE) else f"{label}{SPEED_SEP}{speed}"


def adapter_label(targets: str | None, adapter: dict | None = None) -> str | None:
    """config.adapter_label of a result's adapter config (None without targets)."""
    return None if targets is None else config.adapter_label({**(adapter or {}), "targets": targets})


# conf/speed/ as it was before results recorded their speed label (axes.speed): such results are
# labelled with these switches, never with conf/ as it is now
PRESETS_OF_UNLABELLED = {
    "recipe": {"upcast_non_quantized": True, "adapter_autocast": False, "compile": "none",
               "compile_backend": "inductor", "loss": "full", "loss_chunk_tokens": 1024},
    "fast": {"upcast_non_quantized": False, "adapter_autocast": True, "compile": "layers",
             "compile_backend": "inductor", "loss": "chunked", "loss_chunk_tokens": 1024},
}


def speed_label(result: dict) -> str | None:
    """A training result's recorded speed path (axes.speed), else its config's by PRESETS_OF_UNLABELLED."""
    if (result.get("kind") or "train") != "train":
        return None
    axes, cfg = result.get("axes") or {}, result.get("config") or {}
    return axes.get("speed") or store.speed_label(cfg.get("speed"), (cfg.get("train") or {}).get("runner"),
                                                  PRESETS_OF_UNLABELLED)


def model_weights(model: dict) -> str:
    """What a run's base weights were, from its stored model config: "gguf" (dequantized from a GGUF
    file), "base" (qlab's offline pretrained base), "checkpoint" (a hub id or directory), or "random"
    (a preset shape with random weights, whose losses say nothing of quality)."""
    model = model or {}
    for key, kind in (("gguf", "gguf"), ("base", "base"), ("name_or_path", "checkpoint")):
        if model.get(key):
            return kind
    return "random" if model.get("preset") else "checkpoint"


def find_results(root: Path) -> list[Path]:
    """Every result.json below `root`, hidden directories (.staging/ .logs/ .hydra/) skipped."""
    root = Path(root)
    return sorted(p for p in root.rglob(RESULT)
                  if not any(part.startswith(".") for part in p.relative_to(root).parts[:-1]))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _residual_config(config: dict, kind: str) -> dict:
    """The config keys that must match inside a group besides GROUP_KEYS and the kind (`task`)."""
    skip = ("task", *NON_IDENTITY_KEYS, *AXIS_CONFIG_KEYS, *KIND_AXIS_CONFIG_KEYS.get(kind, ()), *GROUP_KEYS.values(),
            *(t for t in TASK_SECTIONS if t != kind))  # another task's section is not this run's config
    return {k: v for k, v in flatten(config).items()
            if not any(k == s or k.startswith(s + ".") for s in skip)
            and not (k in ADDED_KEYS and v == ADDED_KEYS[k])}  # at its neutral value a newer key changes nothing


def generation_config(cfg: dict, metrics: dict) -> tuple[dict, str]:
    """A generation result's config as the report groups and labels it (`bench.*`, the layout of the
    first bench's results) and its adapter label (`_adapter_label`: two trainings under one run id
    are two arms, never averaged)."""
    if "generate" in cfg:
        bench = {k: v for k, v in cfg["generate"].items() if k != "adapter_run"}
        bench.update(device=(cfg.get("train") or {}).get("device"),
                     **{k: metrics.get(k) for k in ("warmup_calls", "decoding", "prompt_source")})
        model = {k: v for k, v in (cfg.get("model") or {}).items() if k != "base" or v is not None}
        cfg = {"model": model, "quant": cfg.get("quant"), "bench": bench, "seed": cfg.get("seed"),
               "tracker": cfg.get("tracker"), "adapter": {"run_id": metrics.get("adapter_run_id"),
                                                          "weights_sha256": metrics.get("adapter_weights_sha256")}}
    adapter = cfg.get("adapter") or {}
    return cfg, _adapter_label(adapter.get("run_id"), adapter.get("weights_sha256"))


def eval_config(cfg: dict, metrics: dict) -> tuple[dict, str]:
    """An eval result's config as the report groups and labels it, and its adapter label. The tasks
    asked for do not split groups: a task a run did not evaluate is an empty cell."""
    e = {k: v for k, v in (cfg.get("eval") or {}).items() if k not in ("adapter_run", "tasks")}
    e.update(device=(cfg.get("train") or {}).get("device"), max_length_used=metrics.get("lm_eval_max_length"))
    sha = metrics.get("adapter_weights_sha256") or metrics.get("model_weights_sha256")
    cfg = {"model": {k: v for k, v in (cfg.get("model") or {}).items() if v is not None}, "quant": cfg.get("quant"),
           "eval": e, "seed": cfg.get("seed"), "tracker": cfg.get("tracker"),
           "adapter": {"run_id": metrics.get("adapter_run_id"), "weights_sha256": sha}}
    return cfg, _adapter_label(metrics.get("adapter_run_id"), sha)


# Keys newer than the committed results, left out of a training arm's hash at their neutral value
# (store.ADDED_KEYS): a run written before them and its seed written after are one arm. (The keys
# added before stay hashed as they are: the committed reports name their arms by those hashes.)
ARM_NEUTRAL_KEYS = ("adapter.init", "adapter.dora")


def trained_arm(trained: dict) -> str:
    """A training run's arm: its sweep and the hash of its identity less seed and quantization,
    which its seeds share and its quantization arms too (a row's quant tells those apart; its
    adapter's initialization and DoRA are in the hash, so they are arms of their own)."""
    ident = store.identity(trained.get("config") or {})
    for key in ("seed", "quant"):
        ident.pop(key, None)
    for key in ARM_NEUTRAL_KEYS:
        section, leaf = key.split(".")
        part = ident.get(section)
        if isinstance(part, dict) and leaf in part and part[leaf] == ADDED_KEYS[key]:
            part.pop(leaf)
    return f"{trained.get('sweep')} {hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]}"


def _adapter_label(run_id: str | None, sha: str | None) -> str:
    """The training run a result ran beside the base and its weights' hash: `<run id> 1a2b3c4d`."""
    return (run_id or "") + (f" {sha[:8]}" if sha else "")


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _row(r: dict, rel: str, trained: dict | None = None) -> dict:
    """One result's row; `trained`: the result of the training run an eval or generation ran with
    (store.training_result), whose adapter targets and seed become the row's `adapter` and `seed`
    (the task's own seed stays as `task_seed`), so that its arms pair like the training runs'."""
    axes, m, env = r.get("axes") or {}, r.get("metrics") or {}, r.get("env") or {}
    kind = r.get("kind") or "train"
    cfg, adapter_run = r.get("config") or {}, ""
    if kind == "generate":
        cfg, adapter_run = generation_config(cfg, m)
    elif kind == "eval":
        cfg, adapter_run = eval_config(cfg, m)
    flat = flatten(cfg)
    error = r.get("error") or {}
    # the axes name the type and DQ (none for a comparison: its arms carry their own); the stored
    # config the backend and block size (store.quant_config: the defaults where a result predates them)
    quant = {**store.quant_config(cfg), "type": axes.get("quant"), "double_quant": bool(axes.get("double_quant"))}
    row = {
        "run_id": r.get("run_id") or Path(rel).name, "kind": kind, "sweep": r.get("sweep"),
        "status": r.get("status") or "failed", "error_type": error.get("type"),
        "error_message": ((error.get("message") or "").strip().splitlines() or [None])[0],
        "model": axes.get("model", flat.get("model.name")),
        "quant": quant_label({**quant, "double_quant": False}),  # the weight format: nf4, hqq int4, nf4/b128
        "double_quant": quant["double_quant"], "optim": axes.get("optim"),
        "adapter": adapter_label(axes.get("adapter"), cfg.get("adapter") if kind == "train" else None),
        "seed": axes.get("seed", r.get("seed")),
        "speed": speed_label(r),  # generation results and comparisons: none
        "model_weights": model_weights(cfg.get("model")),  # random: a random-init preset (no quality)
    }
    row["quant_label"] = quant_label(quant, row["speed"])
    row["trained_arm"] = row["trained_quant"] = row["trained_data"] = None
    if trained is not None:
        t_axes, t_cfg = trained.get("axes") or {}, trained.get("config") or {}
        row.update(task_seed=row["seed"], adapter=adapter_label(t_axes.get("adapter", row["adapter"]),
                                                                t_cfg.get("adapter")),
                   seed=t_axes.get("seed", trained.get("seed")), trained_arm=trained_arm(trained),
                   trained_quant=quant_label(t_cfg.get("quant")), trained_data=(t_cfg.get("data") or {}).get("name"))
    row["adapter_run"] = adapter_run  # which adapter a generation or eval result ran with: two never merge
    row["dq"] = "on" if row["double_quant"] else "off"
    for col, key in GROUP_KEYS.items():
        if col != "model":
            row[col] = flat.get(key)
    row["hardware"] = env.get("gpu") or f"CPU: {env.get('cpu') or 'unknown'}"
    row["config_rest"] = json.dumps(_residual_config(cfg, kind), sort_keys=True, default=str)
    row.update(_derived(m))
    for k, v in sorted(m.items()):
        if isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
            continue  # a comparison's rounds: result.json has them, a table cell would not
        if isinstance(v, list):
            v = "+".join(map(str, v))
        row.setdefault(k, v)
    for k in ("gpu", "gpu_count", "driver", "cpu", "runs_per_gpu", *VERSIONS):
        row[f"env_{k}"] = env.get(k)
    row.update(git_commit=r.get("git_commit"), started_at=r.get("started_at"), path=rel,
               wandb=bool(flat.get("tracker.wandb")), wandb_mode=flat.get("tracker.wandb_mode"),
               wandb_project=flat.get("tracker.wandb_project"), wandb_entity=flat.get("tracker.wandb_entity"))
    return row


def _derived(m: dict) -> dict:
    """Columns computed from one run's metrics (named here so every consumer agrees)."""
    peak, source = peak_bytes(m)
    out = {"peak_bytes": math.nan if peak is None else peak, "peak_source": source}
    out["adapter_bytes"] = _num(m.get("trainable_params")) * ADAPTER_BYTES_PER_PARAM
    # prepare_model_for_kbit_training casts the non-quantized weights (embeddings, norms, head) to
    # float32: after it they hold weight_bytes_after_prepare - quantized - quantization constants
    # (llama-7b nf4+DQ: 4,390,656,896 - 3,238,002,688 - 103,013,248 = 2 x 524,820,480 bytes)
    after = _num(m.get("weight_bytes_after_prepare"))
    if not math.isfinite(after):
        after = _num(m.get("weight_bytes"))
    out["nonquantized_bytes"] = after - _num(m.get("quantized_weight_bytes")) - _num(m.get("quant_state_bytes"))
    # tokens_per_s = sum(tokens) / sum(step times) = mean tokens/step / mean step time, so the
    # t-interval [lo, hi] of the mean step time maps to [tok/hi, tok/lo] with tok = mean tokens
    # per step = tokens_per_s * step_time_mean_s (4 seq * 512 tok = 2,048 when padded); none where
    # lo <= 0 (stats' rule for a positive quantity; results written before it may hold one)
    tps, mean_t = _num(m.get("tokens_per_s")), _num(m.get("step_time_mean_s"))
    lo_t, hi_t = _num(m.get("step_time_ci95_low_s")), _num(m.get("step_time_ci95_high_s"))
    tok = tps * mean_t
    ok = all(math.isfinite(x) for x in (tok, lo_t, hi_t)) and lo_t > 0
    out["tokens_per_s_run_ci95_low"] = tok / hi_t if ok else math.nan
    out["tokens_per_s_run_ci95_high"] = tok / lo_t if ok else math.nan
    return out


def load_runs(root: Path) -> pd.DataFrame:
    """One row per result.json below `root`, sorted, with `group` and `group_label` set.
    Unreadable files are skipped with a warning (listed in `df.attrs["unreadable"]`)."""
    root = Path(root)
    rows, unreadable = [], []
    for path in find_results(root):
        rel = str(path.parent.relative_to(root))
        try:
            result = json.loads(path.read_text())
            rows.append(_row(result, rel, store.training_result(result, path.parent)))
        except (OSError, ValueError, AttributeError, TypeError) as e:
            warnings.warn(f"skipping unreadable {path}: {e}")
            unreadable.append(str(path.relative_to(root)))
    df = pd.DataFrame(rows)
    if not df.empty:
        for col in READ_METRICS:
            if col not in df:
                df[col] = math.nan
        df = sort_rows(assign_groups(df), lambda r: (
            r["group"], rank("quant", r["quant"]), r["double_quant"], rank("speed", r["speed"]),
            rank("optim", r["optim"]), rank("adapter", r["adapter"]), str(r["seed"]), r["run_id"]))
    df.attrs.update(unreadable=unreadable, root=str(root))  # root: where each row's `path` is
    return df


def ok_comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """The ok comparisons (task=compare) among `runs`, oldest first: what a speed claim and the
    report's agreement table both read."""
    if runs.empty:
        return runs
    return runs[(runs.kind == "compare") & (runs.status == "ok")].sort_values("started_at", kind="stable")


def sort_rows(df: pd.DataFrame, key) -> pd.DataFrame:
    """The rows of `df` in the order of key(row) (stable), indexed 0..n-1."""
    keys = [key(row) for _, row in df.iterrows()]
    return df.iloc[sorted(range(len(df)), key=keys.__getitem__)].reset_index(drop=True)


def status_summary(statuses: pd.Series) -> str:
    """"5 ok, 1 oom": how many runs ended in each status, ok first."""
    counts = statuses.value_counts()
    return ", ".join(f"{counts[s]} {s}" for s in sorted(counts.index, key=lambda s: (s != "ok", s)))


def peak_sources(runs: pd.DataFrame) -> str:
    """Which measurement the ok runs' peak memory comes from (`store.PEAK_SOURCES`), or n/a."""
    return ", ".join(sorted(set(runs.loc[runs.status == "ok", "peak_source"].dropna()))) or "n/a"


def _kind_rank(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)


def assign_groups(df: pd.DataFrame) -> pd.DataFrame:
    """Group = same kind, GROUP_KEYS, hardware and residual config, numbered 1.. in the order of
    their keys (training first); a label names the group's settings and the residual keys that tell
    it apart from groups of its kind."""
    cols = ["kind", *GROUP_KEYS, "hardware", "config_rest"]
    keyed = df[cols].map(str).agg("\x1f".join, axis=1)  # map(str): None and NaN become text too
    kinds = dict(zip(keyed, df.kind))
    distinct = sorted(set(keyed), key=lambda k: (_kind_rank(kinds[k]), k))
    df = df.copy()
    df["group"] = keyed.map({k: i + 1 for i, k in enumerate(distinct)})
    firsts = df.drop_duplicates("group")
    rests = dict(zip(firsts.group, map(json.loads, firsts.config_rest)))
    labels = {}
    for _, r in firsts.iterrows():
        rest = rests[r.group]
        if r.kind == "generate":
            sizes = rest.get("bench.batch_sizes")
            sizes = ", ".join(map(str, sizes)) if isinstance(sizes, list) else sizes
            label = (f"generation · {r.model} · {rest.get('bench.new_tokens')} new tokens · batch {sizes} · "
                     f"{rest.get('bench.prompts')} prompts x {rest.get('bench.repeats')} repeats · {r.hardware}")
        elif r.kind == "eval":
            label = (f"evaluation · {r.model} · limit {rest.get('eval.limit') or 'none'} · max_length "
                     f"{rest.get('eval.max_length_used')} · batch {rest.get('eval.batch_size')} · {r.hardware}")
        elif r.kind == "compare":
            label = f"comparison · {r.model} · {r.hardware}"
        else:
            label = (f"{r.model} · {r.data} · seq {r.max_seq_len} (pad {r.pad_to}) · batch {r.batch_size} · "
                     f"{r.steps} steps · {r.hardware}")
        differing = _differing([rests[h] for h, kind in zip(firsts.group, firsts.kind) if kind == r.kind])
        extra = [f"{k}={rest.get(k)}" for k in differing if k not in LABEL_KEYS.get(r.kind, ())]
        labels[r.group] = label + (" · " + ", ".join(extra) if extra else "")
    df["group_label"] = df.group.map(labels)
    return df


def _differing(rests: list[dict]) -> list[str]:
    return sorted({k for a in rests for b in rests for k in set(a) | set(b) if a.get(k) != b.get(k)})


def differing_keys(df: pd.DataFrame) -> list[str]:
    """Which group-defining keys take more than one value across the groups of `df`: `kind` first
    when kinds are mixed, then the keys that differ between groups of one kind."""
    out = ["kind"] if df.kind.nunique() > 1 else []
    for kind in sorted(df.kind.unique(), key=_kind_rank):
        d = df[df.kind == kind]
        candidates = [*GROUP_KEYS, "hardware"] if kind == "train" else ["model", "hardware"]
        keys = [k for k in candidates if d[k].astype(str).nunique() > 1]
        keys += _differing([json.loads(s) for s in d.config_rest.unique()])
        out += [k for k in keys if k not in out]
    return out


def load_curves(root: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """Per-step train loss of every run from its metrics.jsonl: run_id, step, loss."""
    rows = []
    for run_id, rel in zip(runs.run_id, runs.path):
        path = Path(root) / rel / "metrics.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                rows.append({"run_id": run_id, "step": int(rec["step"]), "loss": float(rec["loss"])})
            except (ValueError, KeyError, TypeError):
                continue  # a half-written last line of a killed run
    return pd.DataFrame(rows, columns=["run_id", "step", "loss"])
