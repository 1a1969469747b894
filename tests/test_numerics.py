"""experiments/numerics.py: the verdict arithmetic on synthetic curves, and a real --quick run."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from qlab.config import PROJECT_ROOT

ROOT = Path(PROJECT_ROOT)
spec = importlib.util.spec_from_file_location("numerics", ROOT / "experiments" / "numerics.py")
numerics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(numerics)


def decaying(n=60, start=4.0, end=2.0):
    """A loss curve falling from `start` towards `end` with a deterministic wiggle (batch noise)."""
    return [end + (start - end) * math.exp(-t / 15) + 0.1 * math.sin(1.7 * t) for t in range(n)]


def test_moving_average():
    assert numerics.moving_average([1, 2, 3, 4, 5], 2) == [1.5, 2.5, 3.5, 4.5]
    assert numerics.moving_average([1, 2, 3], 3) == [2]


def test_verdicts_on_synthetic_curves():
    ref = decaying()
    same = numerics.compare_curves(ref, list(ref))
    assert same["ok"] and same["max_abs_diff"] == 0
    # rounding-sized noise per step: stays well inside max(0.05, 2%)
    jitter = [x + 0.01 * (-1) ** t for t, x in enumerate(ref)]
    assert numerics.compare_curves(ref, jitter)["ok"]
    # a shift of 0.08 nats at a loss of ~2: beyond both 0.05 and 2% (0.04) -> must fail
    shifted = numerics.compare_curves(ref, [x + 0.08 for x in ref])
    assert not shifted["ok"] and shifted["final_window_diff"] == pytest.approx(0.08)
    # the same 0.08 at a loss of ~7 is 1.1%: within the relative bound
    high = decaying(start=8, end=7)
    assert numerics.compare_curves(high, [x + 0.08 for x in high])["ok"]
    # a drift that only shows late (the math slowly going wrong) fails on the final windows
    drift = numerics.compare_curves(ref, [x + 0.003 * t for t, x in enumerate(ref)])
    assert not drift["ok"] and drift["worst_diff_over_tol"] > 1
    # a run that stopped early fails even where its steps agree
    short = numerics.compare_curves(ref, ref[:40])
    assert not short["ok"] and "40 steps" in short["reason"]
    assert not numerics.compare_curves(ref, ref[:5])["ok"]  # fewer steps than the window


def test_eval_verdict_and_which_one_decides():
    assert numerics.compare_eval(2.0, 2.03)["ok"]  # 0.03 <= max(0.05, 0.04)
    assert not numerics.compare_eval(2.0, 2.06)["ok"]
    assert numerics.compare_eval(5.0, 5.09)["ok"]  # 0.09 <= 2% of 5 = 0.10
    assert not numerics.compare_eval(2.0, None)["ok"]
    curve_ok, eval_bad = {"ok": True}, {"ok": False}
    assert numerics.verdict("curve", curve_ok, eval_bad) is True
    assert numerics.verdict("eval", curve_ok, eval_bad) is False
    assert numerics.verdict(None, curve_ok, eval_bad) is None  # the noise-floor row: information only


def test_quick_run_on_cpu_and_resume(tmp_path, capsys):
    """The real path: three `python -m qlab.run` processes (reference, chunked loss, packing),
    the verdicts computed from their metrics.jsonl; a second call reuses every result."""
    args = ["--quick", "--device", "cpu", "--steps", "12", "--window", "5", "--parallel", "2",
            "--only", "loss=chunked,data.pack=true", "--results", str(tmp_path)]
    assert numerics.main(args) == 0
    out = tmp_path / "numerics-tiny-llama-quick"
    report = json.loads((out / "numerics.json").read_text())
    assert report["pass"] and report["env"]["torch"] and report["steps"] == 12
    rows = {r["variant"]: r for r in report["variants"]}
    assert set(rows) == {"loss=chunked", "data.pack=true"}
    assert rows["loss=chunked"]["compared_on"] == "curve" and rows["loss=chunked"]["curve"]["max_abs_diff"] < 1e-3
    assert rows["data.pack=true"]["compared_on"] == "eval"
    assert any(o.startswith("data.pack_tokens=") for o in rows["data.pack=true"]["overrides"])
    assert "**PASS**" in (out / "numerics.md").read_text()
    capsys.readouterr()
    assert numerics.main(args) == 0  # resumed: nothing re-runs
    assert capsys.readouterr().out.count("  skip  ") == 3


def test_a_result_of_other_base_weights_is_not_reused(tmp_path):
    """A base rebuilt on a GPU has other weights under the same cache key: its runs are re-run,
    never compared with runs of the earlier build."""
    from qlab.results import store

    def result(name, status, metrics):
        (tmp_path / name).mkdir()
        store.atomic_write_json(tmp_path / name / "result.json", {"status": status, "metrics": metrics})
        return tmp_path / name

    same = result("same", "ok", {"base_weights_sha256": "a" * 64})
    other = result("other", "ok", {"base_weights_sha256": "b" * 64})
    older = result("older", "ok", {})  # recorded before runs named their base's weights
    failed = result("failed", "failed", {"base_weights_sha256": "a" * 64})
    assert numerics.reusable(same, "a" * 64)
    assert not numerics.reusable(other, "a" * 64) and not numerics.reusable(older, "a" * 64)
    assert not numerics.reusable(failed, "a" * 64)
    assert numerics.reusable(other, None)  # not a built base (a preset, a hub model): complete is enough
