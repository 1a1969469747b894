"""The one statistics module (scipy.stats): every interval, test and percentile qlab reports.

Rules: no interval from fewer than 2 points (None, or no keys). A positive quantity (a time, a
rate) gets its arithmetic t-interval only where the low end is > 0; one that reaches 0 says the
points are too few for their spread. (A log-scale interval would stay > 0 but need not contain
the arithmetic mean, and tokens/s, total tokens / total time, is one.) Ratios are taken on the
log scale (`paired_log_ratio`), where they cannot cross 0. A leaf: numpy, scipy, stdlib only.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0  # fixed: a report regenerated from the same results prints the same CIs
BOOTSTRAP_RESAMPLES = 9999
NO_TEST_N1 = "n=1 per arm: no test"


def percentile(values, q: float) -> float:
    """THE percentile (p90 everywhere): numpy's default, linear between order statistics,
    at rank q/100 * (n - 1) from 0 (p90 of 1..10: rank 8.1, 9 + 0.1 * (10 - 9) = 9.1)."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def mean_interval(values, confidence: float = CONFIDENCE, positive: bool = False) -> tuple[float, float] | None:
    """t-interval of the mean, mean +- t(1 - alpha/2, n - 1) * sd / sqrt(n); None for n < 2 and,
    with `positive` (a time or a rate), None where its low end would be <= 0. No spread: zero width."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None
    if np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    lo, hi = stats.t.interval(confidence, len(x) - 1, loc=x.mean(), scale=x.std(ddof=1) / math.sqrt(len(x)))
    return None if positive and lo <= 0 else (float(lo), float(hi))


def welch_interval(a, b, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Interval of mean(a) - mean(b), Welch-Satterthwaite degrees of freedom
    (`ttest_ind(equal_var=False)`); None when an arm has < 2 points, zero width when neither varies."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) < 2:
        return None
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        d = float(a.mean() - b.mean())
        return d, d
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def paired_log_ratio(log_a, log_b, weights=None, confidence: float = CONFIDENCE) -> dict:
    """log(A / B) from paired units (PTQ windows, interleaved rounds): `log_a`, `log_b` are each
    unit's summed log quantity (a window's NLL in nats; a round's log tok/s), `weights` its size
    (a window's tokens; 1 by default). The ratio estimator sum(log_a - log_b) / sum(weights) with a
    t-interval over units (NaN for one unit); `rel` = A / B - 1, never below -1."""
    a, b = np.asarray(log_a, dtype=float), np.asarray(log_b, dtype=float)
    w = np.ones(len(a)) if weights is None else np.asarray(weights, dtype=float)
    if not (len(a) == len(b) == len(w)) or len(w) == 0:
        raise ValueError(f"paired units must match: {len(a)}, {len(b)}, {len(w)}")
    d = a - b
    delta = float(d.sum() / w.sum())
    # the ratio estimator's standard error, sqrt(sum r_i^2 / (n (n - 1))) / mean(w) with
    # r_i = d_i - delta * w_i, is the t-interval's of the values delta + r_i / mean(w) (mean delta)
    lo, hi = mean_interval(delta + (d - delta * w) / w.mean(), confidence) or (math.nan, math.nan)
    return {"log_ratio": delta, "ci95": [lo, hi], "n": len(w), "weight": float(w.sum()),
            "rel": math.expm1(delta), "rel_ci95": [math.expm1(lo), math.expm1(hi)]}


def summarize(values, prefix: str, unit: str) -> dict:
    """A positive series (per-step times, per-call rates) -> `<prefix>_median_<unit>`, `_p90_`,
    `_mean_`, `<prefix>_cv`, `<prefix>_n`, and where `mean_interval(positive=True)` gives one,
    `<prefix>_ci95_low_<unit>` / `_high_`. An empty prefix gives bare keys (`median_ms`, `cv`)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return {}
    key = lambda *parts: "_".join(p for p in (prefix, *parts) if p)  # noqa: E731
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    out = {key("median", unit): percentile(x, 50), key("p90", unit): percentile(x, 90), key("mean", unit): mean,
           key("cv"): sd / mean if mean else None, key("n"): len(x)}
    ci = mean_interval(x, positive=True)
    if ci:
        out[key("ci95_low", unit)], out[key("ci95_high", unit)] = ci
    return out


def bootstrap_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Bootstrap CI of the mean across seeds (percentile method: BCa's jackknife is unstable at
    2-5 seeds). NaN for n < 2; identical values give a zero-width interval."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    seed = {"rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state":
            np.random.default_rng(BOOTSTRAP_SEED)}
    res = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES,
                          method="percentile", vectorized=True, **seed)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def overlap(intervals) -> tuple[float, float]:
    """Where every (low, high) interval overlaps: (highest low, lowest high); low > high: nowhere."""
    intervals = list(intervals)
    return max(lo for lo, _ in intervals), min(hi for _, hi in intervals)


def hedges_g(a, b) -> float:
    """Cohen's d with the pooled SD, times Hedges' small-sample correction
    J = 1 - 3 / (4 (n_a + n_b) - 9)   (= 1 - 3/(4 df - 1), df = n_a + n_b - 2)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return math.nan
    pooled = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    if pooled == 0:
        return math.nan
    return (a.mean() - b.mean()) / pooled * (1 - 3 / (4 * (na + nb) - 9))


def compare(a, b) -> dict:
    """Two arms' values of one metric: means, % difference of a vs b, and, with n >= 2 per arm, a
    two-sided Welch t-test, a Mann-Whitney U test and Hedges' g (else a note says why not)."""
    a = np.asarray([v for v in a if np.isfinite(v)], float)
    b = np.asarray([v for v in b if np.isfinite(v)], float)
    out = {"n_a": len(a), "n_b": len(b), "mean_a": a.mean() if len(a) else math.nan,
           "mean_b": b.mean() if len(b) else math.nan, "hedges_g": math.nan, "welch_t": math.nan,
           "p_welch": math.nan, "mwu_u": math.nan, "p_mwu": math.nan, "note": ""}
    out["delta_pct"] = (out["mean_a"] - out["mean_b"]) / out["mean_b"] * 100 if out["mean_b"] else math.nan
    if len(a) == 0 or len(b) == 0:
        out["note"] = "no ok run in an arm: no test"
    elif len(a) == 1 and len(b) == 1:
        out["note"] = NO_TEST_N1
    elif min(len(a), len(b)) < 2:
        out["note"] = f"n={len(a)} vs n={len(b)}: no test (needs n>=2 per arm)"
    else:
        if a.var(ddof=1) + b.var(ddof=1) > 0:
            t = stats.ttest_ind(a, b, equal_var=False)
            out.update(welch_t=float(t.statistic), p_welch=float(t.pvalue), hedges_g=hedges_g(a, b))
        else:
            out["note"] = "zero variance in both arms: no t-test"
        u = stats.mannwhitneyu(a, b, alternative="two-sided")
        out.update(mwu_u=float(u.statistic), p_mwu=float(u.pvalue))
    return out


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values; NaN (no test) stays NaN and does not count in m.
    Sorted ascending, p_(k) (k = 1..m) becomes max over j <= k of min(1, (m - j + 1) p_(j))."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m, running = len(idx), 0.0
    for k, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out


# ------------------------------------------------------------------ paired arms (same seed, same settings)
# Paired runs see the same data in the same order from the same LoRA initialization, so d_i = a_i - b_i
# carries less noise than the difference of the arms' means: every test below is a one-sample t on the
# d_i. `margin` is absolute, in the metric's unit (qlab.claims.verdicts converts a relative one).
EQUIVALENCE_ALPHA = 0.05  # each one-sided test; the interval that decides is the 1 - 2 alpha = 90% one


def _paired(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must match one to one: {a.shape} vs {b.shape}")
    return a - b


def _one_sided_p(d: np.ndarray, popmean: float, alternative: str) -> float:
    """p of the one-sample t-test of mean(d) against `popmean` (scipy); with no spread, 0 where every d
    lies strictly on the alternative's side, else 1; NaN for one pair."""
    if len(d) < 2:
        return math.nan
    if np.ptp(d) == 0:
        side = d[0] > popmean if alternative == "greater" else d[0] < popmean
        return 0.0 if side else 1.0
    return float(stats.ttest_1samp(d, popmean, alternative=alternative).pvalue)


def paired_difference(a, b, confidence: float = CONFIDENCE) -> dict:
    """The mean of the paired differences a_i - b_i with its t-interval (`mean_interval`), the two-sided
    paired t-test's p (`scipy.stats.ttest_rel`) and each arm's mean."""
    d = _paired(a, b)
    n = len(d)
    p = math.nan
    if n >= 2:
        p = (0.0 if d[0] != 0 else 1.0) if np.ptp(d) == 0 else float(stats.ttest_rel(a, b).pvalue)
    return {"n": n, "mean": float(d.mean()) if n else math.nan, "sd": float(d.std(ddof=1)) if n > 1 else math.nan,
            "ci": mean_interval(d, confidence), "confidence": confidence, "p": p,
            "mean_a": float(np.mean(a)) if n else math.nan, "mean_b": float(np.mean(b)) if n else math.nan}


def paired_lower(a, b, confidence: float = CONFIDENCE) -> dict:
    """Is a lower than b? The `confidence` interval of the mean paired difference a - b entirely below 0:
    "lower", above 0: "higher", else (or < 2 pairs) "no difference shown"; with the paired t-test's p."""
    out = paired_difference(a, b, confidence)
    ci = out["ci"]
    out["outcome"] = ("lower" if ci and ci[1] < 0 else "higher" if ci and ci[0] > 0 else "no difference shown")
    return out


def tost_paired(a, b, margin: float, alpha: float = EQUIVALENCE_ALPHA) -> dict:
    """Equivalence of paired arms within +-margin by two one-sided t-tests at `alpha` (TOST: H0 mean(d)
    <= -margin, H0 mean(d) >= +margin; p_tost the larger p), decided on the 1 - 2 alpha (90%) interval
    of the mean difference, inside (-margin, +margin) exactly when both reject: "equivalent"; entirely
    beyond one bound: "not equivalent"; otherwise (or < 2 pairs): "inconclusive"."""
    if margin <= 0:
        raise ValueError(f"an equivalence margin must be > 0, got {margin}")
    out = paired_difference(a, b, 1 - 2 * alpha)
    d = _paired(a, b)
    out.update(margin=float(margin), alpha=alpha, p_lower=_one_sided_p(d, -margin, "greater"),
               p_upper=_one_sided_p(d, margin, "less"))
    out["p_tost"] = max(out["p_lower"], out["p_upper"])
    ci = out["ci"]
    out["outcome"] = ("inconclusive" if ci is None else
                      "equivalent" if -margin < ci[0] and ci[1] < margin else
                      "not equivalent" if ci[0] >= margin or ci[1] <= -margin else "inconclusive")
    return out


def noninferiority_paired(a, b, margin: float, alpha: float = EQUIVALENCE_ALPHA, lower_is_better: bool = True) -> dict:
    """Is a no worse than b by more than `margin`? With d = a - b (b - a where higher is better: how much
    worse a is), a one-sided t-test at `alpha` of H0 mean(d) >= +margin (p; `p_inferior` the opposite
    test's), decided on the 1 - 2 alpha (90%) interval of mean(d): upper end below +margin ->
    "non-inferior"; lower end at or above it -> "inferior"; otherwise (or < 2 pairs) -> "inconclusive"."""
    if margin <= 0:
        raise ValueError(f"a non-inferiority margin must be > 0, got {margin}")
    x, y = (a, b) if lower_is_better else (b, a)
    out = paired_difference(x, y, 1 - 2 * alpha)
    d = _paired(x, y)
    out.update(margin=float(margin), alpha=alpha, p=_one_sided_p(d, margin, "less"),
               p_inferior=_one_sided_p(d, margin, "greater"),  # H0 mean(d) <= +margin
               lower_is_better=lower_is_better, mean_a=float(np.mean(a)), mean_b=float(np.mean(b)))
    ci = out["ci"]
    out["outcome"] = ("inconclusive" if ci is None else "non-inferior" if ci[1] < margin else
                      "inferior" if ci[0] >= margin else "inconclusive")
    return out
