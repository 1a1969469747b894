"""Statistics of a sweep, with scipy.stats: bootstrap CIs across seeds, and for each ablation
pair matched on the other axes a two-sided Welch t-test, a Mann-Whitney U test and Hedges' g,
with a Holm correction over all comparisons of one report.

A test needs at least two runs (seeds) in each arm. With fewer, the comparison is still listed
with its means and % difference, and its note says that no test is possible; no p-value is
ever printed for it. Only runs with status "ok" enter the numbers.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from qlab.results.frame import METRICS, rank

BOOTSTRAP_SEED = 0  # fixed: a report regenerated from the same results prints the same CIs
BOOTSTRAP_RESAMPLES = 9999
NO_TEST_N1 = "n=1 per arm: no test"


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
PAIRS = (
    Pair("NF4 vs FP4", "quant", "nf4", "fp4", ("dq", "optim", "adapter", "speed")),
    Pair("DQ on vs off", "dq", "on", "off", ("quant", "optim", "adapter", "speed")),
    *(Pair(f"{paged} vs {std} (paged vs standard)", "optim", paged, std, ("quant_label", "adapter"))
      for paged, std in PAGED_OF.items()),
    Pair("all_linear vs qv", "adapter", "all_linear", "qv", ("quant_label", "optim")),
)


def bootstrap_ci(values, confidence: float = 0.95) -> tuple[float, float]:
    """Bootstrap CI of the mean (percentile method: BCa's jackknife is unstable at 2-5 seeds).
    Needs n >= 2; identical values give a zero-width interval."""
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
    """Two arms' values of one metric: means, % difference of a vs b, and the tests."""
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


def comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """Every ablation pair, in every group and matched context where both arms have runs, for
    every tested metric; Holm-adjusted over the whole frame (Welch and MWU separately)."""
    tested = [m for m in METRICS if m.tested]
    ok = runs[runs.status == "ok"]
    rows = []
    for group in sorted(runs.group.unique()):
        g = runs[runs.group == group]
        for pair in PAIRS:
            arms = g[g[pair.column].isin([pair.a, pair.b])]
            contexts = arms[list(pair.match)].drop_duplicates()
            contexts = sorted(contexts.itertuples(index=False, name=None),
                              key=lambda c: [rank(col, v) for col, v in zip(pair.match, c)])
            for ctx in contexts:
                mask = np.logical_and.reduce([arms[c] == v for c, v in zip(pair.match, ctx)])
                here = arms[mask]
                if set(here[pair.column]) != {pair.a, pair.b}:
                    continue  # one arm missing in this context: nothing to compare
                here_ok = ok.loc[ok.index.intersection(here.index)]
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
