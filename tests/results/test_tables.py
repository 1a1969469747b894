"""qlab.results.tables on fabricated results (fake_results.fake_run): arms' means and 95% CIs
(bootstrap across seeds, a single run's own throughput interval), baseline percentages and
contexts in the axis tables, the formatted cells, the Markdown / LaTeX / CSV files, and the
ablation pairs of statistics.csv."""

import json
import math
import re
import warnings

import pandas as pd
import pytest

from fake_results import fake_run
from qlab.results import frame, stats, tables

# nf4: three seeds; fp4: two; bf16: one ok and one oom; int8 and nf4+DQ: one run each;
# nf4 with adamw: one run (another optimizer context); nf4 with adamw_8bit: failed only
NF4 = dict(peak=[10.0, 11.0, 12.0], tps=[1000.0, 1100.0, 1200.0], eval_loss=[1.0, 1.1, 1.2])
FP4 = dict(peak=[13.0, 14.0], tps=[900.0, 1000.0], eval_loss=[1.4, 1.5])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("res") / "syn"
    for seed in range(3):
        fake_run(root, "nf4", seed=seed, **{k: v[seed] for k, v in NF4.items()})
    for seed in range(2):
        fake_run(root, "fp4", seed=seed, **{k: v[seed] for k, v in FP4.items()})
    fake_run(root, "bf16", peak=20.0, tps=2000.0, eval_loss=1.05)
    fake_run(root, "bf16", seed=1, status="oom", peak=79.0)
    fake_run(root, "int8", peak=15.0, tps=500.0, eval_loss=1.2)
    fake_run(root, "nf4", dq=True, peak=9.5, tps=950.0, eval_loss=1.12)
    fake_run(root, "nf4", optim="adamw", peak=10.5, tps=1050.0, eval_loss=1.1)
    fake_run(root, "nf4", optim="adamw_8bit", status="failed")
    df = frame.load_runs(root)
    assert df.group.nunique() == 1  # one comparability group
    return df


@pytest.fixture(scope="module")
def arms(runs):
    return tables.arms(runs)


def arm(arms, quant_label, optim="paged_adamw_32bit"):
    rows = arms[(arms.quant_label == quant_label) & (arms.optim == optim)]
    assert len(rows) == 1
    return rows.iloc[0]


# ------------------------------------------------------------------------------------ arms


def test_one_arm_per_configuration_in_the_natural_order(arms):
    assert list(zip(arms.quant_label, arms.optim)) == [
        ("bf16", "paged_adamw_32bit"), ("int8", "paged_adamw_32bit"),
        ("nf4", "adamw"), ("nf4", "paged_adamw_32bit"), ("nf4", "adamw_8bit"),
        ("nf4+DQ", "paged_adamw_32bit"), ("fp4", "paged_adamw_32bit")]


def test_means_over_ok_runs_and_status_summaries(arms):
    bf16, nf4 = arm(arms, "bf16"), arm(arms, "nf4")
    assert (bf16.n, bf16.runs) == (1, "1 ok, 1 oom")  # the oom seed has no numbers
    assert bf16.peak_gib == pytest.approx(20.0)
    assert (nf4.n, nf4.runs) == (3, "3 ok")
    assert nf4.peak_gib == pytest.approx(11.0) and nf4.tok_s == pytest.approx(1100.0)
    assert nf4.eval_loss == pytest.approx(1.1) and nf4.eval_ppl == pytest.approx(sum(map(math.exp, NF4["eval_loss"])) / 3)
    failed = arm(arms, "nf4", "adamw_8bit")
    assert (failed.n, failed.runs) == (0, "1 failed") and math.isnan(failed.peak_gib) and math.isnan(failed.tok_s)


def test_several_seeds_get_the_bootstrap_interval_across_seeds(arms):
    nf4 = arm(arms, "nf4")
    lo, hi = stats.bootstrap_ci(NF4["peak"])
    assert (nf4.peak_gib_ci95_low, nf4.peak_gib_ci95_high) == pytest.approx((lo, hi))
    # a percentile interval of the mean lies inside the data's range and around the mean
    assert 10.0 <= lo < 11.0 < hi <= 12.0
    fp4 = arm(arms, "fp4")
    assert 900.0 <= fp4.tok_s_ci95_low < 950.0 < fp4.tok_s_ci95_high <= 1000.0


def test_a_single_run_keeps_its_own_throughput_interval_only(arms):
    int8 = arm(arms, "int8")
    # fake_run: step-time CI is +-10% of the mean step time; tokens/s = tokens per step / step time,
    # so the interval is [500 / 1.1, 500 / 0.9]
    assert (int8.tok_s_ci95_low, int8.tok_s_ci95_high) == pytest.approx((500 / 1.1, 500 / 0.9))
    assert math.isnan(int8.peak_gib_ci95_low) and math.isnan(int8.eval_loss_ci95_high)  # no interval from one run


# ------------------------------------------------------------------------------ axis tables


def test_quant_table_percentages_vs_bf16_in_each_context(arms):
    table, baseline, fixed = tables.axis_table(arms, tables.AXES[0])
    assert baseline == "bf16" and fixed == {"adapter": "all_linear"}  # the adapter never varies
    # only the paged_adamw_32bit context has two quantizations: adamw and adamw_8bit hold nf4 alone
    assert set(table.optim) == {"paged_adamw_32bit"}
    t = table.set_index("quant_label")
    assert list(t.index) == ["bf16", "int8", "nf4", "nf4+DQ", "fp4"]
    assert t.loc["bf16", "is_baseline"] and not t.loc["nf4", "is_baseline"]
    assert t.loc["bf16", "peak_gib_delta_pct"] == pytest.approx(0.0)
    assert t.loc["nf4", "peak_gib_delta_pct"] == pytest.approx((11 - 20) / 20 * 100)  # -45%
    assert t.loc["fp4", "tok_s_delta_pct"] == pytest.approx((950 - 2000) / 2000 * 100)  # -52.5%
    assert t.loc["nf4+DQ", "eval_loss_delta_pct"] == pytest.approx((1.12 - 1.05) / 1.05 * 100)
    # metrics without a baseline comparison (m.delta false) get no column at all
    assert "train_loss_final_delta_pct" not in t and "torch_peak_gib_delta_pct" not in t


def test_requested_baseline_and_a_missing_one(arms):
    t, baseline, _ = tables.axis_table(arms, tables.AXES[0], "fp4")
    t = t.set_index("quant_label")
    assert baseline == "fp4" and t.loc["nf4", "peak_gib_delta_pct"] == pytest.approx((11 - 13.5) / 13.5 * 100)
    with pytest.warns(UserWarning, match="baseline quant=fp8 is not among"):
        _, baseline, _ = tables.axis_table(arms, tables.AXES[0], "fp8")
    assert baseline == "bf16"  # the axis' default


def test_choose_baseline_falls_back_to_the_first_in_order():
    axis = tables.AXES[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing requested: no warning
        assert tables.choose_baseline(["fp4", "nf4"], axis, None) == "nf4"  # bf16 absent: nf4 ranks first
    assert tables.choose_baseline(["fp4", "nf4", "bf16"], axis, None) == "bf16"


def test_optimizer_and_dq_tables_and_an_axis_that_never_varies(arms):
    t, baseline, _ = tables.axis_table(arms, tables.AXES[2])  # optim: compared where quant_label is nf4
    assert baseline == "adamw" and set(t.quant_label) == {"nf4"}
    t = t.set_index("optim")
    assert t.loc["paged_adamw_32bit", "peak_gib_delta_pct"] == pytest.approx((11 - 10.5) / 10.5 * 100)
    assert math.isnan(t.loc["adamw_8bit", "peak_gib"])  # failed arm listed, with no numbers
    t, baseline, _ = tables.axis_table(arms, tables.AXES[1])  # DQ on/off: nf4 only
    assert baseline == "off" and list(t.dq) == ["off", "on"]
    assert t.set_index("dq").loc["on", "peak_gib_delta_pct"] == pytest.approx((9.5 - 11) / 11 * 100)
    assert tables.axis_table(arms, tables.AXES[3]) is None  # adapter: all_linear everywhere


# ------------------------------------------------------------------------------ formatting


def test_cells_show_mean_interval_and_change(arms):
    table, _, _ = tables.axis_table(arms, tables.AXES[0])
    flat = tables.display(table, ["optim", "quant_label"])
    assert list(flat.columns[:3]) == ["optimizer", "quant", "runs"]  # config columns named as in HEADERS
    disp = flat.set_index("quant")
    nf4 = table.set_index("quant_label").loc["nf4"]
    assert disp.loc["nf4", "peak mem (GiB)"] == \
        f"11.00 [{nf4.peak_gib_ci95_low:,.2f}, {nf4.peak_gib_ci95_high:,.2f}] (-45.0%)"
    assert disp.loc["bf16", "peak mem (GiB)"] == "20.00"  # one run: no interval; the baseline: no change
    # int8: one run, its own interval [500/1.1, 500/0.9] = [454.5, 555.6] -> 455 and 556, and -75%
    assert disp.loc["int8", "tok/s [95% CI]"] == "500 [455, 556] (-75.0%)"
    assert disp.loc["bf16", "runs"] == "1 ok, 1 oom"
    grid = tables.display(tables.grid_table(arms), ["quant_label", "optim", "adapter"])
    assert grid.set_index(["quant", "optimizer"]).loc[("nf4", "adamw_8bit"), "peak mem (GiB)"] == "-"


def test_a_zero_width_interval_is_not_printed():
    table = pd.DataFrame({"quant_label": ["nf4"], "runs": ["1 ok"], "tok_s": [100.0], "tok_s_ci95_low": [100.2],
                          "tok_s_ci95_high": [99.8], "tok_s_delta_pct": [0.0], "is_baseline": [True]})
    disp = tables.display(table, ["quant_label"], (frame.METRIC["tok_s"],))
    assert disp.to_dict("records") == [{"quant": "nf4", "runs": "1 ok", "tok/s [95% CI]": "100"}]  # both ends: 100


@pytest.mark.parametrize("delta, text", [(12.34, "+12.3%"), (-45.0, "-45.0%"), (1.0, "+1.0%"), (-0.04, "-0.04%"),
                                         (0.5, "+0.50%")])
def test_pct_keeps_two_decimals_below_one_percent(delta, text):
    assert tables.pct(delta) == text


def test_tex_escape():
    assert tables.tex_escape("nf4+DQ · fast") == r"nf4+DQ $\cdot$ fast"
    assert tables.tex_escape("tok/s [95% CI] a_b & #1") == r"tok/s [95\% CI] a\_b \& \#1"
    assert tables.tex_escape("± Δ") == r"$\pm$ $\Delta$"


def test_write_gives_markdown_latex_and_csv(arms, tmp_path):
    numeric, _, _ = tables.axis_table(arms, tables.AXES[0])
    disp = tables.display(numeric, ["optim", "quant_label"])
    paths = tables.write(numeric, disp, tmp_path / "tables" / "quant", "Quantization type", ["Note one.", "Note two."])
    assert sorted(paths) == ["csv", "md", "tex"] and all(p.parent == tmp_path / "tables" for p in paths.values())
    md = paths["md"].read_text()
    assert md.startswith("### Quantization type\n\n| optimizer") and "Note one.\n\nNote two." in md
    assert md.count("\n| ") == len(disp) + 1  # header row and one row per arm (then the separator)
    tex = paths["tex"].read_text()
    assert r"\toprule" in tex and r"\label{tab:quant}" in tex and r"tok/s [95\% CI]" in tex
    assert r"\caption{Quantization type. Note one. Note two.}" in tex
    back = pd.read_csv(paths["csv"])
    assert list(back.columns) == list(numeric.columns) and len(back) == len(numeric)
    assert back.peak_gib.tolist() == pytest.approx(numeric.peak_gib.tolist())
    assert back.peak_gib_delta_pct.tolist() == pytest.approx(numeric.peak_gib_delta_pct.tolist())


# ------------------------------------------------------------------------------ statistics


def test_comparisons_pair_arms_in_matched_contexts(runs):
    comp = tables.comparisons(runs)
    nf4_fp4 = comp[(comp.comparison == "NF4 vs FP4") & (comp.metric == "peak_gib")]
    assert len(nf4_fp4) == 1  # fp4 exists only with paged_adamw_32bit
    row = nf4_fp4.iloc[0]
    assert row.context == "dq=off, optim=paged_adamw_32bit, adapter=all_linear, speed=recipe"
    assert (row.n_a, row.n_b, row.mean_a, row.mean_b) == (3, 2, pytest.approx(11.0), pytest.approx(13.5))
    assert row.delta_pct == pytest.approx((11 - 13.5) / 13.5 * 100)
    assert math.isfinite(row.p_welch) and row.p_welch_holm >= row.p_welch and row.note == ""
    # the tested metrics only (frame.METRICS' tested): peak, tok/s, final train loss, eval loss
    assert set(comp[comp.comparison == "NF4 vs FP4"].metric) == {"peak_gib", "tok_s", "train_loss_final", "eval_loss"}
    dq = comp[(comp.comparison == "DQ on vs off") & (comp.metric == "peak_gib")].iloc[0]
    assert (dq.n_a, dq.n_b) == (1, 3) and "needs n>=2 per arm" in dq.note and math.isnan(dq.p_welch_holm)
    paged = comp[comp.comparison.str.startswith("paged_adamw_32bit vs adamw")]
    assert set(paged.context) == {"quant_label=nf4, adapter=all_linear"}
    assert comp[comp.comparison == "all_linear vs qv"].empty  # no qv run anywhere
    # Holm over every test in the frame: adjusted p never below the raw one
    tested = comp.dropna(subset=["p_welch"])
    assert (tested.p_welch_holm >= tested.p_welch - 1e-15).all()


def _result(d, **r):
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"status": "ok", "env": {"gpu": "g"}, "started_at": "1", **r}))


def test_evaluations_of_one_training_arm_make_one_row_over_its_seeds(tmp_path):
    """qlab eval of each seed's adapter: one row per training arm and quantization (mean and 95% CI
    over the seeds), its quantization arms in one block (change vs bf16); a base without adapter apart."""
    ppl = {("bf16", 0): 90.0, ("bf16", 1): 92.0, ("nf4", 0): 110.0, ("nf4", 1): 116.0}
    for (quant, seed), value in ppl.items():
        trained = f"{quant}_qv_s{seed}"
        config = {"model": {"name": "m"}, "quant": {"type": quant, "double_quant": quant == "nf4"},
                  "adapter": {"targets": "qv"}, "seed": seed}
        _result(tmp_path / "train" / trained, run_id=trained, kind="train", sweep="train", config=config,
                axes={"quant": quant, "double_quant": quant == "nf4", "adapter": "qv", "seed": seed})
        _result(tmp_path / "ev" / f"e_{trained}", run_id=f"e_{trained}", kind="eval", sweep="ev",
                config={"task": "eval", "model": {"name": "m"}, "quant": config["quant"], "seed": 0,
                        "eval": {"adapter_run": f"/gone/train/{trained}", "tasks": ["t"]}},
                axes={"model": "m", "quant": quant, "double_quant": quant == "nf4", "adapter": "lora", "seed": 0},
                metrics={"adapter_run_id": trained, "lm_eval.t.word_perplexity": value, "eval_tasks": ["t"]})
    _result(tmp_path / "ev" / "base", run_id="base", kind="eval", sweep="ev",
            config={"task": "eval", "model": {"name": "m"}, "quant": {"type": "bf16"}, "seed": 0,
                    "eval": {"tasks": ["t"]}},
            axes={"model": "m", "quant": "bf16", "double_quant": False, "adapter": "none", "seed": 0},
            metrics={"lm_eval.t.word_perplexity": 95.0, "eval_tasks": ["t"]})
    runs = frame.load_runs(tmp_path / "ev")
    assert sorted(runs.seed) == [0, 0, 0, 1, 1]  # the training runs' seeds; the base's own
    assert set(runs[runs.adapter == "qv"].task_seed) == {0} and runs[runs.adapter == "qv"].trained_arm.nunique() == 1
    numeric, _, baseline, _ = tables.eval_display(runs)
    rows = {(r.quant_label, r.adapter.split(" ")[0]): r for _, r in numeric.iterrows()}
    assert set(rows) == {("bf16", "qv"), ("nf4+DQ", "qv"), ("bf16", "none")} and baseline == "bf16"
    nf4 = rows[("nf4+DQ", "qv")]
    assert nf4.n == 2 and nf4.adapter_run.startswith("train ") and nf4.adapter_run.endswith(", seeds 0, 1")
    assert nf4["t.word_perplexity"] == pytest.approx(113.0)
    assert nf4["t.word_perplexity_delta_pct"] == pytest.approx((113.0 - 91.0) / 91.0 * 100)


def test_comparisons_of_two_machines_agree_where_their_intervals_overlap():
    def comparison(run_id, started, fast_trainer, aa):
        pair = lambda lo, hi: {"ratio": (lo * hi) ** 0.5, "ci95": [lo, hi]}  # noqa: E731
        return {"run_id": run_id, "kind": "compare", "status": "ok", "started_at": started,
                "pairs": {"fast/trainer": pair(*fast_trainer)}, "aa_control": {"pair": "fast-aa/fast", **pair(*aa)}}

    runs = pd.DataFrame([comparison("c2", "2", (1.9, 2.3), (0.9, 1.1)), comparison("c1", "1", (2.0, 2.4), (1.12, 1.2)),
                         {"run_id": "f", "kind": "compare", "status": "failed", "started_at": "3"}])
    t = tables.compare_agreement(runs).set_index("pair")
    assert list(t.columns[:2]) == ["c1", "c2"]  # oldest first; the failed comparison left out
    assert t.loc["fast/trainer", "c1"] == f"{(2.0 * 2.4) ** 0.5:.3f} [2.000, 2.400]"
    assert t.loc["fast/trainer", "overlap"] == "[2.000, 2.300]" and t.loc["fast/trainer", "comparisons"] == 2
    assert t.loc["fast-aa/fast (A/A floor)", "overlap"] == "none"  # 1.10 < 1.12: the two machines disagree


# a backends x block sizes x adapter forms sweep, two seeds each: label -> (fake_run's arguments, peak GiB)
BACKEND_ARMS = {
    ("nf4", "all_linear"): (dict(quant="nf4"), 10.2),
    ("nf4+DQ", "all_linear"): (dict(quant="nf4", dq=True), 10.0),
    ("nf4+DQ/b128", "all_linear"): (dict(quant="nf4", dq=True, quant_cfg={"blocksize": 128}), 9.0),
    ("torchao nf4+DQ", "all_linear"): (dict(quant="nf4", dq=True, quant_cfg={"backend": "torchao"}), 11.0),
    ("hqq int4", "all_linear"): (dict(quant="int4", quant_cfg={"backend": "hqq"}), 12.0),
    ("nf4+DQ", "all_linear+loftq"): (dict(quant="nf4", dq=True, adapter_cfg={"init": "loftq"}), 10.5),
    ("nf4+DQ", "all_linear+DoRA"): (dict(quant="nf4", dq=True, adapter_cfg={"dora": True}), 13.0),
}


@pytest.fixture(scope="module")
def backend_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends") / "syn"
    for (label, adapter), (kw, peak) in BACKEND_ARMS.items():
        for seed in range(2):  # seed 1 peaks 0.2 GiB higher: each arm's mean is peak + 0.1
            fake_run(root, seed=seed, peak=peak + 0.2 * seed, **kw)
    runs = frame.load_runs(root)
    assert runs.group.nunique() == 1
    return runs


def test_backends_block_sizes_and_adapter_forms_are_arms_of_their_own(backend_runs):
    """One row per distinct arm, its two seeds aggregated: never two backends, block sizes or adapter
    forms pooled, in the quant, DQ and adapter tables alike."""
    arms = tables.arms(backend_runs)
    assert list(zip(arms.quant_label, arms.adapter)) == [
        ("nf4", "all_linear"), ("nf4+DQ", "all_linear"), ("nf4+DQ", "all_linear+DoRA"), ("nf4+DQ", "all_linear+loftq"),
        ("nf4+DQ/b128", "all_linear"), ("torchao nf4+DQ", "all_linear"), ("hqq int4", "all_linear")]
    assert (arms.n == 2).all()
    for _, a in arms.iterrows():
        assert a.peak_gib == pytest.approx(BACKEND_ARMS[(a.quant_label, a.adapter)][1] + 0.1)
    # quantization table: the adapter varies, so one block per adapter; without bf16 the baseline is nf4
    quant, baseline, _ = tables.axis_table(arms, tables.AXES[0])
    plain = quant[quant.adapter == "all_linear"]
    assert baseline == "nf4" and list(plain.quant_label) == ["nf4", "nf4+DQ", "nf4+DQ/b128", "torchao nf4+DQ",
                                                             "hqq int4"]
    hqq = plain.set_index("quant_label").loc["hqq int4"]
    assert hqq.peak_gib_delta_pct == pytest.approx((12.1 - 10.3) / 10.3 * 100)
    # DQ on vs off: only bitsandbytes nf4 at block size 64 has both; torchao's nf4+DQ is not its "on"
    dq, _, _ = tables.axis_table(arms, tables.AXES[1])
    assert list(zip(dq.quant, dq.dq)) == [("nf4", "off"), ("nf4", "on")]
    assert dq.peak_gib.tolist() == pytest.approx([10.3, 10.1])
    # adapter table: the forms against peft's LoRA on the same targets and quantization
    adapter, baseline, fixed = tables.axis_table(arms, tables.AXES[3])
    assert baseline == "all_linear" and fixed == {"optim": "paged_adamw_32bit"}
    assert list(adapter.adapter) == ["all_linear", "all_linear+DoRA", "all_linear+loftq"]
    assert set(adapter.quant_label) == {"nf4+DQ"}


def test_backend_and_adapter_form_pairs_compare_matched_arms(backend_runs):
    comp = tables.comparisons(backend_runs)
    peak = comp[comp.metric == "peak_gib"].set_index("comparison")
    ctx = "optim=paged_adamw_32bit, adapter=all_linear, speed=recipe"
    assert peak.loc["torchao NF4 vs bitsandbytes NF4", "context"] == f"dq=on, {ctx}"
    assert peak.loc["torchao NF4 vs bitsandbytes NF4", ["n_a", "n_b", "mean_a", "mean_b"]].tolist() == pytest.approx(
        [2, 2, 11.1, 10.1])
    assert peak.loc["HQQ int4 vs bitsandbytes NF4", "context"] == f"dq=off, {ctx}"  # 4.5 bits each
    assert peak.loc["HQQ int4 vs bitsandbytes NF4", ["mean_a", "mean_b"]].tolist() == pytest.approx([12.1, 10.3])
    # DQ on vs off pools no other backend or block size into nf4's "on" (two runs, not six)
    assert peak.loc["DQ on vs off", ["n_a", "n_b", "mean_a"]].tolist() == pytest.approx([2, 2, 10.1])
    for form, mean in (("loftq", 10.6), ("DoRA", 13.1)):
        row = peak.loc[f"all_linear+{form} vs all_linear"]
        assert row.context == "quant_label=nf4+DQ, optim=paged_adamw_32bit"
        assert [row.n_a, row.n_b, row.mean_a, row.mean_b] == pytest.approx([2, 2, mean, 10.1])
    assert "all_linear+pissa vs all_linear" not in peak.index and "NF4 vs FP4" not in peak.index


def test_evaluations_name_the_training_arm_s_backend_and_adapter_form(tmp_path):
    """qlab eval of two trained arms' seeds (LoftQ on nf4+DQ/b128, peft's LoRA on HQQ int4), each on its own
    base and on bf16: each arm one row per base over its seeds, named by its adapter's form and, where
    evaluated on another base, the quantization it trained on (backend and block size included)."""
    trained = {"loftq": ({"type": "nf4", "double_quant": True, "backend": "bitsandbytes", "blocksize": 128},
                         {"targets": "all_linear", "init": "loftq", "dora": False}),
               "hqq": ({"type": "int4", "double_quant": False, "backend": "hqq", "blocksize": 64},
                       {"targets": "all_linear", "init": "gaussian", "dora": False})}
    for name, (quant, adapter) in trained.items():
        for seed in range(2):
            run = f"{name}_s{seed}"
            config = {"model": {"name": "m"}, "quant": quant, "adapter": adapter, "seed": seed}
            _result(tmp_path / "train" / run, run_id=run, kind="train", sweep="train", config=config,
                    axes={"quant": quant["type"], "double_quant": quant["double_quant"], "adapter": "all_linear",
                          "seed": seed})
            for evaluated in (quant, {"type": "bf16", "double_quant": False}):
                e = f"e_{run}_{evaluated['type']}"
                _result(tmp_path / "ev" / e, run_id=e, kind="eval", sweep="ev",
                        config={"task": "eval", "model": {"name": "m"}, "quant": evaluated, "seed": 0,
                                "eval": {"adapter_run": f"/gone/train/{run}", "tasks": ["t"]}},
                        axes={"model": "m", "quant": evaluated["type"], "double_quant": evaluated["double_quant"],
                              "adapter": "lora", "seed": 0},
                        metrics={"adapter_run_id": run, "lm_eval.t.word_perplexity": 100.0 + seed, "eval_tasks": ["t"]})
    runs = frame.load_runs(tmp_path / "ev")
    assert runs.group.nunique() == 1 and runs.trained_arm.nunique() == 2
    numeric, _, baseline, _ = tables.eval_display(runs)
    # "<training sweep> <arm hash>, seeds 0, 1" names each arm (frame.trained_arm)
    rows = sorted((r.quant_label, re.sub(r" \(train [0-9a-f]{8}, seeds 0, 1\)", "", r.adapter), r.n)
                  for _, r in numeric.iterrows())
    assert baseline == "bf16" and rows == [
        ("bf16", "all_linear+loftq, trained on nf4+DQ/b128", 2), ("bf16", "all_linear, trained on hqq int4", 2),
        ("hqq int4", "all_linear", 2), ("nf4+DQ/b128", "all_linear+loftq", 2)]
