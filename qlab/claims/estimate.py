"""`qlab estimate`: a QLoRA run's memory predicted from the model's config alone.

Nothing is loaded: the architecture is built on the meta device (shapes, no storage) and each
term is arithmetic on those shapes. Exact: the weights as bitsandbytes stores them
(`qlab.run.models.weight_bytes` of the loaded model), the LoRA adapter (or, for full fine-tuning,
every weight's float32 master), the gradients and the optimizer state. Estimated (first order):
activations and logits, `activation_bytes`. What each term counts and how well the total predicts
the committed GPU runs: docs/memory.md.

    qlab estimate --model llama-65b --quant nf4 --double-quant --batch 1
    qlab estimate --model llama-7b --all
    python -m qlab.claims.estimate --model /path/to/checkpoint --quant int8 --adapter qv
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from dataclasses import dataclass, field, replace

import torch
from omegaconf import OmegaConf

from qlab.config import (ADAPTER_TARGETS, BLOCKSIZES, COMPUTE_DTYPES, DEFAULT_BACKEND, FOUR_BIT, OPTIMIZERS,
                         QUANT_BACKENDS, QUANT_SETTINGS, QUANT_TYPES, SHAPES, ConfigError, quant_label, resolve_path,
                         validate_quant)
from qlab.reference import gguf, pretrain
from qlab.run import adapters, measure, models, optim, presets, quantize

GiB = 2**30
BLOCK_4BIT = 64  # bnb Linear4bit: one absmax per 64 weights
BLOCK_DQ = 256  # double quant: one float32 second-level absmax per 256 first-level constants
CODE_4BIT = 16  # nf4/fp4 lookup table: 16 float32 values per tensor
CODE_DQ = 256  # the 8-bit dynamic map the DQ absmax is quantized with: 256 float32 values
FP32 = 4

# The six weight settings of `--all`: (label, quant type, double quant)
SETTINGS = tuple((label, quant, dq) for label, (quant, dq) in QUANT_SETTINGS.items())


def model_config(model):
    """A transformers config, of a name: a preset, a GGUF model (converted first if needed) or a local
    directory holding config.json, nothing downloaded; or of a run's `model` group: its base's, GGUF
    model's or preset's, or config.json of its local directory or hub id."""
    from transformers import AutoConfig

    if not isinstance(model, str):
        if getattr(model, "base", None):  # the shape comes from the size's spec: nothing is trained
            return pretrain.model_config(pretrain.spec_for(model.base))
        if getattr(model, "gguf", None):
            return AutoConfig.from_pretrained(gguf.ensure(model.gguf))  # converted first if needed
        if not model.name_or_path:
            return preset_config(model.preset)
        local = resolve_path(os.path.expanduser(model.name_or_path))
        return AutoConfig.from_pretrained(local if os.path.isdir(local) else model.name_or_path,
                                          trust_remote_code=model.trust_remote_code)
    if model in presets.PRESETS:
        return preset_config(model)
    if model in SHAPES["gguf"]:
        return AutoConfig.from_pretrained(gguf.ensure(model))
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError("model", f"no config.json in {model}: not a saved model")
        return AutoConfig.from_pretrained(path)
    raise ConfigError(
        "model", f"unknown preset {model!r} and no such directory (presets: {', '.join(presets.PRESETS)}; "
        "or a local directory with config.json)")


@functools.lru_cache(maxsize=None)
def _tokenizer_size() -> int:
    return len(presets.build_tokenizer())  # ~0.5 s, no model


def preset_config(name: str):
    """The config `presets.build_model` builds the preset from (token ids aside: no shape)."""
    return presets.model_config(name, None if presets.PRESETS[name]["vocab_size"] else _tokenizer_size())


def meta_model(config) -> torch.nn.Module:
    """The architecture on the meta device: shapes, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def _in_out(module) -> tuple[int, int]:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)  # Conv1D stores (in, out)


def _keeps_fp32(name: str, model, dtype: torch.dtype) -> bool:
    """transformers keeps `_keep_in_fp32_modules` in float32 when loading in float16, and the
    `_strict` ones for bfloat16 too (LLaMA and BLOOM have neither)."""
    mods = set(model._keep_in_fp32_modules or ()) if dtype == torch.float16 else set()
    if dtype in (torch.float16, torch.bfloat16):
        mods |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return any(m in name.split(".") for m in mods)


def four_bit_bytes(n: int, double_quant: bool, blocksize: int = BLOCK_4BIT) -> tuple[int, int]:
    """(packed weight bytes, quant state bytes) of one bnb 4-bit tensor of n weights."""
    packed = (n + 1) // 2  # two 4-bit weights per uint8
    blocks = math.ceil(n / blocksize)
    if not double_quant:
        return packed, blocks * FP32 + CODE_4BIT * FP32  # 32/64 = 0.5 bits/param
    # uint8 absmax (8/64 bits/param) + float32 per 256 of them (32/16384) + 256 code + offset
    return packed, blocks + math.ceil(blocks / BLOCK_DQ) * FP32 + CODE_DQ * FP32 + FP32 + CODE_4BIT * FP32


def hqq_bytes(n: int, blocksize: int, dtype: torch.dtype) -> tuple[int, int]:
    """(packed, state) of one HQQ 4-bit layer: two codes per uint8, a scale and a zero point per
    group of `blocksize` in the compute dtype (2 x 16/64 = 0.5 bits/param in bf16)."""
    return n // 2, 2 * (n // blocksize) * dtype.itemsize


def torchao_bytes(n: int, blocksize: int, dtype: torch.dtype) -> tuple[int, int]:
    """(packed, state) of one torchao NF4 tensor: two codes per uint8, an int8 scale per block,
    one scale in the weight's dtype per quantize.torchao_scaler_block of those, their mean and the
    16-value NF4 code (8/64 + 16/(64*256) bits/param in bf16 at the default blocks)."""
    blocks = n // blocksize
    factors = blocks // quantize.torchao_scaler_block(n, blocksize)
    return n // 2, blocks + (factors + 1 + CODE_4BIT) * dtype.itemsize


def quantized_bytes(in_f: int, out_f: int, quant: str, double_quant: bool, dtype: torch.dtype,
                    backend: str = DEFAULT_BACKEND, blocksize: int = BLOCK_4BIT) -> tuple[int, int]:
    """(quantized, state) bytes of one quantized layer of in_f x out_f weights."""
    n = in_f * out_f
    if backend == "hqq":
        return hqq_bytes(n, blocksize, dtype)
    if backend == "torchao":
        return torchao_bytes(n, blocksize, dtype)
    return four_bit_bytes(n, double_quant, blocksize) if quant in FOUR_BIT else int8_bytes(in_f, out_f)


def int8_bytes(in_features: int, out_features: int) -> tuple[int, int]:
    """(int8 weight bytes, SCB bytes): 1 byte/weight + a float32 scale per output row."""
    return in_features * out_features, out_features * FP32


def weight_bytes(model: torch.nn.Module, quant: str, double_quant: bool, dtype: torch.dtype,
                 upcast: bool = True, backend: str = DEFAULT_BACKEND, blocksize: int = BLOCK_4BIT) -> dict:
    """`models.weight_bytes()` of `model` loaded with this quantization, without loading it, plus
    `weight_bytes_after_prepare` (k-bit preparation up-casts non-quantized 16-bit weights to float32;
    an HQQ layer's bias is a plain tensor in the compute dtype, which it leaves)."""
    targets = quantize.targets(model).values() if quant != "bf16" else ()
    quantized = {id(m.weight): _in_out(m) for m in targets}
    plain_bias = {id(m.bias) for m in targets if m.bias is not None} if backend == "hqq" else set()
    packed = state = other = other_after = n_quantized = 0
    for name, p in model.named_parameters():  # tied weights appear once
        if id(p) in quantized:
            in_f, out_f = quantized[id(p)]
            n_quantized += in_f * out_f
            q, s = quantized_bytes(in_f, out_f, quant, double_quant, dtype, backend, blocksize)
            packed, state = packed + q, state + s
            continue
        held = FP32 if _keeps_fp32(name, model, dtype) else dtype.itemsize
        other += p.numel() * held
        other_after += p.numel() * (FP32 if quant != "bf16" and upcast and id(p) not in plain_bias else held)
    return {**models.weight_record(packed, state, other, n_quantized),
            "weight_bytes_after_prepare": packed + state + other_after}


def adapted_layers(model: torch.nn.Module, targets: str) -> list[tuple[str, int, int]]:
    """(name, in, out) of every layer LoRA wraps: peft matches target names against the last
    component of module names, so every linear with that leaf name is adapted."""
    names = set(adapters.resolve_targets(model, targets))
    return [(n, *_in_out(m)) for n, m in model.named_modules() if quantize.is_linear(m) and n.rsplit(".", 1)[-1] in names]


def lora_shapes(layers, r: int, dora: bool = False) -> list[tuple[int, ...]]:
    """lora_A (r, in) and lora_B (out, r) per layer: r*(in+out) parameters each; DoRA adds a
    magnitude per output row (out,)."""
    return [s for _, i, o in layers for s in ((r, i), (o, r), *([(o,)] if dora else []))]


def optimizer_state_bytes(name: str, shapes) -> int:
    """`qlab.run.optim.state_bytes` of tensors of these shapes (meta tensors: no storage)."""
    return optim.state_bytes(name, [torch.empty(s, device="meta") for s in shapes])


@dataclass
class Dims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int  # width of k (= of v): num_key_value_heads * head_dim
    vocab: int
    gated_mlp: bool  # SwiGLU-style gate/up/down (LLaMA) vs up/down (BLOOM, GPT)
    eager_attention: bool  # the attention matrix is materialized (no fused SDPA/flash kernel)


def dims(model: torch.nn.Module) -> Dims:
    c = model.config
    h, heads = c.hidden_size, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    return Dims(
        hidden=h,
        intermediate=getattr(c, "intermediate_size", None) or 4 * h,
        layers=c.num_hidden_layers,
        heads=heads,
        kv_dim=(getattr(c, "num_key_value_heads", None) or heads) * head_dim,
        vocab=model.get_output_embeddings().out_features,
        gated_mlp=any("gate" in n.rsplit(".", 1)[-1] for n, m in model.named_modules() if quantize.is_linear(m)),
        eager_attention=getattr(c, "_attn_implementation", "eager") == "eager",
    )


def activation_bytes(d: Dims, batch: int, seq: int, *, compute_bytes: int, residual_bytes: int,
                     layers: list[tuple[str, int, int]], r: int, lora_dropout: float,
                     checkpointing: bool, dequant_bytes: int = 0) -> dict:
    """Activation memory of one training step, a first-order ESTIMATE: what autograd saves per decoder
    layer (with checkpointing: each layer's input plus one layer at a time), the float32 logits and one
    dequantized weight (docs/memory.md)."""
    t, h = batch * seq, d.hidden  # T tokens
    norms = 2 * t * h * FP32  # 2 x T*h: RMSNorm saves a float32 copy of its input
    attention = t * (2 * h + 2 * d.kv_dim) * compute_bytes  # q, k, v and the attention output
    if d.eager_attention:  # the float32 softmax and the probabilities; a fused SDPA kernel keeps none
        attention += batch * d.heads * seq * seq * (FP32 + compute_bytes)
    mlp = (4 if d.gated_mlp else 2) * t * d.intermediate * compute_bytes  # gate, up, act(gate), act*up | up, act(up)
    mask = 1 if lora_dropout > 0 else 0  # the bool dropout mask: 1 byte per input value
    # per adapted leaf name (the same in every layer): its float32 input, the mask, lora_A's float32
    # output: T*(in*(4 + 1) + 4r); frozen base weights need no saved input
    lora = sum({name.split(".")[-1]: t * (i * (FP32 + mask) + r * FP32) for name, i, _ in layers}.values())
    one_layer = norms + attention + mlp + lora
    if checkpointing:  # each layer's input hidden state, T*h in the residual dtype, and one layer at a time
        kept, recomputed = d.layers * t * h * residual_bytes, one_layer
    else:
        kept, recomputed = d.layers * one_layer, 0
    logits = t * d.vocab * FP32  # T*vocab: what the float32 log-softmax cross-entropy saves
    total = kept + recomputed + logits + dequant_bytes
    return {"activation_bytes": total, "layer_activation_bytes": one_layer,
            "kept_activation_bytes": kept,  # all layers (no checkpointing) or their inputs
            "recomputed_activation_bytes": recomputed, "logits_bytes": logits, "dequant_workspace_bytes": dequant_bytes}


@dataclass
class Setting:
    quant: str = "nf4"
    double_quant: bool = False
    backend: str = DEFAULT_BACKEND
    blocksize: int = BLOCK_4BIT
    compute_dtype: str = "bfloat16"  # or "auto": bfloat16 on cuda, float32 on cpu (models.compute_dtype)
    adapter: str = "all_linear"
    r: int = 64
    lora_dropout: float = 0.05
    dora: bool = False
    optim: str = "paged_adamw_32bit"
    batch: int = 4
    seq: int = 512
    checkpointing: bool = True
    device: str = "cuda"
    upcast: bool = True  # speed.upcast_non_quantized: the recipe's float32 up-cast

    def validate(self) -> None:
        for key, allowed in (("quant", QUANT_TYPES), ("adapter", ADAPTER_TARGETS), ("optim", OPTIMIZERS),
                             ("compute_dtype", COMPUTE_DTYPES)):
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(key, f"unknown value {value!r} (choose from {', '.join(allowed)})")
        validate_quant(OmegaConf.create({"type": self.quant, "double_quant": self.double_quant,
                                         "compute_dtype": self.compute_dtype, "backend": self.backend,
                                         "blocksize": self.blocksize}))
        if self.adapter == "full" and self.quant != "bf16":
            raise ConfigError("adapter", f"full fine-tuning trains a 16-bit base (quant bf16), not {self.quant}")
        for key in ("r", "batch", "seq"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")

    @property
    def label(self) -> str:
        return quant_label({"type": self.quant, "double_quant": self.double_quant, "backend": self.backend,
                            "blocksize": self.blocksize})

    def dtype(self) -> torch.dtype:
        return models.compute_dtype(self, self.device)  # reads .compute_dtype, as of a quant config


@dataclass
class Estimate:
    model: str
    arch: str
    total_params: int
    setting: Setting
    weights: dict  # weight_bytes(): exact
    adapter_params: int
    adapted_layers: int
    target_modules: list
    optimizer_state_bytes: int
    optimizer_state_location: str  # device | managed | cpu (optim.state_location)
    activations: dict  # activation_bytes(): an estimate
    parts: dict = field(init=False)

    def __post_init__(self):
        """`parts`: the terms of a run's measured `memory_breakdown`, predicted."""
        w, a = self.weights, self.activations
        held = {**w, "unquantized_weight_bytes": w["weight_bytes_after_prepare"] - w["quantized_weight_bytes"]
                - w["quant_state_bytes"]}  # after k-bit preparation, as a run measures them
        state = {loc: self.optimizer_state_bytes if loc == self.optimizer_state_location else 0
                 for loc in ("device", "managed", "cpu")}
        grads = self.adapter_params * FP32  # peft keeps LoRA weights in float32, full fine-tuning its masters
        adapter = 0 if self.setting.adapter == "full" else grads  # full: the weights train, counted as weights
        self.parts = measure.memory_breakdown(held, adapter, state, a["logits_bytes"], None, gradient_bytes=grads)
        self.parts["activations_bytes"] = a["activation_bytes"] - a["logits_bytes"]

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def device_bytes(self) -> int:
        """What must fit in the accelerator's memory: everything but managed (paged) state."""
        return self.total_bytes - self.parts["optimizer_state_managed_bytes"]

    def as_metrics(self) -> dict:
        """Flat, JSON-ready numbers named like the measured metrics of a run's result.json."""
        out = {**self.weights, **self.parts}
        out.update(trainable_params=self.adapter_params, optimizer_state_bytes=self.optimizer_state_bytes,
                   optimizer_state_location=self.optimizer_state_location, total_params=self.total_params,
                   total_bytes=self.total_bytes, device_bytes=self.device_bytes)
        return out


def estimate(model: str | torch.nn.Module, setting: Setting, name: str | None = None) -> Estimate:
    """Estimate for `model`: a preset name, a local directory or an already built meta model."""
    setting.validate()
    if isinstance(model, str):
        name, model = name or model, meta_model(model_config(model))
    dtype = setting.dtype()
    weights = weight_bytes(model, setting.quant, setting.double_quant, dtype, setting.upcast, setting.backend,
                           setting.blocksize)
    full = setting.adapter == "full"
    layers = [] if full else adapted_layers(model, setting.adapter)
    shapes = [tuple(p.shape) for p in model.parameters()] if full else lora_shapes(layers, setting.r, setting.dora)
    if full:  # models.prepare_for_training: float32 master weights
        weights["weight_bytes_after_prepare"] = FP32 * sum(p.numel() for p in model.parameters())
    quantized = setting.quant != "bf16"
    sizes = [i * o for i, o in map(_in_out, quantize.targets(model).values())] if quantized else []
    dequant = max(sizes, default=0) * dtype.itemsize  # the largest layer's weight, dequantized
    acts = activation_bytes(
        dims(model), setting.batch, setting.seq, compute_bytes=dtype.itemsize,
        residual_bytes=FP32 if quantized or full else dtype.itemsize, layers=layers, r=setting.r,
        lora_dropout=setting.lora_dropout, checkpointing=setting.checkpointing, dequant_bytes=dequant)
    return Estimate(
        model=name or getattr(model.config, "name_or_path", "") or type(model).__name__, arch=type(model).__name__,
        total_params=sum(p.numel() for p in model.parameters()), setting=setting, weights=weights,
        adapter_params=sum(math.prod(s) for s in shapes), adapted_layers=len(layers),  # full: every parameter
        target_modules=sorted({n.rsplit(".", 1)[-1] for n, _, _ in layers}),
        optimizer_state_bytes=optimizer_state_bytes(setting.optim, shapes),
        optimizer_state_location=optim.state_location(setting.optim, setting.device), activations=acts)


def estimate_for_config(cfg, device: str) -> Estimate:
    """The estimate for a composed run config on `device` (which resolves compute_dtype=auto)."""
    return estimate(meta_model(model_config(cfg.model)), setting_for_config(cfg, device), name=cfg.model.name)


def setting_for_config(cfg, device: str) -> Setting:
    return Setting(
        quant=cfg.quant.type, double_quant=bool(cfg.quant.double_quant), compute_dtype=cfg.quant.compute_dtype,
        backend=cfg.quant.get("backend", DEFAULT_BACKEND), blocksize=int(cfg.quant.get("blocksize", BLOCK_4BIT)),
        adapter=cfg.adapter.targets, r=int(cfg.adapter.r), lora_dropout=float(cfg.adapter.dropout),
        dora=bool(cfg.adapter.get("dora", False)),
        optim=cfg.optim.name, batch=int(cfg.train.batch_size), seq=int(cfg.data.max_seq_len),
        checkpointing=bool(cfg.train.gradient_checkpointing), device=device,
        upcast=bool(cfg.speed.upcast_non_quantized) if "speed" in cfg else True,
    )


def _gib(n: int) -> str:
    return f"{n / GiB:,.3f}"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _run_line(e: Estimate) -> str:
    s = e.setting
    what = (f"full fine-tuning ({_count(e.adapter_params)} params)" if s.adapter == "full" else
            f"adapter {s.adapter} r={s.r} ({e.adapted_layers} layers, {_count(e.adapter_params)} params)")
    return (f"{what}, {s.optim}, batch {s.batch} x {s.seq} tokens, "
            f"gradient checkpointing {'on' if s.checkpointing else 'off'}, compute {_dtype_name(s)} on {s.device}")


def _dtype_name(s: Setting) -> str:
    return str(s.dtype()).replace("torch.", "")


def format_one(e: Estimate) -> str:
    w, a, p = e.weights, e.activations, e.parts
    bits = w["bits_per_quantized_param"]
    dtype = _dtype_name(e.setting)
    rows = [
        ("quantized weights", w["quantized_weight_bytes"], f"{_count(w['quantized_params'])} params", "exact"),
        ("quantization constants", w["quant_state_bytes"],
         f"{bits:.3f} bits/param with the weights" if bits else "", "exact"),
        ("non-quantized weights", w["unquantized_weight_bytes"], dtype, "exact"),
        ("= weights as loaded", w["weight_bytes"], "models.weight_bytes()", "exact"),
        ("  + k-bit prep up-cast to float32", w["weight_bytes_after_prepare"] - w["weight_bytes"],
         "float32 master weights" if e.setting.adapter == "full" else "non-quantized weights", "exact"),
        ("adapter (LoRA, float32)", p["adapters_bytes"], f"{_count(e.adapter_params)} params", "exact"),
        ("gradients (float32)", p["gradients_bytes"], "of every weight" if e.setting.adapter == "full"
         else "of the adapter", "exact"),
        ("optimizer state", e.optimizer_state_bytes, f"{e.setting.optim}, {e.optimizer_state_location}", "exact"),
        ("activations, kept", a["kept_activation_bytes"],
         "layer inputs" if e.setting.checkpointing else "all layers", "estimate"),
        ("activations, recomputed", a["recomputed_activation_bytes"], "one layer at a time", "estimate"),
        ("logits (float32, loss)", a["logits_bytes"], "batch*seq*vocab*4", "estimate"),
        ("dequantized weight", a["dequant_workspace_bytes"], "largest layer, transient", "estimate"),
        ("total", e.total_bytes, "", ""),
        ("on device", e.device_bytes, "total less managed state", ""),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"qlab estimate: {e.model} ({e.arch}, {_count(e.total_params)} params), {e.setting.label}",
             _run_line(e), "",
             f"{'term':<{width}}  {'GiB':>9}  {'bytes':>17}  {'kind':8}  note"]
    for label, n, note, kind in rows:
        lines.append(f"{label:<{width}}  {_gib(n):>9}  {n:>17,}  {kind:8}  {note}")
    return "\n".join(lines)


def estimate_all(model: str, base: Setting) -> list[Estimate]:
    """The six weight settings of SETTINGS for one model, built on meta once."""
    built = meta_model(model_config(model))
    return [estimate(built, replace(base, quant=quant, double_quant=dq), name=model) for _, quant, dq in SETTINGS]


def format_all(estimates: list[Estimate]) -> str:
    e0 = estimates[0]
    head = ["quant", "bits/param", "weights GiB", "consts GiB", "after prep GiB", "total GiB", "on device GiB"]
    rows = []
    for e in estimates:
        w = e.weights
        bits = w["bits_per_quantized_param"] or 8 * e.setting.dtype().itemsize
        rows.append([e.setting.label, f"{bits:.3f}", _gib(w["weight_bytes"]), _gib(w["quant_state_bytes"]),
                     _gib(w["weight_bytes_after_prepare"]), _gib(e.total_bytes), _gib(e.device_bytes)])
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    def fmt(row: list[str]) -> str:  # the first column left-aligned, the numbers right-aligned
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row))
    lines = [f"qlab estimate: {e0.model} ({e0.arch}, {_count(e0.total_params)} params)",
             _run_line(e0), "bits/param: weights and their constants per quantized parameter "
             "(16-bit arm: the compute dtype); weights exact, total includes estimated activations", "",
             fmt(head), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    by = {e.setting.label: e for e in estimates}
    for q in FOUR_BIT:
        plain, dq = by.get(q), by.get(f"{q}+DQ")
        if plain and dq:
            saved = plain.weights["weight_bytes"] - dq.weights["weight_bytes"]
            dbits = plain.weights["bits_per_quantized_param"] - dq.weights["bits_per_quantized_param"]
            lines.append(f"double quantization saves {saved / 1e9:.2f} GB ({saved / GiB:.2f} GiB) on {q}: "
                         f"{dbits:.3f} bits/param x {_count(dq.weights['quantized_params'])} quantized params")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    d = Setting()
    p = argparse.ArgumentParser(
        prog="qlab estimate",
        description="Memory of a QLoRA fine-tuning run predicted from the model config alone: weights "
                    "(exactly as bitsandbytes stores them), LoRA adapter, gradients, optimizer state "
                    "(exact) and activations (a first-order estimate).")
    p.add_argument("--model", default="llama-7b", help=f"a preset ({', '.join(presets.PRESETS)}), a GGUF model "
                   f"({', '.join(SHAPES['gguf'])}) or a local directory with config.json (default: %(default)s)")
    p.add_argument("--quant", default=d.quant, choices=QUANT_TYPES)
    p.add_argument("--double-quant", action="store_true", help="quantize the 4-bit absmax constants too")
    p.add_argument("--backend", default=d.backend, choices=tuple(QUANT_BACKENDS))
    p.add_argument("--blocksize", type=int, default=d.blocksize, choices=BLOCKSIZES,
                   help="weights per scale of a 4-bit type (default: %(default)s)")
    p.add_argument("--compute-dtype", default=d.compute_dtype, choices=COMPUTE_DTYPES,
                   help="dtype of non-quantized weights and activations (auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--adapter", default=d.adapter, choices=ADAPTER_TARGETS)
    p.add_argument("--r", type=int, default=d.r, help="LoRA rank")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--dora", action="store_true", help="DoRA: a trained magnitude per output row too")
    p.add_argument("--optim", default=d.optim, choices=OPTIMIZERS)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seq", type=int, default=d.seq, help="tokens per sequence")
    p.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    p.add_argument("--device", default=d.device, choices=("cuda", "cpu"),
                   help="where the run would train: paged optimizer state is managed memory only on cuda")
    p.add_argument("--all", action="store_true", help="a table over bf16, int8, nf4, nf4+DQ, fp4, fp4+DQ")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    options = {k: v for k, v in vars(args).items() if k in Setting.__dataclass_fields__}
    setting = Setting(**options, checkpointing=not args.no_checkpointing)
    try:
        if args.all:
            setting.double_quant = False  # --all sets quant and DQ itself
            print(format_all(estimate_all(args.model, setting)))
        else:
            print(format_one(estimate(args.model, setting)))
    except ConfigError as e:
        print(f"qlab estimate: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
