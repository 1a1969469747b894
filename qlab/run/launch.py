"""The one way qlab runs something in an isolated process: `python -m <module> <args>` in a fresh
interpreter, so memory peaks, the CUDA context and allocator state never carry into the next run.

A launched process dies with its launcher (no orphan races its own re-run) and is killed with its
process group at `timeout_s`. `run_isolated` recovers the result the run published, or records a
run that died without one as failed: a lost run is a result, never a silent gap.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from qlab.config import PROJECT_ROOT
from qlab.results import store

TIMED_OUT = 124  # the exit status of a process killed at its time limit, as timeout(1) reports it


def die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the launching process dies (Linux), then a
    process group of its own, so a time limit kills the run and everything it started."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass
    os.setpgrp()


def launch(args: list[str], log: Path, module: str = "qlab.run", env: dict | None = None,
           timeout_s: float | None = None) -> int:
    """`python -m module *args` from the project root, stdout and stderr into `log`; its exit
    status (TIMED_OUT when it ran past `timeout_s` and was killed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return TIMED_OUT


def run_isolated(cfg: DictConfig, overrides: list[str], log: Path, env: dict | None = None,
                 timeout_s: float | None = None) -> dict:
    """Run the single config `cfg` (composed from `overrides`) as `python -m qlab.run` and return
    the result it published (store.fresh_result); a process that published none is recorded
    as a failed run, with its exit status and log."""
    started = time.time()
    code = launch([*overrides, "hydra.mode=RUN"], log, env=env, timeout_s=timeout_s)
    result = store.fresh_result(cfg, since=started)
    if result is None:
        why = f"timed out after {timeout_s:.0f} s" if code == TIMED_OUT else f"exited with code {code}"
        result = store.asdict(store.record_lost_run(cfg, f"run process {why} without a result; its log: {log}"))
    return result
