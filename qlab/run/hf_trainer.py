"""runner=hf_trainer: transformers.Trainer as the training loop, measured as qlab's is (loop.drive).

Everything but the loop is the train task's: model, adapters and batches (tasks/train.setup), and
the optimizer and schedule (optim.build), handed over as `optimizers=(opt, sched)`, so only the
loop differs. The Trainer reads qlab's batches in order, unshuffled, and its bf16 (autocast)
follows speed.adapter_autocast. Its loop runs in a thread and waits at each step's start until the
driver asks for steps (warmup(n), window(n)); a step is timed from its start to the next one's, so
the Trainer's own per-step work counts.

speed.liger: the Trainer's own Liger Kernel switch, TrainingArguments(use_liger_kernel=True), which
patches the model's RMSNorm, RoPE, SwiGLU and cross-entropy with Triton kernels when train() starts.
Its RoPE replaces a module-level function of transformers: a comparison runs it in its own process.
"""

from __future__ import annotations

import importlib.util
import tempfile
import threading
from typing import Callable

import torch

from qlab.config import ConfigError
from qlab.results import store
from qlab.run import loop, models
from qlab.run.data import Data
from qlab.run.measure import StepClock


def check(cfg) -> None:
    """What the run asks of this machine, before anything loads: Liger's kernels are Triton's, for a
    CUDA device, from the liger-kernel package (pip install qlab[liger], docs/speed.md)."""
    if not cfg.speed.liger:
        return
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        raise ConfigError("speed.liger", "Liger Kernel's Triton kernels need a CUDA device; this run's is "
                                         f"train.device={cfg.train.device} with CUDA "
                                         f"{'available' if torch.cuda.is_available() else 'unavailable'}")
    missing = [m for m in ("liger_kernel", "triton") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError("speed.liger", f"{' and '.join(missing)} not installed: pip install qlab[liger] "
                                         "(docs/speed.md)")


def check_liger_model(model) -> None:
    """Liger patches nothing of an architecture it has no kernels for (it logs that and goes on, and
    the arm would be the plain Trainer under another name): a ConfigError instead. A liger-kernel
    that keeps its table of architectures elsewhere skips the check (the arm's profile shows Liger's
    kernels or their absence); one not installed is check()'s and the Trainer's to refuse."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError("speed.liger", f"Liger Kernel {store.package_version('liger-kernel')} has no "
                                         f"kernels for model_type={model_type}")


class _Stop(Exception):
    """Ends the Trainer's loop when the driver closes the stepper."""


class _Batches(torch.utils.data.IterableDataset):
    """qlab's training batches as they come (data.train_batches), each one's token counts noted."""

    def __init__(self, data: Data, fetched: list):
        self.data, self.fetched = data, fetched

    def __iter__(self):
        for batch in self.data.train_batches():
            self.fetched.append(loop.batch_tokens(batch))
            yield batch


class Stepper:
    """The Trainer driven in blocks of steps (loop.Stepper's interface: warmup, window, close;
    times, counts, losses, done)."""

    def __init__(self, model, data: Data, optimizer, scheduler, cfg, device: str,
                 on_step: Callable[[dict], None] | None = None, run_id: str = ""):
        from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

        tc, oc = cfg.train, cfg.optim
        if cfg.speed.liger:
            check_liger_model(model)
        self.on_step, self.run_id = on_step or (lambda rec: None), run_id
        self.layers = loop.probe_layers(model, cfg)
        self.clock = StepClock(device)
        self.counts: list[dict] = []
        self.losses: list[float] = []
        self.done = 0
        self.error: BaseException | None = None
        self._fetched: list[dict] = []  # batch_tokens of every batch the Trainer took, in order
        self._go, self._ready = threading.Semaphore(0), threading.Semaphore(0)
        self._measuring = self._timed = self._open = self._stop = False
        self._probe, self._thread = None, None
        bf16 = bool(cfg.speed.adapter_autocast) and models.compute_dtype(cfg.quant, device) == torch.bfloat16
        self.args = dict(
            per_device_train_batch_size=tc.batch_size, gradient_accumulation_steps=1, learning_rate=oc.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=oc.weight_decay, adam_beta1=oc.betas[0],
            adam_beta2=oc.betas[1], max_grad_norm=oc.max_grad_norm,
            optim=oc.name if oc.name != "adamw" else "adamw_torch",  # what optimizers= stands for
            gradient_checkpointing=tc.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
            bf16=bf16, use_cpu=not device.startswith("cuda"), seed=cfg.seed, logging_steps=1, save_strategy="no",
            report_to="none", dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=not tc.progress,
            use_liger_kernel=bool(cfg.speed.liger))
        stepper = self

        class Gate(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                stepper._begin()

            def on_step_end(self, args, state, control, **kw):
                if stepper._probe is not None:
                    stepper._probe.check()
                    stepper._probe = None
                stepper.done += 1

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    stepper.losses.append(float(logs["loss"]))

        class InOrder(Trainer):
            def get_train_dataloader(self):  # no sampler, no shuffling: qlab's batches as they are
                return torch.utils.data.DataLoader(_Batches(data, stepper._fetched), batch_size=None)

        self._out = tempfile.TemporaryDirectory()
        # stopped by the driver (close), never by max_steps
        targs = TrainingArguments(output_dir=self._out.name, max_steps=10**9, **self.args)
        self.trainer = InOrder(model=model, args=targs, callbacks=[Gate()], optimizers=(optimizer, scheduler))
        self.trainer.remove_callback(PrinterCallback)  # a printed dict per step; the loss is logged here
        self.scheduler = scheduler

    @property
    def times(self) -> list[float]:
        return self.clock.times

    def _begin(self) -> None:
        """In the Trainer's thread, at each step's start: end the previous step, wait for the
        driver, start this one."""
        if self._open:
            self._open = False
            if self._timed:
                self.clock.__exit__(None, None, None)
            step = self.done - 1
            rec = {"step": step, "loss": self.losses[-1] if self.losses else None,
                   "lr": self.scheduler.get_last_lr()[0], **self._fetched[step]}
            if self._timed:
                rec["step_time_s"] = self.clock.times[-1]
                self.counts.append(rec)
            self.on_step(rec)
            self._ready.release()
        self._go.acquire()
        if self._stop:
            raise _Stop
        loop.inject_fault(self.done, self.run_id)
        self._open, self._timed = True, self._measuring
        if self.done == 0 and self.layers:
            self._probe = loop.CheckpointProbe(self.layers)
        if self._timed:
            self.clock.__enter__()

    def _loop(self) -> None:
        try:
            self.trainer.train()
        except _Stop:
            pass
        except BaseException as e:  # the driver re-raises it (an OOM stays an OOM)
            self.error = e
        finally:
            self._ready.release()

    def _run(self, n: int, timed: bool) -> None:
        if n == 0:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hf-trainer", daemon=True)
            self._thread.start()
        self._measuring = timed
        self._go.release(n)
        for _ in range(n):
            self._ready.acquire()
            if self.error is not None:
                raise self.error

    def warmup(self, n: int) -> None:
        self._run(n, False)

    def window(self, n: int) -> list[float]:
        first = len(self.counts)
        self._run(n, True)
        return self.times[first:first + n]

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._stop = True
            self._go.release()
            self._thread.join()
        self._out.cleanup()


def train(model, data: Data, optimizer, scheduler, cfg, device: str,
          on_step: Callable[[dict], None] = lambda rec: None, run_id: str = "") -> loop.TrainOutcome:
    stepper = Stepper(model, data, optimizer, scheduler, cfg, device, on_step, run_id)
    outcome = loop.drive(stepper, cfg, device)
    outcome.metrics.update(runner="transformers.Trainer", trainer_args=stepper.args,
                           **(store.versions_of("liger_kernel") if cfg.speed.liger else {}))
    return outcome
