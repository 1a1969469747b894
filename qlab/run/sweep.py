"""Sweeps: a Hydra multirun where every grid point is one isolated, resumable run.

`run_point` prunes meaningless points, skips complete ones (unless force=true) and runs the rest
through the one launcher, each in a fresh process (one that dies is recorded as failed; the sweep
goes on). `ManifestCallback` keeps results/<sweep>/sweep.json: grid, hardware, invocations, statuses.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qlab import config as qconfig
from qlab.results import store
from qlab.run import launch

log = logging.getLogger(__name__)
INVOCATION_ENV = "QLAB_SWEEP_INVOCATION"
MANIFEST = "sweep.json"
HARDWARE = ("gpu", "gpu_count", "driver", "cpu", "cpu_count", "cuda", "torch", "transformers", "peft", "bitsandbytes",
            "python")  # what the manifest records of store.environment()
_progress = None  # a tqdm bar, when the launcher runs the points in this process


def sweep_root(cfg: DictConfig) -> Path:
    return Path(cfg.tracker.results_dir) / cfg.tracker.sweep


@contextmanager
def _manifest(root: Path):
    """Read-modify-write sweep.json under an exclusive lock (runs may finish concurrently)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".sweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = root / MANIFEST
        data = json.loads(path.read_text()) if path.exists() else {"invocations": [], "runs": {}}
        yield data
        store.atomic_write_json(path, data)


def grid_from(hydra_cfg: DictConfig) -> dict[str, list[str]]:
    """The swept parameters and their values, from sweeper params and command-line overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    raw = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items()]
    raw += list(hydra_cfg.overrides.task)
    grid = {}
    for o in OverridesParser.create().parse_overrides(raw):
        if o.is_sweep_override():
            grid[o.get_key_element()] = [str(v) for v in o.sweep_string_iterator()]
        elif o.get_key_element() in grid:
            grid.pop(o.get_key_element())  # a plain override replaces a swept param
    return grid


class ManifestCallback(Callback):
    """Hydra callback (conf/config.yaml: hydra.callbacks.manifest)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        global _progress
        invocation = uuid.uuid4().hex[:12]
        os.environ[INVOCATION_ENV] = invocation
        grid = grid_from(config.hydra)
        total = math.prod(len(values) for values in grid.values())
        with _manifest(sweep_root(config)) as m:
            m.update(sweep=config.tracker.sweep, grid=grid, points=total, experiment=config.get("experiment"))
            env = store.environment()
            m["hardware"] = {k: env.get(k) for k in HARDWARE}
            m["invocations"].append({"id": invocation, "started_at": store.now(), "argv": sys.argv})
        log.info("sweep %s: %d grid points %s -> %s", config.tracker.sweep, total, grid, sweep_root(config))
        if config.hydra.launcher._target_.endswith("BasicLauncher"):
            from tqdm import tqdm

            _progress = tqdm(total=total, desc="sweep", unit="run", dynamic_ncols=True)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        invocation = os.environ.get(INVOCATION_ENV)
        with _manifest(sweep_root(config)) as m:
            counts = {s: 0 for s in ("ok", "oom", "failed", "skipped", "pruned")}
            for run in m["runs"].values():
                if run.get("invocation") == invocation:
                    counts[run["outcome"]] = counts.get(run["outcome"], 0) + 1
            next(i for i in m["invocations"] if i["id"] == invocation).update(finished_at=store.now(), counts=counts)
        if _progress is not None:
            _progress.close()
        summary = " / ".join(f"{v} {k}" for k, v in counts.items())
        log.info("sweep %s done: %s (manifest: %s)", config.tracker.sweep, summary, sweep_root(config) / MANIFEST)
        if counts["failed"]:
            raise SystemExit(1)


def runs_per_gpu() -> int:
    """QLAB_RUNS_PER_GPU (default 1): how many runs share one GPU at a time under a parallel
    launcher (small runs, like the 34 M base's, leave a GPU mostly idle one at a time)."""
    raw = os.environ.get("QLAB_RUNS_PER_GPU", "1")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"QLAB_RUNS_PER_GPU must be an integer >= 1, got {raw!r}")
    return int(raw)


def gpu_slots() -> int:
    """Concurrent runs of the local_gpus launcher (its joblib n_jobs):
    QLAB_NUM_GPUS x QLAB_RUNS_PER_GPU, e.g. 1 GPU x 6 runs = 6 at a time; 1 when unset."""
    return max(int(os.environ.get("QLAB_NUM_GPUS", "0")), 1) * runs_per_gpu()


# conf/hydra/launcher/local_gpus.yaml: n_jobs: ${qlab_gpu_slots:} (resolved when the launcher
# starts; this module is imported before that, by the manifest callback of conf/config.yaml)
if not OmegaConf.has_resolver("qlab_gpu_slots"):
    OmegaConf.register_new_resolver("qlab_gpu_slots", gpu_slots)


@contextmanager
def gpu_slot(lock_dir: str = "/tmp"):
    """With QLAB_NUM_GPUS=N, each concurrent run holds one of N x QLAB_RUNS_PER_GPU (= R) slots, a
    lock file each; slot i is GPU i // R. Free slots are tried round-robin over GPUs, so N runs or
    fewer get a GPU each. Yields the GPU index, or None without QLAB_NUM_GPUS."""
    n = int(os.environ.get("QLAB_NUM_GPUS", "0"))
    if n <= 0:
        yield None
        return
    per = runs_per_gpu()
    order = [g * per + k for k in range(per) for g in range(n)]
    while True:
        for i in order:
            gpu = i // per
            # R = 1 keeps the one-lock-per-GPU name; otherwise a lock per (GPU, place on it)
            name = f"qlab-gpu-{gpu}.lock" if per == 1 else f"qlab-gpu-{gpu}.slot{i % per}.lock"
            f = open(os.path.join(lock_dir, name), "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield gpu
            finally:
                f.close()
            return
        time.sleep(1)


def _record(cfg: DictConfig, run_id: str, **entry) -> None:
    with _manifest(sweep_root(cfg)) as m:
        m["runs"][run_id] = {**m["runs"].get(run_id, {}), **entry, "invocation": os.environ.get(INVOCATION_ENV)}


def _describe(cfg: DictConfig) -> str:
    return (f"{cfg.model.name} {qconfig.quant_label(cfg.quant)} {cfg.optim.name} {qconfig.adapter_label(cfg.adapter)} "
            f"seed={cfg.seed}")


def run_point(cfg: DictConfig) -> str:
    """Run (or prune / skip) one grid point; returns its outcome."""
    num = HydraConfig.get().job.num
    overrides = list(HydraConfig.get().overrides.task)
    try:
        qconfig.validate(cfg)
    except qconfig.PrunedCombination as e:
        log.info("[%d] pruned %s: %s", num, overrides, e)
        _record(cfg, f"pruned:{','.join(sorted(overrides))}", outcome="pruned", overrides=overrides, reason=str(e))
        return _done("pruned")
    except qconfig.ConfigError as e:
        log.error("[%d] invalid %s: %s", num, overrides, e)
        _record(cfg, f"invalid:{','.join(sorted(overrides))}", outcome="failed", overrides=overrides, reason=str(e))
        return _done("failed")
    rid, final = store.run_id(cfg), store.run_dir(cfg)
    done = None if cfg.force else store.complete_result(cfg)
    if done is not None:  # this run's directory, or an equivalent one made before a key was added
        status = store.read_result(done)["status"]
        log.info("[%d] skip %s: complete (%s)%s", num, _describe(cfg), status,
                 "" if done == final else f" as {done.name}")
        _record(cfg, rid, outcome="skipped", status=status, overrides=overrides, result=str(done / store.RESULT))
        return _done("skipped")

    log.info("[%d] start %s", num, _describe(cfg))
    _record(cfg, rid, outcome="running", overrides=overrides, started_at=store.now())
    t0 = time.perf_counter()
    with gpu_slot() as slot:
        env = dict(os.environ)
        # how many runs shared this run's GPU: QLAB_RUNS_PER_GPU under the parallel local launcher,
        # else 1 (the basic launcher and SLURM run one at a time per GPU)
        shared = slot is not None and _parallel_launcher()
        concurrency = {"runs_per_gpu": runs_per_gpu() if shared else 1, "gpu_slots": gpu_slots() if shared else None}
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        env[store.CONCURRENCY_ENV] = json.dumps(concurrency)  # the run records it (store.environment)
        result = launch.run_isolated(cfg, overrides, sweep_root(cfg) / ".logs" / f"{rid}.log", env=env)
    seconds = time.perf_counter() - t0
    status, m = result["status"], result["metrics"]
    peak, _ = store.peak_bytes(m)
    log.info("[%d] end %s: %s, peak %s, %s tokens/s, %.0f s (process, imports and load included)", num,
             _describe(cfg), status, f"{peak / 2**30:.2f} GiB" if peak else "n/a",
             f"{m['tokens_per_s']:.0f}" if m.get("tokens_per_s") else "n/a", seconds)
    _record(cfg, rid, outcome=status, status=status, finished_at=store.now(), process_s=seconds,
            result=str(final / store.RESULT), peak_bytes=peak, tokens_per_s=m.get("tokens_per_s"),
            runs_per_gpu=concurrency["runs_per_gpu"])
    return _done(status)


def _parallel_launcher() -> bool:
    """Whether this point runs under a launcher that runs points side by side in one machine
    (Hydra's joblib launcher: conf/hydra/launcher/local_gpus.yaml)."""
    try:
        return "joblib" in str(HydraConfig.get().launcher.get("_target_", "")).lower()
    except ValueError:  # no Hydra config: called outside a multirun
        return False


def _done(outcome: str) -> str:
    if _progress is not None:
        _progress.update(1)
        _progress.set_postfix_str(outcome)
    return outcome
