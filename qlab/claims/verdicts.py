"""The QLoRA paper's claims as data, each turned into a measurement with a computed verdict.

    qlab claims [--claims experiments/claims.yaml] [--results results] [--out results/claims] [--no-run]

A claims file lists claims; each names the paper's statement and number, its source, where
the measurement comes from, the metric, the comparison and the tolerance. Verdicts are
computed here, never typed: `reproduced`, `not reproduced`, or `inconclusive` with the reason
(no runs yet, one seed per arm, an interval that straddles the margin). A claim that fails is
reported as failing.

Comparison kinds (a small lookup table, `KINDS`):
  value        mean of `metric` over the runs matching `where`, vs `paper_value` +- tolerance
  difference   mean over arm `a` minus mean over arm `b`, vs `paper_value` +- tolerance
  lower        arm `a` has a lower `metric` than arm `b`: Welch's t-test across seeds, alpha 0.05
               (significantly higher -> not reproduced; no significant difference or n < 2 ->
               inconclusive)
  equivalent   |mean_a - mean_b| within `margin` (relative to mean_b): the 95% Welch interval
               of the difference inside +-margin -> reproduced, entirely outside -> not reproduced
  survives     under the claim's experiment, every run of arm `a` is ok and every run of arm `b`
               ran out of memory
  estimate     a number from the analytic memory model (qlab.estimate) of `model` under one
               or two settings, vs `paper_value` +- tolerance or `at_most`
  kernel_order quantization error (MSE) of `kinds` on standard-normal data: the first is lowest
  ptq_error    quantization error `metric` (mse) of `kinds` on the real weights of the `ptq`
               evidence (every decoder linear weight): the first is lowest -> reproduced, else
               not reproduced (no noise: all weights are measured). `ptq`: a base size (`ptq: gpu`,
               results/ptq-base-gpu/ptq.json) or a model and text (`ptq: {model: smollm2-135m,
               text: wiki}`, results/ptq-smollm2-135m-wiki/ptq.json; qlab.claims.ptq.claim_target)
  ptq_lower    post-training-quantization perplexity of the `ptq` evidence: type `a` is lower
               than each type in `others`. Each pair is compared window by window on the same
               tokens (stats.paired_log_ratio, 95% t-interval of log(ppl_a/ppl_b)):
               every interval entirely below 0 -> reproduced; any entirely above 0 (an other type
               significantly lower) -> not reproduced; otherwise the difference is within noise ->
               inconclusive. `measured`: the relative perplexity change vs the closest other type
  interleaved_equivalent  tokens/s of method `a` vs method `b` in the retired overhead bench's
               record (results/overhead/<overhead>.json), interleaved rounds in one process: the
               95% t-interval of the mean per-round ratio a/b - 1 inside +-margin -> reproduced,
               entirely outside -> not reproduced, else inconclusive
  speed_ratio  tokens/s of arm a over arm b in the comparisons (task=compare) of `sweep`, the
               pair `pair`'s 95% interval over its paired rounds against `at_least` / `at_most`
               (the whole interval beyond the threshold -> reproduced, the whole interval on the
               wrong side -> not reproduced, else inconclusive) or `margin` (inside 1 +- margin ->
               reproduced, entirely outside -> not reproduced); a comparison whose A/A control's
               interval excludes 1 is not valid: inconclusive
  ratio        mean `metric` of arm `a` over arm `b` (runs of `sweep`) against `at_most` /
               `at_least`, no interval: for what a run measures without noise (torch's peak bytes)
  curve_within the run of arm `a` follows the reference run `b` step by step: the moving average of
               its per-step loss over `window` steps stays within max(bound.abs, bound.rel x the
               reference's) at every step; both arms select by stored config (`b`: dotted keys and
               values, `a`: the keys that differ from b; a list: any of its values), the newest run
               of each, compared only when trained on the same base weights (docs/numerics.md)
  eval_within  the same pair, judged on eval_loss: |a - b| <= max(bound.abs, bound.rel x b)
               (`information: true`: shown for scale, no verdict)
A claims file with no `sweep` in a claim is judged for any one sweep (`--sweep`, or the sweep
that ends with `SweepVerdicts` as its callback) into <results>/<sweep>/<claims file's stem>.md.
Runs come from `results/<sweep>/`: `make claims` first runs the sweeps that have no results
(`experiment` plus `overrides`, a Hydra multirun), and the PTQ measurements that have no
ptq.json (`python -m qlab.claims.ptq --size <ptq>`, or `--model M --text T`), unless --no-run;
GPU-sized ones (`train=gpu` among the overrides, `ptq: gpu`) only where CUDA is available.

Besides claims.md (every column, the reasons), `write` produces summary.md: one compact table
(claim, paper, measured, verdict) for the README to include verbatim.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from omegaconf import OmegaConf

from qlab import config
from qlab.claims import ptq
from qlab.config import PROJECT_ROOT
from qlab.results import stats, store
from qlab.results.frame import flatten, load_curves, load_runs
from qlab.run import launch
from qlab.run.sweep import ManifestCallback

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
INFORMATION = "information"  # a row shown for scale (a claim with `information: true`), no verdict
ALPHA = 0.05
DEFAULT_CLAIMS = Path(PROJECT_ROOT) / "experiments" / "claims.yaml"


@dataclass
class Verdict:
    verdict: str
    measured: float | None = None
    ci: tuple[float, float] | None = None
    reason: str = ""
    n: str = ""


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


def _within(measured: float, claim: dict) -> bool:
    tol = claim.get("tolerance", {})
    paper = claim["paper_value"]
    limit = tol.get("abs", 0.0) + abs(paper) * tol.get("rel", 0.0)
    return abs(measured - paper) <= limit


# ------------------------------------------------------------------ the comparison kinds

def k_value(claim: dict, runs: pd.DataFrame) -> Verdict:
    v = _values(runs, claim.get("where", {}), claim["metric"], claim.get("scale", 1.0))
    if len(v) == 0:
        return Verdict(INCONCLUSIVE, reason="no ok run matches yet")
    m = float(v.mean())
    ci = stats.mean_interval(v) if v.std() > 0 else None
    ok = _within(m, claim)
    return Verdict(REPRODUCED if ok else NOT_REPRODUCED, m, ci,
                   f"{'within' if ok else 'outside'} the tolerance of the paper's value", f"n={len(v)}")


def _arms(claim: dict, runs: pd.DataFrame):
    """(values of arm a, values of arm b, "n=.. vs ..", an inconclusive verdict if an arm is empty)."""
    scale = claim.get("scale", 1.0)
    a, b = (_values(runs, claim[arm], claim["metric"], scale) for arm in ("a", "b"))
    n = f"n={len(a)} vs {len(b)}"
    empty = Verdict(INCONCLUSIVE, reason="an arm has no ok run yet", n=n) if len(a) == 0 or len(b) == 0 else None
    return a, b, n, empty


def k_difference(claim: dict, runs: pd.DataFrame) -> Verdict:
    a, b, n, empty = _arms(claim, runs)
    if empty:
        return empty
    d = float(a.mean() - b.mean())
    ci = stats.welch_interval(a, b)
    ok = _within(d, claim)
    return Verdict(REPRODUCED if ok else NOT_REPRODUCED, d, ci,
                   f"{'within' if ok else 'outside'} the tolerance of the paper's value", n)


def k_lower(claim: dict, runs: pd.DataFrame) -> Verdict:
    a, b, n, empty = _arms(claim, runs)
    if empty:
        return empty
    d = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2:
        return Verdict(INCONCLUSIVE, d, reason="fewer than 2 seeds per arm: no test", n=n)
    ci = stats.welch_interval(a, b)
    p = stats.compare(a, b)["p_welch"]  # NaN where neither arm varies: then any difference is certain
    p = (0.0 if d else 1.0) if math.isnan(p) else p
    if p < ALPHA:
        return Verdict(REPRODUCED if d < 0 else NOT_REPRODUCED, d, ci,
                       f"a {'lower' if d < 0 else 'higher'} than b, Welch p={p:.3g}", n)
    return Verdict(INCONCLUSIVE, d, ci, f"no significant difference (Welch p={p:.3g})", n)


def k_equivalent(claim: dict, runs: pd.DataFrame) -> Verdict:
    a, b, n, empty = _arms(claim, runs)
    if empty:
        return empty
    d = float(a.mean() - b.mean())
    margin = claim["margin"] * abs(b.mean())
    if min(len(a), len(b)) < 2:
        return Verdict(INCONCLUSIVE, d, reason=f"fewer than 2 seeds per arm: no interval (margin +-{margin:.4g})", n=n)
    lo, hi = stats.welch_interval(a, b)
    if -margin <= lo and hi <= margin:
        return Verdict(REPRODUCED, d, (lo, hi), f"95% interval inside +-{margin:.4g}", n)
    if lo > margin or hi < -margin:
        return Verdict(NOT_REPRODUCED, d, (lo, hi), f"95% interval entirely outside +-{margin:.4g}", n)
    return Verdict(INCONCLUSIVE, d, (lo, hi), f"95% interval straddles the margin +-{margin:.4g}", n)


def k_survives(claim: dict, runs: pd.DataFrame) -> Verdict:
    a, b = select(runs, claim["a"], None), select(runs, claim["b"], None)
    n = f"n={len(a)} vs {len(b)}"
    if a.empty or b.empty:
        return Verdict(INCONCLUSIVE, reason="an arm has no run yet", n=n)
    a_ok, b_oom = (a.status == "ok").all(), (b.status == "oom").all()
    if a_ok and b_oom:
        return Verdict(REPRODUCED, reason="every run of a completed, every run of b ran out of memory", n=n)
    if not a_ok and (a.status == "oom").any():
        return Verdict(NOT_REPRODUCED, reason="arm a ran out of memory too", n=n)
    return Verdict(INCONCLUSIVE, reason=f"statuses a={sorted(set(a.status))}, b={sorted(set(b.status))}: "
                                        "the memory cap did not separate them", n=n)


def k_estimate(claim: dict, runs: pd.DataFrame) -> Verdict:
    from qlab.claims import estimate

    def value(setting: dict) -> float:
        e = estimate.estimate(claim["model"], estimate.Setting(**setting))
        return float(e.as_metrics()[claim["metric"]])

    measured = value(claim["setting"]) - (value(claim["minus"]) if "minus" in claim else 0.0)
    measured /= claim.get("scale", 1.0)
    if "at_most" in claim:
        ok = measured <= claim["at_most"]
        return Verdict(REPRODUCED if ok else NOT_REPRODUCED, measured,
                       reason=f"analytic model: {'at most' if ok else 'above'} {claim['at_most']}", n="estimate")
    ok = _within(measured, claim)
    return Verdict(REPRODUCED if ok else NOT_REPRODUCED, measured,
                   reason=f"analytic model: {'within' if ok else 'outside'} the tolerance", n="estimate")


def k_kernel_order(claim: dict, runs: pd.DataFrame) -> Verdict:
    import torch

    from qlab.claims import kernels

    size = claim.get("size", 1024)
    x = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    mse = {k: kernels.quantization_error(x, k, blocksize=claim.get("blocksize", 64))["mse"] for k in claim["kinds"]}
    order = sorted(mse, key=mse.get)
    ok = order[0] == claim["kinds"][0]  # the claimed type has the lowest error
    return Verdict(REPRODUCED if ok else NOT_REPRODUCED, mse[claim["kinds"][0]],
                   reason="MSE on N(0,1): " + " < ".join(f"{k} {mse[k]:.3g}" for k in order), n=f"{size * size:,} values")


def _ptq_missing(claim: dict) -> Verdict:
    t = ptq.claim_target(claim["ptq"])
    return Verdict(INCONCLUSIVE, reason=f"not run yet: results/{t.name}/ has no ptq.json ({t.command()})")


def _ptq_on(record: dict) -> str:
    """Which model, text and windows a PTQ verdict stands on, for its reason."""
    ev = record["eval"]
    size = f" of {ev['seq_len']} positions" if ev.get("seq_len") else ""
    return f"on {ptq.describe(record)}, {len(ev['window_tokens'])} windows{size}"


def k_ptq_error(claim: dict, record: dict | None) -> Verdict:
    if record is None:
        return _ptq_missing(claim)
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
    return Verdict(REPRODUCED if ok else NOT_REPRODUCED, value[kinds[0]], reason=reason,
                   n=f"{first['n']:,} weights")


def k_ptq_lower(claim: dict, record: dict | None) -> Verdict:
    if record is None:
        return _ptq_missing(claim)
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
    ci = tuple(100 * x for x in c["rel_ci95"])
    on = _ptq_on(record)
    higher = [b for b, r in pairs.items() if r["ci95"][0] > 0]
    if higher:
        return Verdict(NOT_REPRODUCED, 100 * c["rel"], ci,
                       f"{', '.join(higher)} significantly lower than {a}: perplexity {ppl} ({diffs}) {on}", n)
    if all(r["ci95"][1] < 0 for r in pairs.values()):
        return Verdict(REPRODUCED, 100 * c["rel"], ci, f"perplexity {ppl} ({diffs}; 95% paired intervals) {on}", n)
    within = [b for b, r in pairs.items() if r["ci95"][1] >= 0]
    return Verdict(INCONCLUSIVE, 100 * c["rel"], ci,
                   f"{a} vs {', '.join(within)} within noise (the 95% paired interval includes 0): "
                   f"perplexity {ppl} ({diffs}) {on}", n)


def k_interleaved_equivalent(claim: dict, record: dict | None) -> Verdict:
    if record is None:
        return Verdict(INCONCLUSIVE, reason=f"not run yet: results/overhead/{claim['overhead']}.json does not "
                                            "exist (the retired overhead bench's record; kind speed_ratio reads "
                                            "comparisons)")
    methods = record["methods"]
    if claim["a"] not in methods or claim["b"] not in methods:
        return Verdict(INCONCLUSIVE, reason=f"{claim['overhead']}.json has no {claim['a']} / {claim['b']} method")
    a, b = (np.asarray(methods[m]["tokens_per_s_rounds"], dtype=float) for m in (claim["a"], claim["b"]))
    rel = a / b - 1  # round i of each method ran back to back: a paired comparison
    n, margin, m = f"{len(rel)} paired rounds", claim["margin"], float(rel.mean())
    if len(rel) < 2:
        return Verdict(INCONCLUSIVE, m, reason="fewer than 2 rounds: no interval", n=n)
    lo, hi = stats.mean_interval(rel)
    ci = (100 * float(lo), 100 * float(hi))
    setup = record.get("setup", {})
    what = (f"{claim['a']} vs {claim['b']} tok/s on {setup.get('model')} ({record.get('env', {}).get('gpu')}), "
            f"per-round ratio - 1 {100 * m:+.1f}% [{ci[0]:+.1f}, {ci[1]:+.1f}]")
    if -margin <= lo and hi <= margin:
        return Verdict(REPRODUCED, 100 * m, ci, f"{what}: inside +-{100 * margin:g}%", n)
    if lo > margin or hi < -margin:
        return Verdict(NOT_REPRODUCED, 100 * m, ci, f"{what}: entirely outside +-{100 * margin:g}%", n)
    return Verdict(INCONCLUSIVE, 100 * m, ci, f"{what}: straddles +-{100 * margin:g}%", n)


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
        low, high = 1 - claim["margin"], 1 + claim["margin"]
        bound = f"1 +- {claim['margin']:g}"
        ok, wrong = low <= lo and hi <= high, lo > high or hi < low
    elif "at_least" in claim:
        bound = f">= {claim['at_least']:g}"
        ok, wrong = lo >= claim["at_least"], hi < claim["at_least"]
    else:
        bound = f"<= {claim['at_most']:g}"
        ok, wrong = hi <= claim["at_most"], lo > claim["at_most"]
    if ok:
        return Verdict(REPRODUCED, p["ratio"], (lo, hi), f"{what}: the whole 95% interval {bound}", n)
    if wrong:
        return Verdict(NOT_REPRODUCED, p["ratio"], (lo, hi), f"{what}: the whole 95% interval fails {bound}", n)
    return Verdict(INCONCLUSIVE, p["ratio"], (lo, hi), f"{what}: the 95% interval straddles {bound}", n)


def k_speed_ratio(claim: dict, runs: pd.DataFrame) -> Verdict:
    """Every ok comparison of the sweep that has the pair must agree; the last one's numbers."""
    rows = [r for _, r in runs.iterrows() if r.get("kind") == "compare" and r.status == "ok"
            and isinstance(r.get("pairs"), dict) and claim["pair"] in r["pairs"]]
    if not rows:
        return Verdict(INCONCLUSIVE, reason=f"not run yet: no comparison in results/{claim['sweep']}/ has the "
                                            f"pair {claim['pair']}")
    each = [_speed_ratio_one(claim, r) for r in rows]
    v = each[-1]
    if len({e.verdict for e in each}) > 1:
        v = Verdict(INCONCLUSIVE, v.measured, v.ci, "the comparisons disagree: " + "; ".join(
            f"{e.verdict} ({e.reason})" for e in each), v.n)
    if len(rows) > 1:
        v.n = f"{len(rows)} comparisons, the last: {v.n}"
    return v


def k_ratio(claim: dict, runs: pd.DataFrame) -> Verdict:
    a, b, n, empty = _arms(claim, runs)
    if empty:
        return empty
    r = float(a.mean() / b.mean())
    bound, ok = ((f"at most {claim['at_most']:g}", r <= claim["at_most"]) if "at_most" in claim
                 else (f"at least {claim['at_least']:g}", r >= claim["at_least"]))
    return Verdict(REPRODUCED if ok else NOT_REPRODUCED, r,
                   reason=f"{claim['metric']} of a / b = {r:.3f}: {'' if ok else 'not '}{bound}", n=n)


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
    """(run a, run b, the stored result of b) or a Verdict saying why they cannot be compared.
    `b` selects the reference by stored config, `a` is b's selection with a's keys changed; of
    several matches the newest is judged (a re-run supersedes)."""
    root = Path(runs.attrs["root"])
    found, spec = {}, {"b": claim["b"], "a": {**claim["b"], **claim["a"]}}
    results = [store.read_result(root / p) or {} for p in runs.path]
    for side in ("b", "a"):
        idx = [i for i, r in enumerate(results) if _matches(flatten(r.get("config") or {}), spec[side])]
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
    verdict = INFORMATION if claim.get("information") else REPRODUCED if judged["ok"] else NOT_REPRODUCED
    return Verdict(verdict, judged.get("max_abs_diff" if on == "curve" else "eval_diff"), reason="; ".join(texts),
                   n=f"{len(loss[a.run_id])} steps")


def k_curve_within(claim: dict, runs: pd.DataFrame) -> Verdict:
    return _against_reference(claim, runs, "curve")


def k_eval_within(claim: dict, runs: pd.DataFrame) -> Verdict:
    return _against_reference(claim, runs, "eval")


def load_overhead(results: Path, stem: str) -> dict | None:
    import json

    path = results / "overhead" / f"{stem}.json"
    return json.loads(path.read_text()) if path.is_file() else None


KINDS = {"value": k_value, "difference": k_difference, "lower": k_lower, "equivalent": k_equivalent,
         "survives": k_survives, "estimate": k_estimate, "kernel_order": k_kernel_order,
         "ptq_error": k_ptq_error, "ptq_lower": k_ptq_lower, "interleaved_equivalent": k_interleaved_equivalent,
         "speed_ratio": k_speed_ratio, "ratio": k_ratio, "curve_within": k_curve_within, "eval_within": k_eval_within}
NEEDS_RUNS = ("value", "difference", "lower", "equivalent", "survives", "speed_ratio", "ratio", "curve_within",
              "eval_within")
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
        if c["kind"] not in KINDS:
            raise ValueError(f"{path}: claim {c['id']}: unknown kind {c['kind']!r} (choose from {', '.join(KINDS)})")
        if c["kind"] in NEEDS_PTQ:
            try:
                ptq.claim_target(c.get("ptq"))
            except ValueError as e:
                raise ValueError(f"{path}: claim {c['id']}: kind {c['kind']} {e}") from None
    return claims


def run_missing(claims: list[dict], results: Path) -> None:
    """Run each sweep the claims need that has no result yet (a Hydra multirun per sweep), and
    each PTQ measurement that has no ptq.json (one process per model and text), through the launcher;
    each one's output goes to a log under results/logs/claims/."""
    done = set()
    logs = results / "logs" / "claims"
    for c in claims:
        if c["kind"] in NEEDS_PTQ:
            t = ptq.claim_target(c["ptq"])
            if t.name in done or (ptq.result_dir(results, t) / "ptq.json").is_file():
                continue
            done.add(t.name)
            if t.size == "gpu" and not _has_cuda():
                print(f"not running the PTQ measurement of {t.model}: it needs a GPU (its claims stay "
                      "inconclusive)", flush=True)
                continue
            log = logs / (f"ptq-{t.size}.log" if t.text == ptq.HELDOUT else f"{t.name}.log")
            print(f"running missing PTQ measurement {t.name} (log: {log})", flush=True)
            args = ["--size", t.size] if t.text == ptq.HELDOUT else ["--model", t.model, "--text", t.text]
            launch.launch([*args, "--results", str(results)], log, module="qlab.claims.ptq")
            continue
        sweep = c.get("sweep")
        if c["kind"] not in NEEDS_RUNS or not sweep or not c.get("experiment") or sweep in done:
            continue
        done.add(sweep)
        if any((results / sweep).glob("*/result.json")):
            continue
        if "train=gpu" in c.get("overrides", []) and not _has_cuda():
            print(f"not running sweep {sweep}: it needs a GPU (its claims stay inconclusive)", flush=True)
            continue
        print(f"running missing sweep {sweep} (log: {logs / f'{sweep}.log'})", flush=True)
        launch.launch([f"experiment={c['experiment']}", f"tracker.sweep={sweep}", f"tracker.results_dir={results}",
                       *c.get("overrides", [])], logs / f"{sweep}.log")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def evaluate(claims: list[dict], results: Path) -> list[dict]:

    cache: dict[str, pd.DataFrame] = {}
    rows = []
    for c in claims:
        runs = pd.DataFrame(columns=["status"])
        if c["kind"] in NEEDS_PTQ:
            runs = ptq.load(results, ptq.claim_target(c["ptq"])) if results is not None else None  # a dict, or None
        elif c["kind"] == "interleaved_equivalent":
            runs = load_overhead(results, c["overhead"]) if results is not None else None
        elif c["kind"] in NEEDS_RUNS:
            sweep = c["sweep"]
            if sweep not in cache:
                cache[sweep] = load_runs(results / sweep) if (results / sweep).is_dir() else pd.DataFrame(columns=["status"])
            runs = cache[sweep]
        v = KINDS[c["kind"]](c, runs) if (c["kind"] not in NEEDS_RUNS or not runs.empty) else \
            Verdict(INCONCLUSIVE, reason=f"not run yet: results/{c['sweep']}/ has no result")
        rows.append({"id": c["id"], "statement": c["statement"], "source": c["source"],
                     "paper": c.get("paper", c.get("paper_value")), "unit": c.get("unit", ""),
                     "measured": v.measured, "ci95": list(v.ci) if v.ci else None, "verdict": v.verdict,
                     "reason": v.reason, "n": v.n,
                     "evidence": c.get("sweep") or (ptq.claim_target(c["ptq"]).name if c["kind"] in NEEDS_PTQ else
                                                    f"overhead/{c['overhead']}" if c.get("overhead") else c["kind"])})
    return rows


def _machine(env: dict | None) -> str:
    return store.machine_line(env) if env else "n/a"


def evidence_machine(results: Path, evidence: str) -> str:
    """Where a claim's numbers were measured: the hardware and versions its evidence recorded
    (a sweep's first result, ptq.json, the overhead record); claims computed by this command
    (kernel_order on N(0,1) data, the analytic estimate) name the machine evaluating them."""
    import json

    if evidence in ("kernel_order", "estimate"):
        return ("analytic (no hardware)" if evidence == "estimate" else
                f"computed by this command: {_machine(store.environment())}")
    path = results / evidence
    files = [path.with_suffix(".json")] if evidence.startswith("overhead/") else \
        [path / "ptq.json"] if (path / "ptq.json").is_file() else sorted(path.glob("*/result.json"))
    for f in files:
        if f.is_file():
            env = json.loads(f.read_text()).get("env")
            if env:
                return _machine(env)
    return "n/a (no result yet)"


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.4g}" if isinstance(x, float) else str(x)


def write(rows: list[dict], out: Path, results: Path, claims_file: Path = DEFAULT_CLAIMS) -> Path:
    """<out>/<stem>.md, <stem>.json (stem: the claims file's) and summary.md; the claims file's
    `title` and `expected` (the header of the expected value's column) head the page."""
    doc, stem = yaml.safe_load(Path(claims_file).read_text()), Path(claims_file).stem
    shown = Path(claims_file).resolve()
    shown = shown.relative_to(PROJECT_ROOT) if shown.is_relative_to(PROJECT_ROOT) else claims_file
    out.mkdir(parents=True, exist_ok=True)
    store.atomic_write_json(out / f"{stem}.json", {"claims": rows, "generated_at": store.now(),
                                                   "git_commit": store.git_commit(), "env": store.environment()})
    env = store.environment()
    counts = {k: sum(r["verdict"] == k for r in rows) for k in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)}
    lines = [f"# {doc.get('title', 'QLoRA paper claims (arXiv 2305.14314): verdicts')}", "",
             f"Computed by `qlab claims` from `{results}` ({', '.join(f'{v} {k}' for k, v in counts.items())}). "
             "Verdicts are computed from result files and the analytic model, never typed; see "
             f"`{shown}` for each claim's metric, comparison and tolerance.", "",
             f"Evaluated on {env['gpu'] or env['cpu']}; where each claim's numbers were measured is under "
             "Evidence below.", "",
             f"| claim | source | {doc.get('expected', 'paper')} | measured [95% CI] | n | verdict | why |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f" [{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}]" if r["ci95"] else ""
        lines.append(f"| {r['statement']} | {r['source']} | {_fmt(r['paper'])} {r['unit']} | {_fmt(r['measured'])}{ci} | "
                     f"{r['n']} | **{r['verdict']}** | {r['reason']} |")
    lines += ["", "## Evidence", "", "| evidence (under results/) | claims | measured on |", "|---|---|---|"]
    for evidence in dict.fromkeys(r["evidence"] for r in rows):
        ids = ", ".join(r["id"] for r in rows if r["evidence"] == evidence)
        lines.append(f"| `{evidence}` | {ids} | {evidence_machine(results, evidence)} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / "summary.md").write_text(summary(rows, out / f"{stem}.md", doc.get("expected", "paper")))
    return out / f"{stem}.md"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary(rows: list[dict], page: Path = Path("results/claims/claims.md"), expected: str = "paper") -> str:
    """One compact table (claim, paper, measured, verdict) for the README, verbatim: the
    reasons and sources stay in claims.md."""
    lines = [f"| claim | {expected} | measured | verdict |", "|---|---|---|---|"]
    for r in rows:
        unit = f" {r['unit']}" if r["unit"] else ""
        measured = _fmt(r["measured"])
        if r["ci95"]:
            measured += f" [{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}]"
        if r["measured"] is not None and unit and measured != "n/a":
            measured += unit
        lines.append(f"| {_cell(r['statement'])} | {_cell(_fmt(r['paper']))}{_cell(unit)} | {_cell(measured)} | "
                     f"**{r['verdict']}** |")
    counts = {k: sum(r["verdict"] == k for r in rows) for k in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)}
    lines += ["", f"{', '.join(f'{v} {k}' for k, v in counts.items())}; generated by `qlab claims` "
                  f"(`{page}` has the sources, sample sizes and the reason for each verdict)."]
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
