"""qlab's training loop (runner=qlab), the bare loop a comparison measures it against
(runner=bare), and the driver every runner's train() shares.

A stepper runs steps on a persistent model and optimizer: `warmup(n)` unmeasured, `window(n)`
device-timed (measure.StepClock). `drive` is one run: warm-up steps unmeasured (the last
train.profile_steps profiled), then peaks reset and step times recorded. An out-of-memory error
ends the run as status "oom" with everything measured until then.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from qlab.run import profiling, speed
from qlab.config import check_packing
from qlab.run.data import IGNORE_INDEX, Data
from qlab.run.models import compute_dtype
from qlab.run.measure import NOISY_CV, MemoryWindow, StepClock
from qlab.results.stats import summarize
from qlab.results.store import error_record


class InjectedCrash(RuntimeError):
    """Raised on request (QLAB_INJECT_FAULT=crash) to test how failures are recorded."""


def inject_fault(step: int, run_id: str) -> None:
    """QLAB_INJECT_FAULT=oom|crash|kill|stall[@step][:text] makes step `step` (default 1) fail, in runs
    whose id contains `text` (default: every run). For tests of the harness's failure
    handling; unset in normal use."""
    spec = os.environ.get("QLAB_INJECT_FAULT")
    if not spec:
        return
    spec, _, match = spec.partition(":")
    if match not in run_id:
        return
    kind, _, at = spec.partition("@")
    if step != int(at or 1):
        return
    if kind == "oom":
        raise torch.OutOfMemoryError("injected out-of-memory (QLAB_INJECT_FAULT)")
    if kind == "kill":  # die at once without a result, as under the kernel's OOM killer
        os.kill(os.getpid(), 9)
    if kind == "stall":  # hold the run mid-step, e.g. to be killed there
        time.sleep(30)
        return
    raise InjectedCrash(f"injected crash (QLAB_INJECT_FAULT={spec})")


@dataclass
class TrainOutcome:
    status: str  # "ok" | "oom" | "failed"
    metrics: dict
    error: dict | None = None
    losses: list = field(default_factory=list)
    profile: str | None = None  # profile.txt's text (train.profile_steps > 0)


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def probe_layers(model: torch.nn.Module, cfg) -> list[torch.nn.Module]:
    """The layers whose recompute the first step checks (CheckpointProbe); raises when
    train.gradient_checkpointing asks for checkpointing and no layer has it. Compiled layers
    checkpoint inside their compiled code (speed.compile_layers), where no hook can count; Unsloth's
    layers call their norms' kernels on the weights, not the modules, and checkpoint themselves."""
    if not cfg.train.gradient_checkpointing or cfg.train.runner == "unsloth":
        return []
    layers = checkpointed_layers(model)
    if not layers and not any(getattr(m, "qlab_checkpoint", False) for m in model.modules()):
        raise RuntimeError("train.gradient_checkpointing=true but no layer has checkpointing enabled")
    return layers


class CheckpointProbe:
    """Counts forward calls inside the checkpointed decoder layers during one step: with
    gradient checkpointing really active each layer's body runs twice (forward, then again
    when backward recomputes it). The hook sits on each layer's first child, because newer
    transformers checkpoint `forward` and leave the layer's own hooks outside the replay."""

    def __init__(self, layers: list[torch.nn.Module]):
        self.calls = 0
        self.layers = len(layers)
        self.handles = [next(m.children()).register_forward_hook(self._hook) for m in layers]

    def _hook(self, *_):
        self.calls += 1

    def check(self) -> None:
        for h in self.handles:
            h.remove()
        if self.calls != 2 * self.layers:
            raise RuntimeError(f"gradient checkpointing is not active: {self.layers} layers ran {self.calls} "
                               f"times in one step (expected {2 * self.layers}: forward + recompute)")


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _target_tokens(labels: torch.Tensor) -> int:
    # the model predicts token t+1 from position t: the first label never counts
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def batch_tokens(batch: dict) -> dict:
    """What one batch holds: positions processed (padding included), real (unpadded) positions,
    supervised target tokens. A packed row (data.pack) has no attention_mask: all of it is real."""
    n = batch["input_ids"].numel()
    return {"tokens": n, "real_tokens": int(batch["attention_mask"].sum()) if "attention_mask" in batch else n,
            "target_tokens": _target_tokens(batch["labels"])}


def loss_summary(losses: list[float]) -> dict:
    """First and last step's loss, and the mean of the last 10% of steps (>= 1): less noisy
    than the last step alone."""
    if not losses:
        return {}
    tail = losses[-max(1, len(losses) // 10):]
    return {"train_loss_first": losses[0], "train_loss_final": losses[-1],
            "train_loss_tail_mean": sum(tail) / len(tail)}


class Stepper:
    """qlab's step: forward (speed.loss_fn under speed.autocast), backward, clip, optimizer and
    scheduler step, then the loss and token counts read and `on_step(record)`. runner=bare does the
    same step without the checkpoint probe or a per-step host sync: what qlab's loop costs is
    measured against it. `times`, `counts` and `losses` accumulate; `done` counts steps."""

    def __init__(self, model, data: Data, optimizer, scheduler, cfg, device: str,
                 on_step: Callable[[dict], None] | None = None, run_id: str = ""):
        if data.pack_tokens:  # a hub id's architecture is known only now
            check_packing(getattr(model.config, "model_type", None))
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.run_id = device, run_id
        self.bare = cfg.train.runner == "bare"
        self.on_step = on_step or (lambda rec: None)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = cfg.optim.max_grad_norm
        self.layers = probe_layers(model, cfg)
        self.batches = data.train_batches()
        self.compute, self.speed = speed.loss_fn(cfg.speed), cfg.speed
        self.dtype = compute_dtype(cfg.quant, device)
        self.clock = StepClock(device)
        self.counts: list[dict] = []
        self.losses: list[float] = []
        self.done = 0
        self.bar = tqdm(total=cfg.train.steps, desc="train", disable=not cfg.train.progress, dynamic_ncols=True)
        model.train()

    @property
    def times(self) -> list[float]:
        return self.clock.times

    def _step(self) -> dict:
        step = self.done
        batch = _to(next(self.batches), self.device)
        probe = CheckpointProbe(self.layers) if step == 0 and self.layers and not self.bare else None
        inject_fault(step, self.run_id)
        speed.begin_step(self.speed)
        with speed.autocast(self.speed, self.device, self.dtype):
            loss = self.compute(self.model, batch)
        loss.backward()
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.bare:
            self.done += 1
            self.last_loss = loss
            return {"step": step, "tokens": batch["input_ids"].numel()}
        if probe is not None:
            probe.check()
        self.losses.append(float(loss.detach()))
        self.done += 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.losses[-1]:.3f}")
        return {"step": step, "loss": self.losses[-1], "lr": self.scheduler.get_last_lr()[0], **batch_tokens(batch)}

    def warmup(self, n: int) -> None:
        for _ in range(n):
            self.on_step(self._step())

    def window(self, n: int) -> list[float]:
        """n device-timed steps; their seconds."""
        first = len(self.counts)
        for _ in range(n):
            with self.clock:
                rec = self._step()
            if not self.bare:  # reading the time waits for the step: the bare loop never waits
                rec["step_time_s"] = self.clock.times[-1]
            self.counts.append(rec)
            self.on_step(rec)
        if self.bare and n:
            self.losses.append(float(self.last_loss.detach()))
        return self.times[first:first + n]

    def close(self) -> None:
        self.bar.close()


def drive(stepper, cfg, device: str) -> TrainOutcome:
    """One run of `cfg.train.steps` steps through `stepper` (any runner's), measured."""
    tc = cfg.train
    mem = MemoryWindow(device)
    prof = profiling.StepProfile(device, tc.profile_steps)
    status, error = "ok", None
    try:
        stepper.warmup(tc.warmup_steps - tc.profile_steps)
        with prof:  # the last warm-up steps
            stepper.warmup(tc.profile_steps)
        with mem:  # peaks and step times from here on: warm-up excluded
            stepper.window(tc.steps - tc.warmup_steps)
    except torch.OutOfMemoryError as e:  # an OOM is a result: keep what was measured
        status, error = "oom", error_record(e, with_traceback=False)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    except Exception as e:  # any other failure: recorded as failed, with the steps that ran
        status, error = "failed", error_record(e)
    finally:
        stepper.close()
    counts = stepper.counts
    metrics = dict(mem.peaks)
    metrics.update(throughput(stepper.times[: len(counts)], *([c[k] for c in counts]
                                                              for k in ("tokens", "real_tokens", "target_tokens"))))
    metrics["steps_completed"] = stepper.done
    metrics.update(loss_summary(stepper.losses))
    metrics.update(prof.metrics())
    metrics.update(speed.compile_counts(cfg.speed))
    return TrainOutcome(status, metrics, error, stepper.losses, prof.report())


def train(model, data: Data, optimizer, scheduler, cfg, device: str,
          on_step: Callable[[dict], None] = lambda rec: None, run_id: str = "") -> TrainOutcome:
    return drive(Stepper(model, data, optimizer, scheduler, cfg, device, on_step, run_id), cfg, device)


def throughput(times: list[float], tokens: list[int], real: list[int], targets: list[int]) -> dict:
    """Per-step rates, summarized; e.g. 4 seq * 512 positions = 2,048 tokens per step."""
    if not times:
        return {}
    out = summarize(times, "step_time", "s")
    out.update(summarize([n / t for n, t in zip(tokens, times)], "tokens_per_s", "tok"))
    out["tokens_per_s_noisy"] = bool(out.get("tokens_per_s_cv") and out["tokens_per_s_cv"] > NOISY_CV)
    out["max_tokens_per_step"] = max(tokens)
    total_time = sum(times)
    out["tokens_per_s"] = sum(tokens) / total_time
    out["real_tokens_per_s"] = sum(real) / total_time
    out["target_tokens_per_s"] = sum(targets) / total_time
    return out

@torch.no_grad()
def evaluate(model, data: Data, cfg, device: str) -> dict:
    """Token-weighted mean loss over the held-out split (each target token counts once),
    computed the way training computes it (speed.loss, speed.adapter_autocast)."""
    if data.eval is None:
        return {}
    model.eval()
    compute, dtype = speed.loss_fn(cfg.speed), compute_dtype(cfg.quant, device)
    total, count = 0.0, 0
    for batch in data.eval_batches():
        batch = _to(batch, device)
        n = _target_tokens(batch["labels"])
        with speed.autocast(cfg.speed, device, dtype):
            total += float(compute(model, batch)) * n  # the loss is the mean over the n targets
        count += n
    model.train()
    loss = total / count
    return {"eval_loss": loss, "eval_perplexity": math.exp(loss), "eval_target_tokens": count}
