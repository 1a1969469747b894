"""A comparison's arm in a process of its own (qlab/tasks/arm_worker.py): a worker that dies, hangs or
runs out of memory is an ArmFailure and is gone after close; Unsloth's worker imports it before
transformers, offline, in its scratch directory (a stand-in module on a CPU); on a GPU with the
extras installed, the Liger and Unsloth arms set up and run blocks of steps."""

import importlib.util
import json
import os

import pytest
import torch

from qlab.tasks import arm_worker

TINY = ["data.eval_file=null", "data.max_seq_len=64", "train.batch_size=2"]


@pytest.mark.slow
@pytest.mark.parametrize("fault, status, kind", [("kill", "failed", "WorkerDied"), ("stall", "failed", "WorkerTimeout"),
                                                 ("oom", "oom", "OutOfMemoryError")])
def test_a_worker_that_dies_hangs_or_runs_out_of_memory_is_an_arm_failure(compose, tmp_path, monkeypatch, fault,
                                                                         status, kind):
    """A worker killed mid-step (as by the kernel's OOM killer), one silent past the time limit (killed
    then), one whose step runs out of memory (it answers, and closes)."""
    monkeypatch.setenv("QLAB_INJECT_FAULT", f"{fault}@1:x")  # the first step after one warm-up step
    monkeypatch.setattr(arm_worker, "WINDOW_TIMEOUT_S", 2)  # stall holds the step 30 s
    worker = arm_worker.ArmProcess("x", compose(*TINY), tmp_path)
    try:
        assert worker.started()["pid"] == worker.proc.pid
        assert worker.build(1, 0, timeout_s=600)["total_params"] > 0
        with pytest.raises(arm_worker.ArmFailure) as failed:
            worker.window(2)
        assert (failed.value.status, failed.value.error["type"]) == (status, kind)
        if fault == "kill":
            assert "killed by signal 9 during window" in failed.value.error["message"]
    finally:
        worker.close()
    assert worker.proc.returncode is not None and not worker.scratch.exists()


FAKE_UNSLOTH = '''
import json, os, sys
json.dump({"loaded": [m for m in ("torch", "transformers", "peft", "trl") if m in sys.modules], "cwd": os.getcwd(),
           "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "UNSLOTH_DISABLE_STATISTICS",
                                                  "UNSLOTH_DISABLE_CPU_FALLBACK", "UNSLOTH_COMPILE_LOCATION")}},
          open(os.environ["FAKE_UNSLOTH_OUT"], "w"))
raise ImportError("a stand-in for unsloth")
'''


def test_unsloth_is_imported_first_offline_in_a_scratch_directory(compose, tmp_path, monkeypatch):
    (tmp_path / "fake" / "unsloth").mkdir(parents=True)
    (tmp_path / "fake" / "unsloth" / "__init__.py").write_text(FAKE_UNSLOTH)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'fake'}:{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("FAKE_UNSLOTH_OUT", str(tmp_path / "seen.json"))
    worker = arm_worker.ArmProcess("u", compose(*TINY, "+arm=[nf4-dq,unsloth]", "adapter.dropout=0"), tmp_path)
    try:
        with pytest.raises(arm_worker.ArmFailure, match="ImportError: a stand-in for unsloth") as failed:
            worker.started()
        assert failed.value.status == "failed"
        seen = json.loads((tmp_path / "seen.json").read_text())
        assert seen["loaded"] == [] and seen["cwd"] == str(worker.scratch)  # before torch and transformers
        assert seen["env"]["HF_HUB_OFFLINE"] == seen["env"]["UNSLOTH_DISABLE_STATISTICS"] == "1"
        assert seen["env"]["UNSLOTH_DISABLE_CPU_FALLBACK"] == "1"
        assert seen["env"]["UNSLOTH_COMPILE_LOCATION"].startswith(str(worker.scratch))
    finally:
        worker.close()


# ---------------------------------------------------------------- the stacks themselves: a GPU with the extras

def stack(module: str):
    return [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            pytest.mark.skipif(importlib.util.find_spec(module) is None,
                               reason=f"{module} is not installed (pip install qlab[liger|unsloth], docs/speed.md)")]


@pytest.mark.parametrize("arm, version", [
    pytest.param(["+arm=[nf4-dq,liger]"], "liger_kernel_version", marks=stack("liger_kernel")),
    pytest.param(["+arm=[nf4-dq,unsloth]"], "unsloth_version", marks=stack("unsloth"))])
def test_the_public_stacks_run_blocks_of_steps_on_a_gpu(compose, tmp_path, arm, version):
    """small-llama, 2 x 512 tokens, dropout 0: set up, warmed up, profiled, two blocks of device-timed steps."""
    cfg = compose("model=small-llama", "train=gpu", "train.device=cuda", "data.eval_file=null", "data.max_seq_len=512",
                  "data.pad_to=max_seq_len", "train.batch_size=2", "adapter.dropout=0", *arm, fast=False)
    worker = arm_worker.ArmProcess("stack", cfg, tmp_path)
    try:
        assert worker.started()["imported_before_first"] == []
        info = worker.build(3, 1, timeout_s=600)
        assert info["device"].startswith("cuda") and info[version] and info["total_params"] > 0
        for _ in range(2):
            block = worker.window(3)
            assert len(block["step_time_s"]) == 3 and block["tokens"] == 3 * 2 * 512
            assert block["peak_allocated_bytes"] > 0
    finally:
        worker.close()
