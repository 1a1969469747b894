"""`qlab report` on fabricated result files with known numbers: tables against hand-computed
means and deltas, statistics against scipy called directly, Holm by hand, oom/failed runs,
comparability groups, plots, the CLI, and the W&B mirror (offline)."""

import inspect
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from conftest import ROOT
from fake_results import GiB, fake_run
from qlab.results import report, stats



# group 1 (10 steps): nf4 and fp4 with three seeds each; the rest single runs, an oom, a failure
NF4 = dict(peak=[10.0, 11.0, 12.0], tps=[1000.0, 1100.0, 1200.0], eval_loss=[1.0, 1.1, 1.2], train_loss=[2.0, 2.1, 2.2])
FP4 = dict(peak=[12.0, 13.0, 14.0], tps=[900.0, 950.0, 1000.0], eval_loss=[1.3, 1.5, 1.4], train_loss=[2.3, 2.3, 2.4])


def build_sweep(root, wandb=False):
    for seed in range(3):
        fake_run(root, "nf4", seed=seed, wandb=wandb, **{k: v[seed] for k, v in NF4.items()})
        fake_run(root, "fp4", seed=seed, wandb=wandb, **{k: v[seed] for k, v in FP4.items()})
    fake_run(root, "bf16", peak=20.0, tps=2000.0, eval_loss=1.05, train_loss=2.05)
    fake_run(root, "bf16", seed=1, status="oom", peak=79.0)
    fake_run(root, "nf4", dq=True, peak=9.5, tps=900.0, eval_loss=1.12, train_loss=2.1)
    fake_run(root, "nf4", optim="adamw", status="failed")
    fake_run(root, "int8", adapter="qv", peak=15.0, tps=500.0, eval_loss=1.2, train_loss=2.2)
    fake_run(root, "int8", adapter="qv", optim="adamw", peak=15.5, tps=520.0, eval_loss=1.21, train_loss=2.2)
    # group 2: the same model and GPU, 20 steps: never compared with group 1
    fake_run(root, "nf4", steps=20, peak=10.0, tps=1000.0, eval_loss=0.9)
    fake_run(root, "fp4", steps=20, peak=12.0, tps=900.0, eval_loss=1.0)
    # debris of a killed run: hidden directories are never read
    (root / ".staging").mkdir()
    fake_run(root / ".staging", "bf16", peak=99.0)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = build_sweep(tmp_path_factory.mktemp("res") / "syn")
    page = report.build(root, wandb=False)
    return root, page


def csv(root, *parts):
    return pd.read_csv(root.joinpath("report", *parts))


def test_runs_csv_keeps_oom_and_failed_runs_marked(built):
    root, _ = built
    runs = csv(root, "runs.csv")
    assert len(runs) == 14  # every result.json outside .staging/
    assert sorted(runs.status.value_counts().items()) == [("failed", 1), ("ok", 12), ("oom", 1)]
    failed = runs[runs.status == "failed"].iloc[0]
    assert failed.error_type == "RuntimeError" and failed.error_message == "boom"
    assert runs[runs.status == "oom"].iloc[0].error_type == "OutOfMemoryError"
    assert set(runs.quant_label) == {"bf16", "int8", "nf4", "nf4+DQ", "fp4"}
    assert runs.peak_bytes.max() < 99 * GiB
    assert sorted(runs.groupby("group").size().items()) == [(1, 12), (2, 2)]


def test_quant_table_means_cis_and_deltas_by_hand(built):
    root, _ = built
    t = csv(root, "group-1", "tables", "quant.csv")
    t = t[(t.optim == "paged_adamw_32bit") & (t.adapter == "all_linear")].set_index("quant_label")
    assert list(t.index) == ["bf16", "nf4", "nf4+DQ", "fp4"]
    assert t.loc["nf4", "peak_gib"] == pytest.approx(11.0) and t.loc["fp4", "peak_gib"] == pytest.approx(13.0)
    assert t.loc["nf4", "n"] == 3 and t.loc["bf16", "n"] == 1 and t.loc["bf16", "runs"] == "1 ok, 1 oom"
    # % vs bf16 (the oom seed has no numbers: bf16 = 20 GiB, 2,000 tok/s, eval loss 1.05)
    assert t.loc["nf4", "peak_gib_delta_pct"] == pytest.approx((11 - 20) / 20 * 100)  # -45%
    assert t.loc["fp4", "peak_gib_delta_pct"] == pytest.approx(-35.0)
    assert t.loc["nf4+DQ", "tok_s_delta_pct"] == pytest.approx((900 - 2000) / 2000 * 100)
    assert t.loc["fp4", "eval_loss_delta_pct"] == pytest.approx((1.4 - 1.05) / 1.05 * 100, rel=1e-5)
    assert t.loc["bf16", "peak_gib_delta_pct"] == 0
    assert t.loc["nf4", "tok_s"] == pytest.approx(1100.0) and t.loc["fp4", "eval_loss"] == pytest.approx(1.4)
    # n >= 2: bootstrap CI of the mean across seeds, the same as scipy's with the fixed seed
    seed = "rng" if "rng" in inspect.signature(st.bootstrap).parameters else "random_state"
    ci = st.bootstrap(([10.0, 11.0, 12.0],), np.mean, n_resamples=9999, method="percentile",
                      **{seed: np.random.default_rng(0)}).confidence_interval
    assert (t.loc["nf4", "peak_gib_ci95_low"], t.loc["nf4", "peak_gib_ci95_high"]) == \
        pytest.approx((ci.low, ci.high), rel=1e-5)
    # n = 1: the run's own interval, 2,048 tok/step over the step-time CI (0.9, 1.1 x the mean)
    assert t.loc["nf4+DQ", "tok_s_ci95_low"] == pytest.approx(900 / 1.1, rel=1e-5)
    assert t.loc["nf4+DQ", "tok_s_ci95_high"] == pytest.approx(900 / 0.9, rel=1e-5)
    assert math.isnan(t.loc["nf4+DQ", "peak_gib_ci95_low"])
    md = (root / "report" / "group-1" / "tables" / "quant.md").read_text()
    assert "| nf4 " in md and "(-45.0%)" in md and "peak mem (GiB)" in md and "tok/s [95% CI]" in md
    tex = (root / "report" / "group-1" / "tables" / "quant.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"paged\_adamw\_32bit" in tex and r"\%" in tex


def test_other_axis_tables(built):
    root, _ = built
    dq = csv(root, "group-1", "tables", "double_quant.csv").set_index("dq")
    assert dq.loc["on", "peak_gib_delta_pct"] == pytest.approx((9.5 - 11) / 11 * 100)
    optim = csv(root, "group-1", "tables", "optim.csv")
    assert set(optim.quant_label) == {"int8", "nf4"}  # the failed nf4/adamw run still forms a row
    nf4_adamw = optim[(optim.quant_label == "nf4") & (optim.optim == "adamw")].iloc[0]
    assert nf4_adamw.n == 0 and nf4_adamw.runs == "1 failed" and math.isnan(nf4_adamw.peak_gib)
    assert csv(root, "group-1", "tables", "grid.csv").shape[0] == 7


def test_statistics_match_scipy(built):
    root, _ = built
    s = csv(root, "statistics.csv")
    row = s[(s.group == 1) & (s.comparison == "NF4 vs FP4") & (s.metric == "peak_gib")].iloc[0]
    a, b = NF4["peak"], FP4["peak"]
    assert row.context == "dq=off, optim=paged_adamw_32bit, adapter=all_linear, speed=recipe"
    assert row.p_welch == pytest.approx(st.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-5)
    assert row.welch_t == pytest.approx(st.ttest_ind(a, b, equal_var=False).statistic, rel=1e-5)
    assert row.p_mwu == pytest.approx(st.mannwhitneyu(a, b, alternative="two-sided").pvalue, rel=1e-5)
    # Hedges' g: d = (11 - 13) / pooled SD 1 = -2; J = 1 - 3 / (4 * 6 - 9) = 0.8
    assert row.hedges_g == pytest.approx(-1.6)
    assert row.delta_pct == pytest.approx((11 - 13) / 13 * 100)
    for metric, key in (("tok_s", "tps"), ("eval_loss", "eval_loss"), ("train_loss_final", "train_loss")):
        r = s[(s.group == 1) & (s.comparison == "NF4 vs FP4") & (s.metric == metric)].iloc[0]
        assert r.p_welch == pytest.approx(st.ttest_ind(NF4[key], FP4[key], equal_var=False).pvalue, rel=1e-5)
    # Holm over the whole report: the 4 Welch tests (nf4 vs fp4, 4 metrics) are the only ones
    tested = s[s.p_welch.notna()]
    assert len(tested) == 4
    p = tested.p_welch.to_numpy()
    order = np.argsort(p)
    by_hand = np.maximum.accumulate(np.minimum(1, (4 - np.arange(4)) * p[order]))
    assert tested.p_welch_holm.to_numpy()[order] == pytest.approx(by_hand)


def test_single_seed_arms_say_no_test(built):
    root, _ = built
    s = csv(root, "statistics.csv")
    one = s[(s.comparison.str.startswith("paged_adamw_32bit vs adamw")) & (s.context.str.contains("int8"))]
    assert len(one) == 4 and (one.note == stats.NO_TEST_N1).all() and one.p_welch.isna().all()
    failed_arm = s[(s.comparison.str.startswith("paged_adamw_32bit")) & (s.context.str.contains("nf4"))]
    assert failed_arm.note.str.contains("no ok run").all()
    g2 = s[s.group == 2]
    assert (g2.note == stats.NO_TEST_N1).all() and g2.p_welch_holm.isna().all()
    md = (root / "report" / "statistics.md").read_text()
    assert "n=1 per arm: no test" in md


def test_groups_are_separate_sections(built):
    root, page = built
    text = page.read_text()
    assert page == root / "report.md"
    assert "2 comparability groups" in text and "`steps`" in text
    assert "## Group 1:" in text and "## Group 2:" in text and "20 steps" in text
    g2 = csv(root, "group-2", "tables", "quant.csv")
    assert list(g2.quant_label) == ["nf4", "fp4"] and list(g2.peak_gib) == pytest.approx([10.0, 12.0])
    assert not (root / "report" / "group-2" / "tables" / "optim.csv").exists()  # optim never varies there
    assert "](report/group-1/plots/memory_breakdown.png)" in text  # relative links
    assert "Fake GPU 80GB" in text and "driver 1.0" in text and "abc123" in text
    assert "oom**: `tiny_bf16" in text and "failed**: `tiny_nf4" in text
    assert "Shared GPUs" not in text  # one run per GPU: nothing to warn about


def test_runs_of_differing_library_versions_are_flagged(tmp_path):
    from qlab.results import report

    root = tmp_path / "results" / "versions"
    fake_run(root, "nf4", seed=0)
    text = report.build(root, wandb=False).read_text()
    assert "Versions differ" not in text
    fake_run(root, "nf4", seed=1, env={"transformers": "5.18.0"})
    text = report.build(root, wandb=False).read_text()
    assert "- **Versions differ within this group** (transformers): a difference between its arms" in text


def test_runs_sharing_a_gpu_are_flagged(tmp_path):
    from qlab.results import report

    root = tmp_path / "results" / "shared"
    for seed in range(2):
        fake_run(root, "nf4", seed=seed, runs_per_gpu=6)
    text = report.build(root, wandb=False).read_text()
    assert "- **Shared GPUs**: up to 6 runs at once on each GPU" in text


def test_every_plot_is_written(built):
    root, _ = built
    for group in ("group-1", "group-2"):
        for name in ("memory_breakdown", "throughput", "loss_curves", "eval_loss", "memory_vs_quality"):
            for ext in ("png", "svg"):
                path = root / "report" / group / "plots" / f"{name}.{ext}"
                assert path.stat().st_size > 1000, path


def test_pareto_front():
    from qlab.results.plots import pareto_front

    pts = pd.DataFrame({"mem": [10, 8, 12, 9, 8], "loss": [1.0, 1.5, 0.9, 1.6, 1.4]})
    # (8, 1.4) beats (8, 1.5) and (9, 1.6); (10, 1.0) and (12, 0.9) trade memory for loss
    assert list(pareto_front(pts, "mem", "loss")) == [True, False, True, False, True]


def test_cli_subprocess_baseline_and_determinism(built, tmp_path):
    root, _ = built
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "qlab.results.report", str(root), "--baseline", "nf4", "--out", str(out),
                           "--no-wandb"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.md").exists()
    t = pd.read_csv(out / "group-1" / "tables" / "quant.csv")
    fp4 = t[(t.quant_label == "fp4")].iloc[0]
    assert fp4.peak_gib_delta_pct == pytest.approx((13 - 11) / 11 * 100)  # vs nf4 now
    # regenerated from the same files: the same bytes (the baseline changes only the tables)
    for rel in ("runs.csv", "statistics.md", "statistics.csv", "group-1/plots/memory_vs_quality.svg",
                "group-1/plots/throughput.png", "group-2/tables/grid.md"):
        assert (out / rel).read_bytes() == (root / "report" / rel).read_bytes(), rel
    with pytest.raises(SystemExit):
        report.main([str(root), "--baseline", "colour=red"])


def test_cli_subprocess_without_results(tmp_path):
    (tmp_path / "empty" / ".staging" / "x").mkdir(parents=True)
    (tmp_path / "empty" / ".staging" / "x" / "result.json").write_text("{}")  # hidden: not a result
    proc = subprocess.run([sys.executable, "-m", "qlab.results.report", str(tmp_path / "empty")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no result.json under" in proc.stderr


def test_wandb_report_logged_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    root = tmp_path / "wb"
    fake_run(root, "nf4", wandb=True)
    fake_run(root, "fp4", wandb=True, peak=12.0)
    report.build(root)
    [run] = list((root / "wandb").glob("offline-run-*"))
    assert list(run.glob("run-*.wandb"))[0].stat().st_size > 0
    media = run / "files" / "media"
    assert list(media.rglob("quant_*.table.json")) and list(media.rglob("statistics_*.table.json"))
    assert list(media.rglob("memory_breakdown_*.png")) and list(media.rglob("memory_vs_quality_*.png"))


def test_wandb_failure_is_a_warning(tmp_path, monkeypatch):
    import wandb

    def broken(*a, **k):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", broken)
    root = tmp_path / "wb"
    fake_run(root, "nf4", wandb=True)
    with pytest.warns(UserWarning, match="W&B logging of the report failed"):
        page = report.build(root)
    assert page.exists()


RANDOM = {"name": "tiny-llama", "preset": "tiny-llama", "name_or_path": None, "base": None}
PRETRAINED = {  # the same name where a pretrained model is loaded: the stored config decides, never conf/ or names
    "base": {"name": "tiny-llama", "preset": None, "base": "tiny"},
    "gguf": {"name": "smollm2-135m", "preset": None, "name_or_path": None, "gguf": "smollm2-135m"},
    "hub": {"name": "llama-7b", "preset": None, "name_or_path": "huggyllama/llama-7b"},
}


def two_seeds(root, model, sweep="syn"):
    for seed in range(2):
        fake_run(root, "nf4", seed=seed, eval_loss=1.0 + seed / 10, train_loss=2.0, model=model, sweep=sweep)
        fake_run(root, "fp4", seed=seed, eval_loss=1.3 + seed / 10, train_loss=2.3, model=model, sweep=sweep)


LOSS_HEADERS = ("final train loss", "eval loss", "eval ppl")


def test_random_weights_get_no_quality_tables_or_pareto(tmp_path):
    root = tmp_path / "random"
    two_seeds(root, RANDOM)
    page = report.build(root, wandb=False).read_text()
    top = page.split("\n## ")[0]
    assert "**Random weights, not quality.** These runs used a random-init preset shape (tiny-llama" in top
    md = (root / "report" / "tables" / "quant.md").read_text()
    assert "peak mem (GiB)" in md and not any(h in md for h in LOSS_HEADERS)
    assert not any(h in line for line in page.splitlines() if line.startswith("|") for h in LOSS_HEADERS)
    assert not {"eval_loss", "train_loss_final", "eval_ppl"} & set(csv(root, "tables", "grid.csv").columns)
    assert set(csv(root, "statistics.csv").metric) == {"peak_gib", "tok_s"}  # no loss statistic
    plots = {p.stem for p in (root / "report" / "plots").glob("*.png")}
    assert plots == {"memory_breakdown", "throughput", "loss_curves"}  # the curves stay, labelled
    assert "Random weights: these curves show that training ran, not quality." in page
    assert csv(root, "runs.csv").model_weights.unique().tolist() == ["random"]  # the data keeps every number


@pytest.mark.parametrize("kind", sorted(PRETRAINED))
def test_pretrained_weights_keep_quality_tables(tmp_path, kind):
    root = tmp_path / kind
    two_seeds(root, PRETRAINED[kind])
    page = report.build(root, wandb=False).read_text()
    assert "Random weights" not in page and all(h in page for h in LOSS_HEADERS)
    assert {"eval_loss", "train_loss_final"} <= set(csv(root, "statistics.csv").metric)
    assert (root / "report" / "plots" / "memory_vs_quality.png").is_file()
    assert (root / "report" / "plots" / "eval_loss.png").is_file()
    assert csv(root, "runs.csv").model_weights.unique().tolist() == [kind if kind != "hub" else "checkpoint"]


def test_random_and_pretrained_groups_in_one_report(tmp_path):
    root = tmp_path / "both"
    two_seeds(root / "a", RANDOM, sweep="a")
    two_seeds(root / "b", PRETRAINED["base"], sweep="b")
    page = report.build(root, wandb=False).read_text()
    assert "**Random weights, not quality.** The runs of `tiny-llama` used a random-init preset shape" in page
    groups = {g: (root / "report" / f"group-{g}" / "tables" / "quant.md").read_text() for g in (1, 2)}
    random_group = 1 if csv(root, "runs.csv").query("group == 1").model_weights.iloc[0] == "random" else 2
    assert "eval loss" not in groups[random_group] and "eval loss" in groups[3 - random_group]
    stats_csv = csv(root, "statistics.csv")
    assert set(stats_csv[stats_csv.group == random_group].metric) == {"peak_gib", "tok_s"}
    assert "eval_loss" in set(stats_csv[stats_csv.group == 3 - random_group].metric)
    assert not (root / "report" / f"group-{random_group}" / "plots" / "memory_vs_quality.png").exists()
    assert (root / "report" / f"group-{3 - random_group}" / "plots" / "memory_vs_quality.png").exists()


def test_backends_and_adapter_forms_get_rows_of_their_own_in_the_report(tmp_path):
    """A report of bitsandbytes, HQQ and torchao bases and a LoftQ adapter: each its own row in the
    tables and runs.csv, plotted like any other arm, its seeds one row."""
    root = tmp_path / "syn"
    for seed in range(2):
        fake_run(root, "nf4", dq=True, seed=seed, peak=10.0)
        fake_run(root, "int4", seed=seed, quant_cfg={"backend": "hqq", "blocksize": 64}, peak=12.0)
        fake_run(root, "nf4", dq=True, seed=seed, quant_cfg={"backend": "torchao", "blocksize": 32}, peak=11.0)
        fake_run(root, "nf4", dq=True, seed=seed, adapter_cfg={"init": "loftq", "dora": False}, peak=10.5)
    page = report.build(root, wandb=False)
    runs = csv(root, "runs.csv")
    assert sorted(set(zip(runs.quant_label, runs.adapter))) == [
        ("hqq int4", "all_linear"), ("nf4+DQ", "all_linear"), ("nf4+DQ", "all_linear+loftq"),
        ("torchao nf4+DQ/b32", "all_linear")]
    quant = csv(root, "tables", "quant.csv")
    assert list(quant.quant_label) == ["nf4+DQ", "torchao nf4+DQ/b32", "hqq int4"] and (quant.n == 2).all()
    assert list(csv(root, "tables", "adapter.csv").adapter) == ["all_linear", "all_linear+loftq"]
    grid = (root / "report" / "tables" / "grid.md").read_text()
    assert "| hqq int4 " in grid and "| all_linear+loftq " in grid
    assert "HQQ int4 vs bitsandbytes NF4" not in csv(root, "statistics.csv").comparison.values  # nf4 is DQ here
    assert "all_linear+loftq vs all_linear" in csv(root, "statistics.csv").comparison.values
    assert (root / "report" / "plots" / "memory_breakdown.png").exists() and "hqq int4" in page.read_text()
