"""One arm of a comparison (task=compare) in a process of its own: set up, warmed up and profiled,
then driven one block of steps at a time by the comparison (qlab/tasks/compare.py).

Why a process per arm: Unsloth patches transformers' LLaMA when it is imported, and Liger (the
Trainer's use_liger_kernel) replaces module-level functions of transformers such as
apply_rotary_pos_emb; arms in one interpreter would run each other's kernels. A worker holds its
model on the same device as the others and runs only when asked, so no two arms ever run at once;
the comparison keeps the schedule and the statistics.

`python -m qlab.tasks.arm_worker <fd>`: requests and replies are pickled dicts over a socket pair;
the worker's stdout and stderr go to worker-<arm>.log beside the result.
  {"op": "start", "name", "cfg", "out", "first_imports"} -> {"pid", "imports_s", ...}   its imports
  {"op": "build", "warmup", "profile"} -> {"info": {...}}   set up, warm up, profile-<arm>.txt
  {"op": "window", "steps"} -> {"step_time_s", "tokens"[, "peak_allocated_bytes", "window_rise_bytes"]}
  {"op": "close"} -> {}                                     its stepper closed; the process ends
A reply is {"ok": True, ...} or {"ok": False, "status": "failed" | "oom", "error": {type, message,
traceback}}. The parent's handle (ArmProcess) raises ArmFailure for such a reply and for a worker
that died or did not answer in time: the comparison records it as that arm's failure.
"""

from __future__ import annotations

# The standard library only (`python -m` runs qlab.tasks' __init__ first, which imports neither torch
# nor transformers): a worker imports its runner's FIRST_IMPORTS (Unsloth) before qlab's modules
# bring in transformers.
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

# How long the parent waits for a reply before it kills the worker (a lost arm, not a lost comparison)
START_TIMEOUT_S = 600  # an interpreter and its imports: ~8 s for torch + transformers on 2 CPU cores, ~30 s for Unsloth
WINDOW_TIMEOUT_S = 300  # a block of steps: 3 x 0.2-0.7 s on an H200
CLOSE_TIMEOUT_S = 60
MUST_FOLLOW = ("transformers", "peft", "trl")  # what Unsloth wants imported after itself


class ArmFailure(Exception):
    """An arm that failed: its status (failed | oom) and error record (store.error_record's keys)."""

    def __init__(self, status: str, error: dict):
        super().__init__(f"{error['type']}: {error['message']}")
        self.status, self.error = status, error


# ------------------------------------------------------------------ the parent's side

class ArmProcess:
    """A worker process for arm `name` (its composed config `cfg`), started at once: its imports run
    while the parent starts the other arms. `out`: the run's directory (logs, profiles)."""

    def __init__(self, name: str, cfg, out: Path):
        from omegaconf import OmegaConf

        from qlab.config import PROJECT_ROOT
        from qlab.run import launch
        from qlab.tasks import train

        stack = train.runner(cfg)
        self.name, self.log = name, Path(out) / f"worker-{name}.log"
        # a scratch working directory: Unsloth writes generated sources into its working directory
        self.scratch = Path(tempfile.mkdtemp(prefix=f"qlab-arm-{name}-"))
        # PYTHONPATH: this checkout's qlab, whatever the scratch directory would find
        env = {**os.environ, **getattr(stack, "ENV", {}),
               "PYTHONPATH": os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))}
        if hasattr(stack, "SCRATCH_ENV"):
            env[stack.SCRATCH_ENV] = str(self.scratch / "compiled_cache")
        ours, theirs = socket.socketpair()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "qlab.tasks.arm_worker", str(theirs.fileno())],
                                         cwd=self.scratch, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         pass_fds=(theirs.fileno(),), preexec_fn=launch.die_with_parent)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.conn.send({"op": "start", "name": name, "cfg": OmegaConf.to_container(cfg, resolve=True),
                        "out": str(Path(out).resolve()), "first_imports": list(getattr(stack, "FIRST_IMPORTS", ()))})

    def started(self) -> dict:
        """Waits for the worker's imports: {"pid", "imports_s", "imported_before_first": [...]}."""
        return self._reply("start", START_TIMEOUT_S)

    def build(self, warmup: int, profile: int, timeout_s: float) -> dict:
        """Set up, warm up, profile; `timeout_s`: compare.setup_timeout_s (a 7B load ~10-20 s,
        adapters, a warm-up with compiling ~15-35 s on an H200)."""
        return self._reply("build", timeout_s, {"warmup": warmup, "profile": profile})["info"]

    def window(self, steps: int) -> dict:
        return self._reply("window", WINDOW_TIMEOUT_S, {"steps": steps})

    def _reply(self, op: str, timeout_s: float, request: dict | None = None) -> dict:
        """The worker's reply to `op` (sent first, with `request`, unless None: start's was sent)."""
        deadline = time.monotonic() + timeout_s
        try:
            if request is not None:
                self.conn.send({"op": op, **request})
            # poll returns as soon as the reply arrives; a dead worker's socket may stay open in a
            # child it left (a compile worker), so its exit is watched, not only the socket's end
            while not self.conn.poll(1.0):
                if self.proc.poll() is not None and not self.conn.poll(0):
                    raise EOFError
                if time.monotonic() > deadline:
                    self._kill()
                    raise ArmFailure("failed", self._error("WorkerTimeout", f"no reply to {op} in {timeout_s:.0f} s"))
            reply = self.conn.recv()
        except (EOFError, OSError):  # the process is gone: its exit status and its log's last line say why
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
                code = self.proc.wait()
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            raise ArmFailure("failed", self._error("WorkerDied", f"the arm's process {how} during {op}")) from None
        if not reply.pop("ok"):
            raise ArmFailure(reply["status"], reply["error"])
        return reply

    def _error(self, kind: str, message: str) -> dict:
        tail = b""
        if self.log.exists():
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                tail = f.read()
        lines = [x.strip() for x in tail.decode(errors="replace").splitlines() if x.strip()]
        last = f"; its log's last line: {lines[-1][:300]}" if lines else ""
        return {"type": kind, "message": f"{message} (log: {self.log.name}{last})", "traceback": None}

    def _kill(self) -> None:
        """The worker and its children: its own process group (launch.die_with_parent), while it
        has not been reaped (so its id cannot have passed to another process)."""
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Asks the worker to close its stepper and end; kills it if it does not. Never raises."""
        try:
            if self.proc.poll() is None:
                try:
                    self.conn.send({"op": "close"})
                    self.proc.wait(timeout=CLOSE_TIMEOUT_S)
                except (OSError, subprocess.TimeoutExpired):
                    self._kill()
                    self.proc.wait()
        finally:
            self.conn.close()
            shutil.rmtree(self.scratch, ignore_errors=True)


# ------------------------------------------------------------------ the worker's side

def _start(state: dict, msg: dict) -> dict:
    t0 = time.perf_counter()
    early = [m for m in MUST_FOLLOW if m in sys.modules]  # empty: the first imports came first
    for module in msg["first_imports"]:
        importlib.import_module(module)
    from omegaconf import OmegaConf

    from qlab.tasks import train

    cfg = OmegaConf.create(msg["cfg"])
    # what every set-up imports, here where the workers' imports overlap, not in the set-ups one
    # after another (~3 s an arm on 2 CPU cores): transformers' lazy modules, peft, bitsandbytes
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers

    train.runner(cfg)
    for name in ("AutoModelForCausalLM", "AutoTokenizer", "Trainer", "TrainingArguments"):
        getattr(transformers, name)
    OmegaConf.set_struct(cfg, True)  # a misspelt key raises, as on the composed config
    state.update(name=msg["name"], cfg=cfg, out=Path(msg["out"]))
    return {"pid": os.getpid(), "imports_s": time.perf_counter() - t0, "imported_before_first": early}


def _build(state: dict, msg: dict) -> dict:
    """The arm as a training run sets it up (its runner's own setup where it has one: Unsloth),
    then warm-up steps and profiled steps."""
    import gc

    import torch

    from qlab.results import store
    from qlab.run import data, optim, profiling, speed
    from qlab.tasks import train

    cfg, name = state["cfg"], state["name"]
    t0 = time.perf_counter()
    train.check_runner(cfg)
    stack = train.runner(cfg)
    s = getattr(stack, "setup", train.setup)(cfg, data.read(cfg.data))
    opt, sched = optim.build(cfg.optim, list(s.model.parameters()), s.device)
    # run_id = the arm's name: QLAB_INJECT_FAULT=crash@4:<arm> fails this arm only (tests)
    state["stepper"] = stepper = stack.Stepper(s.model, s.batches, opt, sched, cfg, s.device, run_id=name)
    state["device"] = s.device
    t1 = time.perf_counter()
    stepper.warmup(msg["warmup"])
    prof = profiling.StepProfile(s.device, msg["profile"])
    with prof:
        stepper.warmup(msg["profile"])
    if prof.report():
        (state["out"] / f"profile-{name}.txt").write_text(prof.report())
    m = s.metrics
    cuda = s.device.startswith("cuda")
    info = {"device": s.device, "gpu": torch.cuda.get_device_name(s.device) if cuda else None,
            "total_params": m["total_params"], "trainable_params": m.get("trainable_params"),
            "weight_bytes": m.get("weight_bytes"), "compiled_layers": m.get("compiled_layers"),
            # Unsloth sets expandable segments: its peaks are not under the other arms' allocator settings
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"),
            **{k: v for k, v in m.items() if k.endswith("_version")},
            "setup_s": t1 - t0, "warmup_s": time.perf_counter() - t1, **prof.metrics(),
            **speed.compile_counts(cfg.speed)}
    if cfg.speed.liger:
        info.update(store.versions_of("liger_kernel"))
    # the arm's Python objects live as long as the comparison: frozen, a full collection never
    # walks them inside a block (0.5 s with eight tiny arms in one process, docs/speed.md)
    gc.collect()
    gc.freeze()
    return {"info": info}


def _window(state: dict, msg: dict) -> dict:
    """A block of `steps` device-timed steps: their seconds and tokens, and on a GPU this process's
    torch peak over the block (its own allocator: the arm's own peak), how far it rose, and the
    process's GPU memory as NVML sees it (CUDA context and allocator reserve; None where NVML hides
    per-process accounting) at the block's ends: the reserve only grows, so the end is the block's most."""
    import torch

    from qlab.run.measure import MemoryWindow

    stepper, device, n = state["stepper"], state["device"], msg["steps"]
    cuda = device.startswith("cuda")
    with MemoryWindow(device, poll=False) as mem:
        base = torch.cuda.memory_allocated(device) if cuda else 0
        times = stepper.window(n)
    out = {"step_time_s": times, "tokens": sum(c["tokens"] for c in stepper.counts[-n:])}
    if cuda:
        top = mem.peaks["peak_allocated_bytes"]
        out.update(peak_allocated_bytes=top, window_rise_bytes=top - base,
                   nvml_peak_process_bytes=mem.peaks["nvml_peak_process_bytes"])
    return out


def _close(state: dict, msg: dict) -> dict:
    if "stepper" in state:
        state["stepper"].close()
    return {}


HANDLERS = {"start": _start, "build": _build, "window": _window, "close": _close}


def serve(conn: Connection) -> None:
    state: dict = {}  # the arm: its name, config, stepper, device
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the comparison has gone
            return
        try:
            reply = {"ok": True, **HANDLERS[msg["op"]](state, msg)}
        except (Exception, SystemExit) as e:  # the arm's failure, recorded by the comparison
            from qlab.tasks import failure

            outcome = failure(e)
            reply = {"ok": False, "status": outcome.status, "error": outcome.error}
            print(outcome.error.get("traceback") or f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        conn.send(reply)
        if msg["op"] == "close":
            return


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
