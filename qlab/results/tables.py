"""Ablation tables of one comparability group: one per axis plus the full grid, each written
as Markdown, LaTeX (booktabs) and CSV (the numbers; Markdown and LaTeX show them formatted).

An *arm* is one configuration (quant + DQ, backend and block size; optimizer; adapter targets,
initialization and DoRA; speed path) aggregated over its seeds: the mean of its ok runs and a
95% CI. An axis table lists, for every *context* (the values of the other axes) in which that
axis takes at least two values, each arm with its % change vs the baseline arm of the same
context. The speed path is an axis too; quant labels name it (`nf4+DQ · fast`), as they name a
backend and block size (`hqq int4`, `nf4+DQ/b128`); adapter labels name an initialization and
DoRA (`all_linear+loftq`, `all_linear+DoRA`).

Generation and evaluation results get one table per group instead: one row per quantization
setting x adapter, with the % change vs bf16 with the same adapter setting. Comparisons
(task=compare) get their arms and pairs (`compare_tables`). `comparisons` tests each ablation
pair (`PAIRS`) across seeds for statistics.csv.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from qlab.results.frame import (GiB, METRICS, Metric, eval_metrics, generation_metrics, quality_metrics,
                                ok_comparisons, quant_label, rank, sort_rows, status_summary)
from qlab.results.stats import bootstrap_ci, compare, holm, overlap

CONFIG = ["quant_label", "quant", "dq", "optim", "adapter", "speed"]


@dataclass(frozen=True)
class Axis:
    key: str  # file name and CLI name (--baseline optim=adamw)
    column: str  # the arms' column
    title: str
    context: tuple[str, ...]  # the other axes, held equal inside a comparison
    baseline: str


AXES = (
    Axis("quant", "quant_label", "Quantization type (with double quantization)", ("optim", "adapter"), "bf16"),
    Axis("double_quant", "dq", "Double quantization on/off", ("quant", "optim", "adapter", "speed"), "off"),
    Axis("optim", "optim", "Optimizer", ("quant_label", "adapter"), "adamw"),
    Axis("adapter", "adapter", "LoRA adapter targets", ("quant_label", "optim"), "qv"),
    # baseline trainer where there is one, else the first present in ORDER["speed"]: the recipe
    Axis("speed", "speed", "Speed path (trainer: the HF Trainer loop; recipe; fast)",
         ("quant", "dq", "optim", "adapter"), "trainer"),
)
HEADERS = {"quant_label": "quant", "quant": "quant", "dq": "DQ", "optim": "optimizer", "adapter": "adapter",
           "speed": "speed", "model": "model", "arm": "arm", "runner": "runner", "pair": "pair",
           "verdict": "verdict", "run": "run", "stopped": "stopped"}
TEXT_COLUMNS = (*HEADERS.values(), "runs", "status", "largest kernel classes (ms)")  # aligned left; numbers right
# The generation table compares quantization settings with the same adapter setting.
GENERATION = Axis("generation", "quant_label", "Generation speed and memory per quantization type",
                  ("adapter",), "bf16")
EVAL = Axis("eval", "quant_label", "Evaluation (lm-evaluation-harness) per quantization type and adapter",
            ("adapter",), "bf16")


@dataclass(frozen=True)
class Pair:
    """Arm `a` vs arm `b` of `column`, matched on the `match` columns (same values in both)."""

    name: str
    column: str
    a: str
    b: str
    match: tuple[str, ...]


# The paged optimizer and the standard one it pages (same state, same precision).
PAGED_OF = {"paged_adamw_32bit": "adamw", "paged_adamw_8bit": "adamw_8bit"}
# `quant` is the weight format less DQ (nf4, nf4/b128, hqq int4, torchao nf4): pairs matched on it
# never pool two backends or block sizes
PAIRS = (
    Pair("NF4 vs FP4", "quant", "nf4", "fp4", ("dq", "optim", "adapter", "speed")),
    Pair("DQ on vs off", "dq", "on", "off", ("quant", "optim", "adapter", "speed")),
    *(Pair(f"{paged} vs {std} (paged vs standard)", "optim", paged, std, ("quant_label", "adapter"))
      for paged, std in PAGED_OF.items()),
    Pair("all_linear vs qv", "adapter", "all_linear", "qv", ("quant_label", "optim")),
    # other backends vs bitsandbytes at the same bits: torchao's NF4 (always DQ) vs nf4+DQ, HQQ's
    # int4 (a bf16 scale and zero per 64: 4.5 bits) vs nf4 (a float32 absmax per 64: 4.5 bits)
    Pair("torchao NF4 vs bitsandbytes NF4", "quant", "torchao nf4", "nf4", ("dq", "optim", "adapter", "speed")),
    Pair("HQQ int4 vs bitsandbytes NF4", "quant", "hqq int4", "nf4", ("dq", "optim", "adapter", "speed")),
    # an adapter's form vs peft's default LoRA on the same targets
    *(Pair(f"{targets}+{form} vs {targets}", "adapter", f"{targets}+{form}", targets, ("quant_label", "optim"))
      for targets in ("qv", "all_linear") for form in ("DoRA", "loftq", "pissa")),
)


def _arm_metrics(g: pd.DataFrame, metrics) -> dict:
    """n ok runs, status summary, and per metric the mean over the ok runs with a 95% CI: bootstrap
    across runs where n >= 2; with one run, its own interval (`run_ci`) where the metric has one."""
    ok = g[g.status == "ok"]
    row = {"n": len(ok), "runs": status_summary(g.status)}
    for m in metrics:
        vals = (ok[m.source].astype(float) / m.scale).dropna().to_numpy() if m.source in ok else np.array([])
        row[m.name] = vals.mean() if len(vals) else math.nan
        lo, hi = bootstrap_ci(vals)
        if len(vals) == 1 and m.run_ci and all(c in ok for c in m.run_ci):
            one = ok[ok[m.source].notna()].iloc[0]
            lo, hi = (float(one[c]) / m.scale for c in m.run_ci)
        row[f"{m.name}_ci95_low"], row[f"{m.name}_ci95_high"] = lo, hi
    return row


def _arm_rows(runs: pd.DataFrame, config: list[str], metrics) -> pd.DataFrame:
    return pd.DataFrame([{**dict(zip(config, cfg)), **_arm_metrics(g, metrics)}
                         for cfg, g in runs.groupby(config, sort=False)])


def _columns(m: Metric, delta: bool) -> tuple[str, ...]:
    """A metric's numeric columns: mean, 95% CI and, with `delta`, the % change."""
    return (m.name, f"{m.name}_ci95_low", f"{m.name}_ci95_high") + ((f"{m.name}_delta_pct",) if delta else ())


def arms(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration of one group (`_arm_metrics`: <metric>, <metric>_ci95_low, _ci95_high)."""
    return sort_rows(_arm_rows(runs, CONFIG, METRICS),
                     lambda r: [rank(c, r[c]) for c in ("quant_label", "optim", "adapter")])


def choose_baseline(values, axis: Axis, requested: str | None) -> str:
    """The requested baseline if present, else the axis' default, else its first value."""
    present = list(values)
    if requested is not None and requested not in present:
        warnings.warn(f"baseline {axis.key}={requested} is not among {sorted(map(str, present))}; using the default")
    for candidate in (requested, axis.baseline):
        if candidate in present:
            return candidate
    return sorted(present, key=lambda v: rank(axis.column, v))[0]


def axis_table(arm_df: pd.DataFrame, axis: Axis, requested: str | None = None, metrics=METRICS):
    """(numeric table, baseline, fixed context) or None when the axis never takes two values in one
    context. Context columns that do not vary in the group are left out and returned in `fixed`
    (e.g. {"optim": "paged_adamw_32bit"})."""
    ctx = [c for c in axis.context if arm_df[c].nunique() > 1]
    fixed = {c: arm_df[c].iloc[0] for c in axis.context if c not in ctx}
    blocks = [arm_df] if not ctx else [g for _, g in arm_df.groupby(ctx, sort=False)]
    blocks = [b for b in blocks if b[axis.column].nunique() > 1]
    if not blocks:
        return None
    baseline = choose_baseline(pd.concat(blocks)[axis.column].unique(), axis, requested)
    table = pd.concat([_vs_baseline(sort_rows(block, lambda r: rank(axis.column, r[axis.column])), axis.column,
                                    baseline, metrics) for block in blocks]).reset_index(drop=True)
    metric_cols = [c for m in metrics for c in _columns(m, m.delta) if c in table]
    return table[[*ctx, axis.column, "n", "runs", "is_baseline", *metric_cols]], baseline, fixed


def _vs_baseline(block: pd.DataFrame, column: str, baseline: str, metrics) -> pd.DataFrame:
    """The block's arms with is_baseline and each metric's % change vs the block's baseline arm,
    100 (arm - base) / base (NaN where m.delta is false or the block has no baseline arm)."""
    base = block[block[column] == baseline]
    block = block.copy()
    for m in metrics:
        ref = base[m.name].iloc[0] if len(base) else math.nan
        block[f"{m.name}_delta_pct"] = (block[m.name] - ref) / ref * 100 if m.delta and ref else math.nan
    block["is_baseline"] = block[column] == baseline
    return block


def grid_table(arm_df: pd.DataFrame, metrics=METRICS) -> pd.DataFrame:
    return arm_df[["quant_label", "optim", "adapter", "n", "runs", *[c for m in metrics for c in _columns(m, False)]]]


# ---------------------------------------------------------------- generation results

GEN_CONFIG = ["quant_label", "quant", "dq", "adapter", "adapter_run"]


def generation_arms(runs: pd.DataFrame, metrics: tuple[Metric, ...]) -> pd.DataFrame:
    """One row per quantization setting x adapter (and adapter run) of one generation or eval group;
    adapters whose training runs are known (`trained_arm`) by training arm, its seeds one row (their
    mean and 95% CI) named `<training sweep> <arm hash>, seeds 0, 1, ...`, and `trained on <quant>`
    where that was not the row's quantization. `block`: the rows whose quantizations are compared
    (one adapter, or one training arm's quantization arms)."""
    runs = runs.assign(adapter_run=runs.adapter_run.fillna("").astype(str), trained_on="")
    if "trained_arm" in runs and runs.trained_arm.notna().any():
        arm = runs.trained_arm.notna()
        seeds = runs[arm].groupby("trained_arm").seed.agg(lambda s: ", ".join(map(str, sorted(set(s)))))
        runs.loc[arm, "adapter_run"] = [f"{a}, seeds {seeds[a]}" for a in runs.trained_arm[arm]]
        runs.loc[arm, "trained_on"] = [t if t != q else ""
                                       for t, q in zip(runs.trained_quant[arm], runs.quant_label[arm])]
    df = _arm_rows(runs, [*GEN_CONFIG, "trained_on"], metrics)
    if len({r for r in df.adapter_run if r}) > 1:  # several adapters in one group: name each one's run
        df["adapter"] = [a if not r else f"{a} ({r})" for a, r in zip(df.adapter, df.adapter_run)]
    df["block"] = df.adapter
    df["adapter"] = [a if not t else f"{a}, trained on {t}" for a, t in zip(df.adapter, df.trained_on)]
    return sort_rows(df, lambda r: (rank("adapter", r.adapter.split(" ")[0]), r.adapter_run,
                                    rank("quant_label", r.quant_label)))


def generation_table(arm_df: pd.DataFrame, metrics: tuple[Metric, ...], requested: str | None = None,
                     axis: Axis = GENERATION):
    """(numeric table, baseline, metrics kept): the arms with their % change vs the baseline quantization
    of the same adapter setting. Metrics no run holds (torch's peak on a CPU) are left out."""
    baseline = choose_baseline(arm_df.quant_label.unique(), axis, requested)
    table = pd.concat([_vs_baseline(block, "quant_label", baseline, metrics)
                       for _, block in arm_df.groupby(["block"], sort=False)]).reset_index(drop=True)
    kept = tuple(m for m in metrics if table[m.name].notna().any())
    metric_cols = [c for m in kept for c in _columns(m, True)]
    return table[[*GEN_CONFIG, "n", "runs", "is_baseline", *metric_cols]], baseline, kept


def generation_display(runs: pd.DataFrame, requested: str | None = None):
    """(numeric, formatted, baseline, metrics) of one generation group."""
    metrics = generation_metrics(runs)
    numeric, baseline, kept = generation_table(generation_arms(runs, metrics), metrics, requested)
    return numeric, display(numeric, ["quant_label", "adapter"], kept), baseline, kept


def eval_display(runs: pd.DataFrame, requested: str | None = None):
    """(numeric, formatted, baseline, metrics) of one eval group: per task its main metric, mean [95% CI]
    ± the harness's standard error (% change vs the baseline)."""
    metrics = eval_metrics(runs)
    numeric, baseline, kept = generation_table(generation_arms(runs, metrics), metrics, requested, EVAL)
    mains = tuple(m for m in kept if not m.name.endswith("_stderr"))
    return numeric, display(numeric, ["quant_label", "adapter"], mains, stderr=True), baseline, mains


# ---------------------------------------------------------------- comparisons (task=compare)

COMPARISON = Axis("compare", "arm", "Speed comparison: interleaved rounds, paired ratios", (), "")


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def compare_tables(m: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A comparison's metrics (tasks/compare.summarize) as two formatted tables: the arms and the
    pairs (ratio [95% CI], half-width, rounds, verdict; the A/A control, then the pairs a failed arm
    left unmeasured, with the reason, last)."""
    arms = pd.DataFrame([{
        "arm": name, "status": a.get("status", "ok"), "runner": a["runner"],
        "quant": quant_label({"type": a["quant"], "double_quant": a["double_quant"], "backend": a.get("backend"),
                              "blocksize": a.get("blocksize")}),  # an arm from before the backend: bitsandbytes
        "speed": a["speed"],
        "optimizer": a["optim"], "tok/s": _num(a["tokens_per_s"], ",.0f"),
        "step ms (median)": _num(1e3 * (a["step_time_median_s"] or math.nan), ",.0f"),
        "GPU busy": _num(a.get("gpu_busy_fraction"), ".0%"),
        "kernels/step": _num(a.get("profile_kernel_launches_per_step"), ",.0f"), "MFU": _num(a.get("mfu"), ".1%"),
        "torch peak GiB": _num((a.get("peak_allocated_bytes") or math.nan) / GiB, ".2f"),
        "NVML GiB": _num((a.get("nvml_peak_process_bytes") or math.nan) / GiB, ".2f"),
    } for name, a in m["arms"].items()])
    rows = list(m.get("pairs", {}).items())
    if m.get("aa_control"):
        rows.append((f"{m['aa_control']['pair']} (A/A floor)", {**m["aa_control"], "verdict": (
            "covers 1" if m["aa_control"]["covers_1"] else "excludes 1: comparison not valid")}))
    pairs = pd.DataFrame([{"pair": name, "ratio [95% CI]": f"{p['ratio']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]",
                           "half-width": f"{p['half_width']:.1%}", "rounds": str(p["rounds"]), "verdict": p["verdict"]}
                          for name, p in rows], columns=["pair", "ratio [95% CI]", "half-width", "rounds", "verdict"])
    missing = [{"pair": name, "ratio [95% CI]": "not measured", "half-width": "-", "rounds": "-", "verdict": why}
               for name, why in m.get("pairs_not_measured", {}).items()]
    if missing:
        pairs = pd.concat([pairs, pd.DataFrame(missing, columns=pairs.columns)], ignore_index=True)
    return arms, pairs


AGREEMENT_NOTE = (
    "Each pair's ratio [95% CI] in every comparison of the report (each its own machine or call, oldest first) "
    "and where their intervals overlap (the highest lower end to the lowest upper end): comparisons of one "
    "pair measure the same ratio only where the intervals overlap.")


def compare_agreement(runs: pd.DataFrame) -> pd.DataFrame:
    """Every pair (the A/A control too) of the ok comparisons in `runs`: each comparison's ratio and
    95% interval ("-" where a comparison has no such pair) and where the intervals overlap (`overlap`;
    `overlap_low` > `overlap_high`: nowhere)."""
    by_pair: dict[str, dict] = {}
    comparisons = ok_comparisons(runs)
    for _, r in comparisons.iterrows():
        pairs = dict(r.pairs) if isinstance(r.get("pairs"), dict) else {}
        if isinstance(r.get("aa_control"), dict):
            pairs[f"{r.aa_control['pair']} (A/A floor)"] = r.aa_control
        for name, p in pairs.items():
            by_pair.setdefault(name, {})[r.run_id] = p
    rows = []
    for name, each in by_pair.items():
        lo, hi = overlap(p["ci95"] for p in each.values())
        rows.append({"pair": name, **{run: f"{p['ratio']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]"
                                      if (p := each.get(run)) else "-" for run in comparisons.run_id},
                     "comparisons": len(each), "overlap": f"[{lo:.3f}, {hi:.3f}]" if lo <= hi else "none",
                     "overlap_low": lo, "overlap_high": hi})
    return pd.DataFrame(rows)


COMPARE_NOTES = (
    "tok/s: positions processed (padding included) per second of device time, this machine's, pooled over the "
    "rounds; ratio: tokens/s of a over b within each round, geometric mean over rounds with a 95% t-interval "
    "on the log-ratios; half-width: the interval's relative half-width; no difference: the interval covers 1 or "
    "lies inside the A/A floor. GPU busy: kernel time per step (torch.profiler, after warm-up) over the mean "
    "step time; MFU: 6 N tokens/s over the card's dense bf16 peak (N: the base model's parameters). ")
# how the peaks were measured: arms in processes of their own (a worker's pid), or all in one (before them)
PEAK_NOTES = {True: "Each arm runs in a process of its own on the shared device. torch peak: its allocator's "
                    "peak allocated over the rounds; NVML: its process's GPU memory (CUDA context and allocator "
                    "reserve) at the ends of its blocks, the most of them (the reserve only grows; '-': not "
                    "recorded, where NVML hides a process's memory or the comparison predates it). Both are its "
                    "own, the device's total is not; isolated runs: conf/experiment/speed-peaks.yaml.",
              False: "Memory peaks of co-resident arms are not isolated: see the isolated runs "
                     "(conf/experiment/speed-peaks.yaml)."}


def compare_notes(arms) -> str:
    """COMPARE_NOTES with the peak note for `arms` (the arms' records of one or more comparisons)."""
    return COMPARE_NOTES + PEAK_NOTES[any("pid" in a for a in arms)]


def step_profile_table(m: dict) -> pd.DataFrame:
    """Where each profiled arm's step goes: its median step in the rounds, the kernels of its
    profiled steps (their three largest classes) and the rest, the time the GPU ran no kernel of it
    (Python, launches, the host). Kernel time counts kernels only (qlab/run/profiling.py)."""
    rows = []
    for name, a in m["arms"].items():
        kernel, step = a.get("profile_kernel_ms_per_step"), a.get("step_time_median_s")
        if kernel is None or not step:
            continue
        top = sorted((a.get("profile_kernel_ms_by_class") or {}).items(), key=lambda kv: -kv[1])[:3]
        rows.append({"arm": name, "step ms (median)": f"{1e3 * step:,.0f}", "kernels ms": f"{kernel:,.1f}",
                     "no kernel ms": f"{1e3 * step - kernel:,.0f}",
                     "largest kernel classes (ms)": ", ".join(f"{c} {ms:.1f}" for c, ms in top)})
    return pd.DataFrame(rows)


def compare_markdown(m: dict, machine: str) -> str:
    """compare.md: one comparison's setup line, arms and pairs, and where each profiled arm's step goes."""
    arms, pairs = compare_tables(m)
    reached = m.get("half_width_reached")
    lines = [f"# Speed comparison: {len(m['arms'])} arms, interleaved rounds", "", f"Measured on {machine}.", "",
             f"{m['rounds_completed']} rounds x {m['steps_per_round']} steps per arm; stopped: {m['stopped']} "
             f"(target half-width {m['target_half_width']:.0%}"
             + (f", reached {reached:.1%})." if reached is not None else ")."), "",
             to_markdown(arms), "", to_markdown(pairs) if len(pairs) else "No pair: fewer than two rounds.", ""]
    dropout = {a.get("lora_dropout") for a in m["arms"].values()} - {None}
    if len(dropout) == 1:
        lines += [f"LoRA dropout {dropout.pop():g} in every arm.", ""]
    lines += [f"- Arm {name} {a['status']} in {a['failed_in']}: {a['error']['type']}: {a['error']['message']}"
              for name, a in m["arms"].items() if a.get("status", "ok") != "ok"]
    if lines[-1] != "":
        lines.append("")
    profile = step_profile_table(m)
    if len(profile):
        lines += ["Where each arm's step goes: its median step in the rounds, the kernels of its profiled steps "
                  "and the rest, when the GPU ran none of its kernels (profile-<arm>.txt has the whole table).", "",
                  to_markdown(profile), ""]
    return "\n".join(lines + [compare_notes(m["arms"].values()), ""])


# ---------------------------------------------------------------- formatting

def _cell(row, m, with_delta: bool, stderr: bool = False) -> str:
    """mean [95% CI] (± the `<metric>_stderr` column, with `stderr`) (% change vs the baseline)."""
    mean = row[m.name]
    if not np.isfinite(mean):
        return "-"
    fmt = f",.{m.decimals}f"
    s = format(mean, fmt)
    lo, hi = row.get(f"{m.name}_ci95_low", math.nan), row.get(f"{m.name}_ci95_high", math.nan)
    if np.isfinite(lo) and np.isfinite(hi) and format(lo, fmt) != format(hi, fmt):
        s += f" [{lo:{fmt}}, {hi:{fmt}}]"
    se = row.get(f"{m.name}_stderr", math.nan) if stderr else math.nan
    if np.isfinite(se):
        s += f" ± {se:{fmt}}"
    delta = row.get(f"{m.name}_delta_pct", math.nan) if with_delta and not row.get("is_baseline") else math.nan
    if np.isfinite(delta):
        s += f" ({pct(delta)})"
    return s


def pct(delta: float) -> str:
    """+12.3% / -0.04%: two decimals below 1%, where small loss changes would all read +0.0%."""
    return f"{delta:+.1f}%" if abs(delta) >= 1 else f"{delta:+.2f}%"


def display(table: pd.DataFrame, leading: list[str], metrics=METRICS, stderr: bool = False) -> pd.DataFrame:
    """The formatted table: leading (config) columns, runs, one text column per metric."""
    out = pd.DataFrame({HEADERS.get(c, c): table[c].astype(str) for c in leading})
    out["runs"] = table["runs"].values
    for m in metrics:
        out[m.header] = [_cell(r, m, m.delta, stderr) for _, r in table.iterrows()]
    return out


def to_markdown(disp: pd.DataFrame) -> str:
    align = ["left" if c in TEXT_COLUMNS else "right" for c in disp.columns]
    return disp.to_markdown(index=False, disable_numparse=True, colalign=align)


TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "·": r"$\cdot$",
               "Δ": r"$\Delta$", "±": r"$\pm$", "≥": r"$\geq$"}


def tex_escape(s: str) -> str:
    return "".join(TEX_SPECIAL.get(ch, ch) for ch in str(s))


def to_latex(disp: pd.DataFrame, caption: str, label: str) -> str:
    tex = disp.map(tex_escape)
    tex.columns = [tex_escape(c) for c in disp.columns]
    align = "".join("l" if c in TEXT_COLUMNS else "r" for c in disp.columns)
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


def comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """Every ablation pair, in every group and matched context where both arms have runs, for every
    tested metric of the group (frame.quality_metrics), by `stats.compare` over the ok runs (seeds);
    Holm-adjusted over the whole frame (Welch and MWU separately)."""
    rows = []
    for group in sorted(runs.group.unique()):
        g = runs[runs.group == group]
        tested = [m for m in quality_metrics(g) if m.tested]
        for pair in PAIRS:
            arms = g[g[pair.column].isin([pair.a, pair.b])]
            contexts = sorted(arms.groupby(list(pair.match), sort=False),
                              key=lambda kv: [rank(col, v) for col, v in zip(pair.match, kv[0])])
            for ctx, here in contexts:
                if set(here[pair.column]) != {pair.a, pair.b}:
                    continue  # one arm missing in this context: nothing to compare
                here_ok = here[here.status == "ok"]
                for metric in tested:
                    vals = {arm: (here_ok.loc[here_ok[pair.column] == arm, metric.source] / metric.scale).tolist()
                            for arm in (pair.a, pair.b)}
                    rows.append({"group": group, "comparison": pair.name, "a": pair.a, "b": pair.b,
                                 "context": ", ".join(f"{c}={v}" for c, v in zip(pair.match, ctx)),
                                 "metric": metric.name, "unit": metric.header,
                                 **compare(vals[pair.a], vals[pair.b])})
    cols = ["group", "comparison", "a", "b", "context", "metric", "unit", "n_a", "n_b", "mean_a", "mean_b",
            "delta_pct", "hedges_g", "welch_t", "p_welch", "p_welch_holm", "mwu_u", "p_mwu", "p_mwu_holm", "note"]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=cols)
    df["p_welch_holm"] = holm(df.p_welch)
    df["p_mwu_holm"] = holm(df.p_mwu)
    return df[cols]
