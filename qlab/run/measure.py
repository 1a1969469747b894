"""Trackers that watch a training loop without living in it.

`MemoryWindow` (a context manager) resets PyTorch's peak counters on entry and samples NVML's
device-used memory, which sees the CUDA context and paged optimizers' managed memory where torch's
counters do not, and the process RSS; on exit it records the peaks. `StepClock` times each step
with CUDA events on a GPU, so a step's time is its device time, not its launch time.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def nvml_handle(device: str):
    """(pynvml, the NVML handle of CUDA device `device`), or (None, None) without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        # NVML numbers GPUs physically; honour CUDA_VISIBLE_DEVICES when it lists indices
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible and all(v.strip().isdigit() for v in visible.split(",")):
            index = int(visible.split(",")[index])
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # NVML missing or unusable: device-level numbers are then absent
        return None, None


def sampler_interval_s() -> float:
    """The sampler's period: QLAB_SAMPLER_INTERVAL_MS (default 20 ms; 0 turns the thread off,
    leaving one sample at each end of the window: for measuring what the sampler itself costs)."""
    return float(os.environ.get("QLAB_SAMPLER_INTERVAL_MS", "20")) / 1000.0


class PeakSampler(threading.Thread):
    """Polls NVML device-used, this process's GPU memory and RSS every sampler_interval_s()."""

    def __init__(self, device: str):
        super().__init__(daemon=True)
        self.interval_s = sampler_interval_s()
        self.proc = psutil.Process()
        self.nvml, self.handle = nvml_handle(device) if device.startswith("cuda") else (None, None)
        self.peak_rss, self.peak_device_used, self.peak_process_gpu = 0, None, None
        self._halt = threading.Event()

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
        if self.handle is None:
            return
        used = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.peak_device_used = max(self.peak_device_used or 0, used)
        try:
            mine = [p.usedGpuMemory for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
                    if p.pid == self.proc.pid and p.usedGpuMemory is not None]
            if mine:
                self.peak_process_gpu = max(self.peak_process_gpu or 0, sum(mine))
        except Exception:  # containers often hide per-process accounting
            pass

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            if self.interval_s <= 0:
                return
            time.sleep(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


@dataclass
class MemoryWindow:
    """Peak memory over a block of steps; use as `with MemoryWindow(device) as mem:`. `poll=False`:
    NVML and RSS sampled when the window opens and closes only, no thread beside the steps (a
    comparison's blocks, whose process's NVML memory, its allocator's reserve, only grows)."""

    device: str
    poll: bool = True
    peaks: dict = field(default_factory=dict)

    def __enter__(self):
        self.cuda = self.device.startswith("cuda")
        if self.cuda:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sampler = PeakSampler(self.device)
        self.sampler.start() if self.poll else self.sampler.sample()
        return self

    def read(self) -> dict:
        """Peaks so far (also usable after an OOM, when __exit__ has not run yet)."""
        out = {"rss_peak_bytes": self.sampler.peak_rss}
        if self.cuda:
            stats = torch.cuda.memory_stats(self.device)
            out.update(
                peak_allocated_bytes=stats.get("allocated_bytes.all.peak", 0),
                peak_reserved_bytes=stats.get("reserved_bytes.all.peak", 0),
                peak_active_bytes=stats.get("active_bytes.all.peak", 0),
                nvml_peak_device_used_bytes=self.sampler.peak_device_used,
                nvml_peak_process_bytes=self.sampler.peak_process_gpu,
            )
        return out

    def __exit__(self, *exc):
        if self.cuda:
            sync(self.device)
        self.sampler.stop() if self.poll else self.sampler.sample()
        self.peaks = self.read()
        return False


class StepClock:
    """Time of each step: `with clock: step()` appends one entry to `times` (seconds). On CUDA,
    timing events around the step, read once its work has finished (device time, launch gaps
    included); on CPU, host time."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.device = device
        self._times: list[float] = []
        self._pending: list = []

    def __enter__(self):
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._start, end))
        else:
            self._times.append(time.perf_counter() - self._t0)
        return False

    @property
    def times(self) -> list[float]:
        for start, end in self._pending:
            end.synchronize()
            self._times.append(start.elapsed_time(end) / 1000.0)  # elapsed_time is in ms
        self._pending.clear()
        return self._times


NOISY_CV = 0.02  # a run whose per-step throughput varies more than 2% is flagged as noisy


def memory_breakdown(weights: dict, adapter_bytes: int, optimizer_state: dict, logits_bytes: int,
                     peak_allocated: int | None, gradient_bytes: int | None = None) -> dict:
    """Where the bytes at the peak went, in `<part>_bytes` keys: weights after the QLoRA preparation,
    adapters, gradients (`gradient_bytes` where they are not the adapters': full fine-tuning's), the
    optimizer state by location, the float32 logits of the largest batch (estimated), and
    `activations_bytes`: torch's peak allocated less every device-resident part (none on a CPU)."""
    parts = {"quantized_weights_bytes": weights["quantized_weight_bytes"],
             "quant_constants_bytes": weights["quant_state_bytes"],
             "unquantized_weights_bytes": weights["unquantized_weight_bytes"],
             "adapters_bytes": adapter_bytes,
             "gradients_bytes": adapter_bytes if gradient_bytes is None else gradient_bytes,
             **{f"optimizer_state_{where}_bytes": optimizer_state[where] for where in ("device", "managed", "cpu")},
             "logits_bytes": logits_bytes}
    if peak_allocated is not None:
        off_device = ("optimizer_state_managed_bytes", "optimizer_state_cpu_bytes")
        on_device = sum(v for k, v in parts.items() if k not in off_device)
        parts["activations_bytes"] = max(0, peak_allocated - on_device)
    return parts
