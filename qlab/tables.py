"""Ablation tables of one comparability group: one per axis plus the full grid, each written
as Markdown, LaTeX (booktabs) and CSV.

An *arm* is one configuration (quant + DQ, optimizer, adapter) aggregated over its seeds: the
mean of its ok runs and a 95% CI (bootstrap across seeds where n >= 2; for throughput with a
single run, the run's own interval over its measured steps). An axis table lists, for every
*context* (the values of the other axes) in which that axis takes at least two values, each
arm with its % change vs the baseline arm of the same context. The CSV holds the numbers, the
Markdown and LaTeX the same numbers formatted.

Generation results (kind "generate", qlab.generate_bench) get one table instead: one row per
quantization setting x adapter (none | lora), with load time, weights, peak memory, time to
first token and decode / end-to-end throughput per batch size (`frame.generation_metrics`),
and the % change vs the baseline quantization (bf16) with the same adapter setting.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qlab.frame import METRICS, Metric, generation_metrics, rank
from qlab.stats import bootstrap_ci

CONFIG = ["quant_label", "quant", "dq", "optim", "adapter"]


@dataclass(frozen=True)
class Axis:
    key: str  # file name and CLI name (--baseline optim=adamw)
    column: str  # the arms' column
    title: str
    context: tuple[str, ...]  # the other axes, held equal inside a comparison
    baseline: str


AXES = (
    Axis("quant", "quant_label", "Quantization type (with double quantization)", ("optim", "adapter"), "bf16"),
    Axis("double_quant", "dq", "Double quantization on/off", ("quant", "optim", "adapter"), "off"),
    Axis("optim", "optim", "Optimizer", ("quant_label", "adapter"), "adamw"),
    Axis("adapter", "adapter", "LoRA adapter targets", ("quant_label", "optim"), "qv"),
)
HEADERS = {"quant_label": "quant", "quant": "quant", "dq": "DQ", "optim": "optimizer", "adapter": "adapter"}
# The generation table compares quantization settings with the same adapter setting.
GENERATION = Axis("generation", "quant_label", "Generation speed and memory per quantization type",
                  ("adapter",), "bf16")


def _status_summary(statuses: pd.Series) -> str:
    counts = statuses.value_counts()
    return ", ".join(f"{counts[s]} {s}" for s in sorted(counts.index, key=lambda s: (s != "ok", s)))


def arms(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration of one group: n ok runs, status summary, and for each metric
    its mean and 95% CI (columns <metric>, <metric>_ci95_low, <metric>_ci95_high)."""
    rows = []
    for cfg, g in runs.groupby(CONFIG, sort=False):
        ok = g[g.status == "ok"]
        row = {**dict(zip(CONFIG, cfg)), "n": len(ok), "runs": _status_summary(g.status)}
        for m in METRICS:
            vals = (ok[m.source].astype(float) / m.scale).dropna().to_numpy()
            row[m.name] = vals.mean() if len(vals) else math.nan
            lo, hi = bootstrap_ci(vals)
            if len(vals) == 1 and m.name == "tok_s":
                lo, hi = ok.tokens_per_s_run_ci95_low.iloc[0], ok.tokens_per_s_run_ci95_high.iloc[0]
            row[f"{m.name}_ci95_low"], row[f"{m.name}_ci95_high"] = lo, hi
        rows.append(row)
    df = pd.DataFrame(rows)
    order = df.apply(lambda r: [rank(c, r[c]) for c in ("quant_label", "optim", "adapter")], axis=1)
    return df.iloc[sorted(range(len(df)), key=lambda i: order.iloc[i])].reset_index(drop=True)


def choose_baseline(values, axis: Axis, requested: str | None) -> str:
    """The requested baseline if present, else the axis' default, else its first value."""
    present = list(values)
    if requested is not None and requested not in present:
        warnings.warn(f"baseline {axis.key}={requested} is not among {sorted(map(str, present))}; using the default")
    for candidate in (requested, axis.baseline):
        if candidate in present:
            return candidate
    return sorted(present, key=lambda v: rank(axis.column, v))[0]


def axis_table(arm_df: pd.DataFrame, axis: Axis, requested: str | None = None):
    """(numeric table, baseline, fixed context) or None when the axis never takes two values
    in one context. Contexts that do not vary in the group are dropped from the columns and
    returned in `fixed` (e.g. {"optim": "paged_adamw_32bit"})."""
    ctx = [c for c in axis.context if arm_df[c].nunique() > 1]
    fixed = {c: arm_df[c].iloc[0] for c in axis.context if c not in ctx}
    blocks = [arm_df] if not ctx else [g for _, g in arm_df.groupby(ctx, sort=False)]
    blocks = [b for b in blocks if b[axis.column].nunique() > 1]
    if not blocks:
        return None
    baseline = choose_baseline(pd.concat(blocks)[axis.column].unique(), axis, requested)
    out = []
    for block in blocks:
        block = block.iloc[sorted(range(len(block)), key=lambda i: rank(axis.column, block[axis.column].iloc[i]))]
        base = block[block[axis.column] == baseline]
        block = block.copy()
        for m in METRICS:
            if m.delta:
                ref = base[m.name].iloc[0] if len(base) else math.nan
                # % change vs the baseline arm of the same context: 100 * (arm - base) / base
                block[f"{m.name}_delta_pct"] = (block[m.name] - ref) / ref * 100 if ref else math.nan
        block["is_baseline"] = block[axis.column] == baseline
        out.append(block)
    table = pd.concat(out).reset_index(drop=True)
    metric_cols = [c for m in METRICS for c in (m.name, f"{m.name}_ci95_low", f"{m.name}_ci95_high",
                                                f"{m.name}_delta_pct") if c in table]
    return table[[*ctx, axis.column, "n", "runs", "is_baseline", *metric_cols]], baseline, fixed


def grid_table(arm_df: pd.DataFrame) -> pd.DataFrame:
    metric_cols = [c for m in METRICS for c in (m.name, f"{m.name}_ci95_low", f"{m.name}_ci95_high")]
    return arm_df[["quant_label", "optim", "adapter", "n", "runs", *metric_cols]]


# ---------------------------------------------------------------- generation results

GEN_CONFIG = ["quant_label", "quant", "dq", "adapter", "adapter_run"]


def generation_arms(runs: pd.DataFrame, metrics: tuple[Metric, ...]) -> pd.DataFrame:
    """One row per quantization setting x adapter of one generation group: n ok runs, status
    summary, and per metric the mean over its ok runs with a 95% CI (bootstrap across runs
    where n >= 2; with one run, that run's own interval over its timed calls)."""
    rows = []
    runs = runs.assign(adapter_run=runs.adapter_run.fillna("").astype(str))
    for cfg, g in runs.groupby(GEN_CONFIG, sort=False):
        ok = g[g.status == "ok"]
        row = {**dict(zip(GEN_CONFIG, cfg)), "n": len(ok), "runs": _status_summary(g.status)}
        for m in metrics:
            vals = (ok[m.source].astype(float) / m.scale).dropna().to_numpy() if m.source in ok else np.array([])
            row[m.name] = vals.mean() if len(vals) else math.nan
            lo, hi = bootstrap_ci(vals)
            if len(vals) == 1 and m.run_ci and all(c in ok for c in m.run_ci):
                one = ok[ok[m.source].notna()].iloc[0]
                lo, hi = (float(one[c]) / m.scale for c in m.run_ci)
            row[f"{m.name}_ci95_low"], row[f"{m.name}_ci95_high"] = lo, hi
        rows.append(row)
    df = pd.DataFrame(rows)
    if len({r for r in df.adapter_run if r}) > 1:  # several adapters in one group: name each one's run
        df["adapter"] = [a if not r else f"{a} ({r})" for a, r in zip(df.adapter, df.adapter_run)]
    order = df.apply(lambda r: (rank("adapter", r.adapter.split(" ")[0]), r.adapter_run,
                                rank("quant_label", r.quant_label)), axis=1)
    return df.iloc[sorted(range(len(df)), key=lambda i: order.iloc[i])].reset_index(drop=True)


def generation_table(arm_df: pd.DataFrame, metrics: tuple[Metric, ...], requested: str | None = None):
    """(numeric table, baseline): the arms with their % change vs the baseline quantization
    of the same adapter setting (100 (arm - base) / base; no change where the setting has no
    baseline arm). Metrics no run holds (torch's peak on a CPU) are left out."""
    axis = GENERATION
    baseline = choose_baseline(arm_df.quant_label.unique(), axis, requested)
    out = []
    for _, block in arm_df.groupby(["adapter"], sort=False):
        base = block[block.quant_label == baseline]
        block = block.copy()
        for m in metrics:
            ref = base[m.name].iloc[0] if len(base) else math.nan
            block[f"{m.name}_delta_pct"] = (block[m.name] - ref) / ref * 100 if m.delta and ref else math.nan
        block["is_baseline"] = block.quant_label == baseline
        out.append(block)
    table = pd.concat(out).reset_index(drop=True)
    kept = tuple(m for m in metrics if table[m.name].notna().any())
    metric_cols = [c for m in kept for c in (m.name, f"{m.name}_ci95_low", f"{m.name}_ci95_high",
                                              f"{m.name}_delta_pct")]
    return table[["quant_label", "adapter", "adapter_run", "n", "runs", "is_baseline", *metric_cols]], baseline, kept


def generation_display(runs: pd.DataFrame, requested: str | None = None):
    """(numeric, formatted, baseline, metrics) of one generation group."""
    metrics = generation_metrics(runs)
    numeric, baseline, kept = generation_table(generation_arms(runs, metrics), metrics, requested)
    return numeric, display(numeric, ["quant_label", "adapter"], kept), baseline, kept


# ---------------------------------------------------------------- formatting

def _cell(row, m, with_delta: bool) -> str:
    mean = row[m.name]
    if not np.isfinite(mean):
        return "-"
    fmt = f",.{m.decimals}f"
    s = format(mean, fmt)
    lo, hi = row.get(f"{m.name}_ci95_low", math.nan), row.get(f"{m.name}_ci95_high", math.nan)
    if np.isfinite(lo) and np.isfinite(hi) and format(lo, fmt) != format(hi, fmt):
        s += f" [{lo:{fmt}}, {hi:{fmt}}]"
    delta = row.get(f"{m.name}_delta_pct", math.nan) if with_delta and not row.get("is_baseline") else math.nan
    if np.isfinite(delta):
        s += f" ({pct(delta)})"
    return s


def pct(delta: float) -> str:
    """+12.3% / -0.04%: two decimals below 1%, where small loss changes would all read +0.0%."""
    return f"{delta:+.1f}%" if abs(delta) >= 1 else f"{delta:+.2f}%"


def display(table: pd.DataFrame, leading: list[str], metrics=METRICS) -> pd.DataFrame:
    """The formatted table: leading (config) columns, runs, one text column per metric."""
    out = pd.DataFrame({HEADERS.get(c, c): table[c].astype(str) for c in leading})
    out["runs"] = table["runs"].values
    for m in metrics:
        out[m.header] = [_cell(r, m, m.delta) for _, r in table.iterrows()]
    return out


def to_markdown(disp: pd.DataFrame) -> str:
    align = ["left" if c in (*HEADERS.values(), "runs") else "right" for c in disp.columns]
    return disp.to_markdown(index=False, disable_numparse=True, colalign=align)


TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "·": r"$\cdot$",
               "Δ": r"$\Delta$", "±": r"$\pm$", "≥": r"$\geq$"}


def tex_escape(s: str) -> str:
    return "".join(TEX_SPECIAL.get(ch, ch) for ch in str(s))


def to_latex(disp: pd.DataFrame, caption: str, label: str) -> str:
    tex = disp.map(tex_escape)
    tex.columns = [tex_escape(c) for c in disp.columns]
    align = "".join("l" if c in (*HEADERS.values(), "runs") else "r" for c in disp.columns)
    return tex.to_latex(index=False, escape=False, column_format=align, caption=tex_escape(caption),
                        label=label, position="htbp")


def write(numeric: pd.DataFrame, disp: pd.DataFrame, stem: Path, title: str, notes: list[str]) -> dict:
    """<stem>.md, .tex, .csv; returns {format: path}."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {ext: stem.with_suffix(f".{ext}") for ext in ("md", "tex", "csv")}
    md = f"### {title}\n\n{to_markdown(disp)}\n\n" + "".join(f"{n}\n\n" for n in notes)
    paths["md"].write_text(md)
    paths["tex"].write_text(to_latex(disp, title + ". " + " ".join(notes), f"tab:{stem.name}"))
    numeric.to_csv(paths["csv"], index=False, float_format="%.10g")
    return paths
