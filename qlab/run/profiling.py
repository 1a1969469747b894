"""A look inside the training step: torch.profiler over the last warm-up steps (train.profile_steps).

On a GPU: the kernels' device time per step by class (KERNEL_CLASSES), the kernels per step (each
a host launch, unless a CUDA graph replays it: `profile_kernel_launches_per_step` counts both), and
the rest of the wall time, in which no kernel runs (launch gaps, Python, host work). The profiled
steps are warm-up steps, measured by nothing else, so profiling never changes what a run measures
and is no part of its identity. Reading the numbers (profiler overhead included): docs/speed.md.
"""

from __future__ import annotations

import functools
import time

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from qlab.run.measure import sync

# first match wins, on the lower-cased kernel name; names as CUDA 12-13 / torch 2.x / bitsandbytes
# 0.4x-0.5x launch them (cuBLAS "nvjet"/"sm90_xmma" GEMMs, bnb "kDequantizeBlockwise", fused
# "triton_*" kernels of torch.compile, PyTorch's own elementwise and copy kernels)
KERNEL_CLASSES = (
    ("dequantize (bitsandbytes)", ("dequant",)),
    ("optimizer", ("optimizer", "adam")),
    ("compiled (triton)", ("triton",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),  # before gemm: "fmha_cutlass..."
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul")),
    ("copy / cast", ("copy", "cast", "convert")),
    ("reduction / norm / softmax", ("reduce", "norm", "softmax")),
    ("other elementwise", ("",)),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next(label for label, keys in KERNEL_CLASSES if any(k in low for k in keys))


class StepProfile:
    """`with StepProfile(device, n):` around n training steps; a no-op when n is 0. Afterwards
    `metrics()` (per-step numbers for result.json) and `report()` (profile.txt's text)."""

    def __init__(self, device: str, steps: int):
        self.device, self.steps = device, steps
        self.cuda = device.startswith("cuda")
        self.prof, self.wall_s = None, None

    def __enter__(self):
        if self.steps:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=activities)
            sync(self.device)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.prof is not None:
            sync(self.device)  # the steps' kernels have finished: wall time is device-complete
            self.wall_s = time.perf_counter() - self.t0
            self.prof.__exit__(*exc)
        return False

    @functools.cached_property
    def _averages(self):
        """The profiler's events grouped by name, grouped once for the metrics and the table."""
        return self.prof.key_averages()

    def metrics(self) -> dict:
        return {} if self.wall_s is None else dict(self._summary)

    @functools.cached_property
    def _summary(self) -> dict:
        n = self.steps
        out = {"profile_steps": n, "profile_wall_ms_per_step": 1e3 * self.wall_s / n}
        if not self.cuda:
            return out
        # (name, total device µs, launches) of every GPU kernel over the profiled steps. A range on
        # the GPU's timeline (torch.optim's "Optimizer.step#PagedAdamW32bit.step", a record_function)
        # is a user annotation spanning kernels, not a kernel: counted, it added the whole optimizer
        # step again (39 ms a step of the llama-7b fast step, whose optimizer kernels take 3 ms)
        kernels = [(e.key, e.self_device_time_total, e.count) for e in self._averages
                   if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        busy_ms = sum(us for _, us, _ in kernels) / 1e3 / n
        by_class: dict[str, float] = {}
        for name, us, _ in kernels:
            label = kernel_class(name)
            by_class[label] = by_class.get(label, 0.0) + us / 1e3 / n
        out.update(profile_kernel_ms_per_step=busy_ms,
                   profile_idle_ms_per_step=out["profile_wall_ms_per_step"] - busy_ms,
                   profile_kernel_launches_per_step=sum(c for *_, c in kernels) / n,
                   profile_kernel_ms_by_class=dict(sorted(by_class.items(), key=lambda kv: -kv[1])))
        return out

    def report(self, rows: int = 30) -> str | None:
        """The summary and the profiler's table of the top `rows` entries by self device time
        (self CPU time on a CPU), totals over all profiled steps."""
        if self.wall_s is None:
            return None
        m = self.metrics()
        lines = [f"torch.profiler over {self.steps} warm-up steps on {self.device}",
                 f"wall per step: {m['profile_wall_ms_per_step']:.1f} ms"]
        if self.cuda:
            lines += [f"GPU kernel time per step: {m['profile_kernel_ms_per_step']:.1f} ms "
                      f"({m['profile_kernel_launches_per_step']:.0f} kernels)",
                      f"GPU idle per step (launch gaps, Python, host): {m['profile_idle_ms_per_step']:.1f} ms",
                      "kernel time per step by class:"]
            lines += [f"  {label:28s} {ms:8.1f} ms" for label, ms in m["profile_kernel_ms_by_class"].items()]
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        lines += ["", self._averages.table(sort_by=sort, row_limit=rows, max_name_column_width=90)]
        return "\n".join(lines)
