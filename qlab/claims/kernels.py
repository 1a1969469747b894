"""The storage types of the QLoRA ablation as kernels: quantize, dequantize, the round trip's
error. Only computation: timing is in tests/claims/test_kernels.py and experiments/kernels.py.

Kinds: nf4 and fp4 (bitsandbytes 4-bit, one absmax per `blocksize` weights; `double_quant`
quantizes those constants to 8 bits in blocks of 256), int4 (qlab's reference blockwise absmax
integer quantizer, not a bitsandbytes type) and int8 (LLM.int8's `int8_vectorwise_quant`, one
absmax per row, as Linear8bitLt's SCB). Storage per weight, per-tensor code tables left out:
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
BNB_4BIT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what quantize_4bit accepts; QLoRA's is 64
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


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x flattened into rows of `blocksize`, the last zero-padded (zeros change no absmax)."""
    flat = x.reshape(-1).float()
    return torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)


def int4_quantize(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's "Int4", which bitsandbytes lacks: per block of `blocksize` values of the
    flattened tensor, scale = absmax / 7 and q = round(x / scale) in -7..7 (symmetric, so
    absmax maps to +-7 and 0 is exact; docs/kernels.md says why not -8..7). An all-zero block
    gets scale 0. Returns (int8 codes of x's shape, unpacked; float32 scale per block)."""
    blocks = _blocks(x, blocksize)
    scale = blocks.abs().amax(dim=1) / INT4_LEVELS
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # 0/0 for all-zero blocks
    q = torch.round(blocks / safe[:, None]).clamp_(-INT4_LEVELS, INT4_LEVELS).to(torch.int8)
    return q.reshape(-1)[:x.numel()].view(x.shape), scale


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, blocksize: int, dtype=torch.float32) -> torch.Tensor:
    return (_blocks(q, blocksize) * scale[:, None]).reshape(-1)[:q.numel()].view(q.shape).to(dtype)


def quantize(x: torch.Tensor, kind: str, blocksize: int = 64, double_quant: bool = False) -> Quantized:
    import bitsandbytes.functional as F

    _check(kind, blocksize, double_quant)
    if kind in FOUR_BIT_BNB:
        data, state = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type=kind)
        return Quantized(kind, data, state, x.shape, x.dtype, blocksize)
    if kind == "int4":
        q, scale = int4_quantize(x, blocksize)
        return Quantized(kind, q, scale, x.shape, x.dtype, blocksize)
    # int8: LLM.int8 row-wise absmax over the last dimension, q = round(127 * x / absmax_row); in
    # float16 on every device, as Int8Params casts weights before the CUDA kernel
    rows = x.reshape(-1, x.shape[-1]).to(torch.float16)
    codes, row_absmax, _ = F.int8_vectorwise_quant(rows)  # threshold 0: no outlier split
    return Quantized(kind, codes, row_absmax, x.shape, x.dtype, None)


def dequantize(q: Quantized) -> torch.Tensor:
    """Back to q's original shape and dtype. nf4/fp4 decode the flattened tensor: their blocks
    run over it, and bitsandbytes' CPU kernel, given rows, misplaces the constants of rows that
    are not a multiple of blocksize (docs/kernels.md)."""
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


def _from_sums(n: int, sq: float, signal: float, max_abs: float, abs_sum: float) -> dict:
    """The error statistics of n values from their sums: of err^2, of x^2 and of |err|."""
    db = math.inf if sq == 0 else 10 * math.log10(signal / sq) if signal > 0 else -math.inf
    return {"n": n, "mse": sq / n, "rmse": math.sqrt(sq / n), "max_abs_error": max_abs, "mean_abs_error": abs_sum / n,
            "signal_power": signal / n, "sqnr_db": db}  # signal_power: mean x^2; SQNR = signal_power / mse


def error_stats(x: torch.Tensor, xhat: torch.Tensor) -> dict:
    """Error of `xhat` against `x`, in float32 (sums in float64, exact for large tensors)."""
    x = x.float()
    err = xhat.float() - x
    e = err.double()
    return _from_sums(x.numel(), e.square().sum().item(), x.double().square().sum().item(), err.abs().max().item(),
                      e.abs().sum().item())


def quantization_error(x: torch.Tensor, kind: str, blocksize: int = 64, double_quant: bool = False) -> dict:
    """MSE, RMSE, max and mean absolute error, and SQNR (dB) = 10 log10(sum x^2 / sum err^2)
    of the round trip, against the original x."""
    return error_stats(x, round_trip(x, kind, blocksize, double_quant))


def combine_errors(parts: list[dict]) -> dict:
    """The error_stats of several tensors taken as one (all weights of a model), from pooled sums."""
    pooled = lambda key: sum(p[key] * p["n"] for p in parts)  # noqa: E731
    return _from_sums(sum(p["n"] for p in parts), pooled("mse"), pooled("signal_power"),
                      max(p["max_abs_error"] for p in parts), pooled("mean_abs_error"))
