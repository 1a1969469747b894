"""qlab.kernels: correctness of the four storage kinds, and pytest-benchmark micro-benchmarks at
small CPU sizes (a 256x256 weight). The benchmarks' numbers are for comparing kernels on one
machine; the numbers we report come from experiments/kernels.py at real sizes."""

import math

import pytest
import torch

from qlab.claims import kernels as K

W_SHAPE = (256, 256)  # 65,536 weights: 1,024 blocks of 64
BATCH = 8  # matmul input (8, 256): a few tokens through one layer


@pytest.fixture
def normal():
    g = torch.Generator().manual_seed(0)
    return torch.randn(W_SHAPE, generator=g)


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("kind", K.KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_keeps_shape_and_dtype(kind, dtype, normal):
    x = normal.to(dtype)
    y = K.round_trip(x, kind)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.isfinite(y).all()


def test_nf4_beats_fp4_and_int4_on_normal_data(normal):
    """QLoRA's claim 2 on its own premise (normally distributed weights), at blocksize 64."""
    mse = {kind: K.quantization_error(normal, kind, 64)["mse"] for kind in ("nf4", "fp4", "int4")}
    assert mse["nf4"] < mse["fp4"]
    assert mse["nf4"] < mse["int4"]


def test_error_metrics_agree(normal):
    e = K.quantization_error(normal, "nf4")
    assert e["n"] == normal.numel()
    assert e["rmse"] == pytest.approx(math.sqrt(e["mse"]))
    assert 0 < e["mean_abs_error"] <= e["rmse"] <= e["max_abs_error"]
    assert e["sqnr_db"] == pytest.approx(10 * math.log10(e["signal_power"] / e["mse"]))
    assert e["max_abs_error"] <= normal.abs().max()  # 4-bit codes span [-absmax, absmax]


@pytest.mark.parametrize("kind", K.FOUR_BIT_BNB)
def test_double_quant_shrinks_absmax_not_accuracy(kind, normal):
    plain, dq = K.quantize(normal, kind), K.quantize(normal, kind, double_quant=True)
    # one absmax per 64 weights either way: float32 without DQ, uint8 codes with it
    assert plain.state.absmax.dtype == torch.float32 and not plain.state.nested
    assert dq.state.absmax.dtype == torch.uint8 and dq.state.nested
    assert dq.state.absmax.numel() == plain.state.absmax.numel() == normal.numel() // 64
    assert torch.equal(dq.data, plain.data)  # the 4-bit codes themselves are the same
    e_plain = K.quantization_error(normal, kind)["mse"]
    e_dq = K.quantization_error(normal, kind, double_quant=True)["mse"]
    assert e_dq <= 1.05 * e_plain  # 8-bit absmax costs well under 5% MSE on normal data
    assert K.storage_bits(kind) == 4.5  # 4 + 32/64
    assert K.storage_bits(kind, double_quant=True) == pytest.approx(4 + 8 / 64 + 32 / (256 * 64))  # 4.127


def test_int8_far_below_four_bit(normal):
    e8 = K.quantization_error(normal, "int8")["mse"]
    for kind in ("nf4", "fp4", "int4"):
        assert e8 * 50 < K.quantization_error(normal, kind)["mse"]


def test_int4_reference_by_hand():
    x = torch.tensor([7.0, -2.4, 0.6, 0.0, -3.5, 1.2, 0.26, 2.0])
    q, scale = K.int4_quantize(x, blocksize=4)
    # block 1: absmax 7.0, scale 7/7 = 1.0:  7, -2.4, 0.6, 0    -> 7, -2, 1, 0
    # block 2: absmax 3.5, scale 3.5/7 = 0.5: -7, 2.4, 0.52, 4  -> -7, 2, 1, 4
    assert scale.tolist() == [1.0, 0.5]
    assert q.dtype == torch.int8 and q.tolist() == [7, -2, 1, 0, -7, 2, 1, 4]
    y = K.int4_dequantize(q, scale, blocksize=4)
    assert y.tolist() == [7.0, -2.0, 1.0, 0.0, -3.5, 1.0, 0.5, 2.0]
    assert torch.equal(K.round_trip(x, "int4", 4), y)


def test_int4_short_last_block_and_zero_block():
    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, -1.0])  # a zero block, then a block of 2
    q, scale = K.int4_quantize(x, blocksize=4)
    assert scale.tolist() == [0.0, pytest.approx(3 / 7)]
    assert q.tolist() == [0, 0, 0, 0, 7, -2]  # -1 / (3/7) = -2.33
    assert K.int4_dequantize(q, scale, 4).tolist() == pytest.approx([0, 0, 0, 0, 3.0, -6 / 7])


def _decode_4bit(q: K.Quantized) -> torch.Tensor:
    """bitsandbytes' layout by hand: two codes per byte, high nibble first; value = code[i] *
    absmax of its block of the flattened tensor."""
    packed = q.data.reshape(-1)
    idx = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: q.shape.numel()].long()
    absmax = q.state.absmax.repeat_interleave(q.blocksize)[: q.shape.numel()]
    return (q.state.code[idx] * absmax).view(q.shape)


@pytest.mark.parametrize("shape,blocksize", [((256, 256), 64), ((100, 96), 64), ((64, 192), 128), ((16, 256), 512)])
@pytest.mark.parametrize("kind", K.FOUR_BIT_BNB)
def test_dequantize_matches_hand_decode(kind, shape, blocksize):
    """Rows shorter than, or not a multiple of, the block: bitsandbytes 0.50.2's CPU kernel
    gets these wrong when given the 2-D shape; qlab.kernels.dequantize must not."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    q = K.quantize(x, kind, blocksize)
    torch.testing.assert_close(K.dequantize(q), _decode_4bit(q))


def test_rejects_bad_combinations(normal):
    with pytest.raises(ValueError, match="double_quant"):
        K.quantize(normal, "int8", double_quant=True)
    with pytest.raises(ValueError, match="blocksize"):
        K.quantize(normal, "nf4", blocksize=48)
    with pytest.raises(ValueError, match="unknown kind"):
        K.quantize(normal, "int3")
    K.quantize(normal, "int4", blocksize=48)  # the reference takes any blocksize


def test_combine_errors_equals_concatenation(normal):
    a, b = normal[:100], normal[100:] * 3
    parts = [K.quantization_error(a, "nf4"), K.quantization_error(b, "nf4")]
    whole = K.error_stats(torch.cat([a, b]), torch.cat([K.round_trip(a, "nf4"), K.round_trip(b, "nf4")]))
    combined = K.combine_errors(parts)
    for key in whole:
        assert combined[key] == pytest.approx(whole[key], rel=1e-9)


# --------------------------------------------------------------------------- micro-benchmarks

ROUNDS = dict(rounds=5, iterations=1, warmup_rounds=1)  # ~1 ms kernels: the file stays fast
FOUR_BIT = [(kind, bs, dq) for kind in K.FOUR_BIT_BNB for bs in (64, 128) for dq in (False, True)]


def _id(case):
    kind, bs, dq = case
    return f"{kind}-b{bs}" + ("-dq" if dq else "")


@pytest.mark.benchmark(group="quantize_4bit")
@pytest.mark.parametrize("case", FOUR_BIT, ids=_id)
def test_bench_quantize_4bit(benchmark, case, normal):
    import bitsandbytes.functional as F

    kind, bs, dq = case
    packed, state = benchmark.pedantic(
        F.quantize_4bit, args=(normal,), kwargs=dict(blocksize=bs, compress_statistics=dq, quant_type=kind), **ROUNDS)
    assert packed.shape == (normal.numel() // 2, 1)  # 2 weights per byte
    assert state.absmax.numel() == normal.numel() // bs


@pytest.mark.benchmark(group="dequantize_4bit")
@pytest.mark.parametrize("case", FOUR_BIT, ids=_id)
def test_bench_dequantize_4bit(benchmark, case, normal):
    import bitsandbytes.functional as F

    kind, bs, dq = case
    packed, state = F.quantize_4bit(normal, blocksize=bs, compress_statistics=dq, quant_type=kind)
    out = benchmark.pedantic(F.dequantize_4bit, args=(packed, state), **ROUNDS)
    assert out.shape == normal.shape and out.dtype == normal.dtype
    assert ((out - normal) ** 2).mean() < 0.03  # 4-bit on N(0,1): MSE ~0.008 (nf4) .. 0.017 (fp4)


@pytest.mark.benchmark(group="int8")
def test_bench_int8_quantize(benchmark, normal):
    import bitsandbytes.functional as F

    half = normal.half()
    codes, row_absmax, _ = benchmark.pedantic(F.int8_vectorwise_quant, args=(half,), **ROUNDS)
    assert codes.dtype == torch.int8 and codes.shape == normal.shape
    torch.testing.assert_close(row_absmax, half.abs().amax(dim=1).float())


@pytest.mark.benchmark(group="int8")
def test_bench_int8_dequantize(benchmark, normal):
    import bitsandbytes.functional as F

    codes, row_absmax, _ = F.int8_vectorwise_quant(normal.half())
    out = benchmark.pedantic(F.int8_vectorwise_dequant, args=(codes, row_absmax), **ROUNDS)
    assert (out - normal).abs().max() <= row_absmax.max() / 127  # half a step of 1/127, fp16 cast aside


@pytest.mark.benchmark(group="matmul")
@pytest.mark.parametrize("weight", ["fp32", "nf4", "nf4-dq", "fp4"])
def test_bench_matmul(benchmark, weight, normal):
    """(8, 256) float32 input through a 256x256 layer: plain float32 vs bnb.matmul_4bit."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    x = torch.randn(BATCH, W_SHAPE[1], generator=torch.Generator().manual_seed(2))
    if weight == "fp32":
        out = benchmark.pedantic(torch.matmul, args=(x, normal.t()), **ROUNDS)
        torch.testing.assert_close(out, x.double().matmul(normal.double().t()).float(), rtol=1e-4, atol=1e-4)
        return
    kind, dq = weight.split("-")[0], weight.endswith("-dq")
    packed, state = F.quantize_4bit(normal, blocksize=64, compress_statistics=dq, quant_type=kind)
    out = benchmark.pedantic(bnb.matmul_4bit, args=(x, packed.t()), kwargs=dict(quant_state=state), **ROUNDS)
    assert out.shape == (BATCH, W_SHAPE[0])
    # the same product as float32 matmul with the dequantized weight: 4-bit changes W, not the math
    torch.testing.assert_close(out, x @ F.dequantize_4bit(packed, state).t(), rtol=1e-4, atol=1e-4)
