"""result.json files -> one tidy pandas DataFrame (one row per run), and the names the
report, the statistics and the plots share: axis orders, quantization labels, metrics.

Every run found is a row, oom and failed ones included (their `status` says so). Each row
carries its comparability group: runs are only compared inside a group (see `GROUP_KEYS`).
Reading is all this module does; nothing here computes a statistic or draws.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from qlab.track import NON_IDENTITY_KEYS, RESULT

GiB = 2**30
ADAPTER_BYTES_PER_PARAM = 4  # LoRA A/B matrices are trained in float32: 4 bytes/param

# Natural order of each axis' values in tables and plots; unknown values sort after, by name.
ORDER = {
    "quant": ["bf16", "int8", "nf4", "fp4"],
    "quant_label": ["bf16", "int8", "nf4", "nf4+DQ", "fp4", "fp4+DQ"],
    "dq": ["off", "on"],
    "optim": ["adamw", "paged_adamw_32bit", "adamw_8bit", "paged_adamw_8bit"],
    "adapter": ["qv", "all_linear"],
}
# Keys that define a comparability group (besides hardware): column -> dotted config key.
GROUP_KEYS = {
    "model": "model.name",
    "data": "data.name",
    "max_seq_len": "data.max_seq_len",
    "pad_to": "data.pad_to",
    "batch_size": "train.batch_size",
    "steps": "train.steps",
}
# Config keys that are the ablation axes (they vary *inside* a group) or don't change what a
# run measures; every other config key must match for runs to share a group.
AXIS_CONFIG_KEYS = ("quant.type", "quant.double_quant", "optim.name", "adapter.targets", "seed")
VERSIONS = ("python", "torch", "transformers", "peft", "bitsandbytes", "cuda")


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


METRICS = (
    Metric("peak_gib", "peak_bytes", GiB, "peak mem (GiB)", 2, delta=True, tested=True),
    Metric("torch_peak_gib", "peak_allocated_bytes", GiB, "torch peak alloc (GiB)", 2),
    Metric("weights_gib", "weight_bytes", GiB, "weights (GiB)", 2, delta=True),
    Metric("tok_s", "tokens_per_s", 1, "tok/s [95% CI]", 0, delta=True, tested=True),
    Metric("train_loss_final", "train_loss_final", 1, "final train loss", 4, tested=True),
    Metric("eval_loss", "eval_loss", 1, "eval loss", 4, delta=True, tested=True),
    Metric("eval_ppl", "eval_perplexity", 1, "eval ppl", 1),
    Metric("trainable_m", "trainable_params", 1e6, "trainable params (M)", 1),
)
METRIC = {m.name: m for m in METRICS}
# Metric keys the report reads; a run without one (CPU: no torch.cuda or NVML peaks; an oom or
# failed run: no throughput or loss) gets NaN, so every frame has every column.
READ_METRICS = ("weight_bytes", "quantized_weight_bytes", "quant_state_bytes", "unquantized_weight_bytes",
                "weight_bytes_after_prepare", "trainable_params", "total_params", "peak_allocated_bytes",
                "peak_reserved_bytes", "nvml_peak_device_used_bytes", "rss_peak_bytes", "optimizer_state_bytes",
                "tokens_per_s", "step_time_mean_s", "train_loss_first", "train_loss_final", "eval_loss",
                "eval_perplexity")


def rank(column: str, value) -> tuple:
    order = ORDER.get(column, [])
    return (order.index(value), "") if value in order else (len(order), str(value))


def quant_label(quant: str, double_quant: bool) -> str:
    return f"{quant}+DQ" if double_quant else quant


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


def _residual_config(config: dict) -> dict:
    """The config keys that must match inside a group and are not named in GROUP_KEYS."""
    skip = (*NON_IDENTITY_KEYS, *AXIS_CONFIG_KEYS, *GROUP_KEYS.values())
    return {k: v for k, v in flatten(config).items()
            if not any(k == s or k.startswith(s + ".") for s in skip)}


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _row(r: dict, rel: str) -> dict:
    axes, m, env = r.get("axes") or {}, r.get("metrics") or {}, r.get("env") or {}
    cfg = r.get("config") or {}
    flat = flatten(cfg)
    error = r.get("error") or {}
    row = {
        "run_id": r.get("run_id") or Path(rel).name,
        "sweep": r.get("sweep"),
        "status": r.get("status") or "failed",
        "error_type": error.get("type"),
        "error_message": ((error.get("message") or "").strip().splitlines() or [None])[0],
        "model": axes.get("model", flat.get("model.name")),
        "quant": axes.get("quant"),
        "double_quant": bool(axes.get("double_quant")),
        "optim": axes.get("optim"),
        "adapter": axes.get("adapter"),
        "seed": axes.get("seed", r.get("seed")),
    }
    row["quant_label"] = quant_label(row["quant"], row["double_quant"])
    row["dq"] = "on" if row["double_quant"] else "off"
    for col, key in GROUP_KEYS.items():
        if col != "model":
            row[col] = flat.get(key)
    row["hardware"] = env.get("gpu") or f"CPU: {env.get('cpu') or 'unknown'}"
    row["config_rest"] = json.dumps(_residual_config(cfg), sort_keys=True, default=str)
    row.update(_derived(m))
    for k, v in sorted(m.items()):
        if isinstance(v, list):
            v = "+".join(map(str, v))
        row.setdefault(k, v)
    for k in ("gpu", "gpu_count", "driver", "cpu", *VERSIONS):
        row[f"env_{k}"] = env.get(k)
    row.update(git_commit=r.get("git_commit"), started_at=r.get("started_at"), path=rel,
               wandb=bool(flat.get("tracker.wandb")), wandb_mode=flat.get("tracker.wandb_mode"),
               wandb_project=flat.get("tracker.wandb_project"), wandb_entity=flat.get("tracker.wandb_entity"))
    return row


def _derived(m: dict) -> dict:
    """Columns computed from one run's metrics (named here so every consumer agrees)."""
    out = {"peak_bytes": math.nan, "peak_source": None}
    # device-level NVML sees the CUDA context and paged optimizers' managed memory; torch's
    # counters see neither; a CPU run has only the process RSS
    for key, source in (("nvml_peak_device_used_bytes", "NVML device used"),
                        ("peak_allocated_bytes", "torch peak allocated"), ("rss_peak_bytes", "process RSS")):
        if math.isfinite(_num(m.get(key))) and m.get(key):
            out.update(peak_bytes=float(m[key]), peak_source=source)
            break
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
    # per step = tokens_per_s * step_time_mean_s (4 seq * 512 tok = 2,048 when padded)
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
            rows.append(_row(json.loads(path.read_text()), rel))
        except (OSError, ValueError, AttributeError, TypeError) as e:
            warnings.warn(f"skipping unreadable {path}: {e}")
            unreadable.append(str(path.relative_to(root)))
    df = pd.DataFrame(rows)
    df.attrs["unreadable"] = unreadable
    if df.empty:
        return df
    for col in READ_METRICS:
        if col not in df:
            df[col] = math.nan
    df = assign_groups(df)
    keys = df.apply(lambda r: (r["group"], rank("quant", r["quant"]), r["double_quant"], rank("optim", r["optim"]),
                               rank("adapter", r["adapter"]), str(r["seed"]), r["run_id"]), axis=1)
    df = df.iloc[sorted(range(len(df)), key=lambda i: keys.iloc[i])].reset_index(drop=True)
    df.attrs["unreadable"] = unreadable
    return df


def assign_groups(df: pd.DataFrame) -> pd.DataFrame:
    """Group = same GROUP_KEYS, hardware and residual config. Groups are numbered 1.. in the
    order of their keys; a label names the GROUP_KEYS values and, where groups share them,
    the residual keys that tell them apart."""
    cols = [*GROUP_KEYS, "hardware", "config_rest"]
    keyed = df[cols].astype(str).agg("\x1f".join, axis=1)
    distinct = sorted(set(keyed))
    df = df.copy()
    df["group"] = keyed.map({k: i + 1 for i, k in enumerate(distinct)})
    rests = {g: json.loads(df.loc[df.group == g, "config_rest"].iloc[0]) for g in df.group.unique()}
    differing = sorted({k for a in rests.values() for b in rests.values() for k in set(a) | set(b)
                        if a.get(k) != b.get(k)})
    labels = {}
    for g, rest in rests.items():
        r = df[df.group == g].iloc[0]
        label = (f"{r.model} · {r.data} · seq {r.max_seq_len} (pad {r.pad_to}) · batch {r.batch_size} · "
                 f"{r.steps} steps · {r.hardware}")
        extra = [f"{k}={rest.get(k)}" for k in differing]
        labels[g] = label + (" · " + ", ".join(extra) if extra else "")
    df["group_label"] = df.group.map(labels)
    return df


def differing_keys(df: pd.DataFrame) -> list[str]:
    """Which group-defining keys take more than one value across the groups of `df`."""
    out = [k for k in [*GROUP_KEYS, "hardware"] if df[k].astype(str).nunique() > 1]
    rests = [json.loads(s) for s in df.config_rest.unique()]
    out += sorted({k for a in rests for b in rests for k in set(a) | set(b) if a.get(k) != b.get(k)})
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
