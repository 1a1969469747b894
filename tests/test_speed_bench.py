"""experiments/speed_bench.py: the speed label of a run (frame), the mode x model table, its
ratios and the issue's targets on synthetic results (one passing model, one failing two
targets, one with a failed mode), and the real --quick bench on CPU: every mode in its own
process (the Trainer one included) writes a normal result.json, a failure is recorded without
stopping the bench, a second invocation skips what is complete, a run past its timeout is
killed and recorded as failed, and `qlab report` tables the modes side by side."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from qlab.config import PROJECT_ROOT
from qlab.results import frame, report, tables

ROOT = Path(PROJECT_ROOT)


def _load_bench():
    spec = importlib.util.spec_from_file_location("speed_bench", ROOT / "experiments" / "speed_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["speed_bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


# ---------------------------------------------------------------- labels and grouping

def test_speed_label_names_presets_runner_and_deviations():
    recipe, fast = frame.speed_presets()["recipe"], frame.speed_presets()["fast"]
    assert frame.speed_label(None) == "recipe"  # results from before the speed group
    assert frame.speed_label(recipe) == "recipe"
    assert frame.speed_label(fast) == "fast"
    assert frame.speed_label({**fast, "compile": "none"}) == "fast (compile=none)"
    assert frame.speed_label({**recipe, "adapter_autocast": True}) == "recipe (adapter_autocast=true)"
    assert frame.speed_label({**recipe, "runner": "trainer"}) == "trainer"
    assert frame.quant_label("nf4", True, "recipe") == "nf4+DQ"
    assert frame.quant_label("nf4", True, "fast") == "nf4+DQ · fast"
    assert frame.quant_label("bf16", False, None) == "bf16"
    ordered = sorted(["nf4+DQ · fast", "bf16", "nf4+DQ", "nf4+DQ · trainer", "bf16 · fast"],
                     key=lambda v: frame.rank("quant_label", v))
    assert ordered == ["bf16", "bf16 · fast", "nf4+DQ", "nf4+DQ · trainer", "nf4+DQ · fast"]


SPEEDS = {"trainer": ("nf4", {**frame.speed_presets()["recipe"], "adapter_autocast": True, "runner": "trainer"}),
          "recipe": ("nf4", frame.speed_presets()["recipe"]), "fast": ("nf4", frame.speed_presets()["fast"]),
          "bf16": ("bf16", frame.speed_presets()["recipe"]), "bf16-fast": ("bf16", frame.speed_presets()["fast"])}


def fake_result(results: Path, model: str, mode: str, status: str = "ok", tok: float | None = 1000.0,
                peak: float | None = 10 * 2**30, weights: float = 4 * 2**30) -> str:
    """A result.json as qlab's recorder writes it, with the metrics the speed table reads."""
    quant, speed = SPEEDS[mode]
    run_id = f"{model}_{mode}_s0"
    metrics = {"weight_bytes": weights, "weight_bytes_after_prepare": weights * 1.25}
    if tok is not None:
        metrics.update(tokens_per_s=tok, tokens_per_s_median_tok=tok, tokens_per_s_ci95_low_tok=0.98 * tok,
                       tokens_per_s_ci95_high_tok=1.02 * tok, tokens_per_s_cv=0.01, tokens_per_s_n=20,
                       step_time_median_s=2048 / tok)
    if peak is not None:
        metrics.update(peak_allocated_bytes=peak, nvml_peak_device_used_bytes=peak + 2**30)
    config = {"model": {"name": model, "preset": model}, "quant": {"type": quant, "double_quant": quant == "nf4"},
              "adapter": {"targets": "all_linear", "r": 64}, "optim": {"name": "paged_adamw_32bit"},
              "data": {"name": "chat", "max_seq_len": 512, "pad_to": "max_seq_len"},
              "train": {"batch_size": 4, "steps": 28, "warmup_steps": 8}, "speed": speed, "seed": 0,
              "tracker": {"sweep": f"speed-{model}"}}
    result = {"schema": "qlab.result/1", "run_id": run_id, "sweep": f"speed-{model}", "status": status,
              "error": None if status == "ok" else {"type": "OutOfMemoryError", "message": "CUDA out of memory"},
              "axes": {"model": model, "quant": quant, "double_quant": quant == "nf4", "optim": "paged_adamw_32bit",
                       "adapter": "all_linear", "seed": 0},
              "metrics": metrics, "config": config, "env": {"gpu": "Fake GPU 80GB"}, "git_commit": "abc"}
    d = results / f"speed-{model}" / run_id
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(result))
    return run_id


def test_speed_modes_share_one_group_with_distinct_labels(tmp_path):
    for mode in SPEEDS:
        fake_result(tmp_path, "llama-7b", mode)
    runs = frame.load_runs(tmp_path / "speed-llama-7b")
    assert runs.group.nunique() == 1  # the speed path is an axis, not a group key
    assert dict(zip(runs.run_id, runs.speed)) == {f"llama-7b_{m}_s0": ("recipe" if m == "bf16" else
                                                                       "fast" if m == "bf16-fast" else m)
                                                  for m in SPEEDS}
    assert sorted(runs.quant_label) == sorted(["nf4+DQ · trainer", "nf4+DQ", "nf4+DQ · fast", "bf16", "bf16 · fast"])
    arms = tables.arms(runs)
    assert len(arms) == 5 and list(arms.quant_label) == ["bf16", "bf16 · fast", "nf4+DQ", "nf4+DQ · trainer",
                                                         "nf4+DQ · fast"]
    numeric, baseline, _ = tables.axis_table(arms, tables.AXES[-1])  # the speed axis
    assert baseline == "trainer"
    nf4 = numeric[numeric.quant == "nf4"].set_index("speed")
    assert list(nf4.index) == ["trainer", "recipe", "fast"]


# ---------------------------------------------------------------- table, ratios, targets

def _table(tmp_path):
    # llama-7b: every target passes; bloom-7b1: fast only 1.2x the trainer and a higher peak than
    # the recipe (two fails); tiny: fast ran out of memory (every target n/a)
    for mode, tok, peak in (("trainer", 2000, 12e9), ("recipe", 1800, 11e9), ("fast", 3400, 9e9),
                            ("bf16", 3600, 16e9)):
        fake_result(tmp_path, "llama-7b", mode, tok=tok, peak=peak)
    for mode, tok, peak in (("trainer", 2000, 12e9), ("recipe", 1800, 11e9), ("fast", 2400, 11.5e9),
                            ("bf16", 2500, 16e9)):
        fake_result(tmp_path, "bloom-7b1", mode, tok=tok, peak=peak)
    fake_result(tmp_path, "tiny", "trainer")
    fake_result(tmp_path, "tiny", "recipe")
    fake_result(tmp_path, "tiny", "fast", status="oom", tok=None, peak=None)
    import pandas as pd

    runs = pd.concat([frame.load_runs(tmp_path / f"speed-{m}") for m in ("llama-7b", "bloom-7b1", "tiny")],
                     ignore_index=True)
    table = tables.speed_table(runs)
    return table, tables.speed_ratios(table)


def test_speed_table_and_ratios(tmp_path):
    table, ratios = _table(tmp_path)
    assert list(table.model.unique()) == ["llama-7b", "bloom-7b1", "tiny"]
    assert list(table[table.model == "llama-7b"]["mode"]) == ["trainer", "recipe", "fast", "bf16"]
    fast = table[(table.model == "llama-7b") & (table["mode"] == "fast")].iloc[0]
    assert fast.tok_s == 3400 and fast.tok_s_ci95_low == pytest.approx(0.98 * 3400)
    assert fast.peak == 9e9 and fast.peak_source == "torch peak allocated" and fast.nvml_peak_bytes == 9e9 + 2**30
    assert fast.quant_label == "nf4+DQ · fast" and fast.runs == "1 ok"
    oom = table[(table.model == "tiny") & (table["mode"] == "fast")].iloc[0]
    assert oom.n == 0 and oom.runs == "1 oom" and "OutOfMemoryError" in oom.error and math.isnan(oom.tok_s)
    r = ratios.set_index("model")
    assert r.loc["llama-7b", "fast/trainer tok/s"] == pytest.approx(1.7)
    assert r.loc["llama-7b", "fast/bf16 tok/s"] == pytest.approx(3400 / 3600)
    assert r.loc["llama-7b", "peak fast/recipe"] == pytest.approx(9 / 11)
    assert r.loc["bloom-7b1", "fast/trainer tok/s"] == pytest.approx(1.2)
    assert math.isnan(r.loc["tiny", "fast/trainer tok/s"])
    disp = tables.speed_display(table)
    assert disp.columns[4] == "tok/s median [95% CI]" and "torch peak alloc (GiB)" in disp.columns
    assert disp.iloc[2]["tok/s median [95% CI]"] == "3,400 [3,332, 3,468]"


def test_targets_pass_fail_and_na(tmp_path):
    table, ratios = _table(tmp_path)
    targets = bench.evaluate_targets(ratios, table)
    verdict = {(t["model"], t["target"]): t["verdict"] for t in targets}
    assert [verdict[("llama-7b", t.name)] for t in bench.TARGETS] == ["pass", "pass", "pass"]
    # 2,400 / 2,000 = 1.2x < 1.5x; 2,400 / 2,500 = 0.96x >= 0.9x; 11.5 GB > 11 GB
    assert [verdict[("bloom-7b1", t.name)] for t in bench.TARGETS] == ["fail", "pass", "fail"]
    tiny = [t for t in targets if t["model"] == "tiny"]
    assert [t["verdict"] for t in tiny] == ["n/a", "n/a", "n/a"]
    assert tiny[0]["reason"] == "no ok run of fast"
    assert tiny[1]["reason"] == "no ok run of fast, bf16"
    assert bench.overall(targets) == "fail"
    assert bench.overall([t for t in targets if t["model"] != "bloom-7b1"]) == "incomplete"
    assert bench.overall([t for t in targets if t["model"] == "llama-7b"]) == "pass"
    # the boundary counts as a pass: fast exactly 1.5x the trainer
    edge = ratios.copy()
    edge.loc[edge.model == "bloom-7b1", "fast/trainer tok/s"] = 1.5
    assert {t["verdict"] for t in bench.evaluate_targets(edge, table)
            if t["model"] == "bloom-7b1" and t["ratio"] == "fast/trainer tok/s"} == {"pass"}


# ---------------------------------------------------------------- the real bench, CPU

@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick bench on tiny-llama with the bf16 run made to run out of memory (qlab's
    fault injection), run once for the tests below."""
    import os

    results = tmp_path_factory.mktemp("speed")
    argv = ["--quick", "--models", "tiny-llama", "--steps", "2", "--results", str(results)]
    os.environ["QLAB_INJECT_FAULT"] = "oom:_bf16_"
    try:
        rc = bench.main(argv)
    finally:
        del os.environ["QLAB_INJECT_FAULT"]
    return results, argv, rc


def test_quick_bench_records_every_mode(quick):
    results, argv, rc = quick
    assert rc == 0  # an oom is a result, not a failure
    args = bench.parse(argv)
    sweep = results / "speed-tiny-llama"
    expected = {mode: bench.config_for(args, "tiny-llama", mode)[1] for mode in bench.DEFAULT_MODES.split(",")}
    got = {}
    for mode, cfg in expected.items():  # the bench predicted each process's run id
        from qlab.results import store

        r = json.loads((store.run_dir(cfg) / "result.json").read_text())
        got[mode] = r
        assert r["run_id"] == store.run_id(cfg) and r["sweep"] == "speed-tiny-llama"
    assert {m: r["status"] for m, r in got.items()} == {"trainer": "ok", "recipe": "ok", "fast": "ok", "bf16": "oom"}
    t = got["trainer"]
    assert t["config"]["speed"]["runner"] == "trainer" and t["metrics"]["runner"] == "transformers.Trainer"
    m = t["metrics"]
    assert m["step_time_n"] == 2 and m["steps_completed"] == 3 and m["tokens_per_s_n"] == 2
    assert m["max_tokens_per_step"] == 4 * 128 and m["optimizer_state_bytes"] > 0 and m["rss_peak_bytes"] > 0
    assert m["trainer_args"]["optim"] == "paged_adamw_32bit" and m["trainer_args"]["max_grad_norm"] == 0.3
    assert m["trainer_args"]["lr_scheduler_type"] == "constant" and m["trainer_args"]["gradient_checkpointing"]
    assert m["trainable_params"] == got["recipe"]["metrics"]["trainable_params"]
    lines = [json.loads(x) for x in (sweep / t["run_id"] / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2] and "step_time_s" in lines[-1] and "step_time_s" not in lines[0]
    # the same batches in the same order from the same initial adapters: the first losses agree
    first = json.loads((sweep / got["recipe"]["run_id"] / "metrics.jsonl").read_text().splitlines()[0])
    assert lines[0]["loss"] == pytest.approx(first["loss"], rel=1e-4)

    out = json.loads(next((results / "speed-bench").glob("*.json")).read_text())
    assert [(r["mode"], r["status"], r["outcome"]) for r in out["runs"]] == [
        ("trainer", "ok", "ran"), ("recipe", "ok", "ran"), ("fast", "ok", "ran"), ("bf16", "oom", "ran")]
    targets = {t["ratio"]: t for t in out["targets"]}
    fast, trainer, recipe = (got[k]["metrics"] for k in ("fast", "trainer", "recipe"))
    assert targets["fast/trainer tok/s"]["value"] == pytest.approx(
        fast["tokens_per_s_median_tok"] / trainer["tokens_per_s_median_tok"])
    assert targets["peak fast/recipe"]["value"] == pytest.approx(fast["rss_peak_bytes"] / recipe["rss_peak_bytes"])
    assert targets["fast/bf16 tok/s"]["verdict"] == "n/a"
    assert targets["fast/bf16 tok/s"]["reason"] == "no ok run of bf16"
    assert out["verdict"] in ("fail", "incomplete") and out["env"]["torch"]
    md = next((results / "speed-bench").glob("*.md")).read_text()
    assert "## Targets" in md and "nf4+DQ · fast (compile=none)" in md and "| tiny-llama | fast/bf16" not in md

    page = report.build(sweep, wandb=False)  # `make report SWEEP=speed-tiny-llama`
    speed_md = (sweep / "report" / "tables" / "speed.md").read_text()
    assert "trainer" in speed_md and "fast (compile=none)" in speed_md and "Baseline: trainer." in speed_md
    assert "nf4+DQ · trainer" in (sweep / "report" / "tables" / "quant.md").read_text()
    assert page.exists()


def test_quick_bench_resumes(quick, capsys):
    results, argv, _ = quick
    capsys.readouterr()
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count(": skip, complete") == 4 and ": start " not in out
    # the Trainer worker skips on its own too
    args = bench.parse(argv)
    assert bench.trainer_worker(bench.mode_overrides(args, "tiny-llama", "trainer")) == 0
    assert "skip tiny-llama_nf4-dq" in capsys.readouterr().out


def test_no_run_tables_what_is_there(quick, capsys, monkeypatch):
    results, argv, _ = quick
    monkeypatch.setattr(bench, "launch", lambda *a: pytest.fail("--no-run launched a run"))
    # the runs' own machine, not this process': a marker planted in one result's env
    args = bench.parse(argv)
    from qlab.results import store

    path = store.run_dir(bench.config_for(args, "tiny-llama", "trainer")[1]) / "result.json"
    original = path.read_text()
    r = json.loads(original)
    r["env"]["cpu"] = "the bench machine"
    path.write_text(json.dumps(r))
    try:
        assert bench.main([*argv, "--no-run"]) == 0
    finally:
        path.write_text(original)
    out = json.loads((results / "speed-bench" / "the-bench-machine-tiny-llama.json").read_text())
    assert [(x["mode"], x["status"], x["outcome"]) for x in out["runs"]] == [
        ("trainer", "ok", "read"), ("recipe", "ok", "read"), ("fast", "ok", "read"), ("bf16", "oom", "read")]
    assert out["targets"] and out["env"]["cpu"] == "the bench machine"
    # a mode with no result is reported missing, and the exit status says so
    assert bench.main([*argv, "--no-run", "--modes", "recipe,bf16-fast"]) == 1
    assert "| tiny-llama | bf16-fast | missing |" in capsys.readouterr().out


def test_timeout_is_recorded_as_failed(tmp_path, capsys):
    argv = ["--quick", "--models", "tiny-llama", "--modes", "recipe", "--results", str(tmp_path),
            "--timeout-per-run", "1"]
    assert bench.main(argv) == 1  # a failed run: the bench exits non-zero, after writing its report
    out = json.loads(next((tmp_path / "speed-bench").glob("*.json")).read_text())
    (run,) = out["runs"]
    assert run["status"] == "failed" and run["error"]["type"] == "LostRun"
    assert "timed out after 1 s" in run["error"]["message"]
    assert out["verdict"] == "incomplete"
    assert json.loads(Path(run["result"]).read_text())["status"] == "failed"


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.parse(["--modes", "trainer,turbo"])
    assert bench.main(["--quick", "--models", "no-such-model", "--results", "/nonexistent"]) == 2
    with pytest.raises(SystemExit):  # the first warm-up step compiles: never profiled
        bench.parse(["--warmup", "3", "--profile", "3"])


def test_profile_section_tables_profiled_runs_only(tmp_path):
    """The bench's profile table from what qlab.run recorded (GPU metrics: kernel time by class)."""
    from qlab.results import store

    profiled = {"step_time_median_s": 0.5, "profile_steps": 3, "profile_wall_ms_per_step": 512.0, "profile_kernel_ms_per_step": 402.0,
                "profile_idle_ms_per_step": 110.0, "profile_kernel_launches_per_step": 4321.0,
                "profile_kernel_ms_by_class": {"gemm": 250.0, "attention": 60.0, "other elementwise": 50.0,
                                               "dequantize (bitsandbytes)": 22.0, "optimizer": 20.0}}
    done = {}
    for mode, metrics in (("recipe", profiled), ("trainer", {"tokens_per_s": 1.0})):
        (tmp_path / mode).mkdir()
        store.atomic_write_json(tmp_path / mode / "result.json", {"status": "ok", "metrics": metrics})
        done[("m", mode)] = {"model": "m", "mode": mode, "result": str(tmp_path / mode / "result.json")}
    lines = bench.profile_section(done)
    rows = [line for line in lines if line.startswith("| m ")]
    assert rows == ["| m | recipe | 500 | 402 | 98 | 4,321 | gemm 250, attention 60, other elementwise 50, "
                    "dequantize (bitsandbytes) 22 |"]
    assert bench.profile_section({("m", "trainer"): done[("m", "trainer")]}) == []
