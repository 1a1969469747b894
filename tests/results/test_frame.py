"""qlab/results/frame.py: result files -> one row per run, with its labels and comparability group."""

import json
import math

import pytest

from fake_results import fake_run
from qlab.results import frame


def test_quant_labels_and_their_order():
    assert frame.quant_label("nf4", True) == "nf4+DQ" and frame.quant_label("fp4", False) == "fp4"
    assert frame.quant_label("nf4", True, "recipe") == "nf4+DQ"  # the recipe adds nothing
    assert frame.quant_label("nf4", True, "fast") == "nf4+DQ · fast"
    labels = ["fp4", "nf4+DQ · fast", "bf16", "mystery", "nf4+DQ", "int8"]
    assert sorted(labels, key=lambda v: frame.rank("quant_label", v)) == [
        "bf16", "int8", "nf4+DQ", "nf4+DQ · fast", "fp4", "mystery"]


def test_every_run_is_a_row_and_hidden_directories_are_not_read(tmp_path):
    root = tmp_path / "sweep"
    fake_run(root, "nf4", tps=1000.0)
    fake_run(root, "bf16", status="oom", peak=79.0)
    fake_run(root, "fp4", status="failed")
    (root / ".staging").mkdir()
    fake_run(root / ".staging", "int8")
    df = frame.load_runs(root)
    assert sorted(df.status) == ["failed", "ok", "oom"] and "int8" not in set(df.quant)
    failed = df[df.status == "failed"].iloc[0]
    assert failed.error_message == "boom" and math.isnan(failed.tokens_per_s)  # every column, NaN where absent


def test_a_run_s_peak_and_its_throughput_interval(tmp_path):
    root = tmp_path / "sweep"
    fake_run(root, "nf4", tps=1000.0, peak=10.0)
    row = frame.load_runs(root).iloc[0]
    assert row.peak_bytes == 10 * 2**30 and row.peak_source == "NVML device used"
    # tokens/s = 2,048 tok/step / mean step time; its interval maps the step time's [0.9, 1.1] x mean
    assert row.tokens_per_s_run_ci95_low == pytest.approx(1000 / 1.1)
    assert row.tokens_per_s_run_ci95_high == pytest.approx(1000 / 0.9)


def test_runs_that_differ_outside_the_axes_are_never_grouped(tmp_path):
    root = tmp_path / "sweep"
    fake_run(root, "nf4", seed=0)
    fake_run(root, "fp4", seed=1)  # an axis value and a seed: same group
    fake_run(root, "nf4", steps=20)  # a group key
    fake_run(root, "nf4", gpu="Other GPU")  # another machine
    path = root / fake_run(root, "int8") / "result.json"
    r = json.loads(path.read_text())
    r["config"]["optim"]["lr"] = 1e-3  # a residual key (not an axis, not a group key)
    path.write_text(json.dumps(r))
    df = frame.load_runs(root)
    groups = df.groupby("group").run_id.apply(sorted).tolist()
    assert sorted(map(len, groups)) == [1, 1, 1, 2]
    assert any("optim.lr=0.001" in label for label in df.group_label)
    assert frame.differing_keys(df) == ["steps", "hardware", "optim.lr"]


def test_an_unreadable_result_is_skipped_and_listed(tmp_path):
    root = tmp_path / "sweep"
    fake_run(root, "nf4")
    (root / "broken").mkdir()
    (root / "broken" / "result.json").write_text("{not json")
    with pytest.warns(UserWarning, match="skipping unreadable"):
        df = frame.load_runs(root)
    assert len(df) == 1 and df.attrs["unreadable"] == ["broken/result.json"]


def test_loss_curves_skip_a_half_written_last_line(tmp_path):
    root = tmp_path / "sweep"
    run = fake_run(root, "nf4", train_loss=1.0)
    with open(root / run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a run killed mid-write
    curves = frame.load_curves(root, frame.load_runs(root))
    assert curves.step.tolist() == [0, 1, 2, 3, 4] and curves.loss.iloc[-1] == pytest.approx(1.0)
