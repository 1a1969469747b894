"""Do the speed switches and packing keep the numerics? Each one against the QLoRA recipe.

    python experiments/numerics.py --model base-gpu --parallel 4     # a GPU, 200 steps each
    python experiments/numerics.py --quick                           # a CPU check, tiny-llama
    python experiments/numerics.py --only loss=chunked,data.pack=true   # some variants only
    python experiments/numerics.py --model hub model.name_or_path=DIR model.name=NAME  # any checkpoint

Every variant is a real run (`python -m qlab.run`, a fresh process) of the same model, seed and
data, with exactly one thing changed from the reference (speed=recipe, padded batches):

  speed.upcast_non_quantized=false   speed.adapter_autocast=true   speed.compile=layers
  speed.loss=chunked                 speed=fast (all four)         data.pack=true
  seed=1                             the noise floor: no verdict, shows how far a re-seeded run
                                     (other data order, other LoRA init) lands, for scale

Shared settings: adapter.dropout=0 (a switch that reorders random draws would otherwise change
the curve by sampling noise, not by numerics) and data.pad_to=max_seq_len (one batch shape, so
the compiled arm compiles once and stays compiled for every step).

Verdicts. The switches see the same batch at every step as the reference, so batch noise cancels
and their per-step losses differ only by rounding that the parameters carry forward. Per step t
of the moving average over `window` (10) steps, MA:
      |MA_switch(t) - MA_ref(t)| <= max(0.05 nats, 2% of MA_ref(t))    for every t
The switches change rounding, not the math: bf16's unit roundoff is 2^-8 = 0.4%, so a
rounding-only change moves a smoothed curve by well under 2% over a few hundred steps, while a
change of the math (attention across conversations, a dropped term, a mis-scaled loss) moves it
by more within tens of steps (tests/test_pack.py: an all-ones mask on a packed row). The 0.05
nats floor (5% perplexity) keeps the relative bound from becoming tighter than rounding noise
once the loss is low. seed=1's row puts the bound beside the spread a mere re-seed produces.

data.pack=true draws the same conversations in the same order, but its steps are rows, not
batch_size conversations, so it is judged on the held-out eval_loss (evaluated padded in both):
      |eval_pack - eval_ref| <= max(0.05, 2% of eval_ref)
To make "step" mean the same amount of data, its row budget data.pack_tokens is set from the
reference: P = the reference's mean real (unpadded) positions per step; a greedy row stops on
average half a conversation (P / 2 batch_size positions) short of its budget, so
pack_tokens = P * (1 + 1 / (2 batch_size)) makes a row hold batch_size conversations on average
(e.g. 4 conversations of ~40 tokens: P = 160, budget = 160 x 1.125 = 180). Its curve difference
is reported as well, for information. (Left at its default, 4 x 512 = 2,048 positions, a row
would hold ~50 such conversations: 12x the data per step, no longer the same experiment.)

Resumable: each variant's run id is computed from its composed config; a complete result (ok or
oom) is reused unless --force (`python -m qlab.run` alone never skips; sweeps do, and this is
the same rule). On a CPU the compile arm is skipped: inductor recompiles each bitsandbytes layer
for ~20 s per shape on 2 cores and then fails in eval (bitsandbytes' CPU 4-bit kernel trips an
assert_size_stride check), and speed=fast runs there with speed.compile=none. On a CPU the
compute dtype is float32, so upcast and autocast are no-ops there: the CPU check tests the
plumbing, the GPU (bf16) run tests the numerics.

Writes <results>/numerics-<model>/ (or --sweep) numerics.json and numerics.md (hardware and versions as the
reference run recorded them, qlab.track.environment()); exits 1 if any verdict fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlab import config  # noqa: E402  (no torch at import)
from qlab.results import store

ABS_TOL, REL_TOL, WINDOW = 0.05, 0.02, 10

# name -> (overrides, what decides the verdict: "curve" | "eval" | None for information only)
VARIANTS = {
    "reference": ([], None),
    "upcast_non_quantized=false": (["speed.upcast_non_quantized=false"], "curve"),
    "adapter_autocast=true": (["speed.adapter_autocast=true"], "curve"),
    "compile=layers": (["speed.compile=layers"], "curve"),
    "loss=chunked": (["speed.loss=chunked"], "curve"),
    "speed=fast": (["speed=fast"], "curve"),
    "data.pack=true": (["data.pack=true", "data.pad_to=longest"], "eval"),  # + data.pack_tokens
    "seed=1": (["seed=1"], None),
}


def moving_average(xs: list[float], window: int) -> list[float]:
    return [statistics.fmean(xs[i - window + 1: i + 1]) for i in range(window - 1, len(xs))]


def tolerance(ref: float) -> float:
    return max(ABS_TOL, REL_TOL * abs(ref))


def compare_curves(ref: list[float], other: list[float], window: int = WINDOW) -> dict:
    """Moving averages of two per-step loss curves, step by step. `ok` needs equal lengths (a
    run that stopped early fails) and every |difference| within tolerance(MA_ref)."""
    n = min(len(ref), len(other))
    if n < window:
        return {"ok": False, "reason": f"{n} steps, fewer than the window of {window}"}
    a, b = moving_average(ref[:n], window), moving_average(other[:n], window)
    diffs = [abs(x - y) for x, y in zip(a, b)]
    worst = max(d / tolerance(x) for d, x in zip(diffs, a))  # <= 1 everywhere: within tolerance
    out = {"steps": n, "max_abs_diff": max(diffs), "mean_abs_diff": statistics.fmean(diffs),
           "final_window_diff": b[-1] - a[-1], "final_window_ref": a[-1], "worst_diff_over_tol": worst,
           "ok": worst <= 1 and len(ref) == len(other)}
    if len(ref) != len(other):
        out["reason"] = f"{len(other)} steps against the reference's {len(ref)}"
    return out


def compare_eval(ref: float | None, other: float | None) -> dict:
    if ref is None or other is None:
        return {"ok": False, "reason": "no eval_loss"}
    return {"eval_ref": ref, "eval_diff": other - ref, "tol": tolerance(ref), "ok": abs(other - ref) <= tolerance(ref)}


def verdict(compared_on: str | None, curve: dict, ev: dict) -> bool | None:
    return {"curve": curve.get("ok"), "eval": ev.get("ok"), None: None}[compared_on]


def reusable(directory: Path, weights: str | None) -> bool:
    """A complete result of the same base weights (`weights`: base.weights_sha256, None for a
    model that is not a built base). A base rebuilt on a GPU has other weights under the same
    key: a curve of the old build must not be compared with one of the new (it moved the first
    step's loss by 0.06 nats on base-gpu, which failed a switch that matches on one build)."""
    return _same_build(store.read_result(directory), weights)


def _complete(result: dict | None) -> bool:
    return result is not None and result.get("status") in store.COMPLETE_STATUSES


def _same_build(result: dict | None, weights: str | None) -> bool:
    return _complete(result) and (weights is None or result["metrics"].get("base_weights_sha256") == weights)


def run_variant(name: str, overrides: list[str], directory: Path, logs: Path, force: bool,
                weights: str | None = None) -> dict:
    """One variant through `python -m qlab.run` unless its result in `directory` (its run_dir,
    composed beforehand: Hydra's compose API is not thread-safe) is complete already, for the
    same base weights."""
    t0 = time.perf_counter()
    written = directory
    earlier = None if force else store.read_result(directory)
    if _same_build(earlier, weights):
        print(f"  skip  {name}: complete ({directory.name})", flush=True)
        reused = True
    else:
        print(f"  start {name}" + (" (its result is of other base weights)" if _complete(earlier) else ""),
              flush=True)
        started = time.time()
        with open(logs / f"{name}.log", "w") as out:
            subprocess.run([sys.executable, "-m", "qlab.run", *overrides], cwd=ROOT, stdout=out,
                           stderr=subprocess.STDOUT)
        # this attempt's own result: a forced re-run that failed stays in staging, beside the
        # earlier complete result, which must not be judged in its place
        written = store.fresh_dir(directory, started)
        reused = False
    result = (store.read_result(written) if written else None) or {}
    steps_file = written / "metrics.jsonl" if written else None  # one JSON line per step (qlab.track)
    per_step = [json.loads(line) for line in steps_file.read_text().splitlines()] if steps_file and \
        steps_file.exists() else []
    status = result.get("status", "missing")
    print(f"  end   {name}: {status}, {len(per_step)} steps, {time.perf_counter() - t0:.0f} s", flush=True)
    return {"name": name, "overrides": overrides, "run_id": directory.name, "status": status, "reused": reused,
            "losses": [s["loss"] for s in per_step], "real_tokens": [s["real_tokens"] for s in per_step],
            "eval_loss": result.get("metrics", {}).get("eval_loss"), "env": result.get("env")}


def pack_budget(reference: dict, batch_size: int) -> int:
    """Positions per packed row so that a row holds batch_size conversations on average."""
    p = statistics.fmean(reference["real_tokens"])
    return round(p * (1 + 1 / (2 * batch_size)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: base-gpu on CUDA, tiny-llama on CPU")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 200; --quick 20)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--quick", action="store_true", help="tiny-llama, 20 steps, small shapes (a CPU check)")
    ap.add_argument("--parallel", type=int, default=1, help="variant processes at once (a GPU has room)")
    ap.add_argument("--force", action="store_true", help="re-run variants whose result is complete")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--window", type=int, default=WINDOW, help="moving-average window in steps")
    ap.add_argument("--only", default=None, help="comma-separated variant names (the reference always runs)")
    ap.add_argument("--sweep", default=None, help="results/<sweep>/ (default numerics-<model>)")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for every run, e.g. quant=fp4")
    args = ap.parse_args(argv)

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = device == "cpu"
    model = args.model or ("tiny-llama" if args.quick or cpu else "base-gpu")
    steps = args.steps or (20 if args.quick else 200)
    sweep = args.sweep or f"numerics-{model}" + ("-quick" if args.quick else "")
    common = [f"model={model}", f"train.steps={steps}", f"train.warmup_steps={min(3, steps - 1)}",
              f"train.device={device}", f"train.batch_size={args.batch_size}", "adapter.dropout=0",
              "data.pad_to=max_seq_len", "train.save_adapter=false", "train.progress=false",
              f"tracker.results_dir={args.results.resolve()}", f"tracker.sweep={sweep}"]
    if args.quick:  # 4 x 64 positions per step, rank 8, 16 eval conversations
        common += ["data.max_seq_len=64", "adapter.r=8", "data.max_eval_samples=16"]
    common += args.overrides
    out = args.results / sweep
    logs = out / ".logs"
    logs.mkdir(parents=True, exist_ok=True)

    wanted = set(args.only.split(",")) if args.only else set(VARIANTS)
    if unknown := wanted - set(VARIANTS):
        ap.error(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
    variants = {name: list(ov) for name, (ov, _) in VARIANTS.items() if name in wanted or name == "reference"}
    skipped = {}
    if cpu and "compile=layers" in variants:
        skipped["compile=layers"] = ("inductor on a CPU recompiles for ~20 s per shape and fails in eval on "
                                     "bitsandbytes' CPU 4-bit kernel; speed=fast runs with speed.compile=none")
        del variants["compile=layers"]
    if cpu and "speed=fast" in variants:
        variants["speed=fast"].append("speed.compile=none")

    print(f"numerics: {model}, {steps} steps, {device}, -> {out}", flush=True)
    ref_cfg = config.compose(common)
    ref_dir = store.run_dir(ref_cfg)
    weights = None
    if ref_cfg.model.get("base"):  # built (once) before any run, so that every run compares to it
        from qlab.reference import pretrain

        weights = pretrain.weights_sha256(pretrain.ensure_base(ref_cfg.model.base, device))
        print(f"base weights sha256 {weights[:12]}", flush=True)
    runs = {"reference": run_variant("reference", common, ref_dir, logs, args.force, weights)}
    if runs["reference"]["status"] != "ok":
        print(f"the reference run did not complete ({runs['reference']['status']}): see {logs}", file=sys.stderr)
        return 1
    if "data.pack=true" in variants:
        variants["data.pack=true"].append(f"data.pack_tokens={pack_budget(runs['reference'], args.batch_size)}")
    rest = [name for name in variants if name != "reference"]
    dirs = {name: store.run_dir(config.compose(common + variants[name])) for name in rest}
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        for r in pool.map(lambda n: run_variant(n, common + variants[n], dirs[n], logs, args.force, weights), rest):
            runs[r["name"]] = r

    ref = runs["reference"]
    rows = []
    for name in rest:
        r = runs[name]
        compared_on = VARIANTS[name][1]
        curve = compare_curves(ref["losses"], r["losses"], args.window)
        ev = compare_eval(ref["eval_loss"], r["eval_loss"])
        ok = verdict(compared_on, curve, ev)
        if compared_on and r["status"] != "ok":
            ok = False
        rows.append({"variant": name, "overrides": r["overrides"], "run_id": r["run_id"], "status": r["status"],
                     "compared_on": compared_on, "curve": curve, "eval": ev, "pass": ok})
    failed = [row["variant"] for row in rows if row["pass"] is False]
    report = {
        "model": model, "base_weights_sha256": weights, "steps": steps, "device": device, "window": args.window,
        "tolerance": {"abs_nats": ABS_TOL, "rel": REL_TOL,
                      "rule": "curve: |MA_w(switch) - MA_w(ref)| <= max(abs, rel * MA_w(ref)) at every step; "
                              "data.pack: |eval_loss - eval_loss_ref| <= max(abs, rel * eval_loss_ref)"},
        "reference": {"run_id": ref["run_id"], "overrides": ref["overrides"], "eval_loss": ref["eval_loss"],
                      "final_window_loss": statistics.fmean(ref["losses"][-args.window:])},
        "variants": rows, "skipped": skipped, "failed": failed, "pass": not failed,
        "env": ref["env"],  # as the reference run recorded it: qlab.track.environment()
    }
    store.atomic_write_json(out / "numerics.json", report)
    (out / "numerics.md").write_text(markdown(report))
    print((out / "numerics.md").read_text())
    return 1 if failed else 0


def _f(x, fmt="+.4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(r: dict) -> str:
    env = r["env"] or {}
    lines = [f"# Numerics: {r['model']}, {r['steps']} steps, {r['device']}", "",
             f"Hardware: {store.machine_line(env, with_cuda=True)}.", "",
             f"Tolerance: {r['tolerance']['rule']}; abs = {ABS_TOL} nats, rel = {REL_TOL:.0%}, "
             f"moving average over {r['window']} steps.", "",
             "Every run: `" + " ".join(r["reference"]["overrides"]) + "`"
             + (f"; base weights sha256 {r['base_weights_sha256'][:12]} (one build for every run)"
                if r.get("base_weights_sha256") else ""), "",
             f"Reference (speed=recipe, padded): eval_loss {_f(r['reference']['eval_loss'], '.4f')}, "
             f"last {r['window']}-step mean loss {_f(r['reference']['final_window_loss'], '.4f')}.", "",
             "| variant | status | judged on | max abs dMA | mean abs dMA | final dMA | worst d/tol "
             "| d eval_loss | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in r["variants"]:
        c, e = v["curve"], v["eval"]
        mark = {True: "pass", False: "**FAIL**", None: "(info)"}[v["pass"]]
        lines.append(f"| {v['variant']} | {v['status']} | {v['compared_on'] or '-'} | "
                     f"{_f(c.get('max_abs_diff'), '.4f')} | {_f(c.get('mean_abs_diff'), '.4f')} | "
                     f"{_f(c.get('final_window_diff'))} | {_f(c.get('worst_diff_over_tol'), '.2f')} | "
                     f"{_f(e.get('eval_diff'))} | {mark} |")
    for name, why in r["skipped"].items():
        lines.append(f"| {name} | skipped | - | | | | | | {why} |")
    lines += ["", f"Overall: **{'PASS' if r['pass'] else 'FAIL: ' + ', '.join(r['failed'])}**", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
