"""The numerics claims (experiments/numerics.yaml: curve_within, eval_within): the verdict
arithmetic on synthetic curves, runs selected by stored config, the committed sweeps' verdicts,
and the quick CPU experiment end to end."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from qlab.claims import verdicts

CLAIMS = ROOT / "experiments" / "numerics.yaml"
SHIPPED = {c["id"]: c for c in verdicts.load_claims(CLAIMS, sweep="s")}
WINDOW, BOUND = SHIPPED["upcast_off"]["window"], SHIPPED["upcast_off"]["bound"]
RECIPE = {"upcast_non_quantized": True, "adapter_autocast": False, "compile": "none", "loss": "full"}


def decaying(n=60, start=4.0, end=2.0):
    """A loss curve falling from `start` towards `end` with a deterministic wiggle (batch noise)."""
    return [end + (start - end) * math.exp(-t / 15) + 0.1 * math.sin(1.7 * t) for t in range(n)]


def curves(ref, other):
    return verdicts.compare_curves(ref, other, WINDOW, BOUND)


def test_the_tolerances_are_stated_in_the_claims_file():
    assert (WINDOW, BOUND) == (10, {"abs": 0.05, "rel": 0.02})
    assert {c["kind"] for c in SHIPPED.values()} == {"curve_within", "eval_within"}
    assert SHIPPED["packed"]["kind"] == "eval_within" and SHIPPED["seed1"]["information"]
    assert all(c["b"] == SHIPPED["upcast_off"]["b"] and c["bound"] == BOUND for c in SHIPPED.values())


def test_moving_average():
    assert verdicts.moving_average([1, 2, 3, 4, 5], 2).tolist() == [1.5, 2.5, 3.5, 4.5]
    assert verdicts.moving_average([1, 2, 3], 3).tolist() == [2]


def test_verdicts_on_synthetic_curves():
    ref = decaying()
    same = curves(ref, list(ref))
    assert same["ok"] and same["max_abs_diff"] == 0
    # rounding-sized noise per step: stays well inside max(0.05, 2%)
    jitter = [x + 0.01 * (-1) ** t for t, x in enumerate(ref)]
    assert curves(ref, jitter)["ok"]
    # a shift of 0.08 nats at a loss of ~2: beyond both 0.05 and 2% (0.04) -> must fail
    shifted = curves(ref, [x + 0.08 for x in ref])
    assert not shifted["ok"] and shifted["final_window_diff"] == pytest.approx(0.08)
    # the same 0.08 at a loss of ~7 is 1.1%: within the relative bound
    high = decaying(start=8, end=7)
    assert curves(high, [x + 0.08 for x in high])["ok"]
    # a drift that only shows late (the math slowly going wrong) fails on the final windows
    drift = curves(ref, [x + 0.003 * t for t, x in enumerate(ref)])
    assert not drift["ok"] and drift["worst_diff_over_tol"] > 1
    # a run that stopped early fails even where its steps agree
    short = curves(ref, ref[:40])
    assert not short["ok"] and "40 steps" in short["reason"]
    assert not curves(ref, ref[:5])["ok"]  # fewer steps than the window


def fake_sweep(root, runs):
    """results/<root>/<id>/ per run: result.json with the stored config and metrics, and
    metrics.jsonl with the per-step losses. runs: id -> (speed/data/seed changes, losses, metrics)."""
    for i, (run_id, (changes, losses, metrics)) in enumerate(runs.items()):
        d = root / run_id
        d.mkdir(parents=True)
        cfg = {"model": {"name": "m"}, "speed": dict(RECIPE), "data": {"pack": False, "pad_to": "max_seq_len"},
               "seed": 0, "train": {"device": "cpu"}, "quant": {"type": "nf4"}}
        for key, value in changes.items():
            *parents, leaf = key.split(".")
            node = cfg
            for p in parents:
                node = node[p]
            node[leaf] = value
        status = metrics.pop("status", "ok")
        (d / "result.json").write_text(json.dumps({
            "run_id": run_id, "status": status, "config": cfg, "env": {"cpu": "test"}, "metrics": metrics,
            "started_at": f"2026-01-01T00:00:{i:02d}", "axes": {"quant": "nf4", "seed": cfg["seed"]},
            "error": {"message": "boom"} if status != "ok" else None}))
        steps = (json.dumps({"step": t, "loss": x}) + "\n" for t, x in enumerate(losses))
        (d / "metrics.jsonl").write_text("".join(steps))


def judge(results, claim_id, sweep="s"):
    [row] = verdicts.evaluate([{**SHIPPED[claim_id], "sweep": sweep}], results)
    return row


def test_each_kind_is_judged_on_its_own_quantity(tmp_path):
    """A switch is judged on the curve, packing on eval_loss, the re-seed not at all: packing whose
    curve leaves the bound passes on eval, a switch whose eval is fine fails on its curve."""
    assert verdicts.compare_eval(2.0, 2.03, BOUND)["ok"]  # 0.03 <= max(0.05, 0.04)
    assert not verdicts.compare_eval(2.0, 2.06, BOUND)["ok"]
    assert verdicts.compare_eval(5.0, 5.09, BOUND)["ok"]  # 0.09 <= 2% of 5 = 0.10
    assert not verdicts.compare_eval(2.0, None, BOUND)["ok"]
    ref = decaying()
    off = [x + 0.3 for x in ref]
    fake_sweep(tmp_path / "s", {
        "ref": ({}, ref, {"eval_loss": 2.0}),
        "packed": ({"data.pack": True, "data.pad_to": "longest", "data.pack_tokens": 325}, off, {"eval_loss": 2.03}),
        "chunked": ({"speed.loss": "chunked"}, off, {"eval_loss": 2.0}),
        "seed1": ({"seed": 1}, off, {"eval_loss": 2.2}),
        "fast": ({"speed.upcast_non_quantized": False, "speed.adapter_autocast": True, "speed.loss": "chunked"},
                 ref, {"eval_loss": 2.0}),
    })
    packed = judge(tmp_path, "packed")
    assert packed["verdict"] == "reproduced" and packed["measured"] == pytest.approx(0.03)
    assert packed["reason"].startswith("eval_loss +0.0300") and "runs packed vs ref" in packed["reason"]
    chunked = judge(tmp_path, "chunked_loss")
    assert chunked["verdict"] == "not reproduced" and chunked["measured"] == pytest.approx(0.3)
    assert chunked["n"] == "60 steps"
    assert judge(tmp_path, "seed1")["verdict"] == "information"  # the noise floor: no verdict
    assert judge(tmp_path, "fast")["verdict"] == "reproduced"  # compile none on a CPU: one of the listed values
    # the fast run is not the upcast arm: it differs from the reference in more than upcast
    assert judge(tmp_path, "upcast_off")["reason"] == "no run of arm a in the sweep"
    # compiled layers on a CPU: pruned by config.validate, and the verdict says why
    pruned = judge(tmp_path, "compile_layers")
    assert pruned["verdict"] == "inconclusive" and "not run: pruned (speed.compile: inductor" in pruned["reason"]


def test_runs_of_other_base_weights_or_an_ended_run_are_not_compared(tmp_path):
    """A base rebuilt on a GPU has other weights under the same cache key: its runs are never
    compared with runs of another build. A switch whose run failed fails; a failed reference
    decides nothing. Of two runs of one arm, the newer is judged."""
    ref = decaying()
    a, b = "a" * 64, "b" * 64
    fake_sweep(tmp_path / "s", {
        "ref": ({}, ref, {"eval_loss": 2.0, "base_weights_sha256": a}),
        "same": ({"speed.loss": "chunked"}, ref, {"eval_loss": 2.0, "base_weights_sha256": a}),
        "other": ({"speed.adapter_autocast": True}, ref, {"eval_loss": 2.0, "base_weights_sha256": b}),
        "older": ({"speed.upcast_non_quantized": False}, ref, {"eval_loss": 2.0}),  # before runs named weights
        "failed": ({"seed": 1}, ref, {"status": "failed", "base_weights_sha256": a}),
        "old-pack": ({"data.pack": True, "data.pad_to": "longest"}, ref, {"eval_loss": 9.0, "base_weights_sha256": a}),
        "new-pack": ({"data.pack": True, "data.pad_to": "longest"}, ref, {"eval_loss": 2.0, "base_weights_sha256": a}),
    })
    same = judge(tmp_path, "chunked_loss")
    assert same["verdict"] == "reproduced" and "base weights aaaaaaaaaaaa" in same["reason"]
    for claim_id in ("autocast", "upcast_off"):
        r = judge(tmp_path, claim_id)
        assert r["verdict"] == "inconclusive" and "other base weights" in r["reason"]
    failed = judge(tmp_path, "seed1")
    assert failed["verdict"] == "not reproduced" and "ended failed: boom" in failed["reason"]
    newest = judge(tmp_path, "packed")
    assert newest["verdict"] == "reproduced" and "runs new-pack vs ref" in newest["reason"]
    # without weights on either side (a preset, a hub model): complete is enough
    fake_sweep(tmp_path / "p", {"ref": ({}, ref, {"eval_loss": 2.0}),
                                "chunked": ({"speed.loss": "chunked"}, ref, {"eval_loss": 2.0})})
    assert judge(tmp_path, "chunked_loss", sweep="p")["verdict"] == "reproduced"
    fake_sweep(tmp_path / "f", {"ref": ({}, ref, {"status": "failed"}),
                                "chunked": ({"speed.loss": "chunked"}, ref, {"eval_loss": 2.0})})
    r = judge(tmp_path, "chunked_loss", sweep="f")
    assert r["verdict"] == "inconclusive" and r["reason"] == "the reference run ended failed (ref)"


@pytest.mark.parametrize("sweep, pruned", [("numerics-base-gpu", False), ("numerics-tiny-llama", True),
                                           ("numerics-tiny-llama-bf16", True)])
def test_the_committed_sweeps_keep_their_verdicts(tmp_path, sweep, pruned):
    """The runs experiments/numerics.py made, judged by the claims: every switch and packing pass
    (compiled layers pruned on the CPU), the re-seed shown for scale; the page lands in --out. These
    sweeps predate Liger's and the CUDA graphs' arms: their claims have no run there (a CPU prunes
    both: Triton and CUDA graphs need CUDA; the graphs' compiled layers are pruned first)."""
    assert verdicts.main(["--claims", str(CLAIMS), "--results", str(ROOT / "results"), "--sweep", sweep,
                          "--out", str(tmp_path), "--no-run"]) == 0
    rows = {r["id"]: r for r in json.loads((tmp_path / "numerics.json").read_text())["claims"]}
    expected = {i: "reproduced" for i in SHIPPED} | {"seed1": "information", "liger": "inconclusive",
                                                    "graphs": "inconclusive"}
    assert rows["liger"]["reason"] == ("not run: pruned (speed.liger: Liger Kernel's Triton kernels need a CUDA device; "
                                       "this run's is train.device=cpu)" if pruned else "no run of arm a in the sweep")
    if pruned:
        expected["compile_layers"] = "inconclusive"
        for arm in ("compile_layers", "graphs"):
            assert "not run: pruned (speed.compile: inductor" in rows[arm]["reason"]
    else:
        assert rows["graphs"]["reason"] == "no run of arm a in the sweep"
    assert {i: r["verdict"] for i, r in rows.items()} == expected
    assert all(r["n"] == "200 steps" for r in rows.values() if r["verdict"] != "inconclusive")
    page = (tmp_path / "numerics.md").read_text()
    assert page.startswith("# Numerics: the speed switches and packing against the QLoRA recipe")
    assert "| claim | source | measured on | tolerance |" in page and f"| `{sweep}` |" in page


@pytest.mark.parametrize("switch", ["liger", "graphs"])
def test_the_gpu_only_switches_follow_the_recipe_on_the_gpu(tmp_path, switch):
    """results/numerics-base-gpu-<switch>/: the recipe and the switch's arm on an H200 (their own
    sweep, a new base build each): Liger's and the CUDA graphs' claims reproduced over 200 steps; the
    arms that sweep did not run have no run."""
    assert verdicts.main(["--claims", str(CLAIMS), "--results", str(ROOT / "results"), "--sweep",
                          f"numerics-base-gpu-{switch}", "--out", str(tmp_path), "--no-run"]) == 0
    rows = {r["id"]: r for r in json.loads((tmp_path / "numerics.json").read_text())["claims"]}
    assert rows[switch]["verdict"] == "reproduced" and rows[switch]["n"] == "200 steps"
    assert rows[switch]["measured"] < 0.05  # max abs dMA10 within the tolerance
    assert all(r["reason"] == "no run of arm a in the sweep" for i, r in rows.items() if i != switch)


@pytest.mark.slow
def test_quick_experiment_on_cpu_and_resume(tmp_path):
    """The real path: a Hydra multirun of the quick experiment, cut to three arms and 12 steps, each
    run in its own process; compiled layers pruned with the reason; the verdicts computed when the
    sweep ends; a second call runs nothing."""
    cmd = [sys.executable, "-m", "qlab.run", "experiment=numerics-quick", f"tracker.results_dir={tmp_path}",
           "train.steps=12", "+arm=recipe,chunked_loss,packed,compile_layers"]
    env = {**os.environ, "QLAB_CACHE": os.environ["QLAB_CACHE"]}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "numerics-tiny-llama-quick"
    rows = {r["id"]: r for r in json.loads((out / "numerics.json").read_text())["claims"]}
    assert rows["chunked_loss"]["verdict"] == "reproduced" and rows["chunked_loss"]["measured"] < 1e-3
    assert rows["packed"]["verdict"] == "reproduced" and rows["packed"]["n"] == "12 steps"
    assert "not run: pruned" in rows["compile_layers"]["reason"]
    assert json.loads((out / "numerics.json").read_text())["env"]["torch"]
    [packed] = [json.loads(p.read_text()) for p in out.glob("*/result.json")
                if json.loads(p.read_text())["config"]["data"]["pack"]]
    assert packed["config"]["data"]["pack_budget"] == "conversations" and packed["metrics"]["data_pack_tokens"] < 4 * 64
    manifest = json.loads((out / "sweep.json").read_text())
    [prune] = [r for r in manifest["runs"].values() if r["outcome"] == "pruned"]
    assert "inductor cannot compile" in prune["reason"] and "+arm=compile_layers" in prune["overrides"]
    assert "**reproduced**" in (out / "numerics.md").read_text()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and "0 ok / 0 oom / 0 failed / 3 skipped / 1 pruned" in proc.stdout + proc.stderr


def test_a_numerics_claims_file_needs_a_sweep(tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"claims": [{**SHIPPED["packed"], "sweep": None}]}))
    with pytest.raises(ValueError, match="names no sweep"):
        verdicts.load_claims(bare)
