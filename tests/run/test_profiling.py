"""train.profile_steps: torch.profiler over the last warm-up steps, leaving the run as it was."""

import json

import pytest

from qlab import config
from qlab.run import profiling
from qlab import tasks
from qlab.results import store


def _run(compose, tmp_path, *overrides):
    cfg = compose("train.steps=6", "train.warmup_steps=3", *overrides)
    assert tasks.single(cfg) == 0
    path = store.run_dir(cfg)
    steps = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return cfg, path, json.loads((path / "result.json").read_text())["metrics"], steps


def test_profiled_run_writes_its_profile_and_trains_the_same_steps(compose, tmp_path):
    cfg, plain_dir, plain, plain_steps = _run(compose, tmp_path)
    assert not (plain_dir / "profile.txt").exists() and "profile_steps" not in plain
    plain_dir.rename(tmp_path / "plain")
    cfg2, path, m, steps = _run(compose, tmp_path, "train.profile_steps=2")
    assert store.run_id(cfg2) == store.run_id(cfg)  # not part of the run's identity
    text = (path / "profile.txt").read_text()
    assert text.startswith("torch.profiler over 2 warm-up steps on cpu")
    assert "aten::" in text and "Self CPU" in text  # the profiler's own table, CPU ops on a CPU
    assert m["profile_steps"] == 2 and m["profile_wall_ms_per_step"] > 0
    assert "profile_kernel_ms_per_step" not in m  # kernel time exists on a GPU only
    # the same steps on the same batches, the same number measured: the run is the run unprofiled
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in plain_steps], rel=1e-5)
    assert m["step_time_n"] == plain["step_time_n"] == 3
    assert m["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("steps", [3, 5, -1])
def test_profile_steps_must_leave_the_first_warmup_step_unprofiled(compose, steps):
    with pytest.raises(config.ConfigError, match="train.profile_steps"):
        config.validate(compose("train.steps=6", "train.warmup_steps=3", f"train.profile_steps={steps}"))


def test_kernel_time_counts_kernels_not_the_annotations_around_them():
    """torch.optim marks each step with a range on the GPU's timeline (a user annotation): its span
    holds the optimizer's kernels, so it is not itself kernel time (torch's own table leaves it out)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    prof = profiling.StepProfile("cuda:0", 2)
    prof.wall_s = 0.4  # 200 ms a step
    event = lambda key, us, n, kind=DeviceType.CUDA, note=False: SimpleNamespace(  # noqa: E731
        key=key, self_device_time_total=us, count=n, device_type=kind, is_user_annotation=note)
    prof.__dict__["_averages"] = [
        event("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT", 200_000, 100),
        event("void kOptimizer32bit2State<float, 0>(float*, ...)", 6_000, 896),
        event("Optimizer.step#PagedAdamW32bit.step", 78_000, 2, note=True),
        event("aten::mm", 200_000, 100, kind=DeviceType.CPU)]  # a CPU op: its kernels' time, again
    m = prof.metrics()
    assert m["profile_kernel_ms_per_step"] == pytest.approx(103.0) and m["profile_idle_ms_per_step"] == pytest.approx(97.0)
    assert m["profile_kernel_ms_by_class"] == pytest.approx({"gemm": 100.0, "optimizer": 3.0})
    assert m["profile_kernel_launches_per_step"] == 498


@pytest.mark.parametrize("name, label", [
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, __nv_bfloat16*, int, int)",
     "dequantize (bitsandbytes)"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "compiled (triton)"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>(...)", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("void kOptimizer32bit2State<float, 0, 4096, 8>(float*, float*, ...)", "optimizer"),
    ("void at::native::elementwise_kernel<128, 2, at::native::direct_copy_kernel_cuda(...)>", "copy / cast"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "other elementwise"),
])
def test_kernel_classes(name, label):
    assert profiling.kernel_class(name) == label
