"""The analytic memory model against the real thing: tiny presets loaded through qlab.models
(real bitsandbytes quantization on CPU), peft adapters and bitsandbytes optimizers."""

import re
from pathlib import Path

import pytest
import torch

from qlab.config import PROJECT_ROOT
from qlab.run import adapters, models, optim, presets
from qlab.claims import estimate
from qlab.config import ConfigError, validate
from conftest import SMOLLM2

ROOT = Path(PROJECT_ROOT)
WEIGHT_KEYS = ("weight_bytes", "quantized_weight_bytes", "quant_state_bytes", "unquantized_weight_bytes",
               "quantized_params", "bits_per_quantized_param")
QUANTS = {"bf16": ["quant=bf16"], "int8": ["quant=int8"], "nf4": ["quant=nf4"],
          "nf4+DQ": ["quant=nf4", "quant.double_quant=true"], "fp4": ["quant=fp4"],
          "fp4+DQ": ["quant=fp4", "quant.double_quant=true"],
          # the backends and block sizes qlab/run/quantize.py builds after loading
          "hqq int4": ["quant=hqq"], "hqq int4/b32": ["quant=hqq", "quant.blocksize=32"],
          "hqq int4/b256": ["quant=hqq", "quant.blocksize=256"],
          "torchao nf4+DQ": ["quant=torchao-nf4"], "torchao nf4+DQ/b32": ["quant=torchao-nf4", "quant.blocksize=32"],
          "torchao nf4+DQ/b128": ["quant=torchao-nf4", "quant.blocksize=128"],
          "nf4+DQ/b32": ["quant=nf4", "quant.double_quant=true", "quant.blocksize=32"],
          "fp4/b32": ["quant=fp4", "quant.blocksize=32"]}


@pytest.fixture(scope="module")
def llama65():
    return estimate.meta_model(estimate.model_config("llama-65b"))


@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bloom"])
def test_predicted_weights_equal_what_bitsandbytes_holds(compose, model, quant):
    cfg = compose(f"model={model}", *QUANTS[quant])
    predicted = estimate.estimate_for_config(cfg, "cpu")  # from the config: nothing loaded
    loaded = models.load(cfg.model, cfg.quant, "cpu")
    for key in WEIGHT_KEYS:
        assert predicted.weights[key] == loaded.weight_bytes[key], key
    models.prepare_for_training(loaded.model, quant != "bf16", True)
    after = models.weight_bytes(loaded.model)["weight_bytes"]
    assert predicted.weights["weight_bytes_after_prepare"] == after  # k-bit prep up-casts the rest
    peft_model, names = adapters.attach(loaded.model, cfg.adapter)
    assert predicted.adapter_params == adapters.count_params(peft_model)["trainable_params"]
    assert predicted.target_modules == names


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_4_bit_bytes_at_every_block_size(blocksize, double_quant):
    """Every config.BLOCKSIZES value against what bitsandbytes stores, on one small-llama down_proj
    (704 x 256): its CPU kernel cannot run blocks wider than a 64-wide tiny row, so the presets
    measure 32 and 64 above and the GPU runs 128 (results/backends-smollm2-135m); this measures the
    storage itself at each size."""
    import bitsandbytes as bnb

    w = torch.randn(256, 704)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                                 quant_type="nf4")
    tensors = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code, state.offset] if double_quant else [])
    assert estimate.four_bit_bytes(w.numel(), double_quant, blocksize) == (
        packed.numel() * packed.element_size(), sum(t.numel() * t.element_size() for t in tensors))


@pytest.mark.parametrize("quant", ["bf16", "nf4+DQ", "int8", "hqq int4", "torchao nf4+DQ"])
def test_bfloat16_compute_dtype_as_on_a_gpu(compose, quant):
    # the paper's setting: non-quantized weights in bfloat16 (2 bytes), not CPU's float32
    cfg = compose(*QUANTS[quant], "quant.compute_dtype=bfloat16")
    predicted = estimate.estimate_for_config(cfg, "cpu")
    loaded = models.load(cfg.model, cfg.quant, "cpu")
    assert {k: predicted.weights[k] for k in WEIGHT_KEYS} == {k: loaded.weight_bytes[k] for k in WEIGHT_KEYS}
    models.prepare_for_training(loaded.model, quant != "bf16", True)
    assert predicted.weights["weight_bytes_after_prepare"] == models.weight_bytes(loaded.model)["weight_bytes"]


@pytest.mark.parametrize("model, targets", [("tiny-llama", "qv"), ("tiny-bloom", "qv"), ("tiny-bloom", "all_linear")])
def test_adapter_count_matches_peft(compose, model, targets):
    cfg = compose(f"model={model}", f"adapter={targets}", "adapter.r=16")
    predicted = estimate.estimate_for_config(cfg, "cpu")
    loaded = models.load(cfg.model, cfg.quant, "cpu")
    models.prepare_for_training(loaded.model, True, True)
    peft_model, names = adapters.attach(loaded.model, cfg.adapter)
    assert predicted.adapter_params == adapters.count_params(peft_model)["trainable_params"]
    assert predicted.target_modules == sorted(names)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)  # 4 bytes each
    assert predicted.parts["gradients_bytes"] == predicted.parts["adapters_bytes"] == 4 * predicted.adapter_params


@pytest.mark.parametrize("quant", ["nf4", "hqq int4"])
def test_dora_adds_a_trained_magnitude_per_output_row(compose, quant):
    cfg = compose(*QUANTS[quant], "adapter.dora=true", "adapter.r=8")
    predicted = estimate.estimate_for_config(cfg, "cpu")
    plain = estimate.estimate_for_config(compose(*QUANTS[quant], "adapter.r=8"), "cpu")
    loaded = models.load(cfg.model, cfg.quant, "cpu")
    models.prepare_for_training(loaded.model, True, True)
    peft_model, _ = adapters.attach(loaded.model, cfg.adapter)
    assert predicted.adapter_params == adapters.count_params(peft_model)["trainable_params"]
    magnitudes = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_magnitude_vector" in n)
    assert magnitudes > 0 and predicted.adapter_params - plain.adapter_params == magnitudes


def state_bytes_after_one_step(optim_cfg, params) -> int:
    """The bytes of optimizer state the built optimizer holds after one step on `params`."""
    opt, _ = optim.build(optim_cfg, params, "cpu")
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"])
def test_optimizer_state_matches_a_real_step(compose, name):
    # r=64 on tiny-llama: lora_A of q (64x64 = 4096 values) reaches bitsandbytes' 8-bit
    # threshold, lora_B of o (64x64) too; the rest stays in 32-bit state
    cfg = compose(f"optim={name}", "adapter.r=64")
    predicted = estimate.estimate_for_config(cfg, "cpu")
    loaded = models.load(cfg.model, cfg.quant, "cpu")
    models.prepare_for_training(loaded.model, True, True)
    peft_model, _ = adapters.attach(loaded.model, cfg.adapter)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    held = state_bytes_after_one_step(cfg.optim, params)
    assert predicted.optimizer_state_bytes == held
    assert predicted.optimizer_state_location == "cpu"
    n = predicted.adapter_params
    if name in ("adamw", "paged_adamw_32bit"):
        assert held == 2 * 4 * n  # two float32 moments per parameter
    else:
        assert held < 2 * 4 * n


def test_committed_gpu_runs_are_predicted_exactly():
    """Replay results/**/result.json (H100 runs of the 7B shapes): every exact term the run
    recorded equals the prediction from its config alone."""
    import json

    from omegaconf import OmegaConf

    runs = [json.loads(p.read_text()) for p in sorted((ROOT / "results").glob("*/*/result.json"))]
    runs = [r for r in runs if r["status"] == "ok" and r.get("kind", "train") == "train"
            and r["config"]["model"].get("preset")]
    if not runs:
        pytest.skip("no committed preset runs under results/")
    keys = (*WEIGHT_KEYS, "weight_bytes_after_prepare", "trainable_params", "total_params")
    built = {}
    for r in runs:
        cfg, m = OmegaConf.create(r["config"]), r["metrics"]
        preset = cfg.model.preset
        if preset not in built:
            built[preset] = estimate.meta_model(estimate.preset_config(preset))
        e = estimate.estimate(built[preset], estimate.setting_for_config(cfg, m["device"]), name=preset).as_metrics()
        assert {k: e[k] for k in keys if k in m} == {k: m[k] for k in keys if k in m}, r["run_id"]
        assert e["optimizer_state_location"] == m["optimizer_state_location"], r["run_id"]
        if cfg.optim.name in ("adamw", "paged_adamw_32bit"):  # recorded as an int or by location
            held = m["optimizer_state_bytes"]
            assert e["optimizer_state_bytes"] == (sum(held.values()) if isinstance(held, dict) else held), r["run_id"]


def test_optimizer_state_arithmetic_and_location():
    big, small = (64, 4096), (8, 64)  # 262,144 values (8-bit state) and 512 (kept 32-bit)
    assert estimate.optimizer_state_bytes("adamw", [big, small]) == 8 * (64 * 4096 + 512)
    # 8-bit: 1 byte per moment value + float32 absmax per 256 values + two 256-entry float32 maps
    expect = 2 * (64 * 4096 + 4 * (64 * 4096 // 256) + 256 * 4) + 8 * 512
    assert estimate.optimizer_state_bytes("paged_adamw_8bit", [big, small]) == expect
    assert optim.state_location("paged_adamw_8bit", "cuda") == "managed"
    s = estimate.Setting(optim="paged_adamw_32bit", device="cuda")
    e = estimate.estimate("tiny-llama", s)
    assert e.optimizer_state_location == "managed"
    assert e.parts["optimizer_state_managed_bytes"] == e.optimizer_state_bytes
    assert e.device_bytes == e.total_bytes - e.optimizer_state_bytes


def test_bits_per_param_of_one_large_layer():
    n = 4096 * 4096
    packed, state = estimate.four_bit_bytes(n, double_quant=False)
    assert packed == n // 2
    assert 8 * (packed + state) / n == pytest.approx(4.5, abs=1e-3)  # 4 + 32/64
    packed, state = estimate.four_bit_bytes(n, double_quant=True)
    assert 8 * (packed + state) / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)  # 4.127
    # the per-tensor constants: 16-entry code, 256-entry DQ code, float32 offset (1,092 bytes)
    assert state == n // 64 + 4 * (n // 64 // 256) + 4 * (16 + 256 + 1)
    w, scb = estimate.int8_bytes(4096, 4096)
    assert 8 * (w + scb) / n == pytest.approx(8 + 32 / 4096)  # one float32 scale per output row


def test_paper_65b_claims(llama65):
    est = {s.setting.label: s for s in (
        estimate.estimate(llama65, estimate.Setting(quant=q, double_quant=dq, batch=1), name="llama-65b")
        for _, q, dq in estimate.SETTINGS)}
    assert est["bf16"].total_params == 65_285_660_672  # LLaMA-65B
    saved = est["nf4"].weights["weight_bytes"] - est["nf4+DQ"].weights["weight_bytes"]
    assert 2.9e9 < saved < 3.1e9  # "DQ saves ~3 GB on 65B": 0.373 bits x 64.8B params
    bits = est["nf4"].weights["bits_per_quantized_param"] - est["nf4+DQ"].weights["bits_per_quantized_param"]
    assert bits == pytest.approx(0.373, abs=1e-3)
    # "finetune 65B on a single 48 GB GPU": nf4+DQ, LoRA on all linear layers r=64, paged
    # AdamW (its state in managed memory), 1 x 512 tokens with gradient checkpointing
    assert est["nf4+DQ"].device_bytes < 48e9
    assert est["bf16"].device_bytes > 130e9  # while the 16-bit base alone is 130 GB


def test_activation_model_terms(llama65):
    d = estimate.dims(llama65)
    assert (d.hidden, d.intermediate, d.layers, d.vocab, d.gated_mlp, d.eager_attention) == (
        8192, 22016, 80, 32000, True, False)
    layers = estimate.adapted_layers(llama65, "all_linear")
    kw = dict(compute_bytes=2, residual_bytes=4, layers=layers, r=64, lora_dropout=0.05)
    ckpt = estimate.activation_bytes(d, 2, 512, checkpointing=True, **kw)
    full = estimate.activation_bytes(d, 2, 512, checkpointing=False, **kw)
    t = 2 * 512
    assert ckpt["logits_bytes"] == t * 32000 * 4  # float32 logits for the loss
    assert ckpt["kept_activation_bytes"] == 80 * t * 8192 * 4  # each layer's input hidden state
    assert full["kept_activation_bytes"] == 80 * full["layer_activation_bytes"]
    assert ckpt["recomputed_activation_bytes"] == full["layer_activation_bytes"]
    assert ckpt["activation_bytes"] < full["activation_bytes"] / 10
    double = estimate.activation_bytes(d, 4, 512, checkpointing=False, **kw)  # no s^2 term: linear in batch
    assert double["activation_bytes"] == 2 * full["activation_bytes"]
    bloom = estimate.dims(estimate.meta_model(estimate.model_config("tiny-bloom")))
    assert bloom.eager_attention and not bloom.gated_mlp  # BLOOM materializes its attention matrix


def test_cli_all_table_shows_the_dq_saving(capsys):
    assert estimate.main(["--model", "llama-65b", "--all"]) == 0
    out = capsys.readouterr().out
    for label in ("bf16", "int8", "nf4", "nf4+DQ", "fp4", "fp4+DQ"):
        assert re.search(rf"^{re.escape(label)}\s+\d", out, re.M), label
    assert re.search(r"^nf4\+DQ\s+4\.127\s", out, re.M) and re.search(r"^nf4\s+4\.500\s", out, re.M)
    saved = float(re.search(r"double quantization saves ([\d.]+) GB \([\d.]+ GiB\) on nf4", out).group(1))
    assert 2.9 < saved < 3.1


def test_cli_single_estimate_through_the_qlab_script(capsys, monkeypatch):
    from qlab import cli

    monkeypatch.setattr("sys.argv", ["qlab"])  # cli.main rewrites sys.argv for the verb
    assert cli.main(["estimate", "--model", "tiny-bloom", "--quant", "nf4", "--double-quant", "--adapter", "qv",
                     "--r", "8", "--optim", "adamw", "--batch", "2", "--seq", "64"]) == 0
    out = capsys.readouterr().out
    assert "tiny-bloom" in out and "nf4+DQ" in out and "batch 2 x 64 tokens" in out
    for term in ("quantized weights", "quantization constants", "adapter", "gradients", "optimizer state",
                 "logits", "total", "on device"):
        assert term in out
    assert "estimate" in out and "exact" in out  # which terms are which


def test_cli_local_directory_and_errors(capsys, qlab_cache):
    path = presets.ensure("tiny-llama")  # a saved model: config.json read with AutoConfig
    from_dir = estimate.estimate(str(path), estimate.Setting(device="cpu", compute_dtype="auto"))
    from_preset = estimate.estimate("tiny-llama", estimate.Setting(device="cpu", compute_dtype="auto"))
    assert from_dir.weights == from_preset.weights and from_dir.adapter_params == from_preset.adapter_params
    assert estimate.main(["--model", "llama-70b"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'llama-70b'" in err and "llama-65b" in err
    assert estimate.main(["--model", str(qlab_cache)]) == 2  # a directory, but no config.json
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="double_quant"):
        estimate.estimate("tiny-llama", estimate.Setting(quant="int8", double_quant=True))


def test_new_presets_validate_and_have_llama1_sizes(compose):
    for name in ("llama-13b", "llama-33b", "llama-65b"):
        validate(compose(f"model.preset={name}", f"model.name={name}"))
    params = {n: estimate.meta_model(estimate.model_config(n)).num_parameters() for n in ("llama-13b", "llama-33b")}
    assert round(params["llama-13b"] / 1e9, 1) == 13.0 and round(params["llama-33b"] / 1e9, 1) == 32.5


def test_base_shape_comes_from_its_spec_without_training(compose, monkeypatch):
    """The analytic model of a `model=base-<size>` run never builds (trains) the base: on a GPU
    run the cached base is the cuda build, and a cpu-keyed lookup would train a second one."""
    from qlab.reference import pretrain

    def no_training(*a, **k):
        raise AssertionError("the estimate must not build a base")

    monkeypatch.setattr(pretrain, "ensure_base", no_training)
    e = estimate.estimate_for_config(compose("model=base-gpu"), "cuda")
    spec = pretrain.spec_for("gpu")
    assert e.as_metrics()["total_params"] == 34_087_424 == (  # 34.1 M, as qlab/base.py's table says
        2 * spec["vocab_size"] * spec["hidden_size"]
        + spec["num_hidden_layers"] * (4 * spec["hidden_size"] ** 2 + 3 * spec["hidden_size"] * spec["intermediate_size"]
                                       + 2 * spec["hidden_size"]) + spec["hidden_size"])


@pytest.mark.parametrize("name", ["adamw", "paged_adamw_8bit"])
def test_full_fine_tuning_is_predicted_exactly(compose, name):
    """adapter=full: the weights as loaded (bfloat16, as on a GPU), their float32 master copies
    after preparation, every parameter trainable, and the optimizer's state over every weight after
    a real step (8-bit state for tensors of >= 4,096 values, 32-bit for the rest) as predicted."""
    cfg = compose("adapter=full", "quant=bf16", "quant.compute_dtype=bfloat16", f"optim={name}")
    predicted = estimate.estimate_for_config(cfg, "cpu")
    loaded = models.load(cfg.model, cfg.quant, "cpu")
    assert {k: predicted.weights[k] for k in WEIGHT_KEYS} == {k: loaded.weight_bytes[k] for k in WEIGHT_KEYS}
    models.prepare_for_training(loaded.model, False, True, full=True)
    assert predicted.weights["weight_bytes_after_prepare"] == models.weight_bytes(loaded.model)["weight_bytes"]
    model, names = adapters.attach(loaded.model, cfg.adapter)
    assert predicted.adapter_params == adapters.count_params(model)["trainable_params"] == predicted.total_params
    assert predicted.target_modules == names == []
    params = [p for p in model.parameters() if p.requires_grad]
    held = state_bytes_after_one_step(cfg.optim, params)
    assert predicted.optimizer_state_bytes == held
    assert predicted.parts["adapters_bytes"] == 0 and predicted.parts["gradients_bytes"] == 4 * predicted.total_params
    with pytest.raises(ConfigError, match="full fine-tuning"):
        estimate.estimate("tiny-llama", estimate.Setting(quant="nf4", adapter="full"))


@SMOLLM2
def test_smollm2_nf4_dq_weights_are_predicted_exactly(compose, capsys):
    """A real model (model=smollm2-135m, dequantized from its GGUF) quantized as NF4+DQ holds
    exactly the bytes the analytic model predicts from its config; `qlab estimate` knows it by name."""
    cfg = compose("model=smollm2-135m", *QUANTS["nf4+DQ"])
    predicted = estimate.estimate_for_config(cfg, "cpu")
    loaded = models.load(cfg.model, cfg.quant, "cpu")
    assert type(loaded.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert {k: predicted.weights[k] for k in WEIGHT_KEYS} == {k: loaded.weight_bytes[k] for k in WEIGHT_KEYS}
    # 30 layers x (2 x 576^2 + 2 x 576 x 192 + 3 x 576 x 1536) = 106,168,320 weights in 4 bits; the tied
    # 49,152 x 576 embedding (28.3 M) and the norms stay float32 on a CPU
    assert loaded.weight_bytes["quantized_params"] == 106_168_320
    # 4 + 8/64 + 32/(64*256) = 4.127 bits, plus each of the 210 tensors' fixed 1,092 B of codes
    bits = 4 + 8 / 64 + 32 / (64 * 256) + 210 * 1092 * 8 / 106_168_320
    assert loaded.weight_bytes["bits_per_quantized_param"] == pytest.approx(bits, abs=1e-4)  # 4.144
    assert estimate.main(["--model", "smollm2-135m", "--quant", "bf16", "--adapter", "full"]) == 0
    out = capsys.readouterr().out
    assert "full fine-tuning (134.52M params)" in out and "LlamaForCausalLM" in out
