import bitsandbytes as bnb
import pytest
import torch

from qlab.run import optim


@pytest.mark.parametrize("name, cls", [
    ("adamw", torch.optim.AdamW),
    ("adamw_8bit", bnb.optim.AdamW8bit),
    ("paged_adamw_32bit", bnb.optim.PagedAdamW32bit),
    ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit),
])
def test_each_optimizer_builds_and_steps(compose, name, cls):
    cfg = compose(f"optim={name}", "optim.lr_warmup_steps=4")
    w = torch.nn.Parameter(torch.randn(64, 128))
    opt, sched = optim.build(cfg.optim, [w], "cpu")
    assert type(opt) is cls
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert sched.get_last_lr()[0] == pytest.approx(2e-4 / 4)  # warm-up: step 0 -> 1/4 of lr
    before = w.detach().clone()
    w.grad = torch.ones_like(w)
    opt.step()
    sched.step()
    assert not torch.equal(before, w.detach())
    assert sched.get_last_lr()[0] == pytest.approx(2e-4 / 2)
    # 32-bit Adam state: 2 moments x 4 bytes x 8192 params; 8-bit: 1 byte each + a float32
    # absmax per 256 values + a 256-entry float32 map, per moment
    expect = 2 * 4 * 8192 if name.endswith(("32bit", "adamw")) else 2 * (8192 + 4 * 32 + 4 * 256)
    assert optim.state_bytes(name, [w]) == expect
    held = optim.measured_state_bytes(opt)
    assert held["device"] == held["managed"] == 0  # on a CPU everything (paged too) is in RAM
    assert held["cpu"] == expect


def test_managed_memory_guard_needs_cuda_and_is_a_noop_on_cpu():
    w = torch.nn.Parameter(torch.randn(8, 8))
    optim.guard_managed_memory("paged_adamw_32bit", [w], "cpu")  # no managed memory on CPU
    assert optim.state_location("paged_adamw_32bit", "cpu") == "cpu"
    assert optim.state_location("paged_adamw_32bit", "cuda") == "managed"
    assert optim.state_location("adamw", "cuda:0") == "device"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_managed_memory_guard_refuses_beyond_free_memory():
    class FakeParam:  # sized like a parameter, allocates nothing
        def __init__(self, n):
            self.n = n

        def numel(self):
            return self.n

    free, _ = torch.cuda.mem_get_info()
    too_big = FakeParam(int(free / 8 * 1.2))  # 32-bit state: 8 bytes/param -> 1.2x free memory
    with pytest.raises(optim.ManagedMemoryRefused, match="refusing"):
        optim.guard_managed_memory("paged_adamw_32bit", [too_big], "cuda")
