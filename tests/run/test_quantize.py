"""qlab/run/quantize.py and the adapter initializations on tiny presets, on the CPU: every
backend has a CPU path (bitsandbytes' CPU 4-bit kernel, HQQ's PyTorch backend, torchao's NF4
tensor), and qlab's LoftQ and peft's PiSSA and DoRA run there too."""

import pytest
import torch

from qlab.config import validate
from qlab.run import adapters, models, quantize

IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 11, 64, 23, 8, 1, 77]])


def logits(model) -> torch.Tensor:
    model.eval()  # no LoRA dropout
    with torch.no_grad():
        return model(input_ids=IDS).logits


def loaded(compose, *overrides):
    cfg = compose(*overrides)
    validate(cfg)
    return cfg, models.load(cfg.model, cfg.quant, "cpu")


def test_bitsandbytes_at_block_size_64_holds_what_from_pretrained_holds(compose):
    """The post-load path, forced at the paper's block size, against transformers' own: the same
    layers, the same packed codes and constants, bit for bit."""
    cfg, reference = loaded(compose, "quant=nf4", "quant.double_quant=true")
    _, plain = loaded(compose, "quant=bf16")
    quantize.apply(plain.model, cfg.quant, torch.float32, "cpu")
    ours = dict(plain.model.named_modules())
    for name, ref in quantize.targets(models.load(cfg.model, compose("quant=bf16").quant, "cpu").model).items():
        a, b = dict(reference.model.named_modules())[name].weight, ours[name].weight
        assert type(a) is type(b) and a.blocksize == b.blocksize == 64
        assert torch.equal(a.data, b.data)
        assert torch.equal(a.quant_state.absmax, b.quant_state.absmax)
        assert torch.equal(a.quant_state.state2.absmax, b.quant_state.state2.absmax)
    assert models.weight_bytes(plain.model) == reference.weight_bytes
    # the preset's checkpoint is bfloat16, which from_pretrained quantizes as stored: its layers
    # dequantize to bfloat16, these to the float32 copy's dtype (the same values): logits agree
    # to bfloat16's rounding (a GPU run, bfloat16 throughout, is the same either way)
    assert torch.allclose(logits(plain.model), logits(reference.model), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("overrides, module, bits", [
    (["quant=nf4", "quant.blocksize=32"], "Linear4bit", 4 + 32 / 32),        # float32 absmax per 32
    (["quant=nf4", "quant.double_quant=true", "quant.blocksize=32"], "Linear4bit", None),
    (["quant=hqq"], "HQQLinear", 4 + 2 * 32 / 64),                             # float32 scale + zero per 64
    (["quant=hqq", "quant.blocksize=32"], "HQQLinear", 4 + 2 * 32 / 32),
    (["quant=torchao-nf4"], "Linear", None),
])
def test_each_backend_quantizes_every_target_layer_close_to_16_bit(compose, overrides, module, bits):
    cfg, q = loaded(compose, *overrides)
    _, full = loaded(compose, "quant=bf16")
    names = set(quantize.targets(full.model))
    held = dict(q.model.named_modules())
    assert names and all(type(held[n]).__name__ == module for n in names)
    if cfg.quant.backend == "torchao":
        assert all(type(held[n].weight).__name__ == "NF4Tensor" for n in names)
    if cfg.quant.backend == "bitsandbytes":
        assert all(held[n].weight.blocksize == cfg.quant.blocksize for n in names)
    w = q.weight_bytes
    if bits is not None:
        assert w["bits_per_quantized_param"] == pytest.approx(bits, abs=0.13)  # + 16 float32 code values per 4,096-weight layer
    ref, got = logits(full.model), logits(q.model)
    assert torch.isfinite(got).all()
    assert (got - ref).norm() / ref.norm() < 0.2  # 4-bit weights: a few percent off, not noise


@pytest.mark.parametrize("quant", [["quant=hqq"], ["quant=torchao-nf4"], ["quant=nf4", "quant.blocksize=32"]])
def test_every_backend_multiplies_in_the_compute_dtype_after_the_recipe_s_up_cast(compose, quant):
    # as on a GPU: bf16 compute, norms up-cast to float32 by the recipe, so float32 reaches the layers
    cfg, q = loaded(compose, *quant, "quant.compute_dtype=bfloat16")
    models.prepare_for_training(q.model, True, True)
    model, _ = adapters.attach(q.model, cfg.adapter, q.path)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_a_block_that_does_not_fit_a_row_is_refused_naming_the_key(compose):
    from qlab.config import ConfigError

    # tiny-llama's rows hold 64 weights: bitsandbytes' CPU kernel cannot read blocks of 128
    with pytest.raises(ConfigError, match="^quant.blocksize: .*blocks of 128"):
        loaded(compose, "quant=nf4", "quant.blocksize=128")


def test_loftq_starts_at_the_best_rank_r_correction_of_the_quantization_error(compose):
    import bitsandbytes as bnb

    cfg, q = loaded(compose, "quant=nf4", "adapter.init=loftq", "adapter.r=8", "adapter.alpha=16")
    models.prepare_for_training(q.model, True, True)
    model, _ = adapters.attach(q.model, cfg.adapter, q.path)
    _, full = loaded(compose, "quant=bf16")
    w = dict(full.model.named_modules())["model.layers.0.self_attn.q_proj"].weight.float()
    layer = dict(model.named_modules())["base_model.model.model.layers.0.self_attn.q_proj"]
    base = layer.get_base_layer().weight
    dequantized = bnb.functional.dequantize_4bit(base.data, base.quant_state).float()
    start = dequantized + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    s = torch.linalg.svdvals(w - dequantized)
    # Eckart-Young: what is left is the error's singular values beyond the rank
    assert (w - start).norm().item() == pytest.approx(s[8:].norm().item(), rel=1e-3)
    assert (w - start).norm() < 0.9 * (w - dequantized).norm()
    # the adapted model starts closer to the 16-bit one than the quantized base alone
    _, plain = loaded(compose, "quant=nf4")
    ref = logits(full.model)
    assert (logits(model) - ref).norm() < (logits(plain.model) - ref).norm()


def test_pissa_adapter_is_saved_as_a_lora_of_the_original_base(compose, tmp_path):
    """Trained on the residual base, saved as the difference from its start: loaded on the
    untouched base by peft, it gives the trained model's logits (what `qlab eval` relies on)."""
    from peft import PeftModel

    cfg, base = loaded(compose, "quant=bf16", "adapter.init=pissa", "adapter.r=4")
    model, _ = adapters.attach(base.model, cfg.adapter, base.path)
    initial = adapters.save_initial(model, cfg.adapter)
    assert initial is not None
    with torch.no_grad():  # stands in for training: every adapter weight moves
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.01 * torch.randn_like(p))
    trained = logits(model)
    adapters.save(model, tmp_path / "adapter", initial)
    _, fresh = loaded(compose, "quant=bf16")
    reloaded = PeftModel.from_pretrained(fresh.model, str(tmp_path / "adapter"))
    assert reloaded.peft_config["default"].r == 8  # rank 2r
    assert torch.allclose(logits(reloaded), trained, atol=1e-4)
    assert not (tmp_path / "initial").exists()


@pytest.mark.parametrize("quant", [["quant=nf4"], ["quant=hqq"]])
def test_dora_trains_a_magnitude_on_a_4_bit_base(compose, quant, tmp_path):
    cfg, q = loaded(compose, *quant, "adapter.dora=true", "adapter.r=4")
    models.prepare_for_training(q.model, True, True)
    model, _ = adapters.attach(q.model, cfg.adapter, q.path)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    magnitudes = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in magnitudes)
    # DoRA starts as the base: so it must stay through evaluation passes (where bitsandbytes' CPU
    # kernel would repack the 4-bit weights DoRA takes its norm from: adapters.keep_cpu_layout)
    first, second = logits(model), logits(model)
    with model.disable_adapter():
        base = logits(model)
    assert torch.allclose(first, base, atol=1e-4) and torch.allclose(second, base, atol=1e-4)
    # saved and loaded onto a fresh base, as qlab eval / chat load it: the same, pass after pass
    model.save_pretrained(tmp_path / "adapter")
    _, fresh = loaded(compose, *quant)
    reloaded = adapters.load_saved(fresh.model, tmp_path / "adapter")
    assert torch.allclose(logits(reloaded), first, atol=1e-4) and torch.allclose(logits(reloaded), first, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="peft's LoftQ computes on CUDA only")
def test_loftq_is_peft_s_with_the_lora_scaling_divided_out(compose):
    """On a GPU, against peft's own replace_lora_weights_loftq (one alternation, CUDA only): the
    same B A up to qlab's division by the LoRA scaling alpha/r."""
    from peft import replace_lora_weights_loftq

    cfg = compose("quant=nf4", "adapter.init=loftq", "adapter.r=8", "adapter.alpha=16", "train.device=cuda")
    ours, theirs = [], []
    for out, init in ((ours, "loftq"), (theirs, "gaussian")):
        q = models.load(cfg.model, cfg.quant, "cuda")
        models.prepare_for_training(q.model, True, True)
        model, _ = adapters.attach(q.model, compose(*[f"adapter.init={init}", "adapter.r=8", "adapter.alpha=16"]).adapter,
                                   q.path)
        if init == "gaussian":
            replace_lora_weights_loftq(model, model_path=q.path)
        layer = dict(model.named_modules())["base_model.model.model.layers.0.self_attn.q_proj"]
        out.append(layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        scaling = layer.scaling["default"]
    assert torch.allclose(ours[0] * scaling, theirs[0], atol=1e-4, rtol=1e-3)
