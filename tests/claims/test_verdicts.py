"""Claim verdicts computed from synthetic results (known numbers) and from the analytic model."""

import json
import shutil

import pytest
import yaml

from qlab.claims import verdicts
from qlab.results.frame import load_runs


def fake_run(root, sweep, i, quant, dq, adapter, optim, seed, status="ok", **metrics):
    d = root / sweep / f"run{i}"
    d.mkdir(parents=True)
    config = {"model": {"name": "m"}, "data": {"name": "chat", "max_seq_len": 64, "pad_to": "longest"},
              "train": {"batch_size": 4, "steps": 10}, "quant": {"type": quant, "double_quant": dq},
              "optim": {"name": optim}, "adapter": {"targets": adapter}, "seed": seed}
    (d / "result.json").write_text(json.dumps({
        "run_id": f"run{i}", "sweep": sweep, "status": status, "config": config, "env": {"cpu": "test"},
        "axes": {"model": "m", "quant": quant, "double_quant": dq, "optim": optim, "adapter": adapter, "seed": seed},
        "metrics": metrics}))


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    i = 0
    # eval loss: nf4+DQ ~ bf16 (within 1%), fp4 clearly worse, qv clearly worse; 3 seeds each
    table = {("bf16", False, "all_linear"): [2.000, 2.002, 1.998], ("nf4", True, "all_linear"): [2.001, 2.003, 1.999],
             ("fp4", False, "all_linear"): [2.100, 2.104, 2.096], ("nf4", True, "qv"): [1.90, 1.91, 1.89]}
    for (q, dq, ad), losses in table.items():
        for seed, loss in enumerate(losses):
            i += 1
            fake_run(root, "quality", i, q, dq, ad, "paged_adamw_32bit", seed, eval_loss=loss,
                     bits_per_quantized_param=4.127 if dq else (4.5 if q != "bf16" else None))
    # the memory cap: paged completes, standard runs out of memory
    fake_run(root, "spike", 100, "nf4", True, "all_linear", "paged_adamw_32bit", 0)
    fake_run(root, "spike", 101, "nf4", True, "all_linear", "adamw", 0, status="oom")
    return root


def claim(**kw):
    return {"id": "c", "statement": "s", "source": "x", **kw}


def verdict(c, results):
    [row] = verdicts.evaluate([c], results)
    return row


def test_equivalent_reproduced_and_not(results):
    c = claim(kind="equivalent", sweep="quality", metric="eval_loss", margin=0.01,
              a={"quant_label": "nf4+DQ", "adapter": "all_linear"}, b={"quant_label": "bf16", "adapter": "all_linear"})
    r = verdict(c, results)
    assert r["verdict"] == "reproduced" and r["measured"] == pytest.approx(0.001)
    lo, hi = r["ci"]
    assert -0.02 <= lo < 0.001 < hi <= 0.02
    # FP4 is 5% worse: "FP4 matches 16-bit" must come out NOT reproduced
    c["a"] = {"quant_label": "fp4", "adapter": "all_linear"}
    assert verdict(c, results)["verdict"] == "not reproduced"


def test_lower_uses_welch_and_can_fail(results):
    base = dict(kind="lower", sweep="quality", metric="eval_loss")
    r = verdict(claim(**base, a={"quant_label": "nf4+DQ", "adapter": "all_linear"},
                      b={"quant_label": "fp4", "adapter": "all_linear"}), results)
    assert r["verdict"] == "reproduced" and "Welch p=" in r["reason"]
    # in these numbers q/v-only has the LOWER loss: "all-linear beats q/v" is not reproduced
    r = verdict(claim(**base, a={"quant_label": "nf4+DQ", "adapter": "all_linear"},
                      b={"quant_label": "nf4+DQ", "adapter": "qv"}), results)
    assert r["verdict"] == "not reproduced" and r["measured"] == pytest.approx(0.101)


def test_one_seed_or_no_runs_is_inconclusive(results):
    c = claim(kind="lower", sweep="quality", metric="eval_loss", a={"quant_label": "nf4+DQ", "seed": 0},
              b={"quant_label": "fp4", "seed": 0})
    r = verdict(c, results)
    assert r["verdict"] == "inconclusive" and "fewer than 2 seeds" in r["reason"]
    c["sweep"] = "never-ran"
    r = verdict(c, results)
    assert r["verdict"] == "inconclusive" and "not run yet" in r["reason"]


def test_difference_value_and_survives(results):
    d = claim(kind="difference", sweep="quality", metric="bits_per_quantized_param", paper_value=0.373,
              tolerance={"abs": 0.005}, a={"quant_label": "fp4"}, b={"quant_label": "nf4+DQ"})
    assert verdict(d, results)["verdict"] == "reproduced"
    v = claim(kind="value", sweep="quality", metric="eval_loss", where={"quant_label": "bf16"},
              paper_value=2.5, tolerance={"rel": 0.1})
    r = verdict(v, results)
    assert r["verdict"] == "not reproduced" and r["measured"] == pytest.approx(2.0)
    s = claim(kind="survives", sweep="spike", a={"optim": "paged_adamw_32bit"}, b={"optim": "adamw"})
    assert verdict(s, results)["verdict"] == "reproduced"
    s["a"], s["b"] = s["b"], s["a"]
    assert verdict(s, results)["verdict"] == "not reproduced"


def test_estimate_and_kernel_claims():
    dq = claim(kind="estimate", model="llama-65b", metric="weight_bytes", setting={"quant": "nf4"},
               minus={"quant": "nf4", "double_quant": True}, scale=1e9, paper_value=3.0, tolerance={"abs": 0.5})
    [r] = verdicts.evaluate([dq], None)
    # 0.373 bits x 64.76e9 quantized params / 8 = 3.02 GB
    assert r["verdict"] == "reproduced" and r["measured"] == pytest.approx(3.02, abs=0.01)
    k = claim(kind="kernel_order", kinds=["nf4", "fp4", "int4"], size=256)
    [r] = verdicts.evaluate([k], None)
    assert r["verdict"] == "reproduced" and r["reason"].startswith("MSE on N(0,1): nf4")
    k["kinds"] = ["fp4", "nf4"]  # a claim that FP4 beats NF4 must fail
    [r] = verdicts.evaluate([k], None)
    assert r["verdict"] == "not reproduced"


def test_the_shipped_claims_file_and_the_cli(tmp_path, results, capsys):
    shipped = verdicts.load_claims(verdicts.DEFAULT_CLAIMS)
    assert {c["id"] for c in shipped} >= {
        "dq_bits_7b", "dq_gb_65b", "nf4_lowest_error", "qlora_matches_16bit_qv", "qlora_matches_16bit_all_linear",
        "fp4_lags_qv", "fp4_lags_all_linear", "all_linear_matches_full_ft", "qv_short_of_full_ft", "paged_same_speed_compare",
        "paged_rides_spikes", "spike_allocator_cap", "footprint_7b_4bit", "finetune_65b_48gb",
        "nf4_lowest_error_base", "ptq_nf4_lowest_ppl", "ptq_fp4_beats_int4"}
    # the real-model claims read the sweeps experiment=real and experiment=backends write
    # (tracker.sweep: real-/backends-${model.name}) and the qlab eval of real's adapters
    # (experiments/gpu_evidence.sh real-eval: no experiment to run)
    real = [c for c in shipped if c["kind"] in verdicts.PAIRED]
    assert {c["sweep"] for c in real} == {"real-smollm2-135m", "eval-smollm2-135m", "backends-smollm2-135m"}
    assert {c.get("experiment") for c in real if c["sweep"] == "real-smollm2-135m"} == {"real"}
    assert {c.get("experiment") for c in real if c["sweep"] == "backends-smollm2-135m"} == {"backends"}
    assert {c["metric"] for c in real if c["sweep"] == "eval-smollm2-135m"} == {"lm_eval.qlab_wiki_ppl.bits_per_byte"}
    assert all(c["kind"] == "lower_paired" or c["margin"] == {"rel": 0.01} for c in real)
    by_id = {c["id"]: c for c in shipped}
    assert by_id["paged_rides_spikes"]["kind"] == "untested" and by_id["spike_allocator_cap"]["information"]
    assert by_id["dq_bits_7b"]["fact"] and by_id["dq_gb_65b"]["fact"]
    assert by_id["paged_same_speed_compare"]["kind"] == "speed_ratio"  # speed: the interleaved comparison only
    assert not [c for c in shipped if c["kind"] in ("equivalent", "lower") and c.get("metric") == "tokens_per_s"]
    mine = tmp_path / "claims.yaml"
    mine.write_text(yaml.safe_dump({"claims": [
        claim(id="eq", kind="equivalent", sweep="quality", metric="eval_loss", margin=0.01,
              a={"quant_label": "nf4+DQ", "adapter": "all_linear"}, b={"quant_label": "bf16", "adapter": "all_linear"}),
        claim(id="sp", kind="survives", sweep="spike", a={"optim": "paged_adamw_32bit"}, b={"optim": "adamw"})]}))
    assert verdicts.main(["--claims", str(mine), "--results", str(results), "--no-run"]) == 0
    page = (results / "claims" / "claims.md").read_text()
    assert page.count("**reproduced**") == 2 and "| claim | source | measured on | paper |" in page
    assert json.loads((results / "claims" / "claims.json").read_text())["claims"][0]["id"] == "eq"
    # where each claim's numbers were measured: the hardware its evidence recorded
    assert "| `quality` | eq | test |" in page and "| `spike` | sp | test |" in page
    # the README's compact table: one row per claim, nothing but claim, paper, measured, verdict
    summary = (results / "claims" / "summary.md").read_text().splitlines()
    assert summary[:2] == ["| claim | measured on | paper | measured | margin | n | verdict |",
                           "|---|---|---|---|---|---|---|"]
    assert summary[2].startswith("| s | m · chat | n/a | 0.001 [")
    assert summary[2].endswith("| +-1% of b | n=3 vs 3 | **reproduced** |")
    assert summary[3] == "| s | m · chat | n/a | n/a | - | n=1 vs 1 | **reproduced** |"
    assert summary[4] == "" and summary[5].startswith("2 reproduced, 0 not reproduced, 0 inconclusive;")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"claims": [claim(kind="vibes")]}))
    assert verdicts.main(["--claims", str(bad), "--results", str(results), "--no-run"]) == 2
    assert "unknown kind 'vibes'" in capsys.readouterr().err


def test_qlab_claims_runs_a_missing_sweep_end_to_end(tmp_path, capsys):
    """`make claims` on a CPU: the claim's sweep has no results, so qlab runs it (a real Hydra
    multirun of the claim's experiment, cut by command-line overrides to 2 adapters x 2 seeds
    of the tiny preset) and computes the verdict from it; a second call runs nothing."""
    from conftest import FAST

    mine = tmp_path / "claims.yaml"
    mine.write_text(yaml.safe_dump({"claims": [claim(
        id="all_linear", kind="lower", sweep="quality-tiny", experiment="quality", metric="eval_loss",
        overrides=["model=tiny-llama", *FAST, "quant=nf4", "quant.double_quant=true", "adapter=qv,all_linear",
                   "seed=0,1"],
        a={"quant_label": "nf4+DQ", "adapter": "all_linear"}, b={"quant_label": "nf4+DQ", "adapter": "qv"})]}))
    results = tmp_path / "results"
    assert verdicts.main(["--claims", str(mine), "--results", str(results)]) == 0
    assert "running missing sweep" in capsys.readouterr().out
    done = [json.loads(p.read_text()) for p in (results / "quality-tiny").glob("*/result.json")]
    assert sorted((r["axes"]["adapter"], r["axes"]["seed"], r["status"]) for r in done) == [
        ("all_linear", 0, "ok"), ("all_linear", 1, "ok"), ("qv", 0, "ok"), ("qv", 1, "ok")]
    [row] = json.loads((results / "claims" / "claims.json").read_text())["claims"]
    loss = {ad: [r["metrics"]["eval_loss"] for r in done if r["axes"]["adapter"] == ad] for ad in ("all_linear", "qv")}
    assert row["n"] == "n=2 vs 2" and row["ci"] is not None
    assert row["measured"] == pytest.approx(sum(loss["all_linear"]) / 2 - sum(loss["qv"]) / 2)
    assert verdicts.main(["--claims", str(mine), "--results", str(results)]) == 0
    assert "running missing sweep" not in capsys.readouterr().out


def fake_comparison(root, sweep, name, pairs: dict, aa=(0.97, 1.03)):
    """A compare result (task=compare) whose pairs have the given 95% intervals."""
    d = root / sweep / name
    d.mkdir(parents=True)
    def pair(lo, hi):
        return {"ratio": (lo * hi) ** 0.5, "ci95": [lo, hi], "half_width": (hi / lo) ** 0.5 - 1, "rounds": 12,
                "verdict": "a faster" if lo > 1 else "a slower" if hi < 1 else "no difference"}

    metrics = {"pairs": {p: pair(*ci) for p, ci in pairs.items()}, "rounds_completed": 12, "stopped": "target",
               "aa_control": {"pair": "fast-aa/fast", **pair(*aa), "covers_1": aa[0] <= 1 <= aa[1]}}
    (d / "result.json").write_text(json.dumps({
        "run_id": name, "kind": "compare", "sweep": sweep, "status": "ok", "metrics": metrics, "env": {"gpu": "test"},
        "config": {"task": "compare", "model": {"name": "m"}}, "axes": {"model": "m", "seed": 0}}))


@pytest.mark.parametrize("ci, aa, target, verdict", [
    ((1.62, 1.78), (0.97, 1.03), {"at_least": 1.5}, "reproduced"),
    ((1.15, 1.25), (0.97, 1.03), {"at_least": 1.5}, "not reproduced"),  # fast only 1.2x the Trainer: fails
    ((1.40, 1.60), (0.97, 1.03), {"at_least": 1.5}, "inconclusive"),  # straddles the target
    ((1.50, 1.60), (0.97, 1.03), {"at_least": 1.5}, "reproduced"),  # the boundary counts as a pass
    ((1.62, 1.78), (1.04, 1.10), {"at_least": 1.5}, "inconclusive"),  # A/A excludes 1: not a valid comparison
    ((0.80, 0.95), (0.97, 1.03), {"at_most": 1.0}, "reproduced"),
    ((0.98, 1.03), (0.97, 1.03), {"margin": 0.05}, "reproduced"),  # equivalent within 5%
    ((1.08, 1.15), (0.97, 1.03), {"margin": 0.05}, "not reproduced"),
])
def test_speed_ratio_on_the_pairs_interval(tmp_path, ci, aa, target, verdict):
    fake_comparison(tmp_path, "compare-m", "c1", {"fast/trainer": ci}, aa)
    r = verdict_of(claim(kind="speed_ratio", sweep="compare-m", pair="fast/trainer", **target), tmp_path)
    assert r["verdict"] == verdict and r["n"] == "12 paired rounds" and r["ci"] == pytest.approx(list(ci))
    if aa[0] > 1:
        assert "excludes 1, the comparison is not valid" in r["reason"]


def verdict_of(c, results):
    [row] = verdicts.evaluate([c], results)
    return row


def test_speed_ratio_needs_a_comparison_and_every_one_must_agree(tmp_path):
    c = claim(kind="speed_ratio", sweep="compare-m", pair="fast/trainer", at_least=1.5)
    assert "not run yet" in verdict_of(c, tmp_path)["reason"]
    fake_comparison(tmp_path, "compare-m", "c1", {"fast/bf16": (0.9, 1.1)})
    r = verdict_of(c, tmp_path)
    assert r["verdict"] == "inconclusive" and "has the pair fast/trainer" in r["reason"]
    fake_comparison(tmp_path, "compare-m", "c2", {"fast/trainer": (1.6, 1.7)})
    assert verdict_of(c, tmp_path)["verdict"] == "reproduced"
    fake_comparison(tmp_path, "compare-m", "c3", {"fast/trainer": (1.65, 1.8)})  # a second machine agrees
    r = verdict_of(c, tmp_path)
    assert r["verdict"] == "reproduced" and r["n"] == "2 comparisons (12 + 12 rounds)"
    assert r["reason"].startswith("2 comparisons, their 95% intervals overlap on [1.650, 1.700]")
    fake_comparison(tmp_path, "compare-m", "c4", {"fast/trainer": (1.75, 1.9)})  # same verdict, apart from c2
    r = verdict_of(c, tmp_path)
    assert r["verdict"] == "inconclusive" and r["reason"].startswith("the comparisons' 95% intervals do not overlap")
    fake_comparison(tmp_path, "compare-m", "c5", {"fast/trainer": (1.1, 1.2)})  # a machine that disagrees
    r = verdict_of(c, tmp_path)
    assert r["verdict"] == "inconclusive" and r["reason"].startswith("the comparisons disagree")
    assert r["n"].startswith("4 comparisons")


def test_ratio_of_isolated_peaks(tmp_path):
    """fast's torch peak over the recipe's: 9 / 11 GB passes; 11.5 / 11 GB must fail."""
    fake_run(tmp_path, "peaks", 1, "nf4", True, "all_linear", "paged_adamw_32bit", 0, peak_allocated_bytes=11e9)
    fake_run(tmp_path, "peaks", 2, "bf16", False, "all_linear", "paged_adamw_32bit", 0, peak_allocated_bytes=9e9)
    c = claim(kind="ratio", sweep="peaks", metric="peak_allocated_bytes", a={"quant_label": "bf16"},
              b={"quant_label": "nf4+DQ"}, at_most=1.0)
    r = verdict_of(c, tmp_path)
    assert r["verdict"] == "reproduced" and r["measured"] == pytest.approx(9 / 11) and r["n"] == "n=1 vs 1"
    fake_run(tmp_path, "peaks2", 3, "nf4", True, "all_linear", "paged_adamw_32bit", 0, peak_allocated_bytes=11e9)
    fake_run(tmp_path, "peaks2", 4, "bf16", False, "all_linear", "paged_adamw_32bit", 0, peak_allocated_bytes=11.5e9)
    assert verdict_of({**c, "sweep": "peaks2"}, tmp_path)["verdict"] == "not reproduced"


# ------------------------------------------------------------------ paired kinds

def real_run(root, sweep, quant, dq, adapter, seed, eval_loss, status="ok", steps=300, lr=2e-4, started="1",
             trainable=4_884_480, tokens_per_step=4096):
    """A training result as experiment=real writes it: the stored config (a GGUF model, chitchat)
    and the metrics the paired kinds read."""
    run_id = f"smollm2_{quant}{'-dq' if dq else ''}_{adapter}_s{seed}_{steps}_{started}"
    d = root / sweep / run_id
    d.mkdir(parents=True)
    config = {"model": {"name": "smollm2-135m", "preset": None, "name_or_path": None, "gguf": "smollm2-135m"},
              "data": {"name": "chitchat", "max_seq_len": 512, "pad_to": "max_seq_len"},
              "train": {"batch_size": 8, "steps": steps, "progress": False},
              "quant": {"type": quant, "double_quant": dq}, "optim": {"name": "paged_adamw_32bit", "lr": lr},
              "adapter": {"targets": adapter, "r": 64}, "seed": seed,
              "tracker": {"sweep": sweep, "results_dir": str(root)}}
    metrics = {} if status != "ok" else {"eval_loss": eval_loss, "steps_completed": steps,
                                         "max_tokens_per_step": tokens_per_step, "trainable_params": trainable}
    (d / "result.json").write_text(json.dumps({
        "run_id": run_id, "sweep": sweep, "status": status, "config": config, "env": {"gpu": "test GPU"},
        "axes": {"model": "smollm2-135m", "quant": quant, "double_quant": dq, "optim": "paged_adamw_32bit",
                 "adapter": adapter, "seed": seed}, "metrics": metrics, "started_at": started}))
    return run_id


# each seed has its own level (data order, init): 2.60, 2.90, 2.50, 2.75, 3.10; the arms differ by a
# steady amount within a seed. nf4+DQ: +0.005 over bf16 (equivalent within 1% = +-0.0277);
# fp4: +0.08 over nf4+DQ on all_linear (NF4+DQ lower), -0.04 below it on qv (against the paper)
SEEDS = [2.60, 2.90, 2.50, 2.75, 3.10]
JITTER = [0.002, -0.001, 0.0, -0.002, 0.001]


@pytest.fixture
def real(tmp_path):
    root = tmp_path / "results"
    for seed, (level, j) in enumerate(zip(SEEDS, JITTER)):
        for adapter in ("qv", "all_linear"):
            real_run(root, "real", "bf16", False, adapter, seed, level)
            real_run(root, "real", "nf4", True, adapter, seed, level + 0.005 + j)
        real_run(root, "real", "fp4", False, "all_linear", seed, level + 0.085 + j)
        real_run(root, "real", "fp4", False, "qv", seed, level - 0.035 + j)
        # full fine-tuning: its own lr, every weight trainable; all-linear within 0.4%, q/v 3% above it
        real_run(root, "real", "bf16", False, "full", seed, level - 0.01 + j, lr=2e-5, trainable=134_515_008)
    return root


def paired(kind, a, b, **kw):
    return claim(kind=kind, sweep="real", metric="eval_loss", unit="nats", a=a, b=b, **kw)


NF4_AL, BF16_AL = {"quant_label": "nf4+DQ", "adapter": "all_linear"}, {"quant_label": "bf16", "adapter": "all_linear"}


def test_equivalent_paired_reproduced_with_every_number_in_the_row(real):
    r = verdict(paired("equivalent_paired", NF4_AL, BF16_AL, margin={"rel": 0.01}), real)
    # d = 0.005 + jitter: mean 0.005; b's mean 2.77, margin 0.0277
    assert r["verdict"] == "reproduced" and r["n"] == "5 pairs" and r["ci_level"] == pytest.approx(0.9)
    assert r["measured"] == pytest.approx(0.005) and -0.0277 < r["ci"][0] < 0.005 < r["ci"][1] < 0.0277
    assert r["margin"] == "+-1% of b's mean = +-0.0277" and r["measured_on"].startswith("smollm2-135m (dequantized")
    assert "nf4+DQ all_linear 2.7750, bf16 all_linear 2.7700" in r["reason"] and "TOST p=" in r["reason"]
    assert "compared: quant.double_quant, quant.type" in r["reason"] and "unpaired" not in r["reason"]
    # an absolute margin, stated in nats, is applied as it stands
    r = verdict(paired("equivalent_paired", NF4_AL, BF16_AL, margin={"abs": 0.002}), real)
    assert r["verdict"] == "not reproduced" and r["margin"] == "+-0.002 (absolute)"  # 0.005 > 0.002 everywhere


def test_equivalent_paired_must_fail_and_can_be_inconclusive(real):
    fp4 = {"quant_label": "fp4", "adapter": "all_linear"}
    r = verdict(paired("equivalent_paired", fp4, BF16_AL, margin={"rel": 0.01}), real)
    assert r["verdict"] == "not reproduced" and ": not equivalent;" in r["reason"]  # +0.085 >> 0.0277
    # a margin just around the difference: the 90% interval straddles it
    r = verdict(paired("equivalent_paired", NF4_AL, BF16_AL, margin={"abs": 0.006}), real)
    assert r["verdict"] == "inconclusive" and ": inconclusive;" in r["reason"]
    # expect: different turns "not equivalent" into the claim's success
    r = verdict(paired("equivalent_paired", fp4, BF16_AL, margin={"rel": 0.01}, expect="different"), real)
    assert r["verdict"] == "reproduced"


def test_lower_paired_on_both_adapter_arms(real):
    # all-linear: NF4+DQ 0.08 below FP4 in every seed -> reproduced; q/v: FP4 0.04 below -> not reproduced
    r = verdict(paired("lower_paired", NF4_AL, {"quant_label": "fp4", "adapter": "all_linear"}), real)
    assert r["verdict"] == "reproduced" and r["measured"] == pytest.approx(-0.08) and r["ci_level"] == 0.95
    assert "paired t p=" in r["reason"] and "a lower" in r["reason"]
    r = verdict(paired("lower_paired", {"quant_label": "nf4+DQ", "adapter": "qv"},
                       {"quant_label": "fp4", "adapter": "qv"}), real)
    assert r["verdict"] == "not reproduced" and r["measured"] == pytest.approx(0.04) and "a higher" in r["reason"]


def test_full_fine_tuning_claims_pair_across_lr_and_check_tokens(real):
    full = {"quant_label": "bf16", "adapter": "full"}
    eq = paired("equivalent_paired", NF4_AL, full, margin={"rel": 0.01}, show=["trainable_params"], equal_tokens=True)
    r = verdict(eq, real)
    # d = 0.015 exactly (both carry the jitter): inside +-1% of 2.76
    assert r["verdict"] == "reproduced" and r["measured"] == pytest.approx(0.015)
    assert "compared: adapter.targets, optim.lr, quant.double_quant, quant.type" in r["reason"]
    assert "trainable_params: a 4.884e+06, b 1.345e+08" in r["reason"]
    assert "equal tokens: 1,228,800 positions per run" in r["reason"]
    qv = {"quant_label": "nf4+DQ", "adapter": "qv"}
    ni = paired("noninferior_paired", qv, full, margin={"rel": 0.01}, expect="inferior")
    r = verdict(ni, real)  # q/v 0.015 above full too: non-inferior at 1% -> "q/v falls short" not reproduced
    assert r["verdict"] == "not reproduced" and ": non-inferior;" in r["reason"]
    r = verdict({**ni, "margin": {"abs": 0.005}}, real)  # at 0.005 q/v is worse by more than the margin
    assert r["verdict"] == "reproduced" and ": inferior;" in r["reason"]
    # a pair that did not see the same tokens is no comparison
    real_run(real, "real", "bf16", False, "full", 7, 2.0, lr=2e-5, tokens_per_step=2048)
    real_run(real, "real", "nf4", True, "all_linear", 7, 2.0)
    r = verdict(eq, real)
    assert r["verdict"] == "inconclusive" and "unequal tokens in a pair: seed=7: a 1,228,800, b 614,400" in r["reason"]


def test_runs_without_a_partner_are_named_not_dropped(real):
    # seed 5 only in a; seed 6 in both, but b's run ran out of memory; a 150-step run pairs with nothing;
    # seed 0 of a re-run later (the newer counts, the older is listed)
    real_run(real, "real", "nf4", True, "all_linear", 5, 2.7)
    real_run(real, "real", "nf4", True, "all_linear", 6, 2.7)
    oom = real_run(real, "real", "bf16", False, "all_linear", 6, None, status="oom")
    real_run(real, "real", "bf16", False, "all_linear", 2, 2.5, steps=150)
    old = next(p.name for p in (real / "real").iterdir() if p.name.startswith("smollm2_nf4-dq_all_linear_s0_"))
    real_run(real, "real", "nf4", True, "all_linear", 0, 2.605, started="2")
    r = verdict(paired("equivalent_paired", NF4_AL, BF16_AL, margin={"rel": 0.01}), real)
    assert r["n"] == "5 pairs"
    assert "a seed=5 (no run of b with these settings)" in r["reason"]
    assert f"b seed=6 ({oom} oom)" in r["reason"] and "a seed=6" not in r["reason"]
    assert "b seed=2, train.steps=150 (no run of a with these settings)" in r["reason"]
    assert f"superseded by newer runs: a {old}" in r["reason"]
    p = verdicts.pair_runs(paired("equivalent_paired", NF4_AL, BF16_AL), load_runs(real / "real"))
    assert p.labels == [f"seed={s}" for s in range(5)] and p.a[0] == pytest.approx(2.605)
    # fewer than 2 pairs: no interval, inconclusive, and still every run accounted for
    r = verdict(paired("equivalent_paired", {**NF4_AL, "seed": 5}, BF16_AL, margin={"rel": 0.01}), real)
    assert r["verdict"] == "inconclusive" and r["n"] == "0 pairs" and "a seed=5" in r["reason"]


def test_paired_claims_are_checked_when_loaded(tmp_path):
    for bad, message in [({"margin": 0.01}, "needs margin: {abs: x}"), ({"margin": {"rel": 0}}, "needs margin"),
                         ({"margin": {"rel": 0.01}, "expect": "maybe"}, "expect must be one of equivalent, different")]:
        f = tmp_path / "bad.yaml"
        f.write_text(yaml.safe_dump({"claims": [paired("equivalent_paired", NF4_AL, BF16_AL, **bad)]}))
        with pytest.raises(ValueError, match=message):
            verdicts.load_claims(f)
    f.write_text(yaml.safe_dump({"claims": [claim(kind="untested")]}))
    with pytest.raises(ValueError, match="kind untested needs a reason"):
        verdicts.load_claims(f)


def test_untested_fact_and_information_rows_and_their_counts(tmp_path, results):
    claims = [
        claim(id="paging", kind="untested", reason="not safely testable on a shared GPU"),
        claim(id="bits", kind="difference", fact=True, sweep="quality", metric="bits_per_quantized_param",
              paper_value=0.373, tolerance={"abs": 0.005}, a={"quant_label": "fp4"}, b={"quant_label": "nf4+DQ"}),
        claim(id="bad_fact", kind="difference", fact=True, sweep="quality", metric="bits_per_quantized_param",
              paper_value=1.0, tolerance={"abs": 0.005}, a={"quant_label": "fp4"}, b={"quant_label": "nf4+DQ"}),
        claim(id="cap", kind="survives", information=True, sweep="spike", a={"optim": "paged_adamw_32bit"},
              b={"optim": "adamw"}),
    ]
    rows = {r["id"]: r for r in verdicts.evaluate(claims, results)}
    assert rows["paging"]["verdict"] == "untested" and rows["paging"]["reason"] == "not safely testable on a shared GPU"
    assert rows["paging"]["evidence"] == "untested"
    assert rows["bits"]["verdict"] == "fact" and rows["bits"]["reason"].startswith("a fact of the storage format")
    # arithmetic that does not give the paper's number is still reported as failing
    bad = rows["bad_fact"]
    assert bad["verdict"] == "not reproduced" and "a fact of the storage format" in bad["reason"]
    assert rows["cap"]["verdict"] == "information" and "every run of a completed" in rows["cap"]["reason"]
    assert verdicts.counts_line(list(rows.values())) == (
        "0 reproduced, 1 not reproduced, 0 inconclusive, 1 fact, 1 untested, 1 information")
    mine = tmp_path / "c.yaml"
    mine.write_text(yaml.safe_dump({"claims": claims}))
    assert verdicts.main(["--claims", str(mine), "--results", str(results), "--no-run"]) == 0
    page = (results / "claims" / "c.md").read_text()
    assert "1 fact, 1 untested, 1 information" in page and "| **untested** | not safely testable" in page
    assert "| `untested` | paging | not measured |" in page
    summary = (results / "claims" / "summary.md").read_text()
    assert "| **fact** |" in summary and summary.rstrip().splitlines()[-1].startswith(
        "0 reproduced, 1 not reproduced, 0 inconclusive, 1 fact, 1 untested, 1 information;")
    # the README's table holds the rows with a verdict; the information row stays in claims.md, counted
    assert "| **information** |" not in summary and "| **information** |" in page


def test_the_page_shows_every_arm_of_a_paired_sweep(tmp_path, real):
    mine = tmp_path / "c.yaml"
    mine.write_text(yaml.safe_dump({"claims": [
        paired("equivalent_paired", NF4_AL, BF16_AL, id="q", margin={"rel": 0.01})]}))
    assert verdicts.main(["--claims", str(mine), "--results", str(real), "--no-run"]) == 0
    page = (real / "claims" / "c.md").read_text()
    assert "| 0.005 [90%: " in page and "| +-1% of b's mean = +-0.0277 | 5 pairs | **reproduced** |" in page
    assert "## Every arm of `real` (eval_loss)" in page
    # seven arms, each with its runs, mean [95% CI] and trainable parameters, the ones no claim names too
    assert "| bf16 | full | 5/5 | 2.7600 [" in page and "| fp4 | qv | 5/5 |" in page and "134,515,008" in page


def test_estimate_shows_device_and_total_in_gb_and_gib():
    c = claim(kind="estimate", model="llama-65b", metric="device_bytes", show=["total_bytes"], unit="GB",
              setting={"quant": "nf4", "double_quant": True, "batch": 1, "seq": 512}, scale=1e9, at_most=48)
    [r] = verdicts.evaluate([c], None)
    assert r["verdict"] == "reproduced" and r["margin"] == "<= 48" and r["measured_on"] == "llama-65b (analytic)"
    assert "device_bytes 44.02 GB = 40.99 GiB; total_bytes 50.41 GB = 46.95 GiB" in r["reason"]


def test_the_papers_value_carries_its_unit_only_where_it_is_a_number():
    assert verdicts.paper_text({"paper": "< 48", "unit": "GB"}) == "< 48 GB"
    assert verdicts.paper_text({"paper": 0.373, "unit": "bits/param"}) == "0.373 bits/param"
    assert verdicts.paper_text({"paper": "equal", "unit": "nats"}) == "equal"


def eval_run(root, sweep, trained_id, quant, dq, value, moved_from="/elsewhere"):
    """A qlab eval result of training run `trained_id` (results/real/<id>), its recorded adapter path
    on another machine (`moved_from`), the harness's seed 0 whatever the training seed."""
    d = root / sweep / f"eval_{trained_id}"
    d.mkdir(parents=True)
    config = {"task": "eval", "model": {"name": "smollm2-135m", "gguf": "smollm2-135m"},
              "quant": {"type": quant, "double_quant": dq}, "seed": 0, "train": {"device": "auto"},
              "eval": {"adapter_run": f"{moved_from}/real/{trained_id}", "tasks": ["t"], "limit": 200},
              "tracker": {"sweep": sweep}}
    (d / "result.json").write_text(json.dumps({
        "run_id": d.name, "kind": "eval", "sweep": sweep, "status": "ok", "config": config, "env": {"gpu": "test GPU"},
        "axes": {"model": "smollm2-135m", "quant": quant, "double_quant": dq, "adapter": "lora", "seed": 0},
        "metrics": {"adapter_run_id": trained_id, "lm_eval.t.bits_per_byte": value}, "started_at": "1"}))


def test_evaluations_pair_by_their_training_runs_seed(real):
    """Evaluations of adapters pair as their training runs do (by training seed and every other
    setting), found where results moved; without the training runs they cannot pair."""
    ids = {}
    for p in sorted((real / "real").iterdir()):
        r = json.loads((p / "result.json").read_text())
        ids[(r["config"]["quant"]["type"], r["config"]["adapter"]["targets"], r["config"]["seed"])] = r["run_id"]
    for seed, level in enumerate(SEEDS):
        eval_run(real, "eval", ids[("nf4", "all_linear", seed)], "nf4", True, level / 3 + 0.01)
        eval_run(real, "eval", ids[("bf16", "all_linear", seed)], "bf16", False, level / 3)
    c = claim(kind="lower_paired", sweep="eval", metric="lm_eval.t.bits_per_byte", a=BF16_AL, b=NF4_AL)
    r = verdict(c, real)
    assert r["verdict"] == "reproduced" and r["n"] == "5 pairs" and r["measured"] == pytest.approx(-0.01)
    assert "compared: quant.double_quant, quant.type, trained.quant.double_quant, trained.quant.type" in r["reason"]
    shutil.rmtree(real / "real")  # the training runs gone: nothing says which evaluations belong together
    assert verdict(c, real)["n"] != "5 pairs"


def test_a_paired_claim_says_where_library_versions_differ(real):
    c = paired("equivalent_paired", NF4_AL, BF16_AL, margin={"rel": 0.01})
    assert "library versions differ" not in verdict(c, real)["reason"]
    for arm, version in (("_bf16_all_linear_s0_", "5.18.0"), ("_nf4-dq_all_linear_s0_", "5.17.0")):
        run = next(p for p in (real / "real").iterdir() if arm in p.name)
        r = json.loads((run / "result.json").read_text())
        r["env"]["transformers"] = version
        (run / "result.json").write_text(json.dumps(r))
    assert "library versions differ across these runs: transformers 5.17.0, 5.18.0" in verdict(c, real)["reason"]
