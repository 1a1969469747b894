"""Kernel micro-benchmarks at real sizes, and the quantization error of each storage kind.

    python experiments/kernels.py                      # CUDA if present: LLaMA-7B layer shapes
    python experiments/kernels.py --quick --out /tmp/k # fewer repeats (CPU: well under a minute)
    python experiments/kernels.py --model-path DIR     # errors on a real checkpoint's weights

Times quantize / dequantize and the matmul of a 4 x 512-token batch per storage kind, and measures
each kind's round-trip error on N(0,1) data and on a model's linear weights. Writes
<out>/<gpu-or-cpu-name>.json and .md; shapes, timing and caveats: docs/kernels.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from qlab.claims import kernels as K  # noqa: E402
from qlab.results import stats, store  # noqa: E402
from qlab.run import measure, models, presets  # noqa: E402
from qlab.run.device import resolve_device  # noqa: E402

MiB = 2**20
TIMED_BLOCKSIZES = (64, 128)
ERROR_BLOCKSIZES = (64, 128, 256)
L2_FLUSH_BYTES = 256 * MiB  # > any current L2 (H100 50 MiB, H200 60 MiB)
INT8_THRESHOLD = 6.0  # BitsAndBytesConfig's llm_int8_threshold default

# Per device: weight shapes (out, in), matmul tokens, normal-data shape, preset, dtype.
SIZES = {
    "cuda": dict(weights={"qkvo 4096x4096": (4096, 4096), "gate/up 11008x4096": (11008, 4096)},
                 tokens=2048,  # 4 seq * 512 tok
                 normal=(4096, 4096), preset="llama-7b", dtype=torch.bfloat16),
    "cpu": dict(weights={"qkvo 1024x1024": (1024, 1024), "gate/up 2752x1024": (2752, 1024)},
                tokens=512,  # 1 seq * 512 tok
                normal=(1024, 1024), preset="tiny-llama", dtype=torch.float32),
}
REPEATS = {  # (warm-up calls, timed calls)
    ("cuda", False): (10, 50), ("cuda", True): (5, 15),
    ("cpu", False): (3, 20), ("cpu", True): (2, 10),
}


def timer(device: str, warmup: int, repeats: int):
    """`timed(fn)` -> ms of each of `repeats` calls after `warmup` untimed ones, timed one call at
    a time by measure.StepClock; on CUDA each call starts with a cold L2 (an untimed flush)."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if device == "cuda" else None

    def timed(fn) -> list[float]:
        for _ in range(warmup):
            fn()
        clock = measure.StepClock(device)
        for _ in range(repeats):
            if flush is not None:
                flush.zero_()
            with clock:
                fn()
        return [t * 1e3 for t in clock.times]
    return timed


def bench_kernels(device: str, sizes: dict, timer, log) -> list[dict]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    dtype = sizes["dtype"]
    esize = torch.finfo(dtype).bits // 8
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    models.quiet_bnb_casts()  # Linear8bitLt casts a bf16 input to float16 (timed, as in a real layer)

    def record(op, label, shape, ms, weight, moved=None, flop=None, dtype_label=str(dtype).split(".")[-1]):
        row = {"op": op, "config": label, "weight": weight, "shape": "x".join(map(str, shape)),
               "dtype": dtype_label, **stats.summarize(ms, "", "ms")}
        if moved is not None:  # bytes / ms / 1e6 = GB/s, at the median
            row["gb_per_s"] = moved / row["median_ms"] / 1e6
        if flop is not None:  # flop / ms / 1e9 = TFLOP/s
            row["tflop_per_s"] = flop / row["median_ms"] / 1e9
        rows.append(row)
        log(f"  {op:16s} {label:10s} {row['shape']:>11s}  median {row['median_ms']:.3f} ms  {_rate(row)}")

    with torch.inference_mode():
        for wname, (out_f, in_f) in sizes["weights"].items():
            n = out_f * in_f
            W = torch.randn(out_f, in_f, generator=g, device=device).to(dtype)
            for kind in K.FOUR_BIT_BNB:
                for bs in TIMED_BLOCKSIZES:
                    for dq in (False, True):
                        label = _label(kind, bs, dq)
                        # bytes moved: n weights in, n/2 packed bytes + 4 bytes of absmax per block out
                        # (DQ: 1 byte per block + a second pass over the constants, ignored here)
                        moved = n * esize + n // 2 + 4 * n // bs
                        quant = partial(F.quantize_4bit, W, blocksize=bs, compress_statistics=dq, quant_type=kind)
                        record("quantize_4bit", label, W.shape, timer(quant), wname, moved=moved)
                        packed, state = quant()
                        record("dequantize_4bit", label, W.shape, timer(partial(F.dequantize_4bit, packed, state)),
                               wname, moved=moved)
            # int8 bytes moved: n fp16 in, n int8 + a float32 per row out; back: those in, n float32 out
            W16 = W.to(torch.float16)
            record("int8_quant", "int8", W.shape, timer(partial(F.int8_vectorwise_quant, W16)), wname,
                   moved=n * 2 + n + 4 * out_f, dtype_label="float16")
            codes, scb, _ = F.int8_vectorwise_quant(W16)
            record("int8_dequant", "int8", W.shape, timer(partial(F.int8_vectorwise_dequant, codes, scb)), wname,
                   moved=n + 4 * out_f + 4 * n, dtype_label="int8->float32")

            # matmul: (tokens x in) @ (in x out): 2 * tokens * in * out flop
            x = torch.randn(sizes["tokens"], in_f, generator=g, device=device).to(dtype)
            flop = 2 * sizes["tokens"] * in_f * out_f
            mm_shape = (sizes["tokens"], in_f, out_f)
            record("matmul", "plain", mm_shape, timer(lambda: torch.matmul(x, W.t())), wname, flop=flop)
            for label, kind, dq in (("nf4", "nf4", False), ("nf4+DQ", "nf4", True), ("fp4", "fp4", False)):
                packed, state = F.quantize_4bit(W, blocksize=64, compress_statistics=dq, quant_type=kind)
                ms = timer(partial(bnb.matmul_4bit, x, packed.t(), quant_state=state))
                record("matmul", label, mm_shape, ms, wname, flop=flop)
            lin = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False, threshold=INT8_THRESHOLD)
            lin.weight = bnb.nn.Int8Params(W16.cpu(), requires_grad=False, has_fp16_weights=False)
            lin = lin.to(device)  # quantizes here
            record("matmul", "int8", mm_shape, timer(partial(lin, x)), wname, flop=flop)
            del W, W16, x, lin, packed, state, codes, scb
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _rate(row: dict) -> str:
    if "gb_per_s" in row:
        return f"{row['gb_per_s']:.3g} GB/s"
    return f"{row['tflop_per_s']:.3g} TFLOP/s"


ERROR_SETTINGS = (
    *((kind, bs, dq) for bs in ERROR_BLOCKSIZES for kind in ("nf4", "fp4") for dq in (False, True)),
    *(("int4", bs, False) for bs in ERROR_BLOCKSIZES),
    ("int8", None, False),
)


def error_rows(data: str, tensors, log) -> list[dict]:
    """tensors: a list of 2-D tensors, pooled (kernels.combine_errors) per setting."""
    rows = []
    for kind, bs, dq in ERROR_SETTINGS:
        e = K.combine_errors([K.quantization_error(t, kind, bs or 64, dq) for t in tensors])
        # int8's scale is per row, so its bits/weight depend on each tensor's row length
        bits = sum(K.storage_bits(kind, bs or 64, dq, row_len=t.shape[-1]) * t.numel() for t in tensors)
        rows.append({"data": data, "kind": kind, "blocksize": bs, "double_quant": dq,
                     "label": _label(kind, bs, dq), "storage_bits": bits / e["n"], **e})
        log(f"  {data:24s} {rows[-1]['label']:12s} mse {e['mse']:.3e}  sqnr {e['sqnr_db']:.2f} dB")
    return rows


def _label(kind, bs, dq):
    if kind == "int8":
        return "int8 (row)"
    return f"{kind}-b{bs}" + ("+DQ" if dq else "")


LINEAR_SKIP = re.compile(r"embed|lm_head|wte|wpe|word_embeddings")


def model_linear_weights(path: Path, device: str, layers: str):
    """The 2-D weights transformers would quantize (embeddings and head aside), read from the
    checkpoint's safetensors one tensor at a time. layers: "sample" (first, middle, last) or "all"."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no *.safetensors in {path}")
    names = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                m = re.search(r"\.(\d+)\.", name)
                is_2d = len(st.get_slice(name).get_shape()) == 2
                if name.endswith(".weight") and m and is_2d and not LINEAR_SKIP.search(name):
                    names[name] = (f, int(m.group(1)))
    if not names:
        raise SystemExit(f"no per-layer 2-D weights found in {path}")
    idx = sorted({i for _, i in names.values()})
    keep = set(idx) if layers == "all" else {idx[0], idx[len(idx) // 2], idx[-1]}
    out = []
    for name, (f, i) in sorted(names.items()):
        if i in keep:
            with safe_open(str(f), framework="pt", device=device) as st:
                out.append(st.get_tensor(name))
    return out, sorted(keep), len(idx)


def markdown(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    hw = env["gpu"] or env["cpu"]
    lines = [f"# Kernel benchmarks: {hw}", ""]
    if result["cpu_fallback"]:
        lines += ["**CPU fallback**: no CUDA; quarter-width shapes in float32. Not GPU numbers.", ""]
    lines += [f"torch {env['torch']}, bitsandbytes {env['bitsandbytes']}, CUDA {env['cuda']}, "
              f"driver {env['driver']}; {s['warmup']} warm-up + {s['repeats']} timed calls each"
              + (", cold L2" if s["flush_l2"] else "") + (", --quick" if result["quick"] else "") + ".", ""]
    if result["timings"]:
        lines += ["## Time per call (ms)", "",
                  "| op | config | shape | dtype | median | p90 | 95% CI of mean | rate |",
                  "|---|---|---|---|---:|---:|---|---:|"]
        for r in result["timings"]:
            ci = f"{r['ci95_low_ms']:.3f}-{r['ci95_high_ms']:.3f}" if "ci95_low_ms" in r else "-"
            lines.append(f"| {r['op']} | {r['config']} | {r['shape']} | {r['dtype']} | {r['median_ms']:.3f} | "
                         f"{r['p90_ms']:.3f} | {ci} | {_rate(r)} |")
        lines += ["", "matmul shape is tokens x in x out; matmul int8 is bitsandbytes' Linear8bitLt "
                  f"(threshold {INT8_THRESHOLD}), which casts a bfloat16 input to float16. GB/s counts bytes "
                  "read + written once (DQ's second pass over the constants not counted).", ""]
    lines += ["## Quantization error (round trip, float32)", ""]
    for data in dict.fromkeys(r["data"] for r in result["errors"]):
        note = result["error_data"][data]
        lines += [f"**{data}**: {note}", "",
                  "| setting | bits/weight | MSE | RMSE | max abs | mean abs | SQNR (dB) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["errors"]:
            if r["data"] == data:
                lines.append(f"| {r['label']} | {r['storage_bits']:.3f} | {r['mse']:.3e} | {r['rmse']:.3e} | "
                             f"{r['max_abs_error']:.3e} | {r['mean_abs_error']:.3e} | {r['sqnr_db']:.2f} |")
        lines.append("")
    lines += ["int4 is qlab's reference blockwise absmax quantizer (codes -7..7), not a bitsandbytes type; "
              "int8 is LLM.int8's row-wise absmax (one float32 scale per row). bits/weight: constants "
              "included, per-tensor code tables not.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (same shapes)")
    p.add_argument("--out", default=str(ROOT / "results" / "kernels"), help="output directory")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--model-path", help="a checkpoint directory with *.safetensors (default: the preset)")
    p.add_argument("--layers", default="sample", choices=["sample", "all"], help="model layers for the error")
    p.add_argument("--skip-timing", action="store_true", help="errors only")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    sizes = SIZES[device]
    warmup, repeats = REPEATS[(device, args.quick)]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    env = store.environment()
    log(f"kernels on {env['gpu'] or env['cpu']} ({device}{', quick' if args.quick else ''})")

    timings = [] if args.skip_timing else bench_kernels(device, sizes, timer(device, warmup, repeats), log)

    log("quantization error")
    g = torch.Generator(device=device).manual_seed(1)
    normal = torch.randn(sizes["normal"], generator=g, device=device)
    normal_name = f"N(0,1) {sizes['normal'][0]}x{sizes['normal'][1]}"
    error_data = {normal_name: "standard normal data, float32: the distribution NF4 is built for."}
    errors = error_rows(normal_name, [normal], log)
    del normal
    if args.model_path:
        path, what = Path(args.model_path), f"checkpoint {Path(args.model_path).name}"
        origin = "real checkpoint weights"
    else:
        path = presets.ensure(sizes["preset"], device=device)
        what, origin = f"preset {sizes['preset']}", "RANDOM-INIT weights (normal, std 0.02), not trained ones"
    weights, kept, n_layers = model_linear_weights(path, device, args.layers)
    n_params = sum(w.numel() for w in weights)
    model_name = f"{what} weights"
    error_data[model_name] = (f"{origin}; linear weights of layers {kept} of {n_layers} "
                              f"({len(weights)} tensors, {n_params / 1e6:.1f}M values, stored as "
                              f"{str(weights[0].dtype).split('.')[-1]}).")
    errors += error_rows(model_name, weights, log)
    del weights

    result = {
        "benchmark": "kernels", "created_at": store.now(), "git_commit": store.git_commit(), "environment": env,
        "device": device, "cpu_fallback": device == "cpu", "quick": args.quick,
        "settings": {"warmup": warmup, "repeats": repeats, "flush_l2": device == "cuda",
                     "dtype": str(sizes["dtype"]).split(".")[-1], "weights": sizes["weights"],
                     "matmul_tokens": sizes["tokens"], "timed_blocksizes": TIMED_BLOCKSIZES,
                     "int8_threshold": INT8_THRESHOLD, "model": str(path), "layers": args.layers},
        "timings": timings, "errors": errors, "error_data": error_data,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = store.device_slug(env)
    store.atomic_write_json(out / f"{stem}.json", result)
    md = markdown(result)
    (out / f"{stem}.md").write_text(md)
    print(md)
    log(f"wrote {out / stem}.json and .md in {result['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
