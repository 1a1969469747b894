"""qlab/results/frame.py: result files -> one row per run, with its labels and comparability group;
a run's speed path labelled from its result alone (the label it recorded, or for a result from
before labels, its stored switches against the presets of that time, never conf/ on disk); a
comparison's arms and pairs as tables."""

import json
import math
from pathlib import Path

import pytest

from fake_results import fake_run
from qlab.results import frame, store, tables


NF4_DQ = {"type": "nf4", "double_quant": True}  # as results from before quant.backend stored it


def test_quant_labels_and_their_order():
    assert frame.quant_label(NF4_DQ) == "nf4+DQ" and frame.quant_label({"type": "fp4", "double_quant": False}) == "fp4"
    assert frame.quant_label(NF4_DQ, "recipe") == "nf4+DQ"  # the recipe adds nothing
    assert frame.quant_label(NF4_DQ, "fast") == "nf4+DQ · fast"
    assert frame.quant_label(None) is None and frame.quant_label({"type": None}) is None  # a comparison's row
    # backend and block size: config.quant_label's spelling, the speed path after them
    assert frame.quant_label({**NF4_DQ, "backend": "bitsandbytes", "blocksize": 64}) == "nf4+DQ"
    assert frame.quant_label({**NF4_DQ, "blocksize": 128}, "fast") == "nf4+DQ/b128 · fast"
    assert frame.quant_label({"type": "int4", "double_quant": False, "backend": "hqq", "blocksize": 64}) == "hqq int4"
    assert frame.quant_label({**NF4_DQ, "backend": "torchao", "blocksize": 64}) == "torchao nf4+DQ"
    labels = ["fp4", "nf4+DQ · fast", "bf16", "mystery", "nf4+DQ", "int8", "nf4+DQ/b128", "hqq int4", "nf4+DQ/b32",
              "torchao nf4+DQ"]
    assert sorted(labels, key=lambda v: frame.rank("quant_label", v)) == [
        "bf16", "int8", "nf4+DQ/b32", "nf4+DQ", "nf4+DQ · fast", "nf4+DQ/b128", "fp4", "torchao nf4+DQ", "hqq int4",
        "mystery"]


def test_adapter_labels_and_their_order():
    assert frame.adapter_label("all_linear", None) == "all_linear"  # a result from before adapter.init/dora
    assert frame.adapter_label("all_linear", {"init": "gaussian", "dora": False}) == "all_linear"
    assert frame.adapter_label("all_linear", {"init": "loftq", "dora": False}) == "all_linear+loftq"
    assert frame.adapter_label("qv", {"init": "pissa"}) == "qv+pissa"
    assert frame.adapter_label("qv", {"init": "gaussian", "dora": True}) == "qv+DoRA"
    assert frame.adapter_label(None, {"dora": True}) is None  # a comparison's row: no adapter
    labels = ["all_linear+loftq", "full", "all_linear", "qv+DoRA", "qv", "all_linear+DoRA", "all_linear+pissa"]
    assert sorted(labels, key=lambda v: frame.rank("adapter", v)) == [
        "qv", "qv+DoRA", "all_linear", "all_linear+DoRA", "all_linear+loftq", "all_linear+pissa", "full"]


@pytest.mark.parametrize("model, weights", [
    ({"name": "llama-7b", "name_or_path": None, "preset": "llama-7b"}, "random"),  # results from before `base`
    ({"name": "llama-7b", "preset": "llama-7b", "base": None, "gguf": None}, "random"),
    ({"name": "base-gpu", "preset": None, "base": "gpu"}, "base"),
    ({"name": "smollm2-135m", "preset": None, "name_or_path": None, "gguf": "smollm2-135m"}, "gguf"),
    ({"name": "llama-7b", "preset": "llama-7b", "name_or_path": "/ckpt/llama"}, "checkpoint"),  # a path wins
    ({"name": "m"}, "checkpoint"),
])
def test_model_weights_from_the_stored_config(model, weights):
    """Random-init is read from the model config a result stored (model.preset set, no base, gguf or
    name_or_path), never from conf/model/ or the model's name."""
    assert frame.model_weights(model) == weights


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


PRESETS = store.speed_presets()
RECIPE, FAST = PRESETS["recipe"], PRESETS["fast"]


def test_speed_label_names_presets_runner_and_deviations():
    label = lambda speed, runner=None: store.speed_label(speed, runner, PRESETS)  # noqa: E731
    assert label(None) == "recipe"  # results from before the speed group
    assert label(RECIPE) == "recipe" and label(FAST) == "fast"
    assert label({**FAST, "compile": "none"}) == "fast (compile=none)"
    assert label({**RECIPE, "adapter_autocast": True}) == "recipe (adapter_autocast=true)"
    assert label({**RECIPE, "adapter_autocast": True}, "hf_trainer") == "trainer"
    assert label({**RECIPE, "runner": "trainer"}) == "trainer"  # the retired speed bench's Trainer runs
    assert frame.quant_label(NF4_DQ, "recipe") == "nf4+DQ"
    assert frame.quant_label(NF4_DQ, "fast") == "nf4+DQ · fast"
    assert frame.quant_label({"type": "bf16", "double_quant": False}, None) == "bf16"
    ordered = sorted(["nf4+DQ · fast", "bf16", "nf4+DQ", "nf4+DQ · trainer", "bf16 · fast"],
                     key=lambda v: frame.rank("quant_label", v))
    assert ordered == ["bf16", "bf16 · fast", "nf4+DQ", "nf4+DQ · trainer", "nf4+DQ · fast"]


SPEEDS = {"trainer": ("nf4", {**RECIPE, "adapter_autocast": True, "runner": "trainer"}, None),
          "recipe": ("nf4", RECIPE, None), "fast": ("nf4", FAST, None), "bf16": ("bf16", RECIPE, None),
          "bf16-fast": ("bf16", FAST, None),
          # a run that recorded its label, as every run does now: its own label wins
          "trainer-new": ("nf4", {**RECIPE, "adapter_autocast": True}, "trainer")}


def fake_result(results: Path, model: str, mode: str, **metrics) -> str:
    quant, speed, label = SPEEDS[mode]
    run_id = f"{model}_{mode}_s0"
    config = {"model": {"name": model, "preset": model}, "quant": {"type": quant, "double_quant": quant == "nf4"},
              "adapter": {"targets": "all_linear", "r": 64}, "optim": {"name": "paged_adamw_32bit"},
              "data": {"name": "chat", "max_seq_len": 512, "pad_to": "max_seq_len"},
              "train": {"batch_size": 4, "steps": 28, "warmup_steps": 8,
                        **({"runner": "hf_trainer"} if label else {})}, "speed": speed, "seed": 0}
    axes = {"model": model, "quant": quant, "double_quant": quant == "nf4", "optim": "paged_adamw_32bit",
            "adapter": "all_linear", "seed": 0, **({"speed": label} if label else {})}
    d = results / f"speed-{model}" / run_id
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"run_id": run_id, "sweep": f"speed-{model}", "status": "ok",
                                               "axes": axes, "metrics": metrics, "config": config,
                                               "env": {"gpu": "Fake GPU 80GB"}}))
    return run_id


def test_speed_paths_share_one_group_with_distinct_labels_read_from_the_results(tmp_path, monkeypatch):
    for mode in SPEEDS:
        fake_result(tmp_path, "llama-7b", mode, tokens_per_s=1000.0)

    def on_disk(*a, **k):
        raise AssertionError("a report read conf/speed/")

    monkeypatch.setattr(store, "speed_presets", on_disk)
    runs = frame.load_runs(tmp_path / "speed-llama-7b")
    assert runs.group.nunique() == 1  # the speed path, runner included, is an axis, not a group key
    assert dict(zip(runs.run_id, runs.speed)) == {f"llama-7b_{m}_s0": ("recipe" if m == "bf16" else "fast" if m ==
                                                                       "bf16-fast" else "trainer" if m == "trainer-new"
                                                                       else m) for m in SPEEDS}
    arms = tables.arms(runs)
    assert len(arms) == 5 and list(arms.quant_label) == ["bf16", "bf16 · fast", "nf4+DQ", "nf4+DQ · trainer",
                                                         "nf4+DQ · fast"]
    assert arms.set_index("quant_label").loc["nf4+DQ · trainer", "n"] == 2  # the old and the new Trainer run
    numeric, baseline, _ = tables.axis_table(arms, tables.AXES[-1])  # the speed axis
    assert baseline == "trainer"
    assert list(numeric[numeric.quant == "nf4"].speed) == ["trainer", "recipe", "fast"]


def comparison(profiled: bool) -> dict:
    arm = {"runner": "qlab", "quant": "nf4", "double_quant": True, "speed": "fast", "optim": "paged_adamw_32bit",
           "tokens_per_s": 6123.4, "step_time_median_s": 0.3345, "mfu": 0.361 if profiled else None}
    if profiled:
        arm.update(gpu_busy_fraction=0.743, profile_kernel_launches_per_step=8205.0, profile_kernel_ms_per_step=165.7,
                   profile_kernel_ms_by_class={"gemm": 108.6, "dequantize (bitsandbytes)": 22.5, "attention": 9.6,
                                               "compiled (triton)": 17.9})
    return {"arms": {"fast": arm, "trainer": {**arm, "runner": "hf_trainer", "speed": "trainer"}},
            "pairs": {"fast/trainer": {"ratio": 2.071, "ci95": [1.962, 2.186], "half_width": 0.0541, "rounds": 14,
                                       "verdict": "a faster"}},
            "aa_control": {"pair": "fast-aa/fast", "ratio": 1.004, "ci95": [0.981, 1.028], "half_width": 0.024,
                           "rounds": 14, "covers_1": True},
            "rounds_completed": 14, "steps_per_round": 3, "stopped": "time_budget", "target_half_width": 0.05,
            "half_width_reached": 0.0541}


@pytest.mark.parametrize("profiled", [True, False])
def test_comparison_tables(profiled):
    arms, pairs = tables.compare_tables(comparison(profiled))
    fast = arms.set_index("arm").loc["fast"]
    assert fast["tok/s"] == "6,123" and fast["step ms (median)"] == "334" and fast["quant"] == "nf4+DQ"
    if profiled:
        assert (fast["GPU busy"], fast["kernels/step"], fast["MFU"]) == ("74%", "8,205", "36.1%")
    else:  # no profile (a CPU): no busy fraction, launches or MFU
        assert (fast["GPU busy"], fast["kernels/step"], fast["MFU"]) == ("-", "-", "-")
    assert pairs.to_dict("records") == [
        {"pair": "fast/trainer", "ratio [95% CI]": "2.071 [1.962, 2.186]", "half-width": "5.4%", "rounds": "14",
         "verdict": "a faster"},
        {"pair": "fast-aa/fast (A/A floor)", "ratio [95% CI]": "1.004 [0.981, 1.028]", "half-width": "2.4%",
         "rounds": "14", "verdict": "covers 1"}]
    md = tables.compare_markdown(comparison(profiled), "NVIDIA H200")
    assert "14 rounds x 3 steps per arm; stopped: time_budget (target half-width 5%, reached 5.4%)." in md
    # where the step goes: 334.5 ms in the rounds, 165.7 of kernels, the rest with no kernel running
    assert ("| fast    |                334 |        165.7 |            169 | gemm 108.6, dequantize (bitsandbytes) 22.5, "
            "compiled (triton) 17.9 |" in md) == profiled and ("Where each arm's step goes" in md) == profiled


def test_backend_block_size_and_adapter_form_are_labelled_from_the_stored_config(tmp_path):
    """A backends x adapter-forms sweep: one comparability group (the new keys are axes, not residual
    config), each run labelled by config.quant_label and its adapter's form; a result from before
    the keys and one written after, at their defaults, carry the labels results always had."""
    root = tmp_path / "sweep"
    defaults = dict(quant_cfg={"backend": "bitsandbytes", "blocksize": 64}, adapter_cfg={"init": "gaussian",
                                                                                          "dora": False})
    old = fake_run(root, "nf4", dq=True)  # stores none of quant.backend, quant.blocksize, adapter.init, adapter.dora
    new = fake_run(root, "nf4", dq=True, seed=1, **defaults)
    hqq = fake_run(root, "int4", quant_cfg={"backend": "hqq", "blocksize": 64})
    ao = fake_run(root, "nf4", dq=True, quant_cfg={"backend": "torchao", "blocksize": 64})
    b128 = fake_run(root, "nf4", dq=True, quant_cfg={"backend": "bitsandbytes", "blocksize": 128})
    loftq = fake_run(root, "nf4", dq=True, adapter_cfg={"init": "loftq", "dora": False})
    dora = fake_run(root, "nf4", dq=True, adapter="qv", adapter_cfg={"init": "gaussian", "dora": True})
    df = frame.load_runs(root)
    assert df.group.nunique() == 1 and df.config_rest.nunique() == 1
    rows = df.set_index("run_id")[["quant_label", "quant", "dq", "adapter"]].T.to_dict("list")
    assert rows == {old: ["nf4+DQ", "nf4", "on", "all_linear"], new: ["nf4+DQ", "nf4", "on", "all_linear"],
                    hqq: ["hqq int4", "hqq int4", "off", "all_linear"],
                    ao: ["torchao nf4+DQ", "torchao nf4", "on", "all_linear"],
                    b128: ["nf4+DQ/b128", "nf4/b128", "on", "all_linear"],
                    loftq: ["nf4+DQ", "nf4", "on", "all_linear+loftq"], dora: ["nf4+DQ", "nf4", "on", "qv+DoRA"]}
    # the frame's order: weight format (block size after the default), then the adapter's targets and form
    assert list(df.run_id) == [dora, old, new, loftq, b128, ao, hqq]


def test_a_training_arm_tells_adapter_forms_apart_but_not_keys_a_result_predates():
    config = {"model": {"name": "m"}, "quant": {"type": "nf4", "double_quant": True},
              "adapter": {"targets": "qv", "r": 8}, "optim": {"name": "adamw"}, "seed": 0}

    def arm(quant=None, **adapter):
        return frame.trained_arm({"sweep": "s", "config": {**config, "quant": quant or config["quant"],
                                                           "adapter": {**config["adapter"], **adapter}}})

    assert arm() == arm(init="gaussian", dora=False)  # seeds across the schema change: one arm
    assert len({arm(), arm(init="loftq"), arm(init="pissa"), arm(dora=True)}) == 4
    # the quantization is no part of the arm (a row's quant label tells those apart), its backend neither
    assert arm({"type": "int4", "backend": "hqq", "blocksize": 128}) == arm()
