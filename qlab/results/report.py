"""`qlab report`: ablation tables, statistics and plots of a sweep, from its result files alone.

    qlab report RESULTS_DIR [--baseline [AXIS=]VALUE ...] [--out DIR] [--no-wandb]
    python -m qlab.results.report results/default-llama-7b          make report SWEEP=default-llama-7b

Every result.json below RESULTS_DIR (hidden directories aside) is read, and the page, runs.csv,
the statistics, tables and plots are written deterministically into RESULTS_DIR/report.md and
RESULTS_DIR/report/ (or --out), a section per comparability group: runs of different groups
never share a table, a test or a plot. Generation, evaluation and comparison results get tables
of their own per group and no statistics. What each file holds: docs/results.md. Exit status: 0
written, 1 no result.json found, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import pandas as pd

from qlab.results import frame, plots, stats, tables

MARKER = ".qlab-report"
# Settings shown on the page beside the group keys (dotted config keys).
SETTINGS = ("adapter.r", "adapter.alpha", "adapter.dropout", "optim.lr", "train.warmup_steps",
            "train.gradient_checkpointing", "data.max_eval_samples", "quant.compute_dtype")


def parse_baselines(values: list[str]) -> dict[str, str]:
    """["nf4+DQ", "optim=adamw"] -> {"quant": "nf4+DQ", "optim": "adamw"}."""
    keys = {a.key for a in tables.AXES}
    out = {}
    for v in values:
        axis, _, value = v.rpartition("=")
        axis = axis or "quant"
        if axis not in keys:
            raise ValueError(f"--baseline {v}: unknown axis {axis!r}; one of {', '.join(sorted(keys))}")
        out[axis] = value
    return out


def rel(path: Path, page: Path) -> str:
    return Path(os.path.relpath(path, page.parent)).as_posix()


def _fmt_p(p: float, holm: float) -> str:
    return "-" if pd.isna(p) else f"{p:.3g} (Holm {holm:.3g})"


def statistics_markdown(comp: pd.DataFrame, labels: dict) -> str:
    lines = ["# Statistics of the ablation pairs", "",
             "Each pair compares arm A with arm B matched on the other axes (the context), per metric, over the "
             "ok runs (seeds) of each arm: two-sided Welch t-test (`scipy.stats.ttest_ind(equal_var=False)`), "
             "two-sided Mann-Whitney U (`scipy.stats.mannwhitneyu`, exact for small n without ties), Hedges' g "
             "(Cohen's d with the pooled SD times 1 - 3/(4(n_A+n_B)-9)), and Holm-adjusted p-values over all "
             f"{int(comp.p_welch.notna().sum())} Welch and {int(comp.p_mwu.notna().sum())} Mann-Whitney tests "
             "of this report (each family separately). Δ% = 100 (mean A - mean B) / mean B. A test needs n >= 2 "
             "runs in each arm; with one seed per arm no test is possible and none is printed.", ""]
    if comp.empty:
        return "\n".join(lines + ["No ablation pair has both arms in one context: nothing to compare.", ""])
    if comp.p_welch.isna().all() and comp.p_mwu.isna().all():
        lines += [f"**No test possible**: one seed per configuration ({stats.NO_TEST_N1}) everywhere in these "
                  "results. The differences below are single runs; run more seeds (e.g. `seed=0,1,2`) to test "
                  "them.", ""]
    for group in sorted(comp.group.unique()):
        if len(labels) > 1:
            lines += [f"## Group {group}: {labels[group]}", ""]
        for name, c in comp[comp.group == group].groupby("comparison", sort=False):
            a, b = c.a.iloc[0], c.b.iloc[0]
            disp = pd.DataFrame({
                "context": c.context, "metric": [frame.METRIC[m].header.replace(" [95% CI]", "") for m in c.metric],
                "n (A/B)": [f"{x}/{y}" for x, y in zip(c.n_a, c.n_b)],
                f"A: {a}": [_num(v, m) for v, m in zip(c.mean_a, c.metric)],
                f"B: {b}": [_num(v, m) for v, m in zip(c.mean_b, c.metric)],
                "Δ%": [tables.pct(d) if pd.notna(d) else "-" for d in c.delta_pct],
                "Hedges' g": [f"{g:+.2f}" if pd.notna(g) else "-" for g in c.hedges_g],
                "Welch p (Holm)": [note if note and pd.isna(p) else _fmt_p(p, h)
                                   for p, h, note in zip(c.p_welch, c.p_welch_holm, c.note)],
                "MWU p (Holm)": [_fmt_p(p, h) for p, h in zip(c.p_mwu, c.p_mwu_holm)],
            })
            lines += [f"### {name}", "", disp.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)


def _num(v: float, metric: str) -> str:
    return "-" if pd.isna(v) else format(v, f",.{frame.METRIC[metric].decimals}f")


READING = ("Cells: mean over the arm's ok runs (n = seeds) [95% CI: bootstrap across seeds where n >= 2; for "
           "tok/s with one run, the run's t-interval of its mean step time over the measured steps]; "
           "(+x.x%): change vs the baseline arm of the same context (same other axes), 100 (arm - base) / base.")


def table_notes(baseline: str | None, fixed: dict, g: pd.DataFrame) -> list[str]:
    """The notes under one table: how to read it (`READING`), then what is specific to it."""
    notes = [READING]
    if baseline is not None:
        notes.append(f"Baseline: {baseline}.")
    notes.append(f"peak mem: {frame.peak_sources(g)} "
                 "(NVML device-used includes the CUDA context and paged optimizers' managed memory); "
                 "torch peak alloc: torch.cuda peak allocated bytes (sees neither).")
    if fixed:
        notes.append("Held fixed in this group: " + ", ".join(f"{k}={v}" for k, v in fixed.items()) + ".")
    return notes


def group_report(g: pd.DataFrame, curves: pd.DataFrame, out: Path, baselines: dict) -> dict:
    """Tables and plots of one group into `out`; returns what the page needs."""
    arm_df = tables.arms(g)
    varying = [c for c in ("quant_label", "optim", "adapter") if g[c].nunique() > 1]
    metrics = frame.quality_metrics(g)  # random weights: no loss columns, no eval-loss or Pareto plot
    made = {"tables": [], "plots": {}}
    for axis in tables.AXES:
        res = tables.axis_table(arm_df, axis, baselines.get(axis.key), metrics)
        if res is None:
            made["tables"].append((axis, None, None, "no two of its values share the same other axes in these runs"))
            continue
        numeric, baseline, fixed = res
        disp = tables.display(numeric, list(numeric.columns[: numeric.columns.get_loc("n")]), metrics)
        notes = table_notes(baseline, fixed, g)
        paths = tables.write(numeric, disp, out / "tables" / axis.key, axis.title, notes)
        made["tables"].append((axis, paths, tables.to_markdown(disp), " ".join(notes[1:])))
    grid = tables.grid_table(arm_df, metrics)
    disp = tables.display(grid, ["quant_label", "optim", "adapter"], metrics)
    notes = table_notes(None, {}, g)
    made["grid"] = tables.write(grid, disp, out / "tables" / "grid", "Full grid", notes)
    made["plots"] = plots.all_plots(g, arm_df, curves[curves.run_id.isin(g.run_id)], varying, out / "plots",
                                    quality=not frame.random_weights(g))
    return made


def generation_notes(baseline: str, g: pd.DataFrame, sizes: list[int]) -> list[str]:
    ok = g[g.status == "ok"]
    notes = [GENERATION_READING, f"Baseline: {baseline} with the same adapter setting."]
    notes.append(f"peak mem: {frame.peak_sources(g)} while generating, the "
                 "largest over the batch sizes (NVML device-used includes the CUDA context; a CPU run's process RSS "
                 "includes the Python runtime and libraries); torch peak alloc: torch.cuda peak allocated bytes; "
                 "weights: bytes the loaded base weights hold (`weight_bytes`), adapter not included.")
    dtypes = sorted(set(ok.get("compute_dtype", pd.Series(dtype=object)).dropna()))
    if dtypes:
        cpu = " (on a CPU, bf16 holds float32 weights: bf16 matmuls are slow there)" if "float32" in dtypes else ""
        notes.append("Compute dtype: " + ", ".join(dtypes) + cpu + ".")
    calls = [f"b{b}: {int(ok[c].min())}" for b in sizes
             if (c := f"generate_calls_b{b}") in ok and ok[c].notna().any()]
    if calls and "ttft_n" in ok and ok.ttft_n.notna().any():
        calls.append(f"TTFT: {int(ok.ttft_n.min())}")
    if calls:
        notes.append("Timed calls per run (the n of each interval): " + ", ".join(calls) + ".")
    return notes


GENERATION_READING = (
    "Cells: the run's median over its timed generate calls [95% CI: t-interval of the mean over those calls; "
    "with several runs per row, their mean and a bootstrap CI across runs]; (+x.x%): change vs the baseline "
    "quantization with the same adapter setting, 100 (arm - base) / base. TTFT: time to the first token at "
    "batch 1, generate(max_new_tokens=1) = prefill + one token. decode tok/s bB = B (N - 1) / (T_N - T_1): "
    "the N - 1 tokens after each sequence's first over the time after the first token (T_N: a greedy "
    "generate of exactly N new tokens for B left-padded prompts; T_1: the first token of the same prompts). "
    "end-to-end tok/s bB = B N / T_N, prefill included. Wall-clock times, device synchronized.")


def _one_table(axis: tables.Axis, numeric: pd.DataFrame, disp: pd.DataFrame, notes: list[str],
               out: Path, plotted: dict) -> dict:
    """The section of a group shown as one table (generation, evaluation)."""
    paths = tables.write(numeric, disp, out / "tables" / axis.key, axis.title, notes)
    return {"tables": [(axis, paths, tables.to_markdown(disp), " ".join(notes))], "plots": plotted}


def generation_report(g: pd.DataFrame, out: Path, baselines: dict) -> dict:
    """The generation table and plot of one generation group into `out`."""
    numeric, disp, baseline, _ = tables.generation_display(g, baselines.get("quant"))
    sizes = frame.generation_batch_sizes(g)
    notes = generation_notes(baseline, g, sizes)
    plotted = {"generation": plots.generation(numeric, sizes, out / "plots" / "generation")}
    return _one_table(tables.GENERATION, numeric, disp, notes, out, plotted)


def eval_report(g: pd.DataFrame, out: Path, baselines: dict) -> dict:
    """The eval table of one eval group into `out`."""
    numeric, disp, baseline, mains = tables.eval_display(g, baselines.get("quant"))
    ok = g[g.status == "ok"]
    items = {m.name.split(".")[0]: ok[c].dropna().astype(int).unique()
             for m in mains if (c := f"eval.{m.name.split('.')[0]}.items") in ok}
    notes = [EVAL_READING, f"Baseline: {baseline} with the same adapter setting.",
             "Items per task (documents or questions): " + ", ".join(
                 f"{t} {'/'.join(map(str, sorted(n)))}" for t, n in items.items()) + "."]
    return _one_table(tables.EVAL, numeric, disp, notes, out, {})


EVAL_READING = (
    "Cells: the lm-evaluation-harness metric of the run (the mean over runs where a row has several, with a "
    "bootstrap 95% CI) ± the harness's standard error (none for perplexities, which lm-eval does not give one); "
    "(+x.x%): change vs the baseline quantization with the same adapter setting, 100 (arm - base) / base. "
    "word_perplexity = exp(-sum of loglikelihoods / sum of whitespace-separated words) over the documents, in "
    "windows of max_length tokens; acc: fraction of items whose highest-loglikelihood choice is right; "
    "acc_mutual_info: ... whose choice the context raises most above its loglikelihood alone (qlab's chitchat "
    "task: 4 choices, chance 0.25). Per-item numbers for paired tests: samples/<task>.jsonl in each "
    "run directory.")


def eval_setup_lines(g: pd.DataFrame) -> list[str]:
    rest = json.loads(g.iloc[0].config_rest)
    lines = [*_machine_lines(g),
             f"- **Model** {g.iloc[0].model}; **lm-evaluation-harness** "
             f"{_distinct(g.get('lm_eval_version', pd.Series(dtype=object)).dropna())}: limit "
             f"{rest.get('eval.limit') or 'none (every item)'}, max_length {rest.get('eval.max_length_used')} tokens, "
             f"batch {rest.get('eval.batch_size')}, few-shot {rest.get('eval.num_fewshot')}; one process per row"]
    hashes = [f"{c.split('.')[1]} `{_distinct(g[c].dropna())[:12]}`" for c in sorted(g.columns)
              if c.startswith("eval.") and c.endswith(".task_sha256") and g[c].notna().any()]
    if hashes:
        lines.append("- **Local tasks** (qlab/reference/lm_eval_tasks.py, content SHA-256): " + ", ".join(hashes))
    return lines + _adapters_line(g, "**Adapters** (LoRA unmerged; `full`: a fully fine-tuned model)") + [_commits(g)]


def compare_report(g: pd.DataFrame, out: Path) -> dict:
    """The arms and pairs tables of one group of comparisons (task=compare), each row under its run id."""
    made = {"tables": [], "plots": {}}
    arms, pairs = [], []
    notes = tables.compare_notes(a for _, r in g[g.status == "ok"].iterrows() for a in r["arms"].values())
    for _, r in g[g.status == "ok"].iterrows():
        a, p = tables.compare_tables({k: r[k] for k in ("arms", "pairs", "aa_control", "pairs_not_measured")
                                      if isinstance(r.get(k), dict)})
        arms.append(a.assign(run=r.run_id))
        pairs.append(p.assign(run=r.run_id, stopped=f"{r.stopped} ({int(r.rounds_completed)} rounds)"))
    for key, title, frames in (("compare_arms", "Arms", arms), ("compare_pairs", "Pairs", pairs)):
        if not frames:
            continue
        disp = pd.concat(frames, ignore_index=True)
        disp = disp[["run", *[c for c in disp.columns if c != "run"]]]
        axis = tables.Axis(key, "arm", f"{tables.COMPARISON.title}: {title.lower()}", (), "")
        paths = tables.write(disp, disp, out / "tables" / key, axis.title, [notes])
        made["tables"].append((axis, paths, tables.to_markdown(disp), notes))
    return made


def generation_setup_lines(g: pd.DataFrame) -> list[str]:
    r = g.iloc[0]
    rest = json.loads(r.config_rest)
    sizes = rest.get("bench.batch_sizes")
    threads = (f"; torch threads {_distinct(g.torch_num_threads.dropna().astype(int))} (OMP_NUM_THREADS; on a "
               "shared CPU, more threads than free cores slow generation many times over)"
               if "torch_num_threads" in g and g.torch_num_threads.notna().any() else "")
    return [
        *_machine_lines(g, cpu_extra=threads),
        f"- **Model** {r.model}; **bench**: {rest.get('bench.prompts')} prompts ({rest.get('bench.prompt_source')}) "
        f"x {rest.get('bench.repeats')} repeats, {rest.get('bench.decoding')} decoding of exactly "
        f"{rest.get('bench.new_tokens')} new tokens per sequence, batch sizes "
        f"{', '.join(map(str, sizes)) if isinstance(sizes, list) else sizes}, "
        f"{rest.get('bench.warmup_calls')} untimed warm-up call(s) per batch size; one process per row",
        *_adapters_line(g, "**Adapter** (LoRA, unmerged, `PeftModel.from_pretrained`)"), _commits(g)]


def _adapters_line(g: pd.DataFrame, what: str) -> list[str]:
    """The page's line naming the training runs whose adapters (or models) a group ran with."""
    adapters = sorted({a for a in g.adapter_run.dropna() if a})
    return [f"- {what} from run(s): " + ", ".join(f"`{a}`" for a in adapters)] if adapters else []


def _commits(g: pd.DataFrame) -> str:
    return "- **Git commits of the runs**: " + _distinct(g.git_commit.fillna("unknown (not recorded)"))


def _machine_lines(g: pd.DataFrame, cpu_extra: str = "") -> list[str]:
    """The page's Hardware and Versions lines of one group (`cpu_extra` follows a CPU-only line)."""
    env = lambda k: _distinct(g[f"env_{k}"].dropna()) or "n/a"  # noqa: E731
    hardware = (f"- **Hardware**: GPU {env('gpu')} (x{env('gpu_count')}), driver {env('driver')}; CPU {env('cpu')}"
                if g.env_gpu.notna().any() else f"- **Hardware**: CPU runs (no GPU); CPU {env('cpu')}{cpu_extra}")
    lines = [hardware, "- **Versions**: " + "; ".join(f"{k} {env(k)}" for k in frame.VERSIONS)]
    if differ := frame.differing_versions(g):
        lines.append(f"- **Versions differ within this group** ({', '.join(differ)}): a difference between its "
                     "arms may be the versions' as much as the settings'; compare runs of one version set.")
    shared = g.env_runs_per_gpu.dropna() if "env_runs_per_gpu" in g else pd.Series(dtype=float)
    if (shared > 1).any():  # QLAB_RUNS_PER_GPU: several runs at once on each GPU
        lines.append(f"- **Shared GPUs**: up to {int(shared.max())} runs at once on each GPU (QLAB_RUNS_PER_GPU). NVML "
                     "peaks count every run on the card and tok/s is contended: compare losses and torch peak "
                     "alloc here, not NVML memory or speed.")
    return lines


def _distinct(values) -> str:
    counts = pd.Series([str(v) for v in values]).value_counts()
    return ", ".join(f"{v} ({n} runs)" if len(counts) > 1 else v for v, n in sorted(counts.items()))


def setup_lines(g: pd.DataFrame, root: Path) -> list[str]:
    r = g.iloc[0]
    rest = json.loads(r.config_rest)
    tokens = r.batch_size * r.max_seq_len if r.pad_to == "max_seq_len" else None
    lines = [
        *_machine_lines(g),
        f"- **Model** {r.model}; **data** {r.data}, max_seq_len {r.max_seq_len}, pad_to {r.pad_to}; "
        f"**batch** {r.batch_size}" + (f" ({r.batch_size} seq x {r.max_seq_len} tok = {tokens:,} tok/step)"
                                         if tokens else "") + f"; **steps** {r.steps}",
        "- **Settings**: " + ", ".join(f"{k}={rest[k]}" for k in SETTINGS if k in rest),
        _commits(g),
    ]
    for sweep in sorted(g.sweep.dropna().unique()):
        manifest = next((p for p in (root / "sweep.json", root / sweep / "sweep.json") if p.exists()), None)
        try:
            m = json.loads(manifest.read_text()) if manifest else None
        except (OSError, ValueError):
            m = None
        if m and m.get("sweep", sweep) == sweep and m.get("grid"):
            grid = "; ".join(f"{k} = {{{', '.join(v)}}}" for k, v in m["grid"].items())
            lines.append(f"- **Grid** of sweep `{sweep}` (sweep.json, experiment `{m.get('experiment')}`): "
                         f"{grid}: {m.get('points')} points, {len(m.get('invocations', []))} invocation(s)")
        else:
            lines.append(f"- **Sweep** `{sweep}`: no sweep.json (runs made one by one)")
    return lines


def random_weights_note(runs: pd.DataFrame) -> list[str]:
    """The page's warning where runs trained random-init presets (frame.model_weights): their losses
    are not quality, so no loss column, loss statistic or quality plot is shown for them."""
    random = sorted(runs.loc[runs.model_weights == "random", "model"].dropna().unique()) \
        if "model_weights" in runs else []
    if not random:
        return []
    which = "These runs" if frame.random_weights(runs) else "The runs of " + ", ".join(f"`{m}`" for m in random)
    kinds = set(runs.loc[runs.model_weights == "random", "kind"])
    shown = "; ".join(text for kind, text in (
        ("train", "no loss column (train loss, eval loss, perplexity), loss statistic, eval-loss plot or "
                  "memory-vs-quality plot is shown for them, and their loss curves only show that training ran"),
        ("generate", "what they generate is not language"),
        ("eval", "their evaluation scores are an untrained model's")) if kind in kinds) or "speed is all they show"
    return ["", f"> **Random weights, not quality.** {which} used a random-init preset shape "
            f"({', '.join(random)}: model.preset in the stored config, no pretrained weights), which knows no "
            "language: its losses measure nothing a reader could call quality. Memory and speed are what these "
            f"runs measure; {shown}. Quality results come from pretrained models (results/claims/)."]


def statistics_summary(runs: pd.DataFrame, comp: pd.DataFrame, link: str) -> str:
    """The page's one-line account of the statistics (`link`: statistics.md from the page)."""
    if set(runs.kind) == {"compare"}:
        return "a comparison's own: each pair's 95% interval over its paired rounds (the tables)."
    if not (runs.kind == "train").any():
        return ("none: these are generation or evaluation results (qlab generate-bench, qlab eval); the statistics "
                "compare training ablation pairs across seeds. Each generation cell carries its run's own 95% "
                "interval over its timed calls, each evaluation cell the harness's standard error.")
    tested = comp.p_welch.notna().sum()
    if not tested:
        return (f"one seed per configuration ({stats.NO_TEST_N1}): no test is possible for any comparison, and "
                "the differences in the tables are single runs.")
    return (f"{tested} Welch t-tests over {len(comp)} comparisons; significant after Holm (p < 0.05): "
            f"{int((comp.p_welch_holm < 0.05).sum())}. See [statistics.md]({link}).")


def write_page(runs: pd.DataFrame, out: Path, page: Path, sections: dict, comp: pd.DataFrame, argv_dir: str,
               agreement: pd.DataFrame | None) -> None:
    sweeps = ", ".join(f"`{s}`" for s in sorted(runs.sweep.dropna().unique()))
    lines = [f"# Report: {sweeps}", "",
             f"Generated by `qlab report {argv_dir}` from {len(runs)} result.json files ("
             + frame.status_summary(runs.status)
             + "). Every number below is computed from those files; regenerate rather than edit.", "",
             f"- Every run: [runs.csv]({rel(out / 'runs.csv', page)}); statistics: "
             f"[statistics.md]({rel(out / 'statistics.md', page)}) ([csv]({rel(out / 'statistics.csv', page)}))"]
    bad = runs[runs.status != "ok"]
    for _, r in bad.iterrows():
        error = f": {r.error_type}: {r.error_message}" if isinstance(r.error_type, str) else ""
        lines.append(f"- **{r.status}**: `{r.run_id}`{error}")
    for u in runs.attrs.get("unreadable", []):
        lines.append(f"- **unreadable** (skipped): `{u}`")
    labels = dict(zip(runs.group, runs.group_label))
    lines += random_weights_note(runs)
    if len(labels) > 1:
        lines += ["", f"These results form **{len(labels)} comparability groups**, which differ in: "
                  + ", ".join(f"`{k}`" for k in frame.differing_keys(runs))
                  + ". Each group has its own section; runs of different groups are never compared."]
    trained = (runs.kind == "train").any()
    lines += ["", "**Statistics**: " + statistics_summary(runs, comp, rel(out / "statistics.md", page))]
    if agreement is not None:
        overlap = (agreement.overlap != "none").sum()
        lines += ["", f"## Across comparisons: {overlap} of {len(agreement)} pairs' intervals overlap", "",
                  tables.to_markdown(agreement), "", tables.AGREEMENT_NOTE]
    lines += ["", f"**Reading the tables**: {READING}"] if trained else []
    for group, made in sections.items():
        h = "##" if len(labels) == 1 else "###"
        lines += ["", f"## Group {group}: {labels[group]}" if len(labels) > 1 else "## Setup", "", *made["setup"]]
        for axis, paths, md, notes in made["tables"]:
            lines += ["", f"{h} {axis.title}", ""]
            if paths is None:
                lines.append(f"Not shown: {notes}.")
                continue
            lines += [md, "", notes, "", " · ".join(f"[{ext}]({rel(p, page)})" for ext, p in paths.items())]
        if made.get("grid"):
            lines += ["", f"{h} Full grid", "", "Every configuration: " + " · ".join(
                f"[{ext}]({rel(p, page)})" for ext, p in made["grid"].items())]
        plot_dir = made["plot_dir"]
        lines += ["", f"{h} Plots"] if made["plots"] else []
        for name, caption in made["plots"].items():
            png, svg = plot_dir / f"{name}.png", plot_dir / f"{name}.svg"
            lines += ["", f"![{name}]({rel(png, page)})", "", f"{caption} ([SVG]({rel(svg, page)}))"]
    page.write_text("\n".join(lines) + "\n")


def log_wandb(runs: pd.DataFrame, sections: dict, root: Path, comp: pd.DataFrame, parent: Path) -> Path | None:
    """One W&B run with every table (wandb.Table) and plot (wandb.Image), its files under
    parent/wandb/ (wandb adds the wandb/ itself); None if not wanted or W&B failed."""
    flagged = runs[runs.wandb.astype(bool)]
    if flagged.empty:
        return None
    mode = flagged.wandb_mode.dropna().mode()
    mode = mode.iloc[0] if len(mode) else "offline"
    if mode == "disabled":
        return None
    sweep = "+".join(sorted(runs.sweep.dropna().unique())) or root.name
    first = lambda col, default: flagged[col].dropna().iloc[0] if flagged[col].notna().any() else default  # noqa: E731
    try:
        import wandb

        run = wandb.init(project=first("wandb_project", "qlab"), entity=first("wandb_entity", None), group=sweep,
                         name=f"report-{sweep}", job_type="report", mode=mode, dir=str(parent),
                         reinit="finish_previous", settings=wandb.Settings(silent=True, console="off"))
        multi = len(sections) > 1
        log = {"runs": wandb.Table(dataframe=runs.astype(str)), "statistics": wandb.Table(dataframe=comp.astype(str))}
        for group, made in sections.items():
            prefix = f"group-{group}/" if multi else ""
            for axis, paths, _, _ in made["tables"]:
                if paths:
                    log[f"{prefix}table/{axis.key}"] = wandb.Table(dataframe=pd.read_csv(paths["csv"]))
            if made.get("grid"):
                log[f"{prefix}table/grid"] = wandb.Table(dataframe=pd.read_csv(made["grid"]["csv"]))
            for name, caption in made["plots"].items():
                png = made["plot_dir"] / f"{name}.png"
                log[f"{prefix}plot/{name}"] = wandb.Image(str(png), caption=caption[:500])
        run.log(log)
        run.finish()
        return parent / "wandb"
    except Exception as e:  # W&B is a mirror: never fail the report over it
        warnings.warn(f"W&B logging of the report failed; the report is written without it: {e}")
        return None


def build(root: Path, out: Path | None = None, baselines: dict | None = None, wandb: bool = True,
          argv_dir: str | None = None) -> Path:
    """Write the whole report; returns the page's path. Raises FileNotFoundError when `root`
    holds no result.json."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    runs = frame.load_runs(root)
    if runs.empty:
        raise FileNotFoundError(f"no result.json under {root} (hidden .staging/ .logs/ .hydra/ are skipped); "
                                "run a sweep first: make sweep")
    page = root / "report.md" if out is None else Path(out) / "report.md"
    out = root / "report" if out is None else Path(out)
    if (out / MARKER).exists():
        shutil.rmtree(out)  # our own earlier report: no stale group or plot files survive
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by qlab report; cleared and rewritten by the next one\n")
    runs.to_csv(out / "runs.csv", index=False, float_format="%.10g")
    curves = frame.load_curves(root, runs)
    multi = runs.group.nunique() > 1
    baselines = baselines or {}
    sections = {}
    for group in sorted(runs.group.unique()):
        gout = out / f"group-{group}" if multi else out
        g = runs[runs.group == group]
        kind = g.kind.iloc[0]
        if kind == "generate":
            made = {**generation_report(g, gout, baselines), "setup": generation_setup_lines(g)}
        elif kind == "eval":
            made = {**eval_report(g, gout, baselines), "setup": eval_setup_lines(g)}
        elif kind == "compare":
            made = {**compare_report(g, gout), "setup": [*_machine_lines(g), _commits(g)]}
        else:
            made = {**group_report(g, curves, gout, baselines), "setup": setup_lines(g, root)}
        sections[group] = {**made, "plot_dir": gout / "plots"}
    agreement = None  # the pairs' intervals side by side, where comparisons of several machines exist
    if ((runs.kind == "compare") & (runs.status == "ok")).sum() > 1:
        numeric = tables.compare_agreement(runs)
        agreement = numeric.drop(columns=["overlap_low", "overlap_high"])
        tables.write(numeric, agreement, out / "tables" / "compare_agreement", "Across comparisons",
                     [tables.AGREEMENT_NOTE])
    comp = tables.comparisons(runs[runs.kind == "train"])  # generation and eval results: no ablation pairs
    comp.to_csv(out / "statistics.csv", index=False, float_format="%.10g")
    (out / "statistics.md").write_text(statistics_markdown(comp, dict(zip(runs.group, runs.group_label))))
    # the page names the directory as given (relative for `make report`), never a machine's absolute path
    shown = argv_dir if argv_dir and not Path(argv_dir).is_absolute() else root.name
    write_page(runs, out, page, sections, comp, shown, agreement)
    if wandb:
        log_wandb(runs, sections, root, comp, page.parent)
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlab report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir", help="a sweep directory (results/<sweep>) or a directory above several")
    parser.add_argument("--baseline", action="append", default=[], metavar="[AXIS=]VALUE",
                        help="baseline arm of the %% deltas: a quant label (bf16, int8, nf4, nf4+DQ, fp4, fp4+DQ, "
                             "nf4+DQ/b128, hqq int4, torchao nf4+DQ, ...; default bf16) for the quantization table, "
                             "or AXIS=VALUE for another table (double_quant=off, optim=adamw, adapter=qv are the "
                             "defaults; adapter=all_linear+loftq names a form); repeatable")
    parser.add_argument("--out", help="directory for tables, plots and statistics, and report.md "
                                      "(default: RESULTS_DIR/report/ and RESULTS_DIR/report.md)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    args = parser.parse_args(argv)
    try:
        baselines = parse_baselines(args.baseline)
    except ValueError as e:
        parser.error(str(e))
    try:
        page = build(Path(args.results_dir), Path(args.out) if args.out else None, baselines,
                     wandb=not args.no_wandb, argv_dir=args.results_dir)
    except FileNotFoundError as e:
        print(f"qlab report: {e}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(args.results_dir) / "report"
    print(f"qlab report: wrote {page}; tables, plots and statistics in {out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
