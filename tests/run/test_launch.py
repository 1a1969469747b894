"""qlab/run/launch.py: one config in a fresh process, its result recovered or its loss recorded."""

import os

from qlab.results import store
from qlab.run import launch


def test_launch_returns_the_exit_status_and_keeps_the_output(tmp_path):
    log = tmp_path / "logs" / "x.log"
    assert launch.launch([str(tmp_path / "missing.json")], log, module="json.tool") == 2
    assert "No such file" in log.read_text()
    assert launch.launch(["-n", "1", "pass"], log, module="timeit") == 0
    assert "loop" in log.read_text()


def test_a_process_past_its_time_limit_is_killed(tmp_path):
    code = launch.launch(["-n", "1", "import time; time.sleep(30)"], tmp_path / "slow.log", module="timeit",
                         timeout_s=1)
    assert code == launch.TIMED_OUT


def test_run_isolated_returns_the_result_the_run_published(compose, tmp_path):
    overrides = [f"tracker.results_dir={tmp_path / 'results'}", "train.progress=false", "train.device=cpu",
                 "adapter.r=8", "train.steps=3", "train.warmup_steps=1", "data.max_eval_samples=8",
                 "data.max_seq_len=64", "train.save_adapter=false"]
    cfg = compose(*overrides[1:])
    result = launch.run_isolated(cfg, overrides, tmp_path / "ok.log")
    assert result["status"] == "ok" and result["run_id"] == store.run_id(cfg)
    assert result["metrics"]["steps_completed"] == 3


def test_a_run_that_dies_without_a_result_is_recorded_as_failed(compose, tmp_path):
    overrides = [f"tracker.results_dir={tmp_path / 'results'}", "train.progress=false", "train.device=cpu",
                 "adapter.r=8", "train.steps=3", "train.warmup_steps=1", "data.max_seq_len=64"]
    cfg = compose(*overrides[1:])
    env = {**os.environ, "QLAB_INJECT_FAULT": "kill@1"}  # SIGKILL at step 1, as the kernel's OOM killer does
    result = launch.run_isolated(cfg, overrides, tmp_path / "killed.log", env=env)
    assert result["status"] == "failed" and result["error"]["type"] == "LostRun"
    assert "exited with code -9" in result["error"]["message"]
    assert store.read_result(store.run_dir(cfg))["status"] == "failed"  # recorded, not lost
