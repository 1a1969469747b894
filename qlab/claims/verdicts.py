"""The QLoRA paper's claims as data, each turned into a measurement with a computed verdict.

    qlab claims [--claims experiments/claims.yaml] [--results results] [--out results/claims] [--no-run]

A claims file lists claims: the paper's statement and number, its source, where the measurement
comes from, the metric, the comparison and the tolerance. Verdicts are computed, never typed:
`reproduced`, `not reproduced` or `inconclusive` with the reason; a claim that fails is reported
as failing. An interval inside the criterion reproduces a claim, one entirely outside it does not,
one that straddles it is inconclusive.

The comparison kinds (`KINDS`), their keys and the flags `fact` / `information`: docs/claims.md.

Claims that name no `sweep` are judged for one (`--sweep`, or `SweepVerdicts` when a sweep ends).
Unless --no-run, the missing sweeps and PTQ measurements run first (GPU-sized ones only where CUDA
is available). `write` produces claims.md (the reasons, every arm of each paired claim's sweep) and
summary.md (one compact table for the README to include verbatim).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from omegaconf import OmegaConf

from qlab import config
from qlab.claims import estimate, kernels, ptq
from qlab.config import PROJECT_ROOT
from qlab.results import frame, stats, store
from qlab.results.frame import flatten, load_curves, load_runs
from qlab.run import launch
from qlab.run.sweep import ManifestCallback

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
INFORMATION = "information"  # a row shown for scale (a claim with `information: true`), no verdict
FACT = "fact"  # `fact: true`: arithmetic of the storage format that holds, not an experiment
UNTESTED = "untested"  # kind untested: no measurement, for the reason the claim states
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, FACT, UNTESTED, INFORMATION)  # the counts' order
ALPHA = 0.05
DEFAULT_CLAIMS = Path(PROJECT_ROOT) / "experiments" / "claims.yaml"


@dataclass
class Verdict:
    verdict: str
    measured: float | None = None
    ci: tuple[float, float] | None = None
    reason: str = ""
    n: str = ""
    ci_level: float = stats.CONFIDENCE  # the paired equivalence kinds decide on 90% intervals
    margin: str = ""  # the margin as applied (a relative margin in the metric's unit); else from the claim


# ------------------------------------------------------------------ selecting runs

def select(runs: pd.DataFrame, where: dict, status: str | None = "ok") -> pd.DataFrame:
    """Rows matching every `column: value` of `where` (and the status, unless None)."""
    mask = pd.Series(True, index=runs.index)
    for col, value in (where or {}).items():
        if col not in runs:
            return runs.iloc[0:0]
        mask &= runs[col].astype(str) == str(value)
    if status is not None:
        mask &= runs["status"] == status
    return runs[mask]


def _values(runs: pd.DataFrame, where: dict, metric: str, scale: float) -> np.ndarray:
    sel = select(runs, where)
    if metric not in sel:
        return np.array([])
    v = pd.to_numeric(sel[metric], errors="coerce").to_numpy(float) / scale
    return v[np.isfinite(v)]


def _number(x) -> float:
    """x as a float, NaN where it is missing or not a number."""
    return pd.to_numeric(pd.Series([x]), errors="coerce").iloc[0]


def _within(measured: float, claim: dict) -> bool:
    tol = claim.get("tolerance", {})
    paper = claim["paper_value"]
    limit = tol.get("abs", 0.0) + abs(paper) * tol.get("rel", 0.0)
    return abs(measured - paper) <= limit


def _held(ok: bool) -> str:
    return REPRODUCED if ok else NOT_REPRODUCED


def _decide(ok: bool, wrong: bool) -> str:
    """An interval's verdict: inside the criterion (`ok`), entirely outside it (`wrong`), or neither."""
    return REPRODUCED if ok else NOT_REPRODUCED if wrong else INCONCLUSIVE


def _band(lo: float, hi: float, low: float, high: float) -> tuple[bool, bool]:
    """(the interval [lo, hi] lies inside [low, high], it lies entirely outside)."""
    return low <= lo and hi <= high, lo > high or hi < low


def _against_paper(measured: float, claim: dict, ci, n: str) -> Verdict:
    ok = _within(measured, claim)
    return Verdict(_held(ok), measured, ci, f"{'within' if ok else 'outside'} the tolerance of the paper's value", n)


# ------------------------------------------------------------------ the comparison kinds

def k_value(claim: dict, runs: pd.DataFrame) -> Verdict:
    v = _values(runs, claim.get("where", {}), claim["metric"], claim.get("scale", 1.0))
    if len(v) == 0:
        return Verdict(INCONCLUSIVE, reason="no ok run matches yet")
    return _against_paper(float(v.mean()), claim, stats.mean_interval(v) if v.std() > 0 else None, f"n={len(v)}")


def _on_arms(judge):
    """A kind from `judge(claim, values of arm a, values of arm b, "n=.. vs ..")`, run where both arms
    have an ok run."""
    @functools.wraps(judge)
    def kind(claim: dict, runs: pd.DataFrame) -> Verdict:
        a, b = (_values(runs, claim[arm], claim["metric"], claim.get("scale", 1.0)) for arm in ("a", "b"))
        n = f"n={len(a)} vs {len(b)}"
        if len(a) == 0 or len(b) == 0:
            return Verdict(INCONCLUSIVE, reason="an arm has no ok run yet", n=n)
        return judge(claim, a, b, n)

    return kind


@_on_arms
def k_difference(claim: dict, a: np.ndarray, b: np.ndarray, n: str) -> Verdict:
    return _against_paper(float(a.mean() - b.mean()), claim, stats.welch_interval(a, b), n)


@_on_arms
def k_lower(claim: dict, a: np.ndarray, b: np.ndarray, n: str) -> Verdict:
    d = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return Verdict(INCONCLUSIVE, d, reason="fewer than 2 seeds per arm: no test", n=n)
    ci = stats.welch_interval(a, b)
    p = stats.compare(a, b)["p_welch"]  # NaN where neither arm varies: then any difference is certain
    p = (0.0 if d else 1.0) if math.isnan(p) else p
    if p < ALPHA:
        return Verdict(_held(d < 0), d, ci, f"a {'lower' if d < 0 else 'higher'} than b, Welch p={p:.3g}", n)
    return Verdict(INCONCLUSIVE, d, ci, f"no significant difference (Welch p={p:.3g})", n)


@_on_arms
def k_equivalent(claim: dict, a: np.ndarray, b: np.ndarray, n: str) -> Verdict:
    d = float(a.mean() - b.mean())
    margin = claim["margin"] * abs(b.mean())
    if min(len(a), len(b)) < 2:
        return Verdict(INCONCLUSIVE, d, reason=f"fewer than 2 seeds per arm: no interval (margin +-{margin:.4g})", n=n)
    lo, hi = stats.welch_interval(a, b)
    verdict = _decide(*_band(lo, hi, -margin, margin))
    said = {REPRODUCED: "inside", NOT_REPRODUCED: "entirely outside", INCONCLUSIVE: "straddles the margin"}[verdict]
    return Verdict(verdict, d, (lo, hi), f"95% interval {said} +-{margin:.4g}", n)


def _gib(r: pd.Series, col: str) -> str:
    v = _number(r.get(col))
    return "n/a" if pd.isna(v) else f"{v / 2**30:.2f} GiB"


def _memory_of(arm: pd.DataFrame) -> str:
    """An arm's runs as the memory cap saw them: status, optimizer state (where, how large), torch's
    and NVML's peaks, under the cap of the stored config (train.max_device_memory_gib)."""
    out = []
    for _, r in arm.iterrows():
        rest = json.loads(r.config_rest) if isinstance(r.get("config_rest"), str) else {}
        out.append(f"{r.optim} {r.status} under a {rest.get('train.max_device_memory_gib', 'n/a')} GiB allocator "
                   f"cap (optimizer state {_gib(r, 'optimizer_state_bytes')} in "
                   f"{r.get('optimizer_state_location', 'n/a')} memory; torch peak {_gib(r, 'peak_allocated_bytes')}, "
                   f"NVML device peak {_gib(r, 'nvml_peak_device_used_bytes')})")
    return "; ".join(out)


def k_survives(claim: dict, runs: pd.DataFrame) -> Verdict:
    a, b = select(runs, claim["a"], None), select(runs, claim["b"], None)
    n = f"n={len(a)} vs {len(b)}"
    if a.empty or b.empty:
        return Verdict(INCONCLUSIVE, reason="an arm has no run yet", n=n)
    a_ok, b_oom = (a.status == "ok").all(), (b.status == "oom").all()
    runs_text = f": {_memory_of(a)}; {_memory_of(b)}"
    if a_ok and b_oom:
        return Verdict(REPRODUCED, reason=f"every run of a completed, every run of b ran out of memory{runs_text}", n=n)
    if not a_ok and (a.status == "oom").any():
        return Verdict(NOT_REPRODUCED, reason=f"arm a ran out of memory too{runs_text}", n=n)
    return Verdict(INCONCLUSIVE, reason=f"statuses a={sorted(set(a.status))}, b={sorted(set(b.status))}: "
                                        f"the memory cap did not separate them{runs_text}", n=n)


def k_estimate(claim: dict, runs: pd.DataFrame) -> Verdict:
    def metrics(setting: dict) -> dict:
        return estimate.estimate(claim["model"], estimate.Setting(**setting)).as_metrics()

    first = metrics(claim["setting"])
    measured = float(first[claim["metric"]])
    if "minus" in claim:
        measured -= float(metrics(claim["minus"])[claim["metric"]])
    measured /= claim.get("scale", 1.0)
    # `show`: the judged metric and others of the same setting, each in GB (1e9 bytes) and GiB (2^30 bytes)
    shown = "".join(f"; {m} {first[m] / 1e9:.2f} GB = {first[m] / 2**30:.2f} GiB"
                    for m in [claim["metric"], *claim["show"]]) if claim.get("show") else ""
    if "at_most" in claim:
        ok = measured <= claim["at_most"]
        unit = f" {claim['unit']}" if claim.get("unit") else ""
        said = f"{claim['metric']} {'at most' if ok else 'above'} {claim['at_most']}{unit}"
    else:
        ok = _within(measured, claim)
        said = f"{'within' if ok else 'outside'} the tolerance"
    return Verdict(_held(ok), measured, reason=f"analytic model: {said}{shown}", n="estimate")


def k_kernel_order(claim: dict, runs: pd.DataFrame) -> Verdict:
    size = claim.get("size", 1024)
    x = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    mse = {k: kernels.quantization_error(x, k, blocksize=claim.get("blocksize", 64))["mse"] for k in claim["kinds"]}
    order = sorted(mse, key=mse.get)
    ok = order[0] == claim["kinds"][0]  # the claimed type has the lowest error
    return Verdict(_held(ok), mse[claim["kinds"][0]], n=f"{size * size:,} values",
                   reason="MSE on N(0,1): " + " < ".join(f"{k} {mse[k]:.3g}" for k in order))


def _ptq_on(record: dict) -> str:
    """Which model, text and windows a PTQ verdict stands on, for its reason."""
    ev = record["eval"]
    size = f" of {ev['seq_len']} positions" if ev.get("seq_len") else ""
    return f"on {ptq.describe(record)}, {len(ev['window_tokens'])} windows{size}"


def k_ptq_error(claim: dict, record: dict) -> Verdict:
    metric, kinds = claim.get("metric", "mse"), claim["kinds"]
    errors = record.get("weight_error") or {}
    missing = [k for k in kinds if k not in errors]
    if missing:
        return Verdict(INCONCLUSIVE, reason=f"ptq.json has no weight error for {', '.join(missing)}")
    value = {k: float(errors[k][metric]) for k in kinds}
    order = sorted(kinds, key=value.get)
    ok = order[0] == kinds[0] and value[order[0]] < value[order[1]]  # strictly lowest
    first = errors[kinds[0]]
    gguf = (record.get("provenance") or {}).get("linear_types")
    reason = (f"{metric} on {record.get('model') or 'base-' + record['size']}'s {first['n']:,} decoder weights: "
              + " < ".join(f"{k} {value[k]:.4g}" for k in order)
              + "; max abs error " + ", ".join(f"{k} {float(errors[k]['max_abs_error']):.3g}" for k in kinds)
              + (f"; these weights were GGUF values ({', '.join(f'{t} {v:.0%}' for t, v in gguf.items())}): "
                 "a re-quantization error" if gguf else ""))
    return Verdict(_held(ok), value[kinds[0]], reason=reason, n=f"{first['n']:,} weights")


def k_ptq_lower(claim: dict, record: dict) -> Verdict:
    types, a = record.get("types") or {}, claim["a"]
    missing = [t for t in (a, *claim["others"]) if t not in types]
    if missing:
        return Verdict(INCONCLUSIVE, reason=f"ptq.json has no perplexity for {', '.join(missing)}")
    tokens = record["eval"]["window_tokens"]
    pairs = {b: stats.paired_log_ratio(types[a]["window_nll"], types[b]["window_nll"], tokens)
             for b in claim["others"]}
    closest = max(pairs, key=lambda b: pairs[b]["log_ratio"])  # the other type a beats by least
    c = pairs[closest]
    n = f"{int(c['weight']):,} tokens, {c['n']} windows"
    ppl = ", ".join(f"{t} {types[t]['perplexity']:.4g}" for t in sorted((a, *claim["others"]),
                                                                         key=lambda t: types[t]["perplexity"]))
    diffs = "; ".join(f"vs {b} {100 * r['rel']:+.2f}% [{100 * r['rel_ci95'][0]:+.2f}, {100 * r['rel_ci95'][1]:+.2f}]"
                      for b, r in pairs.items())
    higher = [b for b, r in pairs.items() if r["ci95"][0] > 0]
    if higher:
        verdict, said = NOT_REPRODUCED, f"{', '.join(higher)} significantly lower than {a}: perplexity {ppl} ({diffs})"
    elif all(r["ci95"][1] < 0 for r in pairs.values()):
        verdict, said = REPRODUCED, f"perplexity {ppl} ({diffs}; 95% paired intervals)"
    else:
        within = ", ".join(b for b, r in pairs.items() if r["ci95"][1] >= 0)
        verdict, said = INCONCLUSIVE, (f"{a} vs {within} within noise (the 95% paired interval includes 0): "
                                       f"perplexity {ppl} ({diffs})")
    return Verdict(verdict, 100 * c["rel"], tuple(100 * x for x in c["rel_ci95"]), f"{said} {_ptq_on(record)}", n)


def _speed_ratio_one(claim: dict, r: pd.Series) -> Verdict:
    p, aa = r["pairs"][claim["pair"]], r.get("aa_control")
    lo, hi = p["ci95"]
    n = f"{p['rounds']} paired rounds"
    what = f"{claim['pair']} tok/s {p['ratio']:.3f} [{lo:.3f}, {hi:.3f}] ({r.env_gpu or r.env_cpu}; {p['verdict']})"
    if isinstance(aa, dict):
        if not aa["covers_1"]:
            return Verdict(INCONCLUSIVE, p["ratio"], (lo, hi), f"{what}: the A/A control's interval "
                           f"[{aa['ci95'][0]:.3f}, {aa['ci95'][1]:.3f}] excludes 1, the comparison is not valid", n)
        what += f", A/A floor [{aa['ci95'][0]:.3f}, {aa['ci95'][1]:.3f}]"
    if "margin" in claim:
        bound, (low, high) = f"1 +- {claim['margin']:g}", (1 - claim["margin"], 1 + claim["margin"])
    elif "at_least" in claim:
        bound, (low, high) = f">= {claim['at_least']:g}", (claim["at_least"], math.inf)
    else:
        bound, (low, high) = f"<= {claim['at_most']:g}", (-math.inf, claim["at_most"])
    verdict = _decide(*_band(lo, hi, low, high))
    said = {REPRODUCED: "the whole 95% interval", NOT_REPRODUCED: "the whole 95% interval fails",
            INCONCLUSIVE: "the 95% interval straddles"}[verdict]
    return Verdict(verdict, p["ratio"], (lo, hi), f"{what}: {said} {bound}", n)


def k_speed_ratio(claim: dict, runs: pd.DataFrame) -> Verdict:
    """Every ok comparison of the sweep that has the pair (each on its own machine) must agree in
    verdict and their 95% intervals must overlap; the newest one's numbers."""
    rows = [r for _, r in frame.ok_comparisons(runs).iterrows() if isinstance(r.get("pairs"), dict)
            and claim["pair"] in r["pairs"]]
    if not rows:
        return Verdict(INCONCLUSIVE, reason=f"not run yet: no comparison in results/{claim['sweep']}/ has the "
                                            f"pair {claim['pair']}")
    each = [_speed_ratio_one(claim, r) for r in rows]
    v = each[-1]
    if len(rows) == 1:
        return v
    lo, hi = stats.overlap(e.ci for e in each)
    listed = "; ".join(f"{e.verdict} ({e.reason})" for e in each)
    if len({e.verdict for e in each}) > 1:
        v = Verdict(INCONCLUSIVE, v.measured, v.ci, f"the comparisons disagree: {listed}", v.n)
    elif lo > hi:
        v = Verdict(INCONCLUSIVE, v.measured, v.ci, f"the comparisons' 95% intervals do not overlap: {listed}", v.n)
    else:
        v.reason = f"{len(rows)} comparisons, their 95% intervals overlap on [{lo:.3f}, {hi:.3f}]: {listed}"
    v.n = f"{len(rows)} comparisons ({' + '.join(str(r['pairs'][claim['pair']]['rounds']) for r in rows)} rounds)"
    return v


@_on_arms
def k_ratio(claim: dict, a: np.ndarray, b: np.ndarray, n: str) -> Verdict:
    r = float(a.mean() / b.mean())
    bound, ok = ((f"at most {claim['at_most']:g}", r <= claim["at_most"]) if "at_most" in claim
                 else (f"at least {claim['at_least']:g}", r >= claim["at_least"]))
    return Verdict(_held(ok), r, reason=f"{claim['metric']} of a / b = {r:.3f}: {'' if ok else 'not '}{bound}", n=n)


# ------------------------------------------------------------------ paired arms

@dataclass
class Paired:
    """Runs of arm a and arm b paired one to one (`pair_runs`)."""

    a: np.ndarray  # the metric of each pair's a run (scaled)
    b: np.ndarray
    labels: list[str]  # each pair's key, "seed=0"
    compared: list[str]  # the config keys in which the arms differ: the compared axis
    unpaired: list[str]  # runs left out, and why
    superseded: list[str]  # older runs of a key that has a newer ok one
    rows: tuple[pd.DataFrame, pd.DataFrame]  # each pair's a and b rows of the runs frame, in pair order


def _identity(root: Path, rel: str) -> dict:
    """A run's stored config, flattened, without the keys that never change what it measures. An
    eval's or generation's adapter run is named by that training run's identity (`trained.<key>`),
    not its path, so that evaluations pair as the training runs do (by seed and every other
    setting); where the training run's result is not found, by its path as stored."""
    result = store.read_result(root / rel) or {}
    flat = _without_non_identity(flatten(result.get("config") or {}))
    trained = store.training_result(result, root / rel)
    if trained is not None:
        flat.pop(f"{result['kind']}.adapter_run")
        flat.update({f"trained.{k}": v for k, v in _without_non_identity(flatten(trained.get("config") or {})).items()})
    return flat


def _without_non_identity(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if not any(k == s or k.startswith(s + ".") for s in store.NON_IDENTITY_KEYS)}


def _text(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def pair_runs(claim: dict, runs: pd.DataFrame) -> Paired:
    """Pair the runs of arm a with those of arm b by seed and every other config key that is not the
    compared axis: the keys in which no run of a shares a value with a run of b (seed always pairs).
    Of several runs with one key in an arm the newest ok one with a finite metric counts (the others
    are superseded); a key without a usable partner is listed as unpaired with the reason."""
    root, metric, scale = Path(runs.attrs.get("root", ".")), claim["metric"], claim.get("scale", 1.0)
    arms = {side: select(runs, claim[side], None) for side in ("a", "b")}
    configs = {side: [_identity(root, rel) for rel in arms[side].path] for side in arms}
    keys = sorted({k for side in configs for c in configs[side] for k in c})
    values = {side: {k: {_text(c.get(k)) for c in configs[side]} for k in keys} for side in configs}
    compared = [k for k in keys if k != "seed" and not values["a"][k] & values["b"][k]]
    pairing = [k for k in keys if k not in compared]
    common = {k: pd.Series([_text(c.get(k)) for side in configs for c in configs[side]]).mode().iloc[0]
              for k in pairing}

    def label(key: tuple) -> str:
        parts = dict(key)
        extra = [f"{k}={json.loads(v)}" for k, v in key if k != "seed" and v != common.get(k)]
        return ", ".join([f"seed={json.loads(parts.get('seed', 'null'))}", *extra])

    chosen, why, superseded = {}, {}, []
    for side in ("a", "b"):
        chosen[side], why[side] = {}, {}
        by_key: dict[tuple, list] = {}
        for (_, row), cfg in zip(arms[side].iterrows(), configs[side]):
            by_key.setdefault(tuple((k, _text(cfg.get(k))) for k in pairing), []).append(row)
        for key, rows in by_key.items():
            usable = [r for r in rows if r.status == "ok" and math.isfinite(_number(r.get(metric)))]
            if usable:
                newest = max(usable, key=lambda r: str(r.started_at))
                chosen[side][key] = newest
                superseded += [f"{side} {r.run_id}" for r in rows if r.run_id != newest.run_id]
            else:
                why[side][key] = ", ".join(f"{r.run_id} {r.status}" + ("" if r.status != "ok" else f" without {metric}")
                                           for r in rows)
    both = sorted(set(chosen["a"]) & set(chosen["b"]), key=label)
    unpaired = []
    for side, other in (("a", "b"), ("b", "a")):
        for key in sorted(set(chosen[side]) | set(why[side]), key=label):
            if key in why[side]:
                unpaired.append(f"{side} {label(key)} ({why[side][key]})")
            elif key not in both and key not in why[other]:  # a failed run is named once, from its side
                unpaired.append(f"{side} {label(key)} (no run of {other} with these settings)")
    pair_rows = tuple(pd.DataFrame([chosen[side][k] for k in both]) for side in ("a", "b"))
    num = lambda rows: (pd.to_numeric(rows[metric], errors="coerce").to_numpy(float) / scale  # noqa: E731
                        if len(rows) else np.array([]))
    return Paired(*map(num, pair_rows), [label(k) for k in both], compared, unpaired, superseded, pair_rows)


def _margin(claim: dict, mean_b: float) -> tuple[float, str]:
    """(the margin in the metric's unit, how it was stated): {abs: x} or {rel: x} of b's mean."""
    m = claim["margin"]
    if "abs" in m:
        return float(m["abs"]), f"+-{m['abs']:g} (absolute)"
    value = float(m["rel"]) * abs(mean_b)
    return value, f"+-{100 * m['rel']:g}% of b's mean = +-{value:.4g}"


def _paired_extra(claim: dict, p: Paired) -> tuple[str, str | None]:
    """The reason's tail (shown metrics, the compared axis, unpaired and superseded runs) and, with
    `equal_tokens`, why the pairs are not comparable (None when they are)."""
    a_rows, b_rows = p.rows
    parts, problem = [], None
    for m in claim.get("show", []):
        if m in a_rows and m in b_rows:
            va, vb = (pd.to_numeric(r[m], errors="coerce").mean() for r in (a_rows, b_rows))
            parts.append(f"{m}: a {va:,.4g}, b {vb:,.4g}")
    if claim.get("equal_tokens"):
        tokens = [(pd.to_numeric(r["steps_completed"], errors="coerce")
                   * pd.to_numeric(r["max_tokens_per_step"], errors="coerce")).to_numpy(float)
                  if {"steps_completed", "max_tokens_per_step"} <= set(r.columns) else np.array([np.nan])
                  for r in (a_rows, b_rows)]
        if not all(np.isfinite(t).all() for t in tokens):
            problem = "the runs do not record steps_completed x max_tokens_per_step: equal tokens unchecked"
        elif (tokens[0] != tokens[1]).any():
            problem = "unequal tokens in a pair: " + "; ".join(
                f"{lab}: a {x:,.0f}, b {y:,.0f}" for lab, x, y in zip(p.labels, *tokens) if x != y)
        else:
            parts.append("equal tokens: " + ", ".join(f"{t:,}" for t in sorted(set(tokens[0].astype(int))))
                         + " positions per run (steps x tokens/step)")
    parts.append("paired by seed and every other setting; compared: " + (", ".join(p.compared) or "nothing differs"))
    both = pd.concat([a_rows, b_rows])
    if differ := frame.differing_versions(both):
        parts.append("library versions differ across these runs: " + "; ".join(
            f"{k} {', '.join(sorted(both[f'env_{k}'].dropna().astype(str).unique()))}" for k in differ))
    if p.unpaired:
        parts.append("unpaired, left out: " + "; ".join(p.unpaired))
    if p.superseded:
        parts.append("superseded by newer runs: " + ", ".join(p.superseded))
    return "; ".join(parts), problem


def _on_pairs(judge):
    """A paired kind from `judge(claim, pairs, reason tail)`, run where >= 2 comparable pairs exist."""
    @functools.wraps(judge)
    def kind(claim: dict, runs: pd.DataFrame) -> Verdict:
        p = pair_runs(claim, runs)
        tail, problem = _paired_extra(claim, p)
        n = f"{len(p.a)} pairs"
        if len(p.a) < 2:
            return Verdict(INCONCLUSIVE, reason=f"{len(p.a)} pair(s) of ok runs: no interval; {tail}", n=n)
        if problem:
            return Verdict(INCONCLUSIVE, reason=f"{problem}; {tail}", n=n)
        return judge(claim, p, tail)

    return kind


def _means(claim: dict, r: dict) -> str:
    unit = f" {claim['unit']}" if claim.get("unit") else ""
    a, b = (" ".join(str(v) for v in claim[side].values()) for side in ("a", "b"))  # the arms' names
    return (f"{a} {r['mean_a']:.4f}, {b} {r['mean_b']:.4f} "
            f"({claim['metric']}{unit}, means over the pairs)")


def _expected(claim: dict, outcome: str) -> str:
    """The verdict on a test's outcome: reproduced where it is the one the claim's `expect` wants."""
    if outcome == "inconclusive":
        return INCONCLUSIVE
    wanted = EXPECT[claim["kind"]]
    return _held(outcome == wanted[claim.get("expect", next(iter(wanted)))])


@_on_pairs
def k_margin_paired(claim: dict, p: Paired, tail: str) -> Verdict:
    """equivalent_paired (TOST) and noninferior_paired: the mean paired difference against the margin."""
    margin, stated = _margin(claim, float(p.b.mean()))
    if claim["kind"] == "equivalent_paired":
        r = stats.tost_paired(p.a, p.b, margin)
        diff, test = "a - b", f"TOST p={r['p_tost']:.3g}"
    else:
        lower = not claim.get("higher_is_better", False)
        r = stats.noninferiority_paired(p.a, p.b, margin, lower_is_better=lower)
        diff = "a - b" if lower else "b - a (how much worse a is)"
        inferior = claim.get("expect") == "inferior"
        test = (f"one-sided p={r['p_inferior']:.3g} (H0: a worse by at most the margin)" if inferior
                else f"one-sided p={r['p']:.3g} (H0: a worse by the margin or more)")
    lo, hi = r["ci"]
    reason = (f"{_means(claim, r)}; {diff} {r['mean']:+.4f} [90% CI {lo:+.4f}, {hi:+.4f}], {test}; "
              f"margin {stated}: {r['outcome']}; {tail}")
    return Verdict(_expected(claim, r["outcome"]), r["mean"], (lo, hi), reason, f"{len(p.a)} pairs",
                   1 - 2 * r["alpha"], stated)


@_on_pairs
def k_lower_paired(claim: dict, p: Paired, tail: str) -> Verdict:
    r = stats.paired_lower(p.a, p.b)
    lo, hi = r["ci"]
    verdict = {"lower": REPRODUCED, "higher": NOT_REPRODUCED}.get(r["outcome"], INCONCLUSIVE)
    said = {"lower": "a lower", "higher": "a higher"}.get(r["outcome"], "no difference shown")
    reason = (f"{_means(claim, r)}; a - b {r['mean']:+.4f} [95% CI {lo:+.4f}, {hi:+.4f}], "
              f"paired t p={r['p']:.3g}: {said}; {tail}")
    return Verdict(verdict, r["mean"], (lo, hi), reason, f"{len(p.a)} pairs", r["confidence"], "none (a < b)")


# ------------------------------------------------------------------ an arm against a reference run

def moving_average(xs, window: int) -> np.ndarray:
    """The mean of every `window` consecutive values: len(xs) - window + 1 of them."""
    return np.convolve(np.asarray(xs, dtype=float), np.ones(window) / window, "valid")


def tolerance(ref, bound: dict):
    """max(bound['abs'], bound['rel'] x |ref|): absolute where the loss is low, relative above."""
    return np.maximum(bound["abs"], bound["rel"] * np.abs(ref))


def compare_curves(ref: list, other: list, window: int, bound: dict) -> dict:
    """Moving averages of two per-step loss curves, step by step. `ok` needs equal lengths (a run
    that stopped early fails) and every |difference| within tolerance(MA_ref)."""
    n = min(len(ref), len(other))
    if n < window:
        return {"ok": False, "reason": f"{n} steps, fewer than the window of {window}"}
    a, b = moving_average(ref[:n], window), moving_average(other[:n], window)
    diffs = np.abs(b - a)
    worst = float((diffs / tolerance(a, bound)).max())  # <= 1 everywhere: within tolerance
    out = {"steps": n, "max_abs_diff": float(diffs.max()), "mean_abs_diff": float(diffs.mean()),
           "final_window_diff": float(b[-1] - a[-1]), "final_window_ref": float(a[-1]),
           "worst_diff_over_tol": worst, "ok": worst <= 1 and len(ref) == len(other)}
    if len(ref) != len(other):
        out["reason"] = f"{len(other)} steps against the reference's {len(ref)}"
    return out


def compare_eval(ref: float | None, other: float | None, bound: dict) -> dict:
    if ref is None or other is None or not math.isfinite(ref) or not math.isfinite(other):
        return {"ok": False, "reason": "no eval_loss"}
    tol = float(tolerance(ref, bound))
    return {"eval_ref": ref, "eval_diff": other - ref, "tol": tol, "ok": abs(other - ref) <= tol}


def _matches(flat: dict, spec: dict) -> bool:
    """Every dotted key of `spec` holds its value in the flattened config (a list: one of them)."""
    def same(x, want):
        return x == want and isinstance(x, bool) == isinstance(want, bool)  # 0 is never false

    return all(any(same(flat.get(k), w) for w in (v if isinstance(v, list) else [v])) for k, v in spec.items())


def _pruned(reference: dict, spec: dict) -> str | None:
    """Why config.validate prunes arm `spec` in the sweep's settings (the reference's stored
    config with the arm's keys), if it does: e.g. compiled layers on a CPU."""
    if any(isinstance(v, list) for v in spec.values()):
        return None
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(config.RunConfig), reference)
        for key, value in spec.items():
            OmegaConf.update(cfg, key, value)
        config.validate(cfg)
    except config.PrunedCombination as e:
        return str(e)
    except Exception:  # a config of another schema: no reason to give
        return None
    return None


def _pair(claim: dict, runs: pd.DataFrame):
    """(run a, run b, their base weights' sha256) or a Verdict saying why they cannot be compared.
    `b` selects the reference by stored config, `a` is b's selection with a's keys changed; of
    several matches the newest is judged (a re-run supersedes). A key a stored config predates
    holds its neutral value (store.ADDED_KEYS)."""
    root = Path(runs.attrs["root"])
    found, spec = {}, {"b": claim["b"], "a": {**claim["b"], **claim["a"]}}
    results = [store.read_result(root / p) or {} for p in runs.path]
    configs = [{**store.ADDED_KEYS, **flatten(r.get("config") or {})} for r in results]
    for side in ("b", "a"):
        idx = [i for i, flat in enumerate(configs) if _matches(flat, spec[side])]
        found[side] = max(idx, key=lambda i: str(runs.started_at.iloc[i]), default=None)
    if found["b"] is None:
        return Verdict(INCONCLUSIVE, reason="no run of the reference (b) in the sweep")
    ref = results[found["b"]]
    if found["a"] is None:
        why = _pruned(ref.get("config") or {}, claim["a"])
        return Verdict(INCONCLUSIVE, reason=f"not run: pruned ({why})" if why else "no run of arm a in the sweep")
    a, b = runs.iloc[found["a"]], runs.iloc[found["b"]]
    if b.status != "ok":
        return Verdict(INCONCLUSIVE, reason=f"the reference run ended {b.status} ({b.run_id})")
    if a.status != "ok":
        return Verdict(NOT_REPRODUCED, reason=f"arm a's run ended {a.status}: {a.error_message} ({a.run_id})")
    weights = [results[found[s]].get("metrics", {}).get("base_weights_sha256") for s in ("a", "b")]
    if weights[0] != weights[1]:  # a GPU build of a base is not bit-reproducible: compare one build only
        return Verdict(INCONCLUSIVE, reason="a and b trained on other base weights (sha256 "
                       f"{' vs '.join(str(w)[:12] for w in weights)}): re-run the older with force=true")
    return a, b, weights[0]


def _curve_text(c: dict, window: int) -> str:
    if "max_abs_diff" not in c:
        return c["reason"]
    text = (f"max abs dMA{window} {c['max_abs_diff']:.4f} (mean {c['mean_abs_diff']:.4f}, final "
            f"{c['final_window_diff']:+.4f} on the reference's {c['final_window_ref']:.4f}; "
            f"{c['worst_diff_over_tol']:.2f} of the tolerance at worst)")
    return text + (f", {c['reason']}" if "reason" in c else "")


def _against_reference(claim: dict, runs: pd.DataFrame, on: str) -> Verdict:
    """curve_within (on="curve") and eval_within (on="eval"): one arm against the reference run;
    the reason carries both comparisons."""
    pair = _pair(claim, runs)
    if isinstance(pair, Verdict):
        return pair
    a, b, weights = pair
    curves = load_curves(runs.attrs["root"], runs[runs.run_id.isin([a.run_id, b.run_id])])
    loss = {r.run_id: curves[curves.run_id == r.run_id].sort_values("step").loss.tolist() for r in (a, b)}
    curve = compare_curves(loss[b.run_id], loss[a.run_id], claim["window"], claim["bound"])
    ev = compare_eval(b.eval_loss, a.eval_loss, claim["bound"])
    texts = [_curve_text(curve, claim["window"]),
             f"eval_loss {ev['eval_diff']:+.4f} on the reference's {ev['eval_ref']:.4f} (tolerance {ev['tol']:.4f})"
             if "eval_diff" in ev else ev["reason"]]
    judged, texts = (curve, texts) if on == "curve" else (ev, texts[::-1])
    texts.append(f"runs {a.run_id} vs {b.run_id}" + (f", base weights {weights[:12]}" if weights else ""))
    verdict = INFORMATION if claim.get("information") else _held(judged["ok"])
    return Verdict(verdict, judged.get("max_abs_diff" if on == "curve" else "eval_diff"), reason="; ".join(texts),
                   n=f"{len(loss[a.run_id])} steps")


KINDS = {"value": k_value, "difference": k_difference, "lower": k_lower, "equivalent": k_equivalent,
         "survives": k_survives, "estimate": k_estimate, "kernel_order": k_kernel_order,
         "ptq_error": k_ptq_error, "ptq_lower": k_ptq_lower, "speed_ratio": k_speed_ratio, "ratio": k_ratio,
         "curve_within": functools.partial(_against_reference, on="curve"),
         "eval_within": functools.partial(_against_reference, on="eval"),
         "equivalent_paired": k_margin_paired, "noninferior_paired": k_margin_paired, "lower_paired": k_lower_paired,
         "untested": lambda claim, runs: Verdict(UNTESTED, reason=claim["reason"], n="-")}
PAIRED = ("equivalent_paired", "noninferior_paired", "lower_paired")
SHOWS_INFORMATION = ("curve_within", "eval_within")  # their own `information` rule: a failed run still fails
NEEDS_RUNS = ("value", "difference", "lower", "equivalent", "survives", "speed_ratio", "ratio", "curve_within",
              "eval_within", *PAIRED)
# `expect` -> the test outcome that reproduces the claim; the first is the default
EXPECT = {"equivalent_paired": {"equivalent": "equivalent", "different": "not equivalent"},
          "noninferior_paired": {"noninferior": "non-inferior", "inferior": "inferior"}}
NEEDS_PTQ = ("ptq_error", "ptq_lower")  # evidence: results/<ptq.claim_target(claim['ptq']).name>/ptq.json


# ------------------------------------------------------------------ the verb

def load_claims(path: Path, sweep: str | None = None) -> list[dict]:
    """The claims of a claims file; `sweep`: the sweep of every claim that names none."""
    claims = yaml.safe_load(Path(path).read_text())["claims"]
    for i, c in enumerate(claims):
        if c.get("kind") in NEEDS_RUNS and not c.setdefault("sweep", sweep):
            raise ValueError(f"{path}: claim {c.get('id', i)} names no sweep: give one (--sweep)")
        for key in ("id", "statement", "source", "kind"):
            if key not in c:
                raise ValueError(f"{path}: claim {i} ({c.get('id', '?')}) lacks '{key}'")
        kind, at = c["kind"], f"{path}: claim {c['id']}"
        if kind not in KINDS:
            raise ValueError(f"{at}: unknown kind {kind!r} (choose from {', '.join(KINDS)})")
        if kind in NEEDS_PTQ:
            try:
                ptq.claim_target(c.get("ptq"))
            except ValueError as e:
                raise ValueError(f"{at}: kind {kind} {e}") from None
        if kind == "untested" and not c.get("reason"):
            raise ValueError(f"{at}: kind untested needs a reason (why it is not measured)")
        if kind not in PAIRED:
            continue
        for key in ("a", "b", "metric"):
            if key not in c:
                raise ValueError(f"{at}: kind {kind} needs '{key}'")
        m = c.get("margin")
        if kind != "lower_paired" and not (isinstance(m, dict) and len(m) == 1 and ("abs" in m or "rel" in m)
                                           and float(next(iter(m.values()))) > 0):
            raise ValueError(f"{at}: kind {kind} needs margin: {{abs: x}} (the metric's unit) or {{rel: x}} "
                             "(a fraction of arm b's mean), x > 0, stated before the runs")
        if "expect" in c and c["expect"] not in EXPECT.get(kind, {}):
            raise ValueError(f"{at}: expect must be one of {', '.join(EXPECT.get(kind, {})) or 'nothing (no expect)'}")
    return claims


def run_missing(claims: list[dict], results: Path) -> None:
    """Run each sweep the claims need that has no result yet (a Hydra multirun per sweep), and
    each PTQ measurement that has no ptq.json (one process per model and text), through the launcher;
    each one's output goes to a log under results/logs/claims/."""
    done, logs = set(), results / "logs" / "claims"
    for c in claims:
        if c["kind"] in NEEDS_PTQ:
            t = ptq.claim_target(c["ptq"])
            heldout = t.text == ptq.HELDOUT
            name, module, needs_gpu = t.name, "qlab.claims.ptq", t.size == "gpu"
            has_result = (ptq.result_dir(results, t) / "ptq.json").is_file()
            skipped, running = f"the PTQ measurement of {t.model}", f"PTQ measurement {t.name}"
            log = logs / (f"ptq-{t.size}.log" if heldout else f"{t.name}.log")
            args = [*(["--size", t.size] if heldout else ["--model", t.model, "--text", t.text]),
                    "--results", str(results)]
        elif c["kind"] in NEEDS_RUNS and c.get("sweep") and c.get("experiment"):
            name, module, needs_gpu = c["sweep"], "qlab.run", "train=gpu" in c.get("overrides", [])
            has_result = any((results / name).glob("*/result.json"))
            skipped = running = f"sweep {name}"
            log = logs / f"{name}.log"
            args = [f"experiment={c['experiment']}", f"tracker.sweep={name}", f"tracker.results_dir={results}",
                    *c.get("overrides", [])]
        else:
            continue
        if name in done or has_result:
            continue
        done.add(name)
        if needs_gpu and not _has_cuda():
            print(f"not running {skipped}: it needs a GPU (its claims stay inconclusive)", flush=True)
            continue
        print(f"running missing {running} (log: {log})", flush=True)
        launch.launch(args, log, module=module)


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def measured_on(c: dict, runs) -> str:
    """What a claim's numbers come from, for its row: model · data of the runs its arms select (random
    or GGUF weights marked), the analytic model's model, the PTQ record's; else the claim's."""
    kind = c["kind"]
    if kind == "kernel_order":
        return "N(0,1) data"
    if kind == "estimate":
        return f"{c['model']} (analytic)"
    planned = c.get("measured_on") or c.get("model") or "-"  # the claims file's, until runs exist
    if kind in NEEDS_PTQ:
        if runs:
            return ptq.describe(runs)
        t = ptq.claim_target(c["ptq"])
        return f"{t.model} · held-out split" if t.text == ptq.HELDOUT else f"{t.model} · {t.text} (not run yet)"
    if kind not in NEEDS_RUNS or runs is None or runs.empty or "model" not in runs:
        return str(planned) + (" (not run yet)" if kind in NEEDS_RUNS and planned != "-" else "")
    specs = [c[k] for k in ("a", "b", "where") if isinstance(c.get(k), dict)]
    sel = pd.concat([select(runs, spec, None) for spec in specs]) if specs else runs
    sel = sel if len(sel) else runs
    parts = []
    for model, g in sel.groupby("model", sort=True):
        weights = set(g.get("model_weights", pd.Series(dtype=object)).dropna())
        note = {"random": " (random weights)", "gguf": " (dequantized from a 4-bit GGUF)"}.get(
            next(iter(weights)) if len(weights) == 1 else "", "")
        data = sorted({str(d) for d in g.get("data", pd.Series(dtype=object)).dropna()})
        if (g.kind == "eval").all():  # an lm-eval task (the metric's), of adapters trained on some data
            metric = str(c.get("metric", ""))
            data = [metric.split(".")[1] if metric.startswith("lm_eval.") else "lm-eval"]
            trained = sorted({str(d) for d in g.get("trained_data", pd.Series(dtype=object)).dropna()})
            if trained:
                data.append(f"adapters trained on {', '.join(trained)}")
        parts.append(f"{model}{note}" + (f" · {' · '.join(data)}" if data else ""))
    return "; ".join(parts)


def margin_text(c: dict) -> str:
    """The claim's margin or tolerance as stated in the claims file ("" where it has none)."""
    if isinstance(c.get("margin"), dict):
        m = c["margin"]
        return f"+-{m['abs']:g}" if "abs" in m else f"+-{100 * m['rel']:g}% of b"
    if c.get("margin") is not None:
        return f"+-{100 * c['margin']:g}%" + (" of b" if c["kind"] == "equivalent" else "")
    tol = c.get("tolerance") or {}
    if tol:
        return " + ".join(f"+-{v:g}" if k == "abs" else f"+-{100 * v:g}%" for k, v in tol.items())
    for key, sign in (("at_most", "<="), ("at_least", ">=")):
        if key in c:
            return f"{sign} {c[key]:g}"
    return ""


def evaluate(claims: list[dict], results: Path) -> list[dict]:
    cache: dict[str, pd.DataFrame] = {}
    rows = []
    for c in claims:
        runs = pd.DataFrame(columns=["status"])
        if c["kind"] in NEEDS_PTQ:
            runs = ptq.load(results, ptq.claim_target(c["ptq"])) if results is not None else None  # a dict, or None
        elif c["kind"] in NEEDS_RUNS:
            sweep = c["sweep"]
            if sweep not in cache and (results / sweep).is_dir():
                cache[sweep] = load_runs(results / sweep)
            runs = cache.get(sweep, runs)
        if c["kind"] in NEEDS_RUNS and runs.empty:
            v = Verdict(INCONCLUSIVE, reason=f"not run yet: results/{c['sweep']}/ has no result")
        elif c["kind"] in NEEDS_PTQ and runs is None:
            t = ptq.claim_target(c["ptq"])
            v = Verdict(INCONCLUSIVE, reason=f"not run yet: results/{t.name}/ has no ptq.json ({t.command()})")
        else:
            v = KINDS[c["kind"]](c, runs)
        if c.get("fact"):
            v.reason = f"a fact of the storage format (arithmetic, not an experiment): {v.reason}"
            v.verdict = FACT if v.verdict == REPRODUCED else v.verdict
        if c.get("information") and c["kind"] not in SHOWS_INFORMATION:
            v.reason = f"shown for what it measures, not a verdict on the paper's claim: {v.reason}"
            v.verdict = INFORMATION
        rows.append({"id": c["id"], "statement": c["statement"], "source": c["source"],
                     "paper": c.get("paper", c.get("paper_value")), "unit": c.get("unit", ""),
                     "measured_on": measured_on(c, runs), "margin": v.margin or margin_text(c),
                     "measured": v.measured, "ci": list(v.ci) if v.ci else None, "ci_level": v.ci_level,
                     "verdict": v.verdict, "reason": v.reason, "n": v.n,
                     "evidence": c.get("sweep") or (ptq.claim_target(c["ptq"]).name if c["kind"] in NEEDS_PTQ
                                                    else c["kind"])})
    return rows


def evidence_machine(results: Path, evidence: str) -> str:
    """Where a claim's numbers were measured: the machine its evidence recorded (a sweep's first
    result, ptq.json), or the one evaluating claims computed here."""
    if evidence == "untested":
        return "not measured"
    if evidence in ("kernel_order", "estimate"):
        return ("analytic (no hardware)" if evidence == "estimate" else
                f"computed by this command: {store.machine_line(store.environment())}")
    path = results / evidence
    files = [path / "ptq.json"] if (path / "ptq.json").is_file() else sorted(path.glob("*/result.json"))
    for f in files:
        if f.is_file():
            env = json.loads(f.read_text()).get("env")
            if env:
                return store.machine_line(env)
    return "n/a (no result yet)"


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.4g}" if isinstance(x, float) else str(x)


def counts_line(rows: list[dict]) -> str:
    """"7 reproduced, 2 not reproduced, 5 inconclusive, 2 fact, 1 untested, 3 information": the first
    three always, the others where a row has them."""
    counts = {k: sum(r["verdict"] == k for r in rows) for k in VERDICTS}
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v or k in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE))


def _interval(r: dict) -> str:
    if not r.get("ci"):
        return ""
    level = r.get("ci_level", stats.CONFIDENCE)
    tag = "" if abs(level - stats.CONFIDENCE) < 1e-9 else f"{100 * level:g}%: "
    return f" [{tag}{_fmt(r['ci'][0])}, {_fmt(r['ci'][1])}]"


def arms_section(claims: list[dict], results: Path) -> list[str]:
    """Every arm of each sweep a paired claim reads (those no claim names too): the mean of the claim's
    metric over its ok runs [95% t-interval] and its trainable parameters."""
    lines = []
    for sweep, metric in dict.fromkeys((c["sweep"], c["metric"]) for c in claims if c["kind"] in PAIRED):
        if results is None or not (results / sweep).is_dir():
            continue
        runs = load_runs(results / sweep)
        if runs.empty or metric not in runs:
            continue
        runs = runs[runs.kind == "train"]
        keys = [k for k in ("model", "data", "quant_label", "adapter", "optim") if runs[k].nunique() > 1
                or k in ("quant_label", "adapter")]
        table = [f"| {' | '.join(keys)} | runs (ok/all) | {metric} [95% CI] | trainable params |",
                 "|" + "---|" * (len(keys) + 3)]
        for cfg, g in runs.groupby(keys, sort=False):
            cfg = cfg if isinstance(cfg, tuple) else (cfg,)
            ok = g[g.status == "ok"]
            v = pd.to_numeric(ok[metric], errors="coerce").dropna().to_numpy(float)
            ci = stats.mean_interval(v)
            cell = "n/a" if not len(v) else f"{v.mean():.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
            params = pd.to_numeric(ok.get("trainable_params", pd.Series(dtype=float)), errors="coerce").dropna()
            table.append(f"| {' | '.join(map(str, cfg))} | {len(ok)}/{len(g)} | {cell} | "
                         f"{f'{params.mean():,.0f}' if len(params) else 'n/a'} |")
        lines += ["", f"## Every arm of `{sweep}` ({metric})", "",
                  f"Measured on {measured_on({'kind': 'value', 'where': {}}, runs)}. Each arm's ok runs (seeds); "
                  "the claims above compare arms paired by seed.", "", *table]
    return lines


def write(rows: list[dict], out: Path, results: Path, claims_file: Path = DEFAULT_CLAIMS) -> Path:
    """<out>/<stem>.md, <stem>.json (stem: the claims file's) and summary.md; the claims file's
    `title` and `expected` (the header of the expected value's column) head the page."""
    doc, stem = yaml.safe_load(Path(claims_file).read_text()), Path(claims_file).stem
    shown = Path(claims_file).resolve()
    shown = shown.relative_to(PROJECT_ROOT) if shown.is_relative_to(PROJECT_ROOT) else claims_file
    out.mkdir(parents=True, exist_ok=True)
    env = store.environment()
    store.atomic_write_json(out / f"{stem}.json", {"claims": rows, "generated_at": store.now(),
                                                   "git_commit": store.git_commit(), "env": env})
    lines = [f"# {doc.get('title', 'QLoRA paper claims (arXiv 2305.14314): verdicts')}", "",
             f"Computed by `qlab claims` from `{results}` ({counts_line(rows)}). "
             "Verdicts are computed from result files and the analytic model, never typed; see "
             f"`{shown}` for each claim's metric, comparison and tolerance. **fact**: arithmetic of the storage "
             "format, not an experiment; **untested**: not measured, for the reason given; **information**: shown "
             "for what it measures, no verdict on the paper's claim.", "",
             f"Evaluated on {env['gpu'] or env['cpu']}; where each claim's numbers were measured is under "
             "Evidence below.", "",
             f"| claim | source | measured on | {doc.get('expected', 'paper')} | measured [95% CI unless stated] | "
             "margin | n | verdict | why |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r, ("statement", "source", "measured_on", "paper", "measured", "margin", "n", "verdict", "reason"))
              for r in rows]
    claims = [c for c in (doc.get("claims") or []) if c.get("kind") in PAIRED and c.get("sweep")]
    lines += arms_section(claims, results)
    lines += ["", "## Evidence", "", "| evidence (under results/) | claims | measured on |", "|---|---|---|"]
    for evidence in dict.fromkeys(r["evidence"] for r in rows):
        ids = ", ".join(r["id"] for r in rows if r["evidence"] == evidence)
        lines.append(f"| `{evidence}` | {ids} | {evidence_machine(results, evidence)} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / "summary.md").write_text(summary(rows, out / f"{stem}.md", doc.get("expected", "paper")))
    return out / f"{stem}.md"


def paper_text(r: dict) -> str:
    """The paper's value, with the unit where it is a number or a bound ("0.373 bits/param",
    "< 48 GB"), without where it is words ("equal")."""
    p = r["paper"]
    numeric = (isinstance(p, (int, float)) and not isinstance(p, bool)) or \
        (isinstance(p, str) and re.fullmatch(r"[<>=]+ ?[\d.,]+", p.strip()) is not None)
    return _fmt(p) + (f" {r['unit']}" if numeric and r["unit"] else "")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row(r: dict, columns: tuple[str, ...], unit: bool = False) -> str:
    """A claim's table row of `columns`, escaped for markdown (the verdict bold; `unit`: the measured unit too)."""
    measured = _fmt(r["measured"]) + _interval(r)
    if unit and r["unit"] and r["measured"] is not None and measured != "n/a":
        measured += f" {r['unit']}"
    cells = {**r, "paper": paper_text(r), "measured": measured, "margin": r["margin"] or "-", "n": r["n"] or "-"}
    return "| " + " | ".join(f"**{r[k]}**" if k == "verdict" else _cell(cells[k]) for k in columns) + " |"


def summary(rows: list[dict], page: Path = Path("results/claims/claims.md"), expected: str = "paper") -> str:
    """One compact table (claim, what it was measured on, paper, measured with its interval, margin,
    n, verdict) of the rows with a verdict, for the README, verbatim: the information rows (shown
    for scale, no verdict), the reasons and the sources stay in claims.md."""
    lines = [f"| claim | measured on | {expected} | measured | margin | n | verdict |", "|---|---|---|---|---|---|---|"]
    lines += [_row(r, ("statement", "measured_on", "paper", "measured", "margin", "n", "verdict"), unit=True)
              for r in rows if r["verdict"] != INFORMATION]
    lines += ["", f"{counts_line(rows)}; generated by `qlab claims` "
                  f"(`{page}` has the information rows, the sources and the reason for each verdict)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qlab claims", description=__doc__.split("\n\n")[0])
    p.add_argument("--claims", type=Path, default=DEFAULT_CLAIMS)
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--out", type=Path, default=None, help="default: <results>/<--sweep>, else <results>/claims")
    p.add_argument("--sweep", default=None, help="the sweep of the claims that name none (experiments/numerics.yaml)")
    p.add_argument("--no-run", action="store_true", help="evaluate what exists; run no missing sweep")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        claims = load_claims(args.claims, args.sweep)
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"qlab claims: {e}", file=sys.stderr)
        return 2
    if not args.no_run:
        run_missing(claims, args.results)
    rows = evaluate(claims, args.results)
    page = write(rows, args.out or args.results / (args.sweep or "claims"), args.results, args.claims)
    print(page.read_text())
    return 0


class SweepVerdicts(ManifestCallback):
    """The manifest callback of a sweep that is judged when it ends (conf/experiment/numerics.yaml):
    the claims file's claims for this sweep into <results>/<sweep>/<stem>.md; exit 1 when one is
    not reproduced, as when a run failed."""

    def __init__(self, claims: str):
        self.claims = Path(PROJECT_ROOT) / claims

    def on_multirun_end(self, config, **kwargs) -> None:
        results, sweep = Path(config.tracker.results_dir), config.tracker.sweep
        try:
            super().on_multirun_end(config, **kwargs)
        finally:
            rows = evaluate(load_claims(self.claims, sweep), results)
            print(write(rows, results / sweep, results, self.claims).read_text(), flush=True)
        if any(r["verdict"] == NOT_REPRODUCED for r in rows):
            raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(main())
