"""qlab.results.stats: each interval against a hand computation or scipy called directly, the
n < 2 and positive-quantity rules, the one percentile, Holm and Hedges' g on small examples."""

import ast
import math
import sys

import numpy as np
import pytest
from scipy import stats as st

from conftest import ROOT
from qlab.results import stats


def test_stats_is_a_leaf():
    tree = ast.parse((ROOT / "qlab" / "results" / "stats.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) == {"numpy", "scipy"}


def test_percentile_is_numpys_linear():
    x = list(range(10, 0, -1))  # 1..10, unsorted
    # rank 0.9 * (10 - 1) = 8.1 from 0: 9 + 0.1 * (10 - 9)
    assert stats.percentile(x, 90) == pytest.approx(9.1)
    assert stats.percentile(x, 50) == 5.5 == np.median(x)
    assert stats.percentile([3.0], 90) == 3.0
    s = stats.summarize(x, "t", "s")
    assert s["t_p90_s"] == pytest.approx(9.1) and s["t_median_s"] == 5.5


def test_mean_interval_by_hand_and_scipy():
    x = [1.0, 2.0, 3.0, 4.0]
    # mean 2.5, sd sqrt(5/3) = 1.2910, se 0.6455, t(0.975, 3) = 3.1824: 2.5 +- 2.0543
    lo, hi = stats.mean_interval(x)
    half = 3.18244631 * math.sqrt(5 / 3) / 2
    assert (lo, hi) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-8)
    ci = st.ttest_1samp(x, 0).confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((ci.low, ci.high))
    assert stats.mean_interval(x, 0.9) == pytest.approx(tuple(st.ttest_1samp(x, 0).confidence_interval(0.9)))
    # fewer than 2 points: no interval; no spread: zero width
    assert stats.mean_interval([]) is None and stats.mean_interval([5.0]) is None
    assert stats.mean_interval([0.1, 0.1, 0.1]) == (0.1, 0.1)


def test_positive_interval_never_reaches_zero():
    x = [0.05, 1.5]  # mean 0.775, sd 1.025, t(0.975, 1) = 12.71: 0.775 +- 9.21
    lo, hi = stats.mean_interval(x)
    assert lo < 0 < hi  # the arithmetic interval crosses zero...
    assert stats.mean_interval(x, positive=True) is None  # ...so a time or a rate gets none
    assert stats.mean_interval([0.2, 0.25, 0.3], positive=True) == pytest.approx(stats.mean_interval([0.2, 0.25, 0.3]))
    assert stats.mean_interval([-1.0, 1.0, 2.0]) is not None  # a signed quantity keeps its interval


def test_two_step_run_reports_no_interval_through_zero():
    """The issue's 2-step run (tokens/s from -55,787 to 86,547): 2,048 tokens per step, step times
    that vary a lot. The interval is absent; with a third step it is positive and holds the mean."""
    from qlab.run.loop import throughput

    for times, has_ci in (([0.05, 0.3], False), ([0.2, 0.25, 0.3], True)):
        tokens = [2048] * len(times)
        m = throughput(times, tokens, tokens, tokens)
        for p, u in (("step_time", "s"), ("tokens_per_s", "tok")):
            assert (f"{p}_ci95_low_{u}" in m) == (f"{p}_ci95_high_{u}" in m) == has_ci
            if has_ci:
                assert 0 < m[f"{p}_ci95_low_{u}"] <= m[f"{p}_mean_{u}"] <= m[f"{p}_ci95_high_{u}"]
        rates = [2048 / t for t in times]
        assert m["tokens_per_s_mean_tok"] == pytest.approx(np.mean(rates)) and m["tokens_per_s_n"] == len(times)
    # [0.2, 0.25, 0.3] s: mean 0.25, sd 0.05, t(0.975, 2) = 4.3027: 0.25 +- 0.1242
    assert (m["step_time_ci95_low_s"], m["step_time_ci95_high_s"]) == \
        pytest.approx((0.25 - 4.302653 * 0.05 / math.sqrt(3), 0.25 + 4.302653 * 0.05 / math.sqrt(3)), rel=1e-6)


def test_summarize_keys():
    assert stats.summarize([], "x", "s") == {}
    one = stats.summarize([2.0], "x", "s")
    assert one == {"x_median_s": 2.0, "x_p90_s": 2.0, "x_mean_s": 2.0, "x_cv": 0.0, "x_n": 1}  # no interval
    s = stats.summarize([1.0, 2.0, 3.0, 4.0], "", "ms")  # bare keys (experiments/kernels.py)
    assert set(s) == {"median_ms", "p90_ms", "mean_ms", "cv", "n", "ci95_low_ms", "ci95_high_ms"}
    assert s["cv"] == pytest.approx(math.sqrt(5 / 3) / 2.5)
    assert (s["ci95_low_ms"], s["ci95_high_ms"]) == pytest.approx(stats.mean_interval([1.0, 2.0, 3.0, 4.0]))


def test_welch_interval_by_hand_and_scipy():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0]
    # va = 1/3, vb = 20/3 / 4 = 5/3; se = sqrt(2); df = 4 / ((1/3)^2 / 2 + (5/3)^2 / 3) = 3.9706
    va, vb = 1 / 3, 5 / 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    half = st.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert stats.welch_interval(a, b) == pytest.approx((-3 - half, -3 + half))
    ci = st.ttest_ind(a, b, equal_var=False).confidence_interval()
    assert stats.welch_interval(a, b) == pytest.approx((ci.low, ci.high))
    assert stats.welch_interval([1.0], b) is None and stats.welch_interval(a, [2.0]) is None
    assert stats.welch_interval([2.0, 2.0], [1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_paired_log_ratio():
    tokens = [127] * 10 + [50]
    a = [3.0 * n + (0.1 if i % 2 else -0.1) for i, n in enumerate(tokens)]
    same = stats.paired_log_ratio(a, a, tokens)
    assert same["log_ratio"] == 0 and same["ci95"] == [0, 0] and same["rel"] == 0
    # b lower by exactly 0.05 nats per token everywhere: no spread, a zero-width interval
    b = [x - 0.05 * n for x, n in zip(a, tokens)]
    r = stats.paired_log_ratio(a, b, tokens)
    assert r["log_ratio"] == pytest.approx(0.05) and r["ci95"] == pytest.approx([0.05, 0.05])
    assert r["rel"] == pytest.approx(math.expm1(0.05)) and r["weight"] == sum(tokens) and r["n"] == 11
    # noise around a zero mean difference: an interval around 0
    c = [x + (1.0 if i % 2 else -1.0) for i, x in enumerate(a[:10])]
    r = stats.paired_log_ratio(c, a[:10], tokens[:10])
    assert r["ci95"][0] < r["log_ratio"] < r["ci95"][1] and r["ci95"][0] < 0 < r["ci95"][1]
    with pytest.raises(ValueError, match="must match"):
        stats.paired_log_ratio([1.0], [1.0, 2.0], [1])


def test_paired_log_ratio_by_hand():
    # unequal windows: the ratio estimator's SE, sqrt(sum r^2 / (w (w - 1))) / mean(n), r = d - delta n
    n = np.array([100.0, 50.0, 120.0, 80.0])
    d = np.array([3.0, -1.0, 5.0, 0.5])
    delta = d.sum() / n.sum()
    se = math.sqrt(((d - delta * n) ** 2).sum() / (4 * 3)) / n.mean()
    half = st.t.ppf(0.975, 3) * se
    r = stats.paired_log_ratio(d, np.zeros(4), n)
    assert r["log_ratio"] == pytest.approx(delta) and r["ci95"] == pytest.approx([delta - half, delta + half])
    assert r["rel_ci95"] == pytest.approx([math.expm1(delta - half), math.expm1(delta + half)])
    # rounds (weight 1 each) of tok/s: the t-interval of the per-round log ratios
    ta, tb = np.array([1000.0, 1100.0, 950.0]), np.array([900.0, 1000.0, 1000.0])
    r = stats.paired_log_ratio(np.log(ta), np.log(tb))
    assert r["ci95"] == pytest.approx(list(stats.mean_interval(np.log(ta / tb))))
    assert r["rel_ci95"][0] > -1  # a ratio's interval cannot reach 0
    one = stats.paired_log_ratio([2.0], [1.0], [10])
    assert one["log_ratio"] == pytest.approx(0.1) and all(math.isnan(x) for x in one["ci95"])


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, float("nan"), 0.2]
    # m = 4 tests: 0.01*4 = 0.04; 0.03*3 = 0.09; 0.04*2 = 0.08 -> 0.09 (monotone); 0.2*1 = 0.2
    assert stats.holm(p)[[0, 1, 2, 4]] == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert math.isnan(stats.holm(p)[3])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    # m = 3: 0.01*3 = 0.03; 0.02*2 = 0.04; 0.03*1 = 0.03 -> 0.04 (monotone)
    assert stats.holm([0.03, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert len(stats.holm([])) == 0


def test_hedges_g_by_hand():
    # means 5 and 3; pooled var (3 * 20/3 + 2 * 4) / 5 = 5.6; d = 2 / sqrt(5.6); J = 1 - 3 / (4 * 7 - 9)
    g = stats.hedges_g([2.0, 4.0, 6.0, 8.0], [1.0, 3.0, 5.0])
    assert g == pytest.approx(2 / math.sqrt(5.6) * (1 - 3 / 19))
    assert stats.hedges_g([1.0, 2.0, 3.0], [3.0, 4.0, 5.0]) == pytest.approx(-1.6)
    assert math.isnan(stats.hedges_g([1.0], [2.0, 3.0])) and math.isnan(stats.hedges_g([1.0, 1.0], [2.0, 2.0]))


def test_bootstrap_and_compare_edges():
    assert all(math.isnan(x) for x in stats.bootstrap_ci([1.0, float("nan")]))
    assert stats.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    lo, hi = stats.bootstrap_ci([10.0, 11.0, 12.0])
    assert 10.0 <= lo < 11.0 < hi <= 12.0 and stats.bootstrap_ci([10.0, 11.0, 12.0]) == (lo, hi)  # seeded
    c = stats.compare([1.0, 2.0, 3.0], [3.0, 4.0, 5.0])
    assert c["p_welch"] == pytest.approx(st.ttest_ind([1, 2, 3], [3, 4, 5], equal_var=False).pvalue)
    assert c["delta_pct"] == pytest.approx(-50.0) and c["hedges_g"] == pytest.approx(-1.6)
    assert stats.compare([1.0], [2.0])["note"] == stats.NO_TEST_N1
    z = stats.compare([1.0, 1.0], [2.0, 2.0])
    assert math.isnan(z["p_welch"]) and z["note"] == "zero variance in both arms: no t-test"


# ------------------------------------------------------------------ paired arms: known answers

def test_tost_equivalent_against_scipy_by_hand():
    # d = a - b = 0.010, 0.012, 0.008, 0.011, 0.009: mean 0.010, sd 0.0015811, se 0.00070711,
    # t(0.95, 4) = 2.13185: 90% interval 0.010 +- 0.0015075, inside +-0.05 -> equivalent
    b = np.array([2.00, 2.30, 1.90, 2.10, 2.50])
    a = b + [0.010, 0.012, 0.008, 0.011, 0.009]
    r = stats.tost_paired(a, b, 0.05)
    half = 2.131846786 * 0.0015811388 / math.sqrt(5)
    assert r["outcome"] == "equivalent" and r["n"] == 5 and r["confidence"] == pytest.approx(0.90)
    assert r["mean"] == pytest.approx(0.010) and r["ci"] == pytest.approx((0.010 - half, 0.010 + half), rel=1e-6)
    d = a - b
    assert r["p_lower"] == pytest.approx(st.ttest_1samp(d, -0.05, alternative="greater").pvalue)
    assert r["p_upper"] == pytest.approx(st.ttest_1samp(d, 0.05, alternative="less").pvalue)
    assert r["p_tost"] == max(r["p_lower"], r["p_upper"]) < 0.05
    assert r["mean_a"] == pytest.approx(a.mean()) and r["mean_b"] == pytest.approx(b.mean())


def test_tost_not_equivalent_and_inconclusive():
    b = np.array([2.00, 2.30, 1.90, 2.10, 2.50])
    # a is 0.20 above b in every pair (+-0.01): the whole interval beyond +0.05 -> must fail
    r = stats.tost_paired(b + [0.20, 0.21, 0.19, 0.20, 0.20], b, 0.05)
    assert r["outcome"] == "not equivalent" and r["ci"][0] > 0.05 and r["p_tost"] > 0.5
    # right on average (mean 0.01) but the pairs disagree by +-0.1: straddles the margin
    r = stats.tost_paired(b + [0.11, -0.09, 0.12, -0.10, 0.01], b, 0.05)
    assert r["outcome"] == "inconclusive" and r["ci"][0] < -0.05 < 0.05 < r["ci"][1]
    # one pair: no interval, no verdict
    assert stats.tost_paired([2.0], [2.0], 0.05)["outcome"] == "inconclusive"
    with pytest.raises(ValueError, match="margin must be > 0"):
        stats.tost_paired(b, b, 0)
    with pytest.raises(ValueError, match="one to one"):
        stats.tost_paired(b[:4], b, 0.05)


def test_pairing_is_what_makes_equivalence_visible():
    """Seeds differ by +-0.25 nats, arms by a steady +0.005 within each seed: Welch's interval across
    arms cannot show equivalence within +-0.02, the paired one can."""
    b = np.array([2.0, 2.5, 1.8, 2.2, 2.6])
    a = b + [0.004, 0.006, 0.005, 0.005, 0.005]
    lo, hi = stats.welch_interval(a, b)
    assert lo < -0.02 and hi > 0.02  # unpaired: straddles the margin
    assert stats.tost_paired(a, b, 0.02)["outcome"] == "equivalent"
    # and equal spread with no pairing structure stays inconclusive: d alternates +-0.2
    assert stats.tost_paired(b + [0.2, -0.2, 0.2, -0.2, 0.0], b, 0.02)["outcome"] == "inconclusive"


def test_tost_without_spread():
    b = np.array([1.0, 2.0, 3.0])
    r = stats.tost_paired(b + 0.125, b, 0.25)  # every d is exactly 0.125 (binary fractions)
    assert r["outcome"] == "equivalent" and r["ci"] == (0.125, 0.125) and r["p_tost"] == 0.0
    r = stats.tost_paired(b + 0.5, b, 0.25)
    assert r["outcome"] == "not equivalent" and r["p_tost"] == 1.0


def test_noninferiority_on_the_upper_end():
    b = np.array([2.00, 2.30, 1.90, 2.10, 2.50])
    # a 0.01 worse (+-0.002): upper end of the 90% interval below +0.05 -> non-inferior
    d = np.array([0.010, 0.012, 0.008, 0.011, 0.009])
    r = stats.noninferiority_paired(b + d, b, 0.05)
    assert r["outcome"] == "non-inferior" and r["ci"][1] < 0.05
    assert r["p"] == pytest.approx(st.ttest_1samp(d, 0.05, alternative="less").pvalue)
    # a much better (d = -0.3) is non-inferior too: only the upper end matters
    assert stats.noninferiority_paired(b - 0.3 + [0, .01, -.01, 0, 0], b, 0.05)["outcome"] == "non-inferior"
    # a 0.2 worse: the lower end at or above the margin -> inferior
    assert stats.noninferiority_paired(b + [0.20, 0.21, 0.19, 0.20, 0.20], b, 0.05)["outcome"] == "inferior"
    # noisy around +0.05: inconclusive
    assert stats.noninferiority_paired(b + [0.15, -0.05, 0.16, -0.06, 0.05], b, 0.05)["outcome"] == "inconclusive"
    # higher is better (an accuracy): a 0.2 BELOW b is worse by more than the margin
    r = stats.noninferiority_paired(b - [0.20, 0.21, 0.19, 0.20, 0.20], b, 0.05, lower_is_better=False)
    assert r["outcome"] == "inferior" and r["mean"] == pytest.approx(0.2) and r["mean_a"] < r["mean_b"]


def test_paired_lower_both_ways_and_within_noise():
    b = np.array([2.00, 2.30, 1.90, 2.10, 2.50])
    r = stats.paired_lower(b - [0.05, 0.06, 0.04, 0.05, 0.05], b)
    assert r["outcome"] == "lower" and r["ci"][1] < 0 and r["confidence"] == 0.95
    assert r["p"] == pytest.approx(st.ttest_rel(b - [0.05, 0.06, 0.04, 0.05, 0.05], b).pvalue)
    assert stats.paired_lower(b + [0.05, 0.06, 0.04, 0.05, 0.05], b)["outcome"] == "higher"
    assert stats.paired_lower(b + [0.05, -0.06, 0.04, -0.05, 0.0], b)["outcome"] == "no difference shown"
    assert stats.paired_lower([1.0], [2.0])["outcome"] == "no difference shown"  # one pair: no interval


def test_noninferiority_reports_both_one_sided_tests():
    b = np.array([2.00, 2.30, 1.90, 2.10, 2.50])
    d = np.array([0.20, 0.21, 0.19, 0.20, 0.20])
    r = stats.noninferiority_paired(b + d, b, 0.05)
    assert r["p"] == pytest.approx(st.ttest_1samp(d, 0.05, alternative="less").pvalue) and r["p"] > 0.9
    assert r["p_inferior"] == pytest.approx(st.ttest_1samp(d, 0.05, alternative="greater").pvalue)
    assert r["p_inferior"] < 0.05 and r["outcome"] == "inferior"


def test_overlap_of_intervals():
    assert stats.overlap([(1.9, 2.3), (2.0, 2.4), (1.95, 2.5)]) == (2.0, 2.3)
    lo, hi = stats.overlap([(0.9, 1.1), (1.12, 1.2)])
    assert lo > hi  # apart: nowhere in common
