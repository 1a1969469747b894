"""The measured training loop and the held-out evaluation.

Steps [0, warmup_steps) run unmeasured (allocator growth, kernel autotuning, lazy init);
peaks are reset and step times recorded from `warmup_steps` on. An out-of-memory error ends
the loop and is returned as status "oom" together with everything measured until then.
"""

from __future__ import annotations

import math
import os
import time
import traceback
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


def error_record(e: BaseException, with_traceback: bool = True) -> dict:
    msg = str(e).splitlines()[0] if str(e) else ""
    return {"type": type(e).__name__, "message": msg,
            "traceback": traceback.format_exc() if with_traceback else None}


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


class CheckpointProbe:
    """Counts forward calls inside the checkpointed decoder layers during one step: with
    gradient checkpointing really active each layer's body runs twice (forward, then again
    when backward recomputes it). The hook sits on each layer's first child, because newer
    transformers checkpoint `forward` and leave the layer's own hooks outside the replay."""

    def __init__(self, layers: list[torch.nn.Module]):
        self.calls = 0
        self.handles = [next(m.children()).register_forward_hook(self._hook) for m in layers]

    def _hook(self, *_):
        self.calls += 1

    def remove(self) -> int:
        for h in self.handles:
            h.remove()
        return self.calls


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


def train(model, data: Data, optimizer, scheduler, cfg, device: str,
          on_step: Callable[[dict], None] = lambda rec: None, run_id: str = "") -> TrainOutcome:
    tc, max_norm = cfg.train, cfg.optim.max_grad_norm
    if data.pack_tokens:  # a hub id's architecture is known only now
        check_packing(getattr(model.config, "model_type", None))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    batches = data.train_batches()
    clock = StepClock(device)
    tokens, real_tokens, targets, losses = [], [], [], []
    probe_layers = checkpointed_layers(model) if tc.gradient_checkpointing else []
    # compiled layers checkpoint inside their compiled code (speed.compile_layers): backward's
    # replay runs in the compiled graph, where no Python hook can count it
    compiled = [m for m in model.modules() if getattr(m, "qlab_checkpoint", False)]
    if tc.gradient_checkpointing and not (probe_layers or compiled):
        raise RuntimeError("train.gradient_checkpointing=true but no layer has checkpointing enabled")
    bar = tqdm(total=tc.steps, desc="train", disable=not tc.progress, dynamic_ncols=True)
    compute = speed.loss_fn(cfg.speed)
    dtype = compute_dtype(cfg.quant, device)

    def step_once(step: int) -> dict:
        batch = _to(next(batches), device)
        probe = CheckpointProbe(probe_layers) if step == 0 and probe_layers else None
        inject_fault(step, run_id)
        with speed.autocast(cfg.speed, device, dtype):
            loss = compute(model, batch)
        loss.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if probe is not None and (calls := probe.remove()) != 2 * len(probe_layers):
            raise RuntimeError(
                f"gradient checkpointing is not active: {len(probe_layers)} layers ran {calls} "
                f"times in one step (expected {2 * len(probe_layers)}: forward + recompute)"
            )
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        return {"step": step, "loss": losses[-1], "lr": scheduler.get_last_lr()[0], **batch_tokens(batch)}

    mem = MemoryWindow(device)
    prof = profiling.StepProfile(device, tc.profile_steps)
    first_profiled = tc.warmup_steps - tc.profile_steps  # the last warm-up steps
    status, error = "ok", None
    try:
        for step in range(first_profiled):
            on_step(step_once(step))
        with prof:
            for step in range(first_profiled, tc.warmup_steps):
                on_step(step_once(step))
        with mem:  # peaks and step times from here on: warm-up excluded
            for step in range(tc.warmup_steps, tc.steps):
                with clock:
                    rec = step_once(step)
                rec["step_time_s"] = clock.times[-1]
                tokens.append(rec["tokens"])
                real_tokens.append(rec["real_tokens"])
                targets.append(rec["target_tokens"])
                on_step(rec)
    except torch.OutOfMemoryError as e:  # an OOM is a result: keep what was measured
        status, error = "oom", error_record(e, with_traceback=False)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    except Exception as e:  # any other failure: recorded as failed, with the steps that ran
        status, error = "failed", error_record(e)
    finally:
        bar.close()
    metrics = dict(mem.peaks)
    metrics.update(throughput(clock.times[: len(tokens)], tokens, real_tokens, targets))
    metrics["steps_completed"] = len(losses)
    metrics.update(loss_summary(losses))
    metrics.update(prof.metrics())
    return TrainOutcome(status, metrics, error, losses, prof.report())


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
