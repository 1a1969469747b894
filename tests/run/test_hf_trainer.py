"""runner=hf_trainer: transformers.Trainer as an ordinary train task (conf/arm/trainer.yaml): a
valid result labelled `trainer` from its own config, the Trainer's arguments, per-step records,
the same first loss as qlab's loop on the same batches from the same adapters, an OOM in the
Trainer's thread recorded as such, and `qlab report` tabling it beside qlab's recipe; Liger
(speed.liger) only through the Trainer, without the up-cast, on CUDA, reaching TrainingArguments."""

import importlib.util
import json

import pytest

from qlab import config, tasks
from qlab.results import frame, report, store

FIXED = ["data.pad_to=max_seq_len", "train.batch_size=4"]  # 4 x 128 = 512 positions per step


def run(compose, *overrides) -> dict:
    cfg = compose(*FIXED, *overrides)
    tasks.single(cfg)
    return json.loads((store.run_dir(cfg) / store.RESULT).read_text())


def test_trainer_runner_is_an_ordinary_train_task(compose, tmp_path):
    t = run(compose, "+arm=[nf4-dq,trainer]")
    recipe = run(compose, "+arm=[nf4-dq,recipe]")
    assert t["status"] == recipe["status"] == "ok" and t["kind"] == "train"
    assert t["config"]["train"]["runner"] == "hf_trainer" and t["axes"]["speed"] == "trainer"
    m = t["metrics"]
    assert m["runner"] == "transformers.Trainer" and m["optimizer_class"] == "PagedAdamW32bit"
    assert m["step_time_n"] == 5 and m["steps_completed"] == 6 and m["tokens_per_s_n"] == 5  # 1 warm-up step
    assert m["max_tokens_per_step"] == 4 * 128 and m["optimizer_state_bytes"] > 0 and m["rss_peak_bytes"] > 0
    args = m["trainer_args"]
    assert args["optim"] == "paged_adamw_32bit" and args["max_grad_norm"] == 0.3
    assert args["lr_scheduler_type"] == "constant"
    assert args["gradient_checkpointing"] and args["bf16"] is False  # autocast on; a CPU computes in float32
    assert args["use_liger_kernel"] is False
    assert m["trainable_params"] == recipe["metrics"]["trainable_params"] and m["eval_loss"] > 0
    adhoc = tmp_path / "results" / "adhoc"
    lines = [json.loads(x) for x in (adhoc / t["run_id"] / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(6)) and "step_time_s" in lines[-1] and "step_time_s" not in lines[0]
    # the same batches in the same order from the same initial adapters: the first losses agree
    first = json.loads((adhoc / recipe["run_id"] / "metrics.jsonl").read_text().splitlines()[0])
    assert lines[0]["loss"] == pytest.approx(first["loss"], rel=1e-4)
    runs = frame.load_runs(adhoc)
    assert runs.group.nunique() == 1 and sorted(runs.quant_label) == ["nf4+DQ", "nf4+DQ · trainer"]
    report.build(adhoc, wandb=False)
    speed_md = (adhoc / "report" / "tables" / "speed.md").read_text()
    assert "\n| trainer " in speed_md and "\n| recipe " in speed_md and "Baseline: trainer." in speed_md


def test_an_oom_in_the_trainers_loop_is_a_result(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_INJECT_FAULT", "oom@3")
    cfg = compose(*FIXED, "+arm=[nf4-dq,trainer]")
    assert tasks.single(cfg) == tasks.EXIT["oom"]
    r = json.loads((store.run_dir(cfg) / store.RESULT).read_text())
    assert r["status"] == "oom" and r["error"]["message"].startswith("injected")
    assert r["metrics"]["steps_completed"] == 3 and r["metrics"]["step_time_n"] == 2  # what ran is kept


def test_liger_without_cuda_is_refused_before_anything_loads(compose, tmp_path, caplog):
    """A training run asking for Liger's kernels on a machine without CUDA: exit 2, nothing written
    (in a comparison the same check is the arm's recorded failure: tests/tasks/test_compare.py)."""
    assert tasks.single(compose(*FIXED, "+arm=[nf4-dq,liger]")) == tasks.EXIT["invalid"]
    assert "invalid input, nothing was run: speed.liger: Liger Kernel's Triton kernels need a CUDA device" in caplog.text
    assert not list(tmp_path.rglob(store.RESULT))


@pytest.mark.parametrize("overrides, key, says", [
    (["+arm=recipe", "speed.liger=true"], "speed.liger", "train.runner=hf_trainer, not qlab"),
    (["+arm=trainer", "speed.liger=true"], "speed.liger", "speed.upcast_non_quantized=false"),
    (["+arm=trainer", "speed.upcast_non_quantized=false"], "train.runner", "with Liger without the up-cast"),
])
def test_liger_comes_only_through_the_trainer_without_the_upcast(compose, overrides, key, says):
    with pytest.raises(config.ConfigError, match=f"^{key}: .*{says}"):
        config.validate(compose(*overrides))


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_speed_liger_reaches_the_trainers_arguments(compose):
    """TrainingArguments(use_liger_kernel=True): the Trainer applies Liger's kernels when its loop
    starts, which without liger-kernel is transformers' own ImportError in the first step."""
    from qlab.run import data, hf_trainer, optim
    from qlab.tasks import train

    cfg = compose(*FIXED, "+arm=[nf4-dq,liger]")
    s = train.setup(cfg, data.read(cfg.data))  # train.prepare would refuse it here (no CUDA)
    opt, sched = optim.build(cfg.optim, list(s.model.parameters()), s.device)
    stepper = hf_trainer.Stepper(s.model, s.batches, opt, sched, cfg, s.device)
    try:
        assert stepper.args["use_liger_kernel"] is True and stepper.trainer.args.use_liger_kernel
        with pytest.raises(ImportError, match="liger"):
            stepper.warmup(1)
    finally:
        stepper.close()
