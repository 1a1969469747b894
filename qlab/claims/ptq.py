"""Post-training quantization of the pretrained base: held-out perplexity per storage type (the
paper's Table 2) and the quantization error of the base's real weights.

    python -m qlab.claims.ptq --size tiny|small|gpu|auto [--device auto] [--results results] [--max-tokens N]

Each type is loaded afresh (models.load) and evaluated on the same held-out windows; int4, which
bitsandbytes lacks, is the bf16 base with every quantized layer's weight replaced by its
kernels.round_trip. Two types are compared window by window (stats.paired_log_ratio). Writes
<results>/ptq-base-<size>/ptq.json and ptq.md; the method is in docs/pretrained-base.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

from qlab.claims import estimate, kernels
from qlab.config import QUANT_SETTINGS, ModelConfig, QuantConfig
from qlab.reference import pretrain
from qlab.results import stats, store
from qlab.run import models
from qlab.run.device import resolve_device

# label -> (quant.type for models.load, double_quant); "int4" is loaded as bf16, then rounded
TYPES: dict[str, tuple[str, bool]] = {**QUANT_SETTINGS, "int4": ("bf16", False)}
BLOCKSIZE = 64  # bitsandbytes' Linear4bit default and the paper's
ERROR_KINDS: dict[str, tuple[str, bool]] = {  # label -> (kernels kind, double_quant)
    "nf4": ("nf4", False), "fp4": ("fp4", False), "int4": ("int4", False),
    "nf4+DQ": ("nf4", True), "fp4+DQ": ("fp4", True),
}


def result_dir(results: Path | str, size: str) -> Path:
    return Path(results) / f"ptq-base-{size}"


def decoder_linears(model) -> list[tuple[str, object]]:
    """(name, module) of every layer transformers' bitsandbytes integration quantizes (for a
    LLaMA: every decoder linear layer, not the head): estimate.quantized_linears, shared."""
    return list(estimate.quantized_linears(model).items())


def int4_in_place(model) -> int:
    """Replace every decoder linear weight by its int4 round trip (kernels.round_trip: absmax
    per BLOCKSIZE weights of the flattened tensor, as bitsandbytes blocks them). Returns the
    number of weights quantized."""
    n = 0
    with torch.no_grad():
        for _, m in decoder_linears(model):
            m.weight.data.copy_(kernels.round_trip(m.weight.data, "int4", BLOCKSIZE))
            n += m.weight.numel()
    return n


def _model_cfg(size: str):
    return ModelConfig(name=f"base-{size}", name_or_path=None, preset=None, base=size)


def measure_type(label: str, size: str, device: str, texts: list[str], seq_len: int,
                 max_tokens: int | None) -> dict:
    """Load the base as `label`, evaluate it; per-window NLLs kept for the paired comparison."""
    qtype, dq = TYPES[label]
    quant = QuantConfig(type=qtype, double_quant=dq)
    loaded = models.load(_model_cfg(size), quant, device)
    wb = dict(loaded.weight_bytes)
    if label == "int4":
        t0 = time.perf_counter()
        n = int4_in_place(loaded.model)
        held = sum(m.weight.numel() * m.weight.element_size() for _, m in decoder_linears(loaded.model))
        # int4 storage: 4 bits per weight + a float32 absmax per 64 = 4.5 bits (kernels.storage_bits)
        wb = {**models.weight_record(math.ceil(n * 4 / 8), math.ceil(n / BLOCKSIZE) * 4, wb["weight_bytes"] - held, n),
              "weight_bytes_basis": "computed: int4 storage of the decoder linear weights (held dequantized)",
              "int4_round_trip_s": time.perf_counter() - t0}
    else:
        wb["weight_bytes_basis"] = "held (models.weight_bytes of the loaded model)"
    t0 = time.perf_counter()
    ev = pretrain.heldout_eval(loaded.model, loaded.tokenizer, texts, seq_len, max_tokens, per_window=True)
    eval_s = time.perf_counter() - t0
    out = {"quant": qtype, "double_quant": dq,
           "compute_dtype": str(models.compute_dtype(quant, device)).removeprefix("torch."),
           "loss": ev["loss"], "perplexity": ev["perplexity"], "tokens": ev["tokens"],
           "load_time_s": loaded.load_time_s, "eval_s": eval_s, **wb,
           "window_nll": ev["window_nll"], "window_tokens": ev["window_tokens"]}
    del loaded  # the next type loads afresh
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def weight_errors(path: Path | str, device: str = "cpu") -> dict:
    """Pooled quantization error of every decoder linear weight of the stored checkpoint (its own
    float32 values, not a bf16 cast), per kind in ERROR_KINDS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    weights = [m.weight.detach().to(device) for _, m in decoder_linears(model)]
    return {label: {**kernels.combine_errors([kernels.quantization_error(w, kind, BLOCKSIZE, dq) for w in weights]),
                    "tensors": len(weights)} for label, (kind, dq) in ERROR_KINDS.items()}


def measure(size: str, device: str = "auto", results: Path | str = "results", max_tokens: int | None = None,
            types: list[str] | None = None, progress: bool = True) -> Path:
    """Run the PTQ measurement of base-<size> and write ptq.json / ptq.md; returns ptq.json's path."""
    device = resolve_device(device)
    spec = pretrain.spec_for(size)
    types = list(types or TYPES)
    unknown = [t for t in types if t not in TYPES]
    if unknown or "bf16" not in types:
        raise ValueError(f"types must include bf16 and come from {', '.join(TYPES)}; got {types}")
    t_start = time.perf_counter()
    path = Path(models.model_path(_model_cfg(size), device))  # builds the base if missing (pretrain.ensure_base)
    info = json.loads((path / "base.json").read_text())
    texts = pretrain.heldout_texts()
    seq_len = spec["seq_len"]
    max_tokens = spec["eval_tokens"] if max_tokens is None else max_tokens

    per: dict[str, dict] = {}
    for label in types:
        r = per[label] = measure_type(label, size, device, texts, seq_len, max_tokens)
        if progress:
            print(f"[ptq base-{size}] {label:7s} perplexity {r['perplexity']:.4f} ({r['tokens']:,} tokens, "
                  f"{r['weight_bytes'] / 2**20:.2f} MiB weights, load {r['load_time_s']:.1f}s, "
                  f"eval {r['eval_s']:.1f}s)", file=sys.stderr, flush=True)
    ref = per["bf16"]
    window_tokens = ref["window_tokens"]
    for label, r in per.items():  # the same tokens for every type, window by window
        if r["tokens"] != ref["tokens"] or r.pop("window_tokens") != window_tokens:
            raise RuntimeError(f"{label} was evaluated on other tokens than bf16: {r['tokens']} vs {ref['tokens']}")
        cmp = stats.paired_log_ratio(r["window_nll"], ref["window_nll"], window_tokens)
        r.update(delta_vs_bf16=r["perplexity"] - ref["perplexity"], rel_vs_bf16=cmp["rel"],
                 rel_vs_bf16_ci95=cmp["rel_ci95"])

    t0 = time.perf_counter()
    errors = weight_errors(path, device)
    errors_s = time.perf_counter() - t0

    record = {
        "schema": "qlab.ptq/1", "kind": "ptq", "model": f"base-{size}", "size": size, "device": device,
        "base": {"path_name": path.name, "key": info.get("key"), "precision": info.get("precision"),
                 "build_version": info.get("build_version"), "params": info.get("params"),
                 "corpus_sha256": (info.get("corpus") or {}).get("sha256"),
                 "heldout_perplexity_as_built": info.get("heldout_perplexity"),
                 "built_on": (info.get("environment") or {}).get("gpu") or (info.get("environment") or {}).get("cpu"),
                 "git_commit": info.get("git_commit"), "created": info.get("created")},
        "eval": {"split": "held-out", "files": len(texts), "seq_len": seq_len, "max_tokens": max_tokens,
                 "tokens": ref["tokens"], "windows": len(window_tokens), "window_tokens": window_tokens},
        "blocksize": BLOCKSIZE, "types": per, "weight_error": errors, "weight_error_s": errors_s,
        "wall_time_s": time.perf_counter() - t_start,
        "env": store.environment(), "git_commit": store.git_commit(), "created": store.now(),
    }
    out = result_dir(results, size)
    out.mkdir(parents=True, exist_ok=True)
    store.atomic_write_json(out / "ptq.json", record)
    (out / "ptq.md").write_text(render(record))
    return out / "ptq.json"


def load(results: Path | str, size: str) -> dict | None:
    try:
        return json.loads((result_dir(results, size) / "ptq.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def render(rec: dict) -> str:
    env, b, ev = rec["env"], rec["base"], rec["eval"]
    hw = env.get("gpu") or f"CPU: {env.get('cpu')}"
    lines = [f"# Post-training quantization of {rec['model']}", "",
             f"Generated by `python -m qlab.claims.ptq --size {rec['size']}` ({rec['created']}, commit "
             f"`{rec['git_commit']}`) on {hw}; torch {env.get('torch')}, transformers {env.get('transformers')}, "
             f"bitsandbytes {env.get('bitsandbytes')}, Python {env.get('python')}.", "",
             f"Base: `{b['path_name']}` ({b['params']:,} params, {b['precision']} build, held-out perplexity "
             f"{b['heldout_perplexity_as_built']:.4g} as built). Held-out split: {ev['files']} files, "
             f"{ev['tokens']:,} predicted tokens in {ev['windows']} windows of up to {ev['seq_len']} tokens, "
             "the same for every type.", "",
             "| type | perplexity | vs bf16 | vs bf16 [95% CI] | weights (MiB) | bits / quantized weight |",
             "|---|---:|---:|---|---:|---:|"]
    for label, r in rec["types"].items():
        bits = r.get("bits_per_quantized_param")
        lo, hi = r["rel_vs_bf16_ci95"]
        ci = "" if label == "bf16" else f"{100 * r['rel_vs_bf16']:+.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}]"
        computed = " (computed)" if label == "int4" else ""
        lines.append(f"| {label} | {r['perplexity']:.4f} | {r['delta_vs_bf16']:+.4f} | {ci} | "
                     f"{r['weight_bytes'] / 2**20:.3f}{computed} | {f'{bits:.3f}' if bits else '-'} |")
    bf16_dtype = rec["types"]["bf16"]["compute_dtype"]
    lines += ["", f"`bf16` holds {bf16_dtype} weights here (models.compute_dtype). int4 is qlab's reference "
              "blockwise-absmax quantizer (qlab.claims.kernels, blocksize 64, codes -7..7), applied in place to every "
              "decoder linear weight: bitsandbytes has no int4 type. The interval is paired over the held-out "
              "windows (qlab.results.stats.paired_log_ratio).", "",
              f"## Quantization error of the base's weights (blocksize {rec['blocksize']})", "",
              f"Every decoder linear weight of the stored float32 checkpoint "
              f"({next(iter(rec['weight_error'].values()))['n']:,} weights in "
              f"{next(iter(rec['weight_error'].values()))['tensors']} tensors), pooled.", "",
              "| type | MSE | max abs error | mean abs error | SQNR (dB) |", "|---|---:|---:|---:|---:|"]
    for label, e in sorted(rec["weight_error"].items(), key=lambda kv: kv[1]["mse"]):
        lines.append(f"| {label} | {e['mse']:.4g} | {e['max_abs_error']:.4g} | {e['mean_abs_error']:.4g} | "
                     f"{e['sqnr_db']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlab.claims.ptq", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="auto", choices=[*pretrain.SIZES, "auto"],
                    help="auto: gpu where CUDA is available, else small")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--results", type=Path, default=Path("results"), help="writes <results>/ptq-base-<size>/")
    ap.add_argument("--max-tokens", type=int, default=None, help="cut the held-out split (default: the size's)")
    ap.add_argument("--types", default=",".join(TYPES), help=f"comma-separated subset of {','.join(TYPES)}")
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = args.size if args.size != "auto" else ("gpu" if device.startswith("cuda") else "small")
    try:
        out = measure(size, device, args.results, args.max_tokens, args.types.split(","))
    except (ValueError, pretrain.BaseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out.parent / "ptq.md").read_text())
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
