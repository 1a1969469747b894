"""Quantize a loaded 16-bit model's linear layers in place, for what transformers' quantization
configs cannot say: bitsandbytes' 4-bit types at a block size other than 64 (BitsAndBytesConfig
has no 4-bit block size), HQQ (HqqConfig refuses a CPU device map) and torchao's NF4 tensor (no
transformers config builds it; torchtune's QLoRA holds its base this way).

Every backend quantizes the same layers, the ones transformers' bitsandbytes integration converts
(`targets`), and at block size 64 this path's bitsandbytes layers hold the same bytes as
from_pretrained's (tests/run/test_quantize.py). Bits per quantized weight, constants included,
for n weights in blocks of b (qlab/claims/estimate.py counts them exactly):
  bitsandbytes nf4/fp4: 4 + 32/b (a float32 absmax per block); with DQ 4 + 8/b + 32/(256 b)
  hqq int4:             4 + 2*16/b in bf16 (a scale and a zero point per group, compute dtype)
  torchao nf4:          4 + 8/b + 16/(b s) in bf16 (an int8 scale per block, a bf16 one per s of
                        them: s = 256, or the largest power of two dividing the layer's block count)
"""

from __future__ import annotations

import importlib
import math

import torch

from qlab.config import DEFAULT_BACKEND, DEFAULT_BLOCKSIZE, FOUR_BIT, ConfigError

TORCHAO_SCALER_BLOCK = 256  # torchao's to_nf4 default: int8 scales quantized in blocks of 256


def by_qlab(quant_cfg) -> bool:
    """Whether `models.load` quantizes after loading (here) rather than through from_pretrained."""
    return quant_cfg.type != "bf16" and (
        quant_cfg.backend != DEFAULT_BACKEND or (quant_cfg.type in FOUR_BIT and quant_cfg.blocksize != DEFAULT_BLOCKSIZE))


def is_linear(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return type(module) is torch.nn.Linear or isinstance(module, Conv1D)  # what replace_with_bnb_linear converts


def targets(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules transformers' bitsandbytes integration replaces (llm_int8_skip_modules at its default, as
    models.bnb_config): every plain nn.Linear/Conv1D but the head, tied weights and `_keep_in_fp32_modules`."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    return {name: m for name, m in model.named_modules() if is_linear(m) and should_convert_module(name, skip)}


def torchao_scaler_block(numel: int, blocksize: int) -> int:
    """torchao's scaler block for a weight of `numel`: to_nf4 needs it to divide the block count
    (SmolLM2's 576 x 576 q_proj has 5,184 blocks of 64: gcd(256, 5184) = 64)."""
    return math.gcd(TORCHAO_SCALER_BLOCK, numel // blocksize)


def check_blocks(layers: dict[str, torch.nn.Module], quant_cfg, device: str) -> None:
    """Raise ConfigError naming the first of `layers` (targets' name -> module) whose weights do not
    split into blocks of quant.blocksize on `device`. Reads shapes only: meta modules will do."""
    # bitsandbytes' CPU kernel reads the absmax per row: a row must hold whole blocks
    row = quant_cfg.backend == "bitsandbytes" and not device.startswith("cuda")
    for name, linear in layers.items():
        n = linear.weight.shape[-1] if row else linear.weight.numel()
        if n % quant_cfg.blocksize:
            raise ConfigError("quant.blocksize", f"{name}'s {'rows of ' if row else ''}{n:,} weights do not split "
                                                 f"into blocks of {quant_cfg.blocksize}")


def apply(model: torch.nn.Module, quant_cfg, dtype: torch.dtype, device: str) -> None:
    """Replace every target layer of `model` (loaded in `dtype` on `device`) by its quantized form."""
    layers = targets(model)
    check_blocks(layers, quant_cfg, device)
    build = {"bitsandbytes": _bitsandbytes, "hqq": _hqq, "torchao": _torchao}[quant_cfg.backend]
    for name, linear in layers.items():
        model.set_submodule(name, compute_in(build(linear, quant_cfg, dtype, device), dtype))


def compute_in(layer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Multiply in the compute dtype and return the input's, as bitsandbytes' Linear4bit does:
    the recipe up-casts the norms to float32, so a layer's input is float32 while HQQ's dequantized
    weight is bf16 (a dtype error) and torchao's NF4 would dequantize to float32 (a float32 matmul,
    unlike bitsandbytes'). bitsandbytes' own layers cast for themselves."""
    if type(layer).__name__ == "Linear4bit":
        return layer

    def cast_in(module, args):
        module.qlab_input_dtype = args[0].dtype
        return (args[0].to(dtype), *args[1:])

    layer.register_forward_pre_hook(cast_in)
    layer.register_forward_hook(lambda module, args, out: out.to(module.qlab_input_dtype))
    return layer


# the module each backend's builder imports
BACKEND_MODULES = {"bitsandbytes": "bitsandbytes", "hqq": "hqq.core.quantize",
                   "torchao": "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"}


def missing(backend: str) -> str | None:
    """Why quant.backend=`backend` cannot quantize here (its package is absent or does not import),
    or None."""
    try:
        importlib.import_module(BACKEND_MODULES[backend])
    except Exception as e:  # ImportError, or a build made for another torch failing as it loads
        return (f"quant.backend={backend} needs the {backend} package, which does not import here "
                f"({type(e).__name__}: {e}); install it (pip install {backend})")
    return None


def _bitsandbytes(linear, q, dtype: torch.dtype, device: str):
    import bitsandbytes as bnb

    out = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            compute_dtype=dtype, compress_statistics=q.double_quant, quant_type=q.type,
                            quant_storage=torch.uint8, device="meta")
    out.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=q.blocksize,
                                   compress_statistics=q.double_quant, quant_type=q.type,
                                   quant_storage=torch.uint8, module=out).to(device)  # quantizes on the move
    if linear.bias is not None:
        out.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return out


def _hqq(linear, q, dtype: torch.dtype, device: str):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    # axis=1: groups along the input dimension, as transformers' HqqConfig; PyTorch backend (no
    # compiled extension): forward dequantizes the weight and multiplies
    return HQQLinear(linear, BaseQuantizeConfig(nbits=4, group_size=q.blocksize, axis=1),
                     compute_dtype=dtype, device=device, del_orig=True)


def _torchao(linear, q, dtype: torch.dtype, device: str):
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    w = linear.weight.data.to(dtype)
    # F.linear on the NF4 tensor dequantizes it to the input's dtype (torchao's linear_nf4)
    linear.weight = torch.nn.Parameter(to_nf4(w, q.blocksize, torchao_scaler_block(w.numel(), q.blocksize)),
                                       requires_grad=False)
    return linear


def is_quantized(p: torch.Tensor) -> bool:
    """A parameter that holds quantized weights (never up-cast, never trained)."""
    return type(p).__name__ in ("Params4bit", "Int8Params", "NF4Tensor") or not p.is_floating_point()


def hqq_layers(model: torch.nn.Module):
    """HQQ's layers: their scales and zero points are plain tensors, not parameters."""
    try:
        from hqq.core.quantize import HQQLinear
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, HQQLinear)]
