"""Optimizers of the ablation and their constant-with-warm-up schedule.

  adamw              torch.optim.AdamW: two float32 states per parameter, 8 bytes/param, on device
  adamw_8bit         bnb AdamW8bit: two blockwise-quantized 8-bit states, ~2 bytes/param, on device
  paged_adamw_32bit  bnb PagedAdamW32bit: 8 bytes/param in CUDA managed (unified) memory
  paged_adamw_8bit   bnb PagedAdamW8bit: ~2 bytes/param in managed memory

Paged state lives outside PyTorch's allocator, so torch's memory counters never see it; on a
CPU bitsandbytes falls back to ordinary (non-paged) state and says so.
"""

from __future__ import annotations

import math

import torch

# bitsandbytes keeps tensors smaller than this in 32-bit state even for 8-bit optimizers
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256  # 8-bit state: one float32 absmax per 256 values


def state_bytes(name: str, params: list[torch.Tensor]) -> int:
    """Bytes of Adam's two moment buffers for these parameters (an estimate made before the
    optimizer exists, exact for the 32-bit types)."""
    total = 0
    for p in params:
        n = p.numel()
        if name.endswith("8bit") and n >= BNB_MIN_8BIT_SIZE:
            # per moment: 1 byte/value + a float32 absmax per block + its 256-entry float32 map
            total += 2 * (n + 4 * math.ceil(n / BNB_BLOCK) + 4 * 256)
        else:
            total += 2 * 4 * n  # exp_avg + exp_avg_sq in float32
    return total


def state_location(name: str, device: str) -> str:
    if name.startswith("paged") and device.startswith("cuda"):
        return "managed"
    return "device" if device.startswith("cuda") else "cpu"


class ManagedMemoryRefused(RuntimeError):
    pass


def guard_managed_memory(name: str, params: list[torch.Tensor], device: str) -> None:
    """Refuse to create a paged optimizer whose state would not fit in 90% of the device memory
    free right now: oversubscribing CUDA managed memory can hang the whole GPU, not only this run."""
    if state_location(name, device) != "managed":
        return
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    need = state_bytes(name, params)
    if need > 0.9 * free:
        raise ManagedMemoryRefused(f"optim.name={name}: paged state needs {need / 2**30:.2f} GiB of managed memory "
                                   f"but only {free / 2**30:.2f} GiB of device memory is free (limit 90% of free); "
                                   "refusing")


def build(optim_cfg, params: list[torch.Tensor], device: str):
    """Return (optimizer, scheduler)."""
    params = [p for p in params if p.requires_grad]
    kw = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay)
    if optim_cfg.name == "adamw":
        opt = torch.optim.AdamW(params, **kw)
    else:
        import bitsandbytes as bnb

        guard_managed_memory(optim_cfg.name, params, device)
        cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
               "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[optim_cfg.name]
        opt = cls(params, **kw)
    warmup = optim_cfg.lr_warmup_steps
    # constant lr after a linear ramp over `warmup` steps: factor (step+1)/warmup, capped at 1
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    return opt, sched


def measured_state_bytes(opt: torch.optim.Optimizer) -> dict:
    """Bytes actually held in the optimizer's state tensors (after at least one step), by
    where they live: `managed` (bitsandbytes paged tensors: CUDA unified memory, invisible
    to torch's allocator counters), `device` (ordinary CUDA tensors) or `cpu`."""
    where = {"device": 0, "managed": 0, "cpu": 0}
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                loc = "managed" if getattr(v, "is_paged", False) else ("device" if v.is_cuda else "cpu")
                where[loc] += v.numel() * v.element_size()
    return where
