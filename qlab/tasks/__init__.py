"""Tasks: what one run does with its config (`task=train|generate|compare|eval`), behind one contract.

A task is a module with two functions:
  prepare(cfg) -> inputs                   read and check what the run needs (data, an adapter)
                                           before anything heavy loads; bad input raises
                                           ConfigError / DataError: exit 2, nothing written
  run(cfg, inputs, recorder) -> Outcome    do the work, logging steps through the recorder
`execute` validates, prepares, records (store.RunRecorder: run id, staging, atomic publish,
result.json) and turns an exception into a failed or oom result; `single` maps that to the
exit code. Every task runs in its own process when launched by a sweep (qlab/run/launch.py).
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field

import psutil
from omegaconf import DictConfig

from qlab import config
from qlab.results import store
from qlab.run.data import DataError

log = logging.getLogger("qlab")
EXIT = {"ok": 0, "failed": 1, "invalid": 2, "oom": 3}
TASKS = {"train": "qlab.tasks.train", "generate": "qlab.tasks.generate", "compare": "qlab.tasks.compare",
         "eval": "qlab.tasks.eval"}


@dataclass
class Outcome:
    status: str  # ok | oom | failed
    metrics: dict = field(default_factory=dict)
    error: dict | None = None


def failure(e: BaseException, metrics: dict | None = None) -> Outcome:
    """An exception as a result: out of memory (torch's or the host's) is `oom`, with what was
    measured until then; anything else `failed`, with its traceback."""
    import torch  # lazy: `python -m qlab.run` rejects a bad config before torch loads

    oom = isinstance(e, (torch.OutOfMemoryError, MemoryError))
    return Outcome("oom" if oom else "failed", dict(metrics or {}), store.error_record(e, with_traceback=not oom))


def execute(cfg: DictConfig) -> store.Result:
    """Run one config in this process; its Result (also written to disk). Raises ConfigError /
    DataError, before anything is loaded, for bad input."""
    t_start = time.perf_counter()
    # process start -> here: interpreter, imports, Hydra compose (the fixed cost of isolation)
    startup_s = time.time() - psutil.Process().create_time()
    config.validate(cfg)
    task = importlib.import_module(TASKS[cfg.task])
    inputs = task.prepare(cfg)
    recorder = store.RunRecorder(cfg)
    recorder.start()
    log.info("run %s -> %s", recorder.id, recorder.final_dir)
    try:
        outcome = task.run(cfg, inputs, recorder)
    except Exception as e:
        outcome = failure(e)
    if outcome.error:
        log.error("run %s %s: %s: %s", recorder.id, outcome.status, outcome.error["type"], outcome.error["message"])
    metrics = {"startup_s": startup_s, **outcome.metrics, "wall_time_s": time.perf_counter() - t_start}
    return recorder.finish(outcome.status, metrics, outcome.error)


def single(cfg: DictConfig) -> int:
    """`execute`, its one-line summary, and its exit code (EXIT)."""
    try:
        result = execute(cfg)
    except (config.ConfigError, DataError) as e:
        log.error("invalid input, nothing was run: %s", e)
        return EXIT["invalid"]
    m = result.metrics
    log.info("status=%s weight=%.1f MiB tokens/s=%s eval_loss=%s -> %s", result.status,
             m.get("weight_bytes", 0) / 2**20, _fmt(m.get("tokens_per_s")), _fmt(m.get("eval_loss")), result.run_id)
    return EXIT[result.status]


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"
