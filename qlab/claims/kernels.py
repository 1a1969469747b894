"""The storage types of the QLoRA ablation as kernels: quantize, dequantize, and the error of the
round trip. Timing lives in tests/test_kernels.py (pytest-benchmark, small) and
experiments/kernels.py (real sizes); this module only computes.

Kinds (what a weight of the ablation is stored as):
  nf4   bitsandbytes 4-bit NormalFloat, one absmax per `blocksize` weights
  fp4   bitsandbytes 4-bit float (e2m1), one absmax per `blocksize` weights
  int4  qlab's reference blockwise absmax integer quantizer (below): NOT a bitsandbytes type
  int8  LLM.int8's weight storage: bitsandbytes `int8_vectorwise_quant`, one absmax per row
        (Linear8bitLt's SCB); `blocksize` does not apply, a block is a whole row
`double_quant` (nf4/fp4 only) quantizes the absmax constants to 8 bits in blocks of 256,
as `bnb_4bit_use_double_quant` does.

Storage per weight, per-tensor lookup tables left out (`storage_bits`):
  nf4/fp4, int4   4 + 32/blocksize              blocksize 64: 4 + 32/64 = 4.5 bits
  nf4/fp4 + DQ    4 + 8/blocksize + 32/(256*blocksize)   64: 4 + 0.125 + 0.002 = 4.127 bits
  int8            8 + 32/row_len                row_len 4096: 8.0078 bits
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

KINDS = ("nf4", "fp4", "int4", "int8")
FOUR_BIT_BNB = ("nf4", "fp4")
# bitsandbytes 0.50 `functional.quantize_4bit` accepts these (32 needs bnb >= 0.48 on CUDA;
# ROCm builds start at 64). The QLoRA default, and transformers' Linear4bit's, is 64.
BNB_4BIT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DQ_BLOCKSIZE = 256  # double quant: the absmax constants in blocks of 256, 8-bit dynamic map
INT4_LEVELS = 7  # reference int4: codes -7..7


@dataclass
class Quantized:
    kind: str
    data: torch.Tensor  # packed uint8, 2 weights per byte (nf4/fp4); int8 codes (int4, int8)
    state: object  # bnb QuantState (nf4/fp4); float32 scale per block (int4) or per row (int8)
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int | None  # None for int8: one scale per row


def _check(kind: str, blocksize: int, double_quant: bool) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
    if double_quant and kind not in FOUR_BIT_BNB:
        raise ValueError(f"double_quant applies to nf4/fp4 absmax constants only, not {kind}")
    if kind in FOUR_BIT_BNB and blocksize not in BNB_4BIT_BLOCKSIZES:
        raise ValueError(f"bitsandbytes 4-bit blocksize must be one of {BNB_4BIT_BLOCKSIZES}, got {blocksize}")
    if kind == "int4" and blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")


# --------------------------------------------------------------------------- reference int4


def int4_quantize(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """qlab's reference implementation of the "Int4" the QLoRA paper compares NF4 and FP4
    against: blockwise absmax integer quantization in plain torch. bitsandbytes has no plain
    int4 type; this is for error measurement (codes are kept one per int8, unpacked).

    Over the flattened tensor, per block of `blocksize` values (the last block may be short,
    as in bitsandbytes): scale = absmax / 7, q = round(x / scale) clamped to [-7, 7].
    Symmetric, 15 of the 16 codes: absmax maps to +-7 exactly, so both signs reach the block's
    extreme and 0 is exact. The two's-complement range [-8, 7] would either scale by absmax/8
    and clip a positive absmax to 7/8 of itself, or scale by absmax/7 and never use -8; either
    way the 16th code buys nothing for absmax scaling. Cost: log2(15) = 3.91 of 4 bits used.
    An all-zero block gets scale 0 and dequantizes to zeros.
    Returns (q: int8 codes of x's shape, scale: float32, one per block)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = -n % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # zero padding: no effect on absmax
    scale = blocks.abs().amax(dim=1) / INT4_LEVELS
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # 0/0 for all-zero blocks
    q = torch.round(blocks / safe[:, None]).clamp_(-INT4_LEVELS, INT4_LEVELS).to(torch.int8)
    return q.reshape(-1)[:n].view(x.shape), scale


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, blocksize: int, dtype=torch.float32) -> torch.Tensor:
    flat = q.reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    return (blocks * scale[:, None]).reshape(-1)[:n].view(q.shape).to(dtype)


# --------------------------------------------------------------------------- the four kinds


def quantize(x: torch.Tensor, kind: str, blocksize: int = 64, double_quant: bool = False) -> Quantized:
    import bitsandbytes.functional as F

    _check(kind, blocksize, double_quant)
    if kind in FOUR_BIT_BNB:
        data, state = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type=kind)
        return Quantized(kind, data, state, x.shape, x.dtype, blocksize)
    if kind == "int4":
        q, scale = int4_quantize(x, blocksize)
        return Quantized(kind, q, scale, x.shape, x.dtype, blocksize)
    # int8: LLM.int8 row-wise absmax, 127 levels each side: q = round(127 * x / absmax_row).
    # Rows are the last dimension (a weight's input features, as Linear8bitLt). bitsandbytes'
    # CUDA kernel takes float16 only, and Int8Params casts weights to float16 before it, so
    # we cast too, on every device: the same numbers on CPU and GPU.
    rows = x.reshape(-1, x.shape[-1]).to(torch.float16)
    codes, row_absmax, _ = F.int8_vectorwise_quant(rows)  # threshold 0: no outlier split
    return Quantized(kind, codes, row_absmax, x.shape, x.dtype, None)


def dequantize(q: Quantized) -> torch.Tensor:
    """Back to q's original shape and dtype.

    nf4/fp4 decode the flattened tensor: bitsandbytes 0.50.2's CPU (AVX-512) dequantize_4bit
    kernel indexes absmax per row, so for a row length that is not a multiple of blocksize
    (e.g. a 256-wide weight at blocksize 512, or 96-wide at 64) it applies the wrong
    constants; its blocks are over the flattened tensor, so one row of numel is right
    everywhere (on CUDA the kernel is flat anyway). tests/test_kernels.py checks the decode
    against a hand-written one."""
    import bitsandbytes.functional as F

    if q.kind in FOUR_BIT_BNB:
        flat_state = copy.copy(q.state)
        flat_state.shape = torch.Size([q.shape.numel()])
        return F.dequantize_4bit(q.data, flat_state).view(q.shape).to(q.dtype)
    if q.kind == "int4":
        return int4_dequantize(q.data, q.state, q.blocksize, q.dtype)
    return F.int8_vectorwise_dequant(q.data, q.state).view(q.shape).to(q.dtype)  # codes * absmax / 127


def round_trip(x: torch.Tensor, kind: str, blocksize: int = 64, double_quant: bool = False) -> torch.Tensor:
    """dequantize(quantize(x)): what a layer computes with in place of x."""
    return dequantize(quantize(x, kind, blocksize, double_quant))


def storage_bits(kind: str, blocksize: int = 64, double_quant: bool = False, row_len: int | None = None) -> float:
    """Bits per weight, constants included, per-tensor code tables left out (arithmetic in
    the module docstring). int8 needs `row_len`: one float32 absmax per row."""
    _check(kind, blocksize, double_quant)
    if kind == "int8":
        if not row_len:
            raise ValueError("int8 storage needs row_len (one float32 scale per row)")
        return 8 + 32 / row_len
    if double_quant:
        return 4 + 8 / blocksize + 32 / (DQ_BLOCKSIZE * blocksize)
    return 4 + 32 / blocksize


# --------------------------------------------------------------------------- error


def error_stats(x: torch.Tensor, xhat: torch.Tensor) -> dict:
    """Error of `xhat` against `x`, in float32 (sums in float64 so 45M-element weights add up)."""
    x, xhat = x.float(), xhat.float()
    err = xhat - x
    n = x.numel()
    sq = err.double().square().sum().item()
    signal = x.double().square().sum().item()
    mse = sq / n
    return {
        "n": n,
        "mse": mse,
        "rmse": math.sqrt(mse),
        "max_abs_error": err.abs().max().item(),
        "mean_abs_error": err.double().abs().sum().item() / n,
        "signal_power": signal / n,  # mean x^2; SQNR = signal_power / mse
        "sqnr_db": _db(signal, sq),
    }


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def quantization_error(x: torch.Tensor, kind: str, blocksize: int = 64, double_quant: bool = False) -> dict:
    """MSE, RMSE, max and mean absolute error, and SQNR (dB) = 10 log10(sum x^2 / sum err^2)
    of the round trip, against the original x."""
    return error_stats(x, round_trip(x, kind, blocksize, double_quant))


def combine_errors(parts: list[dict]) -> dict:
    """The error_stats of several tensors taken as one (e.g. all weights of a model):
    means weighted by element count, SQNR from the pooled sums."""
    n = sum(p["n"] for p in parts)
    sq = sum(p["mse"] * p["n"] for p in parts)
    signal = sum(p["signal_power"] * p["n"] for p in parts)
    return {
        "n": n,
        "mse": sq / n,
        "rmse": math.sqrt(sq / n),
        "max_abs_error": max(p["max_abs_error"] for p in parts),
        "mean_abs_error": sum(p["mean_abs_error"] * p["n"] for p in parts) / n,
        "signal_power": signal / n,
        "sqnr_db": _db(signal, sq),
    }
