"""Sweeps through the real Hydra multirun, each point in its own `python -m qlab.run` process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import CHITCHAT, FAST, ROOT, SMOLLM2

# 4 quick steps per run; the eval split cut to a few samples
QUICK = [o for o in FAST if not o.startswith(("train.steps", "train.warmup_steps"))] + [
    "train.steps=4", "train.warmup_steps=1", "data.max_eval_samples=8", "train.save_adapter=false"]


def sweep_cmd(results, *overrides, experiment="default"):
    return [sys.executable, "-m", "qlab.run", f"experiment={experiment}", f"tracker.results_dir={results}",
            "tracker.sweep=t", *QUICK, *overrides]


def run_sweep(results, *overrides, env=None, **kw):
    proc = subprocess.run(sweep_cmd(results, *overrides, **kw), cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout + proc.stderr


def results_of(results):
    out = {}
    for path in (results / "t").glob("*/result.json"):
        out[path.parent.name] = json.loads(path.read_text())
    return out


def manifest(results):
    return json.loads((results / "t" / "sweep.json").read_text())


def test_grid_pruning_and_skip_on_resume(tmp_path):
    results = tmp_path / "results"
    # 2 quant x 2 DQ = 4 points; DQ on bf16 is meaningless -> pruned, not run, not failed
    code, out = run_sweep(results, "quant=bf16,nf4", "optim=adamw", "adapter=qv")
    assert code == 0, out
    assert "3 ok / 0 oom / 0 failed / 0 skipped / 1 pruned" in out
    done = results_of(results)
    assert sorted(r["axes"]["quant"] + ("-dq" if r["axes"]["double_quant"] else "") for r in done.values()) == \
        ["bf16", "nf4", "nf4-dq"]
    assert all(r["status"] == "ok" for r in done.values())
    m = manifest(results)
    assert m["points"] == 4 and m["grid"]["quant"] == ["bf16", "nf4"]
    assert sorted(r["outcome"] for r in m["runs"].values()) == ["ok", "ok", "ok", "pruned"]
    assert m["hardware"]["cpu_count"] and m["invocations"][0]["counts"]["pruned"] == 1
    mtimes = {p: p.stat().st_mtime for p in (results / "t").glob("*/result.json")}

    code, out = run_sweep(results, "quant=bf16,nf4", "optim=adamw", "adapter=qv")
    assert code == 0 and "0 ok / 0 oom / 0 failed / 3 skipped / 1 pruned" in out, out
    assert {p: p.stat().st_mtime for p in (results / "t").glob("*/result.json")} == mtimes

    code, out = run_sweep(results, "quant=bf16", "optim=adamw", "adapter=qv", "quant.double_quant=false", "force=true")
    assert code == 0 and "1 ok / 0 oom / 0 failed / 0 skipped / 0 pruned" in out, out


def test_default_grid_has_24_runs_per_seed(tmp_path):
    from hydra import compose, initialize_config_dir

    from qlab import config
    from qlab.run.sweep import grid_from

    config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=default"], return_hydra_config=True)
    grid = grid_from(cfg.hydra)
    assert grid == {"quant": ["bf16", "int8", "nf4", "fp4"], "quant.double_quant": ["False", "True"],
                    "optim": ["adamw", "paged_adamw_32bit"], "adapter": ["qv", "all_linear"]}  # seed: one value
    import itertools

    valid = [p for p in itertools.product(*grid.values()) if not (p[1] == "True" and p[0] in ("bf16", "int8"))]
    assert len(valid) == 24


def test_injected_oom_and_crash_are_recorded_and_the_sweep_goes_on(tmp_path):
    results = tmp_path / "results"
    grid = ["quant=nf4,fp4,int8", "quant.double_quant=false", "optim=adamw", "adapter=qv"]
    code, out = run_sweep(results, *grid, env={"QLAB_INJECT_FAULT": "oom@2:fp4"})
    assert code == 0, out  # an OOM is a result, not a failure
    assert "2 ok / 1 oom / 0 failed" in out
    code, out = run_sweep(results, *grid, "force=true", env={"QLAB_INJECT_FAULT": "crash@1:nf4"})
    assert code == 1, out  # a failure makes the sweep's exit status non-zero ...
    assert "2 ok / 0 oom / 1 failed" in out  # ... after every other point has run
    status = {r["axes"]["quant"]: r["status"] for r in results_of(results).values()}
    # the forced re-run of nf4 failed: its earlier complete result is kept, never replaced,
    # and the failed attempt waits in .staging with its error
    assert status == {"nf4": "ok", "fp4": "ok", "int8": "ok"}
    [failed] = (results / "t" / ".staging").glob("*nf4*/result.json")
    assert json.loads(failed.read_text())["error"]["type"] == "InjectedCrash"
    runs = manifest(results)["runs"]
    assert sorted(r["outcome"] for r in runs.values()) == ["failed", "ok", "ok"]
    # a run process killed outright (no result of its own) is recorded as failed by the sweep
    code, out = run_sweep(results, "quant=bf16", "optim=adamw", "adapter=qv", env={"QLAB_INJECT_FAULT": "kill@1"})
    assert code == 1 and "0 ok / 0 oom / 1 failed" in out, out
    [lost] = [r for r in results_of(results).values() if r["axes"]["quant"] == "bf16"]
    assert lost["status"] == "failed" and lost["error"]["type"] == "LostRun"
    assert "exited with code -9" in lost["error"]["message"]


def test_killed_sweep_resumes_to_completion_without_duplicates(tmp_path):
    results = tmp_path / "results"
    grid = ["quant=nf4,fp4,bf16", "quant.double_quant=false", "optim=adamw", "adapter=qv"]
    # slow every run down (a 30 s stall at step 2) so the kill lands mid-run
    proc = subprocess.Popen(sweep_cmd(results, *grid, "train.steps=6"), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "QLAB_INJECT_FAULT": "stall@2:fp4"})
    staging = results / "t" / ".staging"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until the first run is done and the second is running
        if len(results_of(results)) == 1 and staging.exists() and any(staging.glob("*fp4*/metrics.jsonl")):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the sweep never reached its second run")
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the whole sweep, child included
    proc.wait()
    done = results_of(results)
    assert len(done) == 1 and all(r["status"] == "ok" for r in done.values())  # nothing half-done looks complete
    assert not any("fp4" in name for name in done)

    code, out = run_sweep(results, *grid, "train.steps=6")
    assert code == 0 and "2 ok / 0 oom / 0 failed / 1 skipped" in out, out
    done = results_of(results)
    assert sorted(r["axes"]["quant"] for r in done.values()) == ["bf16", "fp4", "nf4"]
    assert all(r["status"] == "ok" for r in done.values())
    assert [p.name for p in staging.iterdir()] == []  # the killed attempt's debris was cleared


def test_local_parallel_launcher_gives_each_concurrent_run_its_own_gpu_slot(tmp_path):
    results = tmp_path / "results"
    code, out = run_sweep(results, "quant=nf4,fp4", "quant.double_quant=false", "optim=adamw", "adapter=qv",
                          "hydra/launcher=local_gpus", env={"QLAB_NUM_GPUS": "2"})
    assert code == 0 and "2 ok / 0 oom / 0 failed" in out, out
    done = list(results_of(results).values())
    assert sorted(r["env"]["cuda_visible_devices"] for r in done) == ["0", "1"]
    a, b = sorted(done, key=lambda r: r["started_at"])
    assert b["started_at"] < a["finished_at"]  # they ran at the same time
    assert all(r["metrics"]["startup_s"] > 0 for r in done)
    assert all(r["env"]["runs_per_gpu"] == 1 and r["env"]["gpu_slots"] == 2 for r in done)


def test_several_runs_share_one_gpu_with_qlab_runs_per_gpu(tmp_path):
    """QLAB_NUM_GPUS=1 QLAB_RUNS_PER_GPU=2: two slots on one "GPU", both runs at once on device 0,
    and each result says it shared its GPU."""
    results = tmp_path / "results"
    code, out = run_sweep(results, "quant=nf4,fp4", "quant.double_quant=false", "optim=adamw", "adapter=qv",
                          "hydra/launcher=local_gpus", env={"QLAB_NUM_GPUS": "1", "QLAB_RUNS_PER_GPU": "2"})
    assert code == 0 and "2 ok / 0 oom / 0 failed" in out, out
    done = list(results_of(results).values())
    assert [r["env"]["cuda_visible_devices"] for r in done] == ["0", "0"]
    a, b = sorted(done, key=lambda r: r["started_at"])
    assert b["started_at"] < a["finished_at"]  # two workers (n_jobs = 1 x 2), at the same time
    assert all(r["env"]["runs_per_gpu"] == 2 and r["env"]["gpu_slots"] == 2 for r in done)
    assert all(r["runs_per_gpu"] == 2 for r in manifest(results)["runs"].values())
    # the basic launcher runs one at a time: recorded as alone on the GPU, whatever the variable says
    code, out = run_sweep(results, "quant=bf16", "optim=adamw", "adapter=qv", "quant.double_quant=false",
                          env={"QLAB_NUM_GPUS": "1", "QLAB_RUNS_PER_GPU": "2"})
    assert code == 0, out
    [solo] = [r for r in results_of(results).values() if r["axes"]["quant"] == "bf16"]
    assert solo["env"]["runs_per_gpu"] == 1 and solo["env"]["gpu_slots"] is None


def test_gpu_slot_maps_slot_i_to_gpu_i_div_runs_per_gpu(tmp_path, monkeypatch):
    from contextlib import ExitStack

    from omegaconf import OmegaConf

    from qlab.run import sweep

    monkeypatch.setenv("QLAB_NUM_GPUS", "2")
    monkeypatch.setenv("QLAB_RUNS_PER_GPU", "3")
    assert sweep.gpu_slots() == 6
    assert OmegaConf.create({"n_jobs": "${qlab_gpu_slots:}"}).n_jobs == 6  # the launcher's n_jobs
    with ExitStack() as stack:  # six concurrent holders: round-robin over the GPUs, three on each
        gpus = [stack.enter_context(sweep.gpu_slot(str(tmp_path))) for _ in range(6)]
        assert gpus == [0, 1, 0, 1, 0, 1]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            f"qlab-gpu-{g}.slot{k}.lock" for g in (0, 1) for k in range(3))
    with sweep.gpu_slot(str(tmp_path)) as first:  # released: slot 0 (GPU 0) again
        assert first == 0
    monkeypatch.setenv("QLAB_RUNS_PER_GPU", "1")
    with sweep.gpu_slot(str(tmp_path)) as a, sweep.gpu_slot(str(tmp_path)) as b:
        assert (a, b) == (0, 1) and (tmp_path / "qlab-gpu-0.lock").exists()  # one lock per GPU, as before
    monkeypatch.delenv("QLAB_NUM_GPUS")
    monkeypatch.delenv("QLAB_RUNS_PER_GPU")
    assert sweep.gpu_slots() == 1
    with sweep.gpu_slot(str(tmp_path)) as none:
        assert none is None
    monkeypatch.setenv("QLAB_RUNS_PER_GPU", "0")
    with pytest.raises(ValueError, match="QLAB_RUNS_PER_GPU must be an integer >= 1"):
        sweep.runs_per_gpu()


@pytest.mark.slurm
def test_sweep_through_a_real_slurm(tmp_path):
    """Needs a running single-node SLURM (tests/slurm/slurm_up.sh up; .ci/run does it)."""
    import shutil

    if not shutil.which("sbatch") or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        if os.environ.get("QLAB_REQUIRE_SLURM"):
            pytest.fail("QLAB_REQUIRE_SLURM is set but no SLURM answers")
        pytest.skip("no SLURM here (tests/slurm/slurm_up.sh up starts one)")
    results = tmp_path / "results"
    code, out = run_sweep(results, "quant=nf4,fp4", "quant.double_quant=false", "optim=adamw", "adapter=qv",
                          "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug",
                          "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10")
    assert code == 0, out
    assert "2 ok / 0 oom / 0 failed" in out
    done = results_of(results)
    assert sorted(r["axes"]["quant"] for r in done.values()) == ["fp4", "nf4"]
    assert all(r["status"] == "ok" and r["env"]["slurm_job_id"] for r in done.values())
    assert len({r["env"]["slurm_job_id"] for r in done.values()}) == 2  # one SLURM job per point


def test_a_result_made_before_a_key_existed_still_counts_as_complete(compose):
    """Growing the schema changes every run id (the id hashes the whole config); a run made
    before `data.pack` existed is still this configuration while pack is off, and is found."""
    from omegaconf import OmegaConf

    from qlab.results import store

    cfg = compose("tracker.sweep=old")
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["data"]["pack"], old["data"]["pack_tokens"], old["speed"]  # the config as it was then
    old_dir = store.run_dir(cfg).parent / "tiny-llama_nf4_paged_adamw_32bit_all_linear_s0_0ld1d000"
    old_dir.mkdir(parents=True)
    result = {"run_id": old_dir.name, "status": "ok", "config": old}
    (old_dir / store.RESULT).write_text(json.dumps(result))
    assert store.run_dir(cfg).name != old_dir.name and store.complete_result(cfg) == old_dir
    assert store.complete_result(compose("tracker.sweep=old", "data.pack=true")) is None  # pack on: another run
    assert store.complete_result(compose("tracker.sweep=old", "speed=fast")) is None
    (old_dir / store.RESULT).write_text(json.dumps({**result, "status": "failed"}))
    assert store.complete_result(cfg) is None  # only complete results count


@pytest.mark.parametrize("experiment, arms, sweep, new", [
    ("foundation", {"nf4-dq": "nf4-dq", "fp4": "fp4", "int8": "int8", "bf16": "bf16"}, "foundation-gpu", []),
    ("numerics", {"recipe": "8f2303a1", "upcast_off": "c5fd3b3f", "autocast": "a844c3c9",
                  "compile_layers": "fd9105ab", "chunked_loss": "a72dde6b", "fast": "728fca5c", "seed1": "2e2a648a"},
     "numerics-base-gpu", ["packed"]),
])
def test_experiments_find_the_committed_results_complete(compose, experiment, arms, sweep, new):
    """The experiments that replaced experiments/foundation_gpu.sh and numerics.py compose the
    configurations those scripts ran: a resumed sweep skips the committed 7B and base-gpu runs
    (their ids predate keys the schema gained since: ADDED_KEYS at their neutral values). The
    packed arm's budget is now derived from the data (data.pack_budget): a new configuration."""
    from qlab.results import store

    def arm(name):
        return compose(f"experiment={experiment}", f"+arm={name}", f"tracker.results_dir={ROOT / 'results'}",
                       fast=False)

    for name, committed in arms.items():
        cfg = arm(name)
        found = store.complete_result(cfg)
        assert cfg.tracker.sweep == sweep and found is not None and committed in found.name, name
        assert store.run_dir(cfg) != found  # the id hashes the grown schema; the identity matches
    assert all(store.complete_result(arm(name)) is None for name in new)


REAL_ARMS = ["bf16-qv", "bf16-all-linear", "nf4-dq-qv", "nf4-dq-all-linear", "fp4-qv", "fp4-all-linear", "full-ft"]


def test_real_experiment_is_35_runs_on_equal_tokens():
    """experiment=real: 16-bit LoRA, NF4+DQ and FP4 on q/v and all linear layers, and 16-bit full
    fine-tuning, x 5 seeds, each a valid, distinct run; every arm the same positions per step and
    steps, at LoRA's lr but full fine-tuning's own."""
    import itertools

    from hydra import compose, initialize_config_dir

    from qlab import config
    from qlab.results import store
    from qlab.run.sweep import grid_from

    config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        grid = grid_from(compose("config", overrides=["experiment=real"], return_hydra_config=True).hydra)
    assert grid == {"+arm": REAL_ARMS, "seed": ["0", "1", "2", "3", "4"]}
    runs = {}
    for arm, seed in itertools.product(*grid.values()):
        cfg = config.compose(["experiment=real", f"+arm={arm}", f"seed={seed}"])
        config.validate(cfg)
        runs[store.run_id(cfg)] = cfg
    assert len(runs) == 35
    settings = {(c.quant.type, c.quant.double_quant, c.adapter.targets, c.optim.lr) for c in runs.values()}
    assert settings == {(q, dq, t, 2e-4) for q, dq in (("bf16", False), ("nf4", True), ("fp4", False))
                        for t in ("qv", "all_linear")} | {("bf16", False, "full", 2e-5)}
    shape = {(c.train.steps, c.train.batch_size, c.data.max_seq_len, c.data.pad_to, c.optim.name, c.adapter.r,
              c.model.gguf, c.data.source, c.train.device, c.tracker.sweep) for c in runs.values()}
    assert shape == {(150, 8, 512, "max_seq_len", "paged_adamw_32bit", 64, "smollm2-135m", "chitchat", "cuda",
                      "real-smollm2-135m")}


@pytest.mark.slow
@SMOLLM2
@CHITCHAT
def test_real_cpu_runs_smollm2_end_to_end(tmp_path):
    """experiment=real-cpu, two arms: QLoRA and full fine-tuning of SmolLM2 on chitchat, a few
    steps on the CPU, through the sweep's isolated runs (~1 min each on 2 cores)."""
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "qlab.run", "experiment=real-cpu", f"tracker.results_dir={results}",
                           "+arm=nf4-dq-all-linear,full-ft", "seed=0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "2 ok / 0 oom / 0 failed" in out, out[-3000:]
    done = {r["axes"]["adapter"]: (p, r) for p in (results / "real-smollm2-135m-cpu").glob("*/result.json")
            for r in [json.loads(p.read_text())]}
    assert set(done) == {"all_linear", "full"}
    for path, r in done.values():
        m = r["metrics"]
        assert m["model_source"].startswith("gguf: dequantized from a 4-bit GGUF, SmolLM2-135M-Instruct.Q4_1.gguf")
        assert m["eval_target_tokens"] > 0 and m["eval_loss"] < 8  # ln(49,152) = 10.8: a language model
        assert m["data_train_samples"] > 3_000 and m["steps_completed"] == 3
    assert done["all_linear"][1]["axes"]["quant"] == "nf4" and done["all_linear"][1]["axes"]["double_quant"]
    assert (done["all_linear"][0].parent / "adapter" / "adapter_config.json").is_file()
    full = done["full"][1]["metrics"]
    assert full["trainable_params"] == full["total_params"] == 134_515_008
    assert (done["full"][0].parent / "model" / "model.safetensors").is_file()
