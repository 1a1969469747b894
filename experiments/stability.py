"""How steady is this machine? The floor under every throughput CV qlab reports.

    python experiments/stability.py                     # on the GPU machine, before benchmarks
    python experiments/stability.py --quick --out /tmp/s   # CPU check

Three probes with no model, each a CV over repeated windows: `gemm` (the device), `launch` (the
host's launch path), `python` (the host core), plus NVML's view of the card before and after.
Writes <out>/<device slug>-stability.json and .md (docs/kernels.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlab.results import stats, store  # noqa: E402
from qlab.run import measure  # noqa: E402
from qlab.run.device import resolve_device  # noqa: E402


def nvml_state() -> dict | None:
    """The card as NVML sees it: a None result means no NVML (CPU machine)."""
    pynvml, h = measure.nvml_handle("cuda")  # the visible card, mapped to NVML's physical index
    if h is None:
        return None
    out = {}

    def get(key, fn):
        try:
            out[key] = fn()
        except Exception as e:  # some queries are not allowed in containers: say so
            out[key] = f"unavailable ({type(e).__name__})"

    mine = os.getpid()
    get("other_processes", lambda: [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid != mine])
    get("utilization_gpu_pct", lambda: pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
    get("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))
    get("sm_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM))
    get("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM))
    get("throttle_reasons", lambda: hex(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h)))
    get("temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
    get("power_w", lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1000)
    get("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000)
    get("memory_used_bytes", lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used)
    return out


def idle_utilization(seconds: float) -> list | None:
    """NVML utilization sampled while this process runs nothing: nonzero means a neighbour."""
    pynvml, h = measure.nvml_handle("cuda")
    if h is None:
        return None
    samples = []
    t_end = time.time() + seconds
    while time.time() < t_end:
        try:
            samples.append(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
        except Exception as e:  # not allowed in some containers: say so, as nvml_state does
            samples.append(f"unavailable ({type(e).__name__})")
        time.sleep(0.2)
    return samples


def gemm_windows(windows: int, gemms: int, n: int) -> list[float]:
    dev = resolve_device("auto")
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    clock = measure.StepClock(dev)  # CUDA events: the device's time, no host in the loop
    for _ in range(windows + 2):  # the first two warm the kernels and clocks, uncounted
        with clock:
            for _ in range(gemms):
                a @ b  # 2 x n^3 flop: 1.1 TFLOP at n = 8192
    return clock.times[2:]


def launch_windows(windows: int, launches: int) -> list[float]:
    dev = resolve_device("auto")
    x = torch.zeros(16, device=dev)
    out = []
    for w in range(windows + 2):
        measure.sync(dev)
        t0 = time.perf_counter()
        for _ in range(launches):  # a 7B QLoRA step launches ~10^4 kernels
            x.add_(1)
        measure.sync(dev)
        if w >= 2:
            out.append(time.perf_counter() - t0)
    return out


def python_windows(windows: int) -> list[float]:
    out = []
    for _ in range(windows):
        t0 = time.perf_counter()
        s = 0
        for i in range(100_000):
            s += i
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=30)
    p.add_argument("--gemms", type=int, default=20)
    p.add_argument("--launches", type=int, default=2000)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--quick", action="store_true", help="CPU check: 5 windows, small sizes")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "overhead")
    args = p.parse_args(argv)
    if args.quick:
        args.windows, args.gemms, args.launches, args.n = 5, 2, 200, 256
    before = nvml_state()
    idle = idle_utilization(2.0)
    probes = {"gemm": gemm_windows(args.windows, args.gemms, args.n),
              "launch": launch_windows(args.windows, args.launches),
              "python": python_windows(args.windows)}
    after = nvml_state()
    env = store.environment()
    summary = {name: {**stats.summarize(xs, "", "s"), "min_s": min(xs), "max_s": max(xs)}
               for name, xs in probes.items()}
    if torch.cuda.is_available():
        flops = 2 * args.n ** 3 * args.gemms
        summary["gemm"]["tflops_median"] = flops / summary["gemm"]["median_s"] / 1e12
    record = {"setup": vars(args) | {"out": str(args.out)}, "nvml_before": before, "nvml_after": after,
              "idle_utilization_pct": idle, "probes": summary, "windows_s": probes, "env": env,
              "git_commit": store.git_commit(), "finished_at": store.now()}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = store.device_slug(env)
    store.atomic_write_json(args.out / f"{slug}-stability.json", record)
    lines = [f"# Machine stability: {env['gpu'] or env['cpu']}", "",
             f"torch {env['torch']}, driver {env['driver']}, {env['cpu_count']} CPU cores; "
             f"{args.windows} windows per probe", "",
             "| probe | median per window | CV | min | max |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['median_s'] * 1e3:.2f} ms | {s['cv']:.2%} | {s['min_s'] * 1e3:.2f} ms | "
                     f"{s['max_s'] * 1e3:.2f} ms |")
    if before is not None:
        lines += ["", f"NVML before: {before}", f"NVML after: {after}", f"idle utilization (%): {idle}"]
    (args.out / f"{slug}-stability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
