"""End-to-end: one real run (tiny preset, real bitsandbytes NF4, real peft, real optimizer)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from qlab import tasks
from qlab.results import store


def result_files(root):
    return sorted(root.rglob("result.json"))


def test_complete_run_writes_a_valid_result(compose, tmp_path):
    cfg = compose("train.steps=40", "train.warmup_steps=3", "optim.lr=3e-3", "quant.double_quant=true")
    assert tasks.single(cfg) == 0
    [path] = result_files(tmp_path / "results")
    r = json.loads(path.read_text())
    assert r["status"] == "ok" and r["error"] is None
    assert r["run_id"] == path.parent.name == store.run_id(cfg)
    assert r["axes"] == {"model": "tiny-llama", "quant": "nf4", "double_quant": True,
                         "optim": "paged_adamw_32bit", "adapter": "all_linear", "seed": 0, "speed": "recipe"}
    assert r["config"]["quant"]["double_quant"] is True and r["config"]["train"]["steps"] == 40
    for key in ("python", "torch", "transformers", "peft", "bitsandbytes", "cuda", "gpu", "driver", "cpu"):
        assert key in r["env"]
    assert r["env"]["bitsandbytes"] and r["git_commit"] and r["seed"] == 0
    m = r["metrics"]
    assert m["steps_completed"] == 40 and m["step_time_n"] == 37  # 3 warm-up steps excluded
    assert m["tokens_per_s"] > m["real_tokens_per_s"] >= m["target_tokens_per_s"] > 0
    assert m["trainable_params"] == 8 * 2560 and m["weight_bytes"] > 0 and m["rss_peak_bytes"] > 0
    # 4 bits + constants; tiny tensors pay a large share for DQ's fixed 1 KiB second-level code
    assert m["bits_per_quantized_param"] > 4.0 and m["quant_state_bytes"] > 0
    assert m["optimizer_class"] == "PagedAdamW32bit" and m["optimizer_state_bytes"] == 2 * 4 * 8 * 2560
    b = m["memory_breakdown"]
    assert b["adapters_bytes"] == b["gradients_bytes"] == 4 * 8 * 2560  # float32 LoRA weights
    assert b["optimizer_state_cpu_bytes"] == m["optimizer_state_bytes"]
    assert b["quantized_weights_bytes"] == m["quantized_weight_bytes"]
    from qlab.run import presets

    vocab = len(presets.build_tokenizer())  # the tiny preset's vocabulary is its tokenizer's
    assert b["logits_bytes"] == m["max_tokens_per_step"] * vocab * 4  # float32 logits
    assert "activations_bytes" not in b  # no allocator peak on a CPU
    pvm = m["predicted_vs_measured"]  # the analytic model, recorded beside the measurement
    for key in ("weight_bytes", "quant_state_bytes", "weight_bytes_after_prepare", "trainable_params",
                "optimizer_state_bytes"):
        assert pvm[key]["predicted"] == pvm[key]["measured"], key
    assert m["eval_loss"] > 0 and m["eval_perplexity"] == pytest.approx(2.718281828 ** m["eval_loss"])
    steps = [json.loads(l) for l in (path.parent / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(40))
    losses = [s["loss"] for s in steps]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.05  # it learns
    assert (path.parent / "adapter" / "adapter_config.json").is_file()
    assert not any((tmp_path / "results" / "adhoc" / ".staging").iterdir())


BAD = [
    ["quant.type=nf5"], ["quant=int8", "quant.double_quant=true"], ["adapter.r=0"], ["optim.lr=0"],
    ["train.steps=0"], ["data.train_file=/nope.jsonl"], ["model.name_or_path=/no/such/model"],
]


@pytest.mark.parametrize("overrides", BAD)
def test_bad_input_runs_nothing_and_writes_no_result(compose, tmp_path, overrides):
    assert tasks.single(compose(*overrides)) == tasks.EXIT["invalid"]
    assert result_files(tmp_path) == []


def test_malformed_data_line_fails_before_loading(compose, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversation": [{"human": "a", "assistant": "b"}]}\n{"conversation": 5}\n')
    assert tasks.single(compose(f"data.train_file={bad}")) == tasks.EXIT["invalid"]
    assert result_files(tmp_path) == []
    # skipping is allowed when asked for, and counted
    assert tasks.single(compose(f"data.train_file={bad}", "data.on_bad_line=skip")) == 0
    [path] = result_files(tmp_path)
    assert json.loads(path.read_text())["metrics"]["data_skipped_bad_lines"] == 1


def test_cli_exits_nonzero_and_names_the_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qlab.run", "adapter.r=0", f"tracker.results_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "adapter.r: LoRA rank must be > 0, got 0" in proc.stdout + proc.stderr
    assert result_files(tmp_path) == []


@pytest.mark.parametrize("fault, status, code", [("oom@3", "oom", 3), ("crash@2", "failed", 1)])
def test_oom_and_crash_are_recorded_not_lost(compose, tmp_path, monkeypatch, fault, status, code):
    monkeypatch.setenv("QLAB_INJECT_FAULT", fault)
    assert tasks.single(compose()) == code
    [path] = result_files(tmp_path)
    r = json.loads(path.read_text())
    assert r["status"] == status and r["error"]["message"].startswith("injected")
    steps = int(fault.split("@")[1])
    assert r["metrics"]["steps_completed"] == steps  # what ran before the fault is kept
    assert not store.is_complete(path.parent) if status == "failed" else store.is_complete(path.parent)
    if status == "failed":
        assert "InjectedCrash" in r["error"]["traceback"]


def test_wandb_offline_files_are_written_and_readable(compose, tmp_path):
    from wandb_log import key, records

    assert tasks.single(compose("tracker=wandb", f"tracker.results_dir={tmp_path / 'results'}")) == 0
    [log] = list((tmp_path / "results").rglob("run-*.wandb"))
    history, summary, config = [], {}, {}
    for rec in records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            summary.update({key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "run":
            config = {key(i): json.loads(i.value_json) for i in rec.run.config.update}
    [result] = result_files(tmp_path / "results")
    local = [json.loads(l) for l in (result.parent / "metrics.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in history if "loss" in h] == pytest.approx([s["loss"] for s in local])
    assert summary["status"] == "ok" and summary["eval_loss"] == pytest.approx(
        json.loads(result.read_text())["metrics"]["eval_loss"])
    assert config["quant"]["type"] == "nf4"


def test_wandb_failure_never_loses_the_run(compose, tmp_path, monkeypatch):
    import wandb

    def broken(*a, **k):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", broken)
    with pytest.warns(UserWarning, match="W&B init failed"):
        assert tasks.single(compose("tracker=wandb")) == 0
    [path] = result_files(tmp_path)
    assert json.loads(path.read_text())["status"] == "ok"


def test_full_fine_tuning_trains_every_weight_and_saves_the_model(compose, tmp_path):
    """adapter=full (16-bit base): no LoRA, every parameter trains under AdamW, the loss falls, the
    weights are saved as a checkpoint into model/ (no adapter/), and the analytic model predicts
    the exact terms it measured."""
    from transformers import AutoModelForCausalLM

    cfg = compose("adapter=full", "quant=bf16", "optim.lr=1e-3", "train.steps=30", "train.warmup_steps=2")
    assert tasks.single(cfg) == 0
    [path] = result_files(tmp_path / "results")
    r = json.loads(path.read_text())
    m = r["metrics"]
    assert r["axes"]["adapter"] == "full" and "_full_" in r["run_id"] and m["lora_target_modules"] == []
    assert m["trainable_params"] == m["total_params"] > 0
    assert m["optimizer_state_bytes"] == 2 * 4 * m["total_params"]  # two float32 moments per weight
    b = m["memory_breakdown"]
    assert b["adapters_bytes"] == 0 and b["gradients_bytes"] == 4 * m["total_params"]
    assert b["unquantized_weights_bytes"] == 4 * m["total_params"]  # the float32 weights, counted once
    for key, v in m["predicted_vs_measured"].items():
        assert v["predicted"] == v["measured"], key
    losses = [json.loads(l)["loss"] for l in (path.parent / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # it learns
    assert not (path.parent / "adapter").exists()
    saved = AutoModelForCausalLM.from_pretrained(path.parent / "model")  # an evaluation can load it
    assert sum(p.numel() for p in saved.parameters()) == m["total_params"]
    assert (path.parent / "model" / "tokenizer.json").is_file()


def test_full_fine_tuning_refuses_a_quantized_base(compose, tmp_path):
    assert tasks.single(compose("adapter=full", "quant=nf4")) == tasks.EXIT["invalid"]
    assert result_files(tmp_path) == []
