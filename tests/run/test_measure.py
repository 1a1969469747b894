"""qlab/run/measure.py: the trackers a run's numbers come from (CPU paths here, CUDA paths on a GPU)."""

import time

import pytest
import torch

from qlab.run import measure

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_step_clock_on_cpu_times_each_step():
    clock = measure.StepClock("cpu")
    for seconds in (0.02, 0.05):
        with clock:
            time.sleep(seconds)
    assert len(clock.times) == 2
    assert clock.times[0] == pytest.approx(0.02, abs=0.015) and clock.times[1] == pytest.approx(0.05, abs=0.015)


def test_memory_window_on_cpu_sees_the_process_grow():
    with measure.MemoryWindow("cpu") as mem:
        block = bytearray(64 * 2**20)  # 64 MiB the sampler must see in the RSS
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
        time.sleep(0.1)
    assert mem.peaks["rss_peak_bytes"] >= 64 * 2**20
    assert "peak_allocated_bytes" not in mem.peaks  # no allocator on a CPU
    del block


def test_sampler_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("QLAB_SAMPLER_INTERVAL_MS", "0")
    assert measure.sampler_interval_s() == 0.0
    sampler = measure.PeakSampler("cpu")
    sampler.start()
    sampler.stop()  # with interval 0 the thread samples once and ends: stop() must not hang
    assert sampler.peak_rss > 0


def test_memory_breakdown_adds_up_to_the_peak():
    weights = {"quantized_weight_bytes": 100, "quant_state_bytes": 10, "unquantized_weight_bytes": 40}
    state = {"device": 16, "managed": 1000, "cpu": 0}
    parts = measure.memory_breakdown(weights, adapter_bytes=8, optimizer_state=state, logits_bytes=30,
                                     peak_allocated=300)
    # on the device: 100 + 10 + 40 weights, 8 adapters + 8 gradients, 16 state, 30 logits = 212;
    # the managed state is listed but lies outside torch's allocator
    assert parts["activations_bytes"] == 300 - 212
    assert parts["optimizer_state_managed_bytes"] == 1000 and parts["gradients_bytes"] == 8
    assert "activations_bytes" not in measure.memory_breakdown(weights, 8, state, 30, None)


@pytest.mark.gpu
@cuda
def test_step_clock_on_cuda_is_device_time_not_launch_time():
    clock = measure.StepClock("cuda")
    torch.cuda._sleep(1000)  # warm the path
    torch.cuda.synchronize()
    start = time.perf_counter()
    with clock:
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU spinning at ~2 GHz, queued in microseconds
    launched = time.perf_counter() - start
    assert launched < 0.05  # the host returned at once ...
    assert clock.times[0] > 2 * launched  # ... the clock measured the device's time


@pytest.mark.gpu
@cuda
def test_memory_window_on_cuda_resets_and_reads_the_peaks():
    held = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB before the window
    temp = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    del temp  # a peak from before the window must not count
    with measure.MemoryWindow("cuda") as mem:
        inside = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        del inside
    p = mem.peaks
    assert 320 * 2**20 <= p["peak_allocated_bytes"] < 768 * 2**20  # 256 held + 64 inside, not the 512
    assert p["peak_reserved_bytes"] >= p["peak_allocated_bytes"]
    if p["nvml_peak_device_used_bytes"] is not None:  # NVML sees the whole device: context included
        assert p["nvml_peak_device_used_bytes"] >= p["peak_allocated_bytes"]
    del held
