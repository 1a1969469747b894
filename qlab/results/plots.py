"""Plots of one comparability group (matplotlib, Agg backend), each written as PNG and SVG.

One colour per quantization type in every plot (`QUANT_COLORS`, defined once); double
quantization is the same colour with hatching (bars), a dashed line (curves) or a hollow
marker (scatter). Each function returns its caption, which says how its numbers are derived.
SVGs carry no date and a fixed hash salt, so regenerating them from the same results gives
the same files.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from qlab.config import BLOCK_SEP, FORM_SEP  # noqa: E402
from qlab.results.frame import GiB, peak_sources, rank  # noqa: E402

# Okabe-Ito colours (colour-blind safe); bf16, the unquantized baseline, in neutral grey.
QUANT_COLORS = {"bf16": "#555555", "int8": "#E69F00", "nf4": "#0072B2", "fp4": "#D55E00",
                "torchao nf4": "#56B4E9", "hqq int4": "#009E73"}  # other backends (frame's `quant`)
OTHER_COLOR = "#999999"
DQ_HATCH = "///"
# Memory segments, in stacking order (Paul Tol's muted palette: distinct from QUANT_COLORS).
SEGMENTS = (
    ("quantized weights", "quantized_weight_bytes", "#332288"),
    ("quantization constants", "quant_state_bytes", "#88CCEE"),
    ("non-quantized weights", "nonquantized_bytes", "#44AA99"),
    ("LoRA adapter (fp32)", "adapter_bytes", "#CC6677"),
    ("optimizer state", "optimizer_state_bytes", "#DDCC77"),
    ("activations, gradients, other", None, "#DDDDDD"),
)
ADAPTER_MARKERS = {"all_linear": "o", "qv": "s"}
OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 7}  # legends beside the axes
# svg.fonttype none: text stays text in the SVG (a third of the size, searchable)
plt.rcParams.update({"svg.hashsalt": "qlab", "svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10,
                     "axes.grid": True, "grid.alpha": 0.3, "axes.axisbelow": True})


def color(quant: str) -> str:
    """A weight format's colour; another block size (nf4/b128) keeps its format's."""
    return QUANT_COLORS.get(quant, QUANT_COLORS.get(str(quant).partition(BLOCK_SEP)[0], OTHER_COLOR))


def label(row, varying: list[str]) -> str:
    """A configuration's name from the axes that vary in the group (quant label always)."""
    return "  ".join(str(row[c]) for c in ["quant_label", *[c for c in ("optim", "adapter") if c in varying]])


def save(fig, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(stem.with_suffix(".png"), dpi=150, bbox_inches="tight")
    fig.savefig(stem.with_suffix(".svg"), bbox_inches="tight", metadata={"Date": None})  # no date: same bytes again
    plt.close(fig)


def _quant_legend(arms: pd.DataFrame) -> list:
    present = [q for q in QUANT_COLORS if q in set(arms.quant)] + sorted(set(arms.quant) - set(QUANT_COLORS))
    handles = [Patch(facecolor=color(q), label=q) for q in present]
    if (arms.dq == "on").any():
        handles.append(Patch(facecolor="white", edgecolor="black", hatch=DQ_HATCH, label="+DQ (double quant)"))
    return handles


def _mean_err(arms: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """An arms column `metric` and errorbar's xerr from `<metric>_ci95_low` / `_high`: the distances
    below and above the mean (0 where unknown)."""
    mean = arms[metric].to_numpy(float)
    lo, hi = (arms.get(f"{metric}_ci95_{end}", pd.Series(np.nan, index=arms.index)).to_numpy(float)
              for end in ("low", "high"))
    return mean, np.nan_to_num(np.abs(np.vstack([mean - lo, hi - mean])))


def _barh_frame(n: int, width: float = 7.5):
    """A figure for n horizontal bars, the first at the top, and their y positions."""
    fig, ax = plt.subplots(figsize=(width, 0.8 + 0.3 * n))
    ax.invert_yaxis()
    return fig, ax, np.arange(n)


def memory_breakdown(runs: pd.DataFrame, arms: pd.DataFrame, varying: list[str], stem: Path) -> str:
    ok = runs[runs.status == "ok"]
    cols = [c for _, c, _ in SEGMENTS if c] + ["peak_bytes", "peak_allocated_bytes"]
    keys = ["quant_label", "optim", "adapter"]  # per-arm means of the ok runs, in the arms' order
    means = ok.groupby(keys)[cols].mean().reindex(pd.MultiIndex.from_frame(arms[keys])).reset_index(drop=True) / GiB
    fig, ax, y = _barh_frame(len(arms), 8.5)
    left = np.zeros(len(arms))
    for name, col, c in SEGMENTS:
        if col is None:  # what the peak holds beyond the listed parts
            width = np.clip(means.peak_bytes.to_numpy() - left, 0, None)
        else:
            width = means[col].fillna(0).to_numpy()
        ax.barh(y, width, left=left, color=c, edgecolor="white", linewidth=0.4, label=name,
                hatch="..." if col is None else None)
        left = left + width
    torch_peak = means.peak_allocated_bytes.to_numpy()
    if np.isfinite(torch_peak).any() and (runs.peak_source != "torch peak allocated").any():
        ax.plot(torch_peak, y, "|", color="black", markersize=12, mew=1.5, label="torch peak allocated")
    ax.set_yticks(y, [label(r, varying) + ("  (no ok run)" if r.n == 0 else "") for _, r in arms.iterrows()])
    for tick, q in zip(ax.get_yticklabels(), arms.quant):
        tick.set_color(color(q))
    ax.set_xlabel("memory (GiB)")
    source = peak_sources(runs)
    ax.set_title(f"Peak memory breakdown per configuration (peak: {source})")
    ax.legend(**OUTSIDE)
    save(fig, stem)
    return ("Peak memory per configuration, split into: quantized weights (`quantized_weight_bytes`), "
            "quantization constants (absmax/scales, `quant_state_bytes`), non-quantized weights (embeddings, "
            "norms, head; after k-bit preparation casts them to float32: `weight_bytes_after_prepare` - "
            "quantized - constants), LoRA adapter (`trainable_params` x 4 bytes, float32), optimizer state "
            "(`optimizer_state_bytes`; paged optimizers keep it in CUDA managed memory), and the rest up to "
            f"the peak ({source}): activations, gradients, CUDA context, allocator cache and other. The black "
            "tick marks torch's peak allocated bytes, which do not see managed memory or the CUDA context. "
            "Tick labels are coloured by quantization type; means over seeds.")


def throughput(arms: pd.DataFrame, varying: list[str], stem: Path) -> str:
    fig, ax, y = _barh_frame(len(arms))
    mean, err = _mean_err(arms, "tok_s")
    ax.barh(y, np.nan_to_num(mean), color=[color(q) for q in arms.quant],
            hatch=[DQ_HATCH if d == "on" else None for d in arms.dq], edgecolor="white", linewidth=0.4)
    ax.errorbar(mean, y, xerr=err, fmt="none", ecolor="black", capsize=2, lw=0.8)
    ax.set_yticks(y, [label(r, varying) for _, r in arms.iterrows()])
    ax.set_xlabel("throughput (tok/s, padded tokens, warm-up excluded)")
    ax.set_title("Training throughput per configuration (95% CI)")
    ax.legend(handles=_quant_legend(arms), **OUTSIDE)
    save(fig, stem)
    return ("Training throughput (`tokens_per_s`: tokens of the measured steps / their device-synchronized "
            "time). Error bars: 95% CI, bootstrap across seeds where n >= 2, otherwise the run's own "
            "t-interval of the mean step time over its measured steps.")


def eval_loss(arms: pd.DataFrame, varying: list[str], stem: Path) -> str:
    fig, ax, y = _barh_frame(len(arms))
    mean, err = _mean_err(arms, "eval_loss")
    for i, r in arms.iterrows():
        ax.errorbar(mean[i], y[i], xerr=err[:, i:i + 1], fmt="o", color=color(r.quant),
                    mfc="white" if r.dq == "on" else color(r.quant), capsize=2, ms=6)
    ax.set_yticks(y, [label(r, varying) for _, r in arms.iterrows()])
    ax.set_xlabel("eval loss (cross-entropy on target tokens, nats/token)")
    ax.set_title("Held-out eval loss per configuration")
    handles = [Line2D([], [], marker="o", ls="", color=color(q), label=q) for q in QUANT_COLORS if q in set(arms.quant)]
    if (arms.dq == "on").any():
        handles.append(Line2D([], [], marker="o", ls="", color="black", mfc="white", label="+DQ (hollow)"))
    ax.legend(handles=handles, **OUTSIDE)
    save(fig, stem)
    return ("Eval loss after training (mean over seeds; error bars: bootstrap 95% CI across seeds where n >= 2). "
            "Hollow markers: double quantization.")


def loss_curves(runs: pd.DataFrame, curves: pd.DataFrame, varying: list[str], stem: Path,
                title: str = "Train loss per step (metrics.jsonl)") -> str:
    panels_by = [c for c in ("optim", "adapter") if c in varying]
    data = curves.merge(runs[["run_id", "quant", "quant_label", "dq", "optim", "adapter"]], on="run_id")
    panels = [((), data)] if not panels_by else sorted(
        data.groupby(panels_by), key=lambda kv: [rank(c, v) for c, v in zip(panels_by, kv[0])])
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows), sharey=True, squeeze=False)
    for ax, (key, d) in zip(axes.flat, panels):
        for (ql, q, dq), dd in d.groupby(["quant_label", "quant", "dq"], sort=False):
            style = dict(color=color(q), ls="--" if dq == "on" else "-")
            if dd.run_id.nunique() > 1:
                for _, one in dd.groupby("run_id"):
                    ax.plot(one.step, one.loss, lw=0.5, alpha=0.3, **style)
            mean = dd.groupby("step").loss.mean()
            ax.plot(mean.index, mean.values, lw=1.4, label=ql, **style)
        key = key if isinstance(key, tuple) else (key,)
        ax.set_title(", ".join(f"{c}={v}" for c, v in zip(panels_by, key)) or "all configurations")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("train loss (nats/token)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    save(fig, stem)
    return ("Train loss at every step from each run's metrics.jsonl, one panel per optimizer/adapter setting; "
            "thick lines are the mean over seeds (thin lines: single seeds, where there are several); "
            "dashed: double quantization.")


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.Series:
    """True for the points no other point beats on both x and y (lower is better for both)."""
    order = points.sort_values([x, y]).index
    best, front = math.inf, pd.Series(False, index=points.index)
    for i in order:
        if points.at[i, y] < best:
            front[i], best = True, points.at[i, y]
    return front


def memory_vs_quality(arms: pd.DataFrame, varying: list[str], stem: Path) -> str:
    pts = arms.dropna(subset=["peak_gib", "eval_loss"])
    front = pareto_front(pts, "peak_gib", "eval_loss") if len(pts) else pd.Series(dtype=bool)
    f = pts[front].sort_values(["peak_gib", "eval_loss"])
    fig, ax = plt.subplots(figsize=(7.5, 5.2 + 0.16 * len(f)))
    if len(f):  # the front: a staircase and a black ring behind each of its points
        ax.step(f.peak_gib, f.eval_loss, where="post", color="black", lw=1, alpha=0.5, zorder=2)
        ax.scatter(f.peak_gib, f.eval_loss, s=190, facecolors="none", edgecolors="black", lw=1.3, zorder=2)
    for _, r in pts.iterrows():
        c = color(r.quant)
        marker = ADAPTER_MARKERS.get(str(r.adapter).partition(FORM_SEP)[0], "^")  # by targets: all_linear+loftq o
        ax.scatter(r.peak_gib, r.eval_loss, marker=marker, s=55, zorder=3,
                   facecolors="white" if r.dq == "on" else c, edgecolors=c, linewidths=1.5)
    listing = []
    for k, (_, r) in enumerate(f.iterrows(), start=1):  # numbers on the plot, names below it
        ax.annotate(str(k), (r.peak_gib, r.eval_loss), textcoords="offset points", xytext=(7, 5 + 7 * (k % 2)),
                    fontsize=8, fontweight="bold")
        listing.append(f"{k}: {label(r, varying)}  ({r.peak_gib:.2f} GiB, eval loss {r.eval_loss:.4f})")
    ax.set_xlabel("peak memory (GiB)")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title("Memory vs quality (lower-left is better)")
    handles = [Line2D([], [], marker="o", ls="", color=color(q), label=q) for q in QUANT_COLORS if q in set(pts.quant)]
    handles += [Line2D([], [], marker=m, ls="", color="black", mfc="none", label=f"adapter {a}")
                for a, m in ADAPTER_MARKERS.items() if a in {str(x).partition(FORM_SEP)[0] for x in pts.adapter}]
    if (pts.dq == "on").any():
        handles.append(Line2D([], [], marker="o", ls="", color="grey", mfc="white", label="+DQ (hollow)"))
    handles.append(Line2D([], [], marker="o", ls="-", color="black", mfc="none", ms=10, lw=1, alpha=0.7,
                          label="Pareto front"))
    ax.legend(handles=handles, fontsize=7, loc="best")
    if listing:
        fig.text(0.01, 0.0, "Pareto front:\n" + "\n".join(listing), fontsize=7, va="top", family="monospace")
    save(fig, stem)
    return ("Peak memory (same figure as the tables) against eval loss, one point per configuration (means over "
            "seeds). The Pareto front, the configurations that no other one beats on both, is ringed in black, "
            "joined by a staircase and numbered; the numbers are named under the plot.")


def all_plots(runs: pd.DataFrame, arms: pd.DataFrame, curves: pd.DataFrame, varying: list[str], out: Path,
              quality: bool = True) -> dict:
    """Every plot of one group into `out`; returns {name: caption}. quality=False (random weights):
    no eval-loss or memory-vs-quality plot, and the loss curves labelled as training only."""
    made = {"memory_breakdown": memory_breakdown(runs, arms, varying, out / "memory_breakdown"),
            "throughput": throughput(arms, varying, out / "throughput")}
    if not quality:
        made["loss_curves"] = "Random weights: these curves show that training ran, not quality. " + loss_curves(
            runs, curves, varying, out / "loss_curves", "Train loss per step: random weights, not quality")
        return made
    made["loss_curves"] = loss_curves(runs, curves, varying, out / "loss_curves")
    made["eval_loss"] = eval_loss(arms, varying, out / "eval_loss")
    made["memory_vs_quality"] = memory_vs_quality(arms, varying, out / "memory_vs_quality")
    return made


def generation(table: pd.DataFrame, batch_sizes: list[int], stem: Path) -> str:
    """The plot of one generation group. Left: time to first token at batch 1; right: decode
    tokens/s per batch size; one bar per quantization setting x adapter, coloured by quantization
    type, hatched for DQ."""
    rows = table.reset_index(drop=True)
    names = [f"{r.quant_label}  {r.adapter}" for _, r in rows.iterrows()]
    y = np.arange(len(rows))
    panels = [("ttft_ms", "time to first token, batch 1 (ms)")] + [
        (f"decode_tok_s_b{b}", f"decode tok/s, batch {b}") for b in batch_sizes]
    panels = [(c, t) for c, t in panels if c in rows and rows[c].notna().any()]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.4 * max(1, len(panels)) + 1.5, 0.9 + 0.32 * len(rows)),
                             sharey=True, squeeze=False)
    for ax, (col, title) in zip(axes.flat, panels):
        mean, err = _mean_err(rows, col)
        ax.barh(y, np.nan_to_num(mean), color=[color(q) for q in rows.quant],
                hatch=[DQ_HATCH if d == "on" else None for d in rows.dq], edgecolor="white", linewidth=0.4)
        ax.errorbar(np.nan_to_num(mean), y, xerr=err, fmt="none", ecolor="black", capsize=2, lw=0.8)
        ax.set_title(title)
    axes.flat[0].set_yticks(y, names)
    axes.flat[0].invert_yaxis()
    for tick, q in zip(axes.flat[0].get_yticklabels(), rows.quant):
        tick.set_color(color(q))
    axes.flat[-1].legend(handles=_quant_legend(rows), **OUTSIDE)
    fig.suptitle("Generation per quantization type (greedy; error bars: 95% CI)")
    fig.tight_layout()
    save(fig, stem)
    return ("Left: time to first token at batch 1 (generate with max_new_tokens=1: prefill + one token). Right: decode "
            "throughput per batch size, B (N - 1) / (T_N - T_1) tokens/s (the tokens after each sequence's first, "
            "over the time after the first token). Bars: the run's median over its timed calls; error bars: the 95% "
            "t-interval of the mean over those calls (bootstrap across runs where a row has several). Colour: "
            "quantization type; hatched: double quantization.")
