"""Post-training quantization perplexity per storage type (the paper's Table 2) and the
quantization error of real weights: qlab's pretrained base on its held-out split, or a real
pretrained model (smollm2-135m, gemma3-270m: conf/model/) on a real text (qlab.reference.texts).

    python -m qlab.claims.ptq --model smollm2-135m|gemma3-270m|<conf/model name>|tiny|small|gpu
                              --text wiki|c4|tinystories|heldout [--types bf16,...|default|all]
                              [--max-tokens N] [--seq-len 512] [--device auto] [--results results]
    python -m qlab.claims.ptq --size tiny|small|gpu|auto     (= --model base-<size> --text heldout)

A type is a label of TYPES, spelled as config.quant_label spells its quant config: Table 2's
(DEFAULT_TYPES), and beside them bitsandbytes' NF4+DQ at other block sizes, HQQ's int4 and
torchao's NF4 (`--types all`, or by name: --types 'bf16,nf4+DQ,hqq int4'). The model is loaded
as a run loads it (models.load; a GGUF model is converted on first use), once per type, afresh;
"int4", qlab's reference round-to-nearest int4, is the bf16 model with every quantized layer's
weight replaced by its kernels.round_trip. Every type is scored on the same token windows
(checked by their SHA-256), two types compared window by window (stats.paired_log_ratio). Writes
<results>/ptq-<model>-<text>/ (ptq-base-<size>/ for a base on its held-out split): ptq.json,
ptq.md. The method: docs/ptq.md.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qlab import config
from qlab.claims import estimate, kernels
from qlab.config import BLOCKWISE, DEFAULT_BACKEND, FOUR_BIT, QUANT_SETTINGS, SHAPES, ConfigError, QuantConfig
from qlab.reference import gguf, pretrain, texts
from qlab.results import stats, store
from qlab.run import models, quantize
from qlab.run.device import resolve_device

REFERENCE_INT4 = "int4"  # qlab's round-to-nearest int4 (kernels), which bitsandbytes lacks: not "hqq int4"
# label (config.quant_label's spelling) -> the quant config models.load gets; REFERENCE_INT4 is
# loaded in 16 bits, then rounded in place (int4_in_place)
TYPES: dict[str, QuantConfig] = {
    **{label: QuantConfig(type=t, double_quant=dq) for label, (t, dq) in QUANT_SETTINGS.items()},
    REFERENCE_INT4: QuantConfig(type="bf16"),
    # the same NF4+DQ with an absmax per 32 / 128 weights: 4 + 8/32 + 32/(256*32) = 4.254 bits,
    # 4 + 8/128 + 32/(256*128) = 4.063 bits (64: 4.127)
    "nf4+DQ/b32": QuantConfig(type="nf4", double_quant=True, blocksize=32),
    "nf4+DQ/b128": QuantConfig(type="nf4", double_quant=True, blocksize=128),
    "hqq int4": QuantConfig(type="int4", backend="hqq"),
    "torchao nf4+DQ": QuantConfig(type="nf4", double_quant=True, backend="torchao"),
}
# Table 2's types, what `--types` measures unless told (and what results/ptq-*/ hold)
DEFAULT_TYPES = ("bf16", "int8", "nf4", "nf4+DQ", "fp4", "fp4+DQ", REFERENCE_INT4)
TYPE_GROUPS = {"default": DEFAULT_TYPES, "all": tuple(TYPES)}  # names --types also takes
BLOCKSIZE = 64  # bitsandbytes' Linear4bit default and the paper's
ERROR_KINDS: dict[str, tuple[str, bool]] = {  # label -> (kernels kind, double_quant), at BLOCKSIZE
    "nf4": ("nf4", False), "fp4": ("fp4", False), "int4": ("int4", False),
    "nf4+DQ": ("nf4", True), "fp4+DQ": ("fp4", True),
}
# qlab.claims.kernels round-trips bitsandbytes' types and its own int4 only: these backends' weight
# error would need their own quantizer, which it does not reimplement
NO_WEIGHT_ERROR = {
    "hqq": "HQQ fits each group's scale and zero point with its own solver; qlab.claims.kernels has no "
           "HQQ round trip, so its weight error is not computed",
    "torchao": "torchao's NF4 quantizes its scales its own way (int8 per block, a scale per up to 256 of "
               "them), not bitsandbytes' double quantization that qlab.claims.kernels applies, so its "
               "weight error is not computed",
}
# the neighbours worth a paired interval, where both were measured: (a, b) -> ppl_a / ppl_b - 1 in
# ptq.md. Table 2's order; then HQQ's fitted int4 against qlab's round-to-nearest one, and each other
# backend or block size against bitsandbytes' NF4+DQ at 64
TABLE_2_PAIRS = (("nf4+DQ", "fp4"), ("fp4", "int4"), ("nf4+DQ", "int4"), ("nf4", "nf4+DQ"), ("nf4", "fp4"))
PAIRS = (*TABLE_2_PAIRS, ("hqq int4", "int4"), ("hqq int4", "nf4+DQ"), ("torchao nf4+DQ", "nf4+DQ"),
         ("nf4+DQ/b32", "nf4+DQ"), ("nf4+DQ/b128", "nf4+DQ"))

HELDOUT = "heldout"  # a base's own held-out split (qlab.reference.corpus), as it was built with
SEQ_LEN = 512  # positions per window on a real text
# Predicted tokens per real text by default: one model's three texts x 7 types in ~25 min on a
# 2-core CPU (docs/ptq.md "Sizing")
TEXT_TOKENS = {"smollm2-135m": 7 * (SEQ_LEN - 1), "gemma3-270m": 4 * (SEQ_LEN - 1)}
DEFAULT_TEXT_TOKENS = 64 * (SEQ_LEN - 1)  # any other model (a GPU has the time for 64 windows)
LOGITS_BYTES = 2**30  # a batch's float32 logits at most (Gemma 3: 512 x 262,144 x 4 B = 512 MiB a window)


@dataclass(frozen=True)
class Target:
    """What one measurement measures: a model (a conf/model name) on a text."""
    model: str  # base-gpu, smollm2-135m, ...
    text: str   # heldout | wiki | c4 | tinystories

    @property
    def name(self) -> str:
        """The result directory's name: ptq-base-gpu (a base on its held-out split), ptq-<model>-<text>."""
        return f"ptq-{self.model}" if self.text == HELDOUT else f"ptq-{self.model}-{self.text}"

    @property
    def size(self) -> str | None:
        return self.model.removeprefix("base-") if self.model.removeprefix("base-") in pretrain.SIZES else None

    def command(self) -> str:
        if self.text == HELDOUT:
            return f"python -m qlab.claims.ptq --size {self.size}"
        return f"python -m qlab.claims.ptq --model {self.model} --text {self.text}"


def target(model: str, text: str | None = None) -> Target:
    """A Target from a base size (tiny|small|gpu), base-<size> or a conf/model name, and a text
    (default: heldout for a base, else wiki). Raises ValueError naming what is wrong."""
    model = f"base-{model}" if model in pretrain.SIZES else model
    if not (Path(config.PROJECT_ROOT) / "conf" / "model" / f"{model}.yaml").is_file():
        raise ValueError(f"unknown model {model!r}: a base size ({', '.join(pretrain.SIZES)}) or a conf/model name")
    base = model.removeprefix("base-") in pretrain.SIZES
    text = text or (HELDOUT if base else "wiki")
    if text not in (HELDOUT, *texts.TEXTS):
        raise ValueError(f"unknown text {text!r}: {HELDOUT} (a base's held-out split) or {', '.join(texts.TEXTS)}")
    if text == HELDOUT and not base:
        raise ValueError(f"text {HELDOUT} is a pretrained base's own held-out split: {model} has none "
                         f"(choose from {', '.join(texts.TEXTS)})")
    return Target(model, text)


def claim_target(spec) -> Target:
    """A claim's `ptq:` evidence: a base size (`ptq: gpu`, its held-out split) or
    `{model: smollm2-135m, text: wiki}`."""
    if isinstance(spec, str) and spec in pretrain.SIZES:
        return target(spec)
    if isinstance(spec, dict) and set(spec) == {"model", "text"}:
        return target(str(spec["model"]), str(spec["text"]))
    raise ValueError(f"needs ptq: tiny|small|gpu (the base size) or {{model: <conf/model name>, text: "
                     f"{'|'.join(texts.TEXTS)}}}, got {spec!r}")


def result_dir(results: Path | str, what: Target | str) -> Path:
    """<results>/<target.name>/; `what` may be a base size (its held-out split)."""
    return Path(results) / (what if isinstance(what, Target) else target(what)).name


def load(results: Path | str, what: Target | str) -> dict | None:
    try:
        return json.loads((result_dir(results, what) / "ptq.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def describe(rec: dict) -> str:
    """The record's model and text in words: "smollm2-135m (dequantized from a 4-bit GGUF) · wiki",
    "base-gpu · held-out split" (older records name only a size)."""
    model = rec.get("model") or f"base-{rec['size']}"
    note = " (dequantized from a 4-bit GGUF)" if (rec.get("provenance") or {}).get("kind") == "gguf" else ""
    text = (rec.get("eval") or {}).get("text", HELDOUT)
    return f"{model}{note} · {'held-out split' if text == HELDOUT else text}"


def select_types(names: list[str] | None) -> list[str]:
    """The labels `names` asks for, in its order, a group (TYPE_GROUPS) expanded, each once; None:
    DEFAULT_TYPES. Raises ValueError naming an unknown label and the choices, or a list without bf16
    (every other type is compared with it)."""
    labels: list[str] = []
    for name in names or ["default"]:
        for label in TYPE_GROUPS.get(name, (name,)):
            if label not in TYPES:
                raise ValueError(f"unknown type {label!r}: choose from {', '.join(TYPES)}, or "
                                 f"{' / '.join(TYPE_GROUPS)} ({', '.join(DEFAULT_TYPES)} / every one)")
            if label not in labels:
                labels.append(label)
    if "bf16" not in labels:
        raise ValueError(f"types must include bf16 (every type is compared with it); got {', '.join(labels)}")
    return labels


def check_types(labels: list[str], model_cfg, device: str) -> None:
    """Before any type loads, raise ValueError naming a type this machine cannot measure: its
    backend's package missing, or, where qlab/run/quantize.py quantizes, a layer the block size does
    not split (bitsandbytes on a CPU needs whole blocks per row: rows of 576 do not take 128)."""
    skeleton = None
    for label in labels:
        q = TYPES[label]
        if q.type == "bf16":
            continue
        if why := quantize.missing(q.backend):
            raise ValueError(f"type {label!r} cannot be measured here: {why}")
        if quantize.by_qlab(q):
            skeleton = skeleton or estimate.meta_model(estimate.model_config(model_cfg))
            try:
                quantize.check_blocks(quantize.targets(skeleton), q, device)
            except ConfigError as e:
                raise ValueError(f"type {label!r} cannot be measured on {device}: {e}") from e


def model_config(name: str):
    """conf/model/<name>.yaml composed as `python -m qlab.run model=<name>` composes it."""
    return config.compose([f"model={name}"]).model


def decoder_linears(model) -> list[tuple[str, object]]:
    """(name, module) of every layer bitsandbytes quantizes (quantize.targets): for a
    LLaMA every decoder linear layer, not the head."""
    return list(quantize.targets(model).items())


def int4_in_place(model) -> int:
    """Replace every decoder linear weight by its int4 round trip (kernels.round_trip, blocks of
    BLOCKSIZE); returns the number of weights quantized."""
    n = 0
    with torch.no_grad():
        for _, m in decoder_linears(model):
            m.weight.data.copy_(kernels.round_trip(m.weight.data, "int4", BLOCKSIZE))
            n += m.weight.numel()
    return n


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its bos token first when it encodes (Gemma's does; SmolLM2's not)."""
    return tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]


def text_windows(tokenizer, name: str, seq_len: int, max_tokens: int) -> tuple[list[list[int]], dict]:
    """The first `max_tokens` tokens of text `name` (its documents in file order, joined by a blank
    line) in windows of seq_len positions, each predicting seq_len - 1: [bos] + the next seq_len - 1
    tokens where the tokenizer adds a bos (the start the model was trained with), else seq_len tokens
    overlapping by one. Returns (windows, what they are)."""
    if seq_len < 2 or max_tokens < 1:
        raise ValueError(f"need seq_len >= 2 and max_tokens >= 1, got {seq_len}, {max_tokens}")
    bos = adds_bos(tokenizer)
    docs = [d.text for d in texts.documents(name)]
    sep = tokenizer("\n\n", add_special_tokens=False).input_ids
    need = max_tokens + (0 if bos else 1)  # without a bos the stream's first token is context only
    stream: list[int] = []
    used = 0
    while len(stream) < need and used < len(docs):
        for enc in tokenizer.backend_tokenizer.encode_batch(docs[used: used + 64], add_special_tokens=False):
            stream.extend([*sep, *enc.ids] if stream else enc.ids)
            used += 1
            if len(stream) >= need:
                break
    if len(stream) < need:
        raise ValueError(f"text {name} holds {len(stream):,} tokens, fewer than the {need:,} asked for")
    stream = stream[:need]
    step = seq_len - 1
    windows = ([[tokenizer.bos_token_id, *stream[s: s + step]] for s in range(0, need, step)] if bos else
               [stream[s: s + seq_len] for s in range(0, need - 1, step)])
    info = {"text": name, **{k: texts.TEXTS[name][k] for k in ("source", "file", "sha256", "licence")},
            "package": f"{texts.PACKAGE}=={texts.VERSION}", "documents": used, "of_documents": len(docs),
            "separator": "\\n\\n", "bos": tokenizer.bos_token if bos else None}
    return windows, info


def windows_sha256(windows: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(windows, separators=(",", ":")).encode()).hexdigest()


def batch_size(model, seq_len: int) -> int:
    """Windows per forward pass: up to 8, as many as keep the float32 logits under LOGITS_BYTES."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return max(1, min(8, LOGITS_BYTES // (seq_len * vocab * 4)))


def measure_type(label: str, tgt: Target, model_cfg, device: str, seq_len: int, max_tokens: int | None) -> dict:
    """Load the model as `label`, build its windows with its own tokenizer, score them; per-window
    NLLs kept for the paired comparison, the windows' SHA-256 for the same-windows check."""
    quant = TYPES[label]
    loaded = models.load(model_cfg, quant, device)
    wb = dict(loaded.weight_bytes)
    if label == REFERENCE_INT4:
        t0 = time.perf_counter()
        n = int4_in_place(loaded.model)
        held = sum(m.weight.numel() * m.weight.element_size() for _, m in decoder_linears(loaded.model))
        # int4 storage: 4 bits per weight + a float32 absmax per 64 = 4.5 bits (kernels.storage_bits)
        wb = {**models.weight_record(math.ceil(n * 4 / 8), math.ceil(n / BLOCKSIZE) * 4, wb["weight_bytes"] - held, n),
              "weight_bytes_basis": "computed: int4 storage of the decoder linear weights (held dequantized)",
              "int4_round_trip_s": time.perf_counter() - t0}
    else:
        wb["weight_bytes_basis"] = "held (models.weight_bytes of the loaded model)"
    if tgt.text == HELDOUT:
        windows = pretrain.heldout_windows(loaded.tokenizer, pretrain.heldout_texts(), seq_len, max_tokens)
        text_info = {"text": HELDOUT}
    else:
        windows, text_info = text_windows(loaded.tokenizer, tgt.text, seq_len, max_tokens)
    t0 = time.perf_counter()
    ev = pretrain.score_windows(loaded.model, windows, batch_size(loaded.model, seq_len), per_window=True)
    eval_s = time.perf_counter() - t0
    reference = label == REFERENCE_INT4
    out = {"quant": quant.type, "double_quant": quant.double_quant,
           "backend": "qlab.claims.kernels" if reference else quant.backend,
           "blocksize": BLOCKSIZE if reference else quant.blocksize if quant.type in BLOCKWISE else None,
           "compute_dtype": str(models.compute_dtype(quant, device)).removeprefix("torch."),
           "loss": ev["loss"], "perplexity": ev["perplexity"], "tokens": ev["tokens"],
           "load_time_s": loaded.load_time_s, "eval_s": eval_s, **wb,
           "window_nll": ev["window_nll"], "window_tokens": ev["window_tokens"],
           "windows_sha256": windows_sha256(windows), "text_info": text_info, "path": loaded.path}
    del loaded  # the next type loads afresh
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def check_same_windows(per: dict[str, dict]) -> None:
    """Raise RuntimeError naming the first type not scored on bf16's windows, token for token: the
    paired comparison needs the same windows."""
    ref = per["bf16"]
    for label, r in per.items():
        if r["windows_sha256"] != ref["windows_sha256"] or r["window_tokens"] != ref["window_tokens"]:
            raise RuntimeError(f"{label} was scored on other windows than bf16 (sha256 {r['windows_sha256'][:12]} vs "
                               f"{ref['windows_sha256'][:12]}, {r['tokens']:,} vs {ref['tokens']:,} tokens): "
                               "the types cannot be compared window by window")


def error_kinds(labels: list[str]) -> dict[str, tuple[str, bool, int]]:
    """label -> (kernels kind, double_quant, blocksize) of the weight errors to compute: ERROR_KINDS
    whichever types were measured (the error does not depend on it), and each measured bitsandbytes
    4-bit type at another block size."""
    kinds = {label: (kind, dq, BLOCKSIZE) for label, (kind, dq) in ERROR_KINDS.items()}
    for label in labels:
        q = TYPES[label]
        if q.backend == DEFAULT_BACKEND and q.type in FOUR_BIT and q.blocksize != BLOCKSIZE:
            kinds[label] = (q.type, q.double_quant, q.blocksize)
    return kinds


def no_weight_error(labels: list[str]) -> dict[str, str]:
    """label -> why its weight error is not computed, for each measured type of another backend."""
    return {label: NO_WEIGHT_ERROR[TYPES[label].backend] for label in labels if TYPES[label].backend in NO_WEIGHT_ERROR}


def weight_errors(path: Path | str, device: str = "cpu", kinds: dict | None = None) -> dict:
    """Pooled quantization error of every decoder linear weight of the stored checkpoint (its own
    float32 values, not a bf16 cast), per label of `kinds` (default: ERROR_KINDS at BLOCKSIZE)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    weights = [m.weight.detach().to(device) for _, m in decoder_linears(model)]
    return {label: {**kernels.combine_errors([kernels.quantization_error(w, kind, b, dq) for w in weights]),
                    "tensors": len(weights)} for label, (kind, dq, b) in (kinds or error_kinds([])).items()}


def provenance(model_cfg, path: Path) -> dict:
    """Where the weights come from: a base built here (base.json), a GGUF model dequantized from
    its 4- to 8-bit values (the conversion's record, and the GGUF types of the decoder linear
    weights that the error section re-quantizes), a random-init preset or a checkpoint."""
    if getattr(model_cfg, "base", None):
        info = json.loads((path / "base.json").read_text())
        env = info.get("environment") or {}
        return {"kind": "base", "path_name": path.name, "key": info.get("key"), "precision": info.get("precision"),
                "build_version": info.get("build_version"), "params": info.get("params"),
                "corpus_sha256": (info.get("corpus") or {}).get("sha256"),
                "heldout_perplexity_as_built": info.get("heldout_perplexity"),
                "built_on": env.get("gpu") or env.get("cpu"),
                "git_commit": info.get("git_commit"), "created": info.get("created")}
    if getattr(model_cfg, "gguf", None):
        marker = json.loads((path / gguf.MARKER).read_text())
        return {"kind": "gguf", **gguf.source(path), "path_name": path.name,
                "linear_types": SHAPES["gguf"][model_cfg.gguf]["linear_types"],
                **{k: marker[k] for k in ("gguf_file", "gguf_types", "upstream", "licence", "params", "add_bos",
                                          "transformers", "gguf", "torch")}}
    kind = "preset (random init)" if getattr(model_cfg, "preset", None) and not model_cfg.name_or_path else "checkpoint"
    return {"kind": kind, "path_name": path.name, "name_or_path": model_cfg.name_or_path, "preset": model_cfg.preset}


def measure(what: Target | str, device: str = "auto", results: Path | str = "results", max_tokens: int | None = None,
            types: list[str] | None = None, progress: bool = True, seq_len: int | None = None,
            weight_error: bool = True) -> Path:
    """Run the PTQ measurement of `what` (a Target, or a base size: its held-out split) and write
    ptq.json / ptq.md; returns ptq.json's path. `weight_error=False` leaves out the weights'
    quantization error, which does not depend on the text."""
    tgt = what if isinstance(what, Target) else target(what)
    device = resolve_device(device)
    types = select_types(types)
    t_start = time.perf_counter()
    model_cfg = model_config(tgt.model)
    models.check_available(model_cfg)
    path = Path(models.model_path(model_cfg, device))  # builds a base, converts a GGUF model on first use
    check_types(types, model_cfg, device)
    if tgt.text == HELDOUT:
        spec = pretrain.spec_for(tgt.size)
        seq_len, max_tokens = spec["seq_len"], spec["eval_tokens"] if max_tokens is None else max_tokens
    else:
        seq_len = seq_len or SEQ_LEN
        max_tokens = max_tokens or TEXT_TOKENS.get(tgt.model, DEFAULT_TEXT_TOKENS)

    per: dict[str, dict] = {}
    for label in types:
        r = per[label] = measure_type(label, tgt, model_cfg, device, seq_len, max_tokens)
        if progress:
            print(f"[{tgt.name}] {label:14s} perplexity {r['perplexity']:.4f} ({r['tokens']:,} tokens, "
                  f"{r['weight_bytes'] / 2**20:.2f} MiB weights, load {r['load_time_s']:.1f}s, "
                  f"eval {r['eval_s']:.1f}s)", file=sys.stderr, flush=True)
    check_same_windows(per)
    ref = per["bf16"]
    window_tokens, text_info, sha = ref["window_tokens"], ref["text_info"], ref["windows_sha256"]
    for label, r in per.items():
        for key in ("window_tokens", "windows_sha256", "text_info", "path"):
            r.pop(key)
        cmp = stats.paired_log_ratio(r["window_nll"], ref["window_nll"], window_tokens)
        r.update(delta_vs_bf16=r["perplexity"] - ref["perplexity"], rel_vs_bf16=cmp["rel"],
                 rel_vs_bf16_ci95=cmp["rel_ci95"])
    pairs = [{"a": a, "b": b, **stats.paired_log_ratio(per[a]["window_nll"], per[b]["window_nll"], window_tokens)}
             for a, b in PAIRS if a in per and b in per]

    t0 = time.perf_counter()
    errors = weight_errors(path, device, error_kinds(types)) if weight_error else None
    errors_s = time.perf_counter() - t0 if weight_error else None
    prov = provenance(model_cfg, path)

    record = {
        "schema": "qlab.ptq/2", "kind": "ptq", "model": tgt.model, "size": tgt.size, "device": device,
        "provenance": prov,
        "eval": {**text_info,
                 **({"split": "held-out", "files": len(pretrain.heldout_texts())} if tgt.text == HELDOUT else {}),
                 "seq_len": seq_len, "max_tokens": max_tokens, "tokens": ref["tokens"], "windows": len(window_tokens),
                 "windows_sha256": sha, "window_tokens": window_tokens},
        "blocksize": BLOCKSIZE, "types": per, "pairs": pairs, "weight_error": errors, "weight_error_s": errors_s,
        "weight_error_not_computed": no_weight_error(types) if weight_error else {},
        "wall_time_s": time.perf_counter() - t_start,
        "env": store.environment(), "git_commit": store.git_commit(),
        "created": store.now(),
    }
    if prov["kind"] == "base":
        record["base"] = {k: v for k, v in prov.items() if k != "kind"}  # the key records before texts had
    out = result_dir(results, tgt)
    out.mkdir(parents=True, exist_ok=True)
    store.atomic_write_json(out / "ptq.json", record)
    (out / "ptq.md").write_text(render(record))
    return out / "ptq.json"


def _pct(rel: float, ci) -> str:
    return f"{100 * rel:+.2f}% [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


def type_note(label: str, r: dict, env: dict) -> str | None:
    """What a type beside Table 2's stores, for the note under ptq.md's table (the bits per weight:
    qlab/run/quantize.py)."""
    backend, b, dtype = r.get("backend", DEFAULT_BACKEND), r.get("blocksize"), r["compute_dtype"]
    if backend == "hqq":
        width = 32 if dtype == "float32" else 16
        return (f"{label}: HQQ's asymmetric int4 (hqq {env.get('hqq')}), a scale and a zero point per {b} weights, "
                f"fitted by HQQ's solver and held in the compute dtype ({dtype}): 4 + 2*{width}/{b} = "
                f"{4 + 2 * width / b:g} bits.")
    if backend == "torchao":
        return (f"{label}: torchao's NF4 tensor (torchao {env.get('torchao')}; torchtune's QLoRA base), an int8 "
                f"scale per {b} weights and a {dtype} scale per up to 256 of those.")
    if backend == DEFAULT_BACKEND and b not in (None, BLOCKSIZE):
        return (f"{label}: bitsandbytes' {r['quant'].upper()}{'+DQ' if r['double_quant'] else ''} with an absmax "
                f"per {b} weights, quantized after loading by qlab/run/quantize.py (BitsAndBytesConfig has no "
                "4-bit block size).")
    return None


def render(rec: dict) -> str:
    env, ev, prov = rec["env"], rec["eval"], rec.get("provenance") or {"kind": "base", **rec["base"]}
    hw = env.get("gpu") or f"CPU: {env.get('cpu')}"
    text = ev.get("text", HELDOUT)
    cmd = Target(rec["model"], text).command() + ("" if text == HELDOUT else f" --max-tokens {ev['max_tokens']}")
    if tuple(rec["types"]) != DEFAULT_TYPES:
        cmd += f" --types {shlex.quote(','.join(rec['types']))}"
    where = "the held-out split" if text == HELDOUT else text
    measured = {r.get("backend") for r in rec["types"].values()}
    others = "".join(f", {b} {env[b]}" for b in ("hqq", "torchao") if b in env and b in measured)
    lines = [f"# Post-training quantization of {rec['model']} on {where}", "",
             f"Generated by `{cmd}` ({rec['created']}, commit `{rec['git_commit']}`) on {hw}; torch {env.get('torch')}, "
             f"transformers {env.get('transformers')}, bitsandbytes {env.get('bitsandbytes')}{others}, Python "
             f"{env.get('python')}; {rec['wall_time_s'] / 60:.1f} min in all.", ""]
    if prov["kind"] == "base":
        lines += [f"Base: `{prov['path_name']}` ({prov['params']:,} params, {prov['precision']} build, held-out "
                  f"perplexity {prov['heldout_perplexity_as_built']:.4g} as built). Held-out split: {ev['files']} files, "
                  f"{ev['tokens']:,} predicted tokens in {ev['windows']} windows of up to {ev['seq_len']} tokens, "
                  "the same for every type.", ""]
    else:
        if prov["kind"] == "gguf":
            lines += [f"Model: {rec['model']}, {prov['params']:,} params, {prov['upstream']} ({prov['licence']}), "
                      f"**dequantized from a 4-bit GGUF**: `{prov['gguf_file']}` (sha256 {prov['gguf_sha256'][:12]}..., "
                      f"by weight {', '.join(f'{t} {s:.1%}' for t, s in prov['gguf_types'].items())}), converted to "
                      f"float32 by qlab.reference.gguf (transformers {prov['transformers']}, gguf {prov['gguf']}). "
                      "Its \"16-bit\" weights are those GGUF values expanded, not the upstream bf16 release.", ""]
        else:
            lines += [f"Model: {rec['model']} ({prov['kind']}, `{prov['path_name']}`).", ""]
        bos = f"each window starts with the model's {ev['bos']} token" if ev.get("bos") else \
            "the tokenizer adds no bos token, so windows overlap by one token"
        lines += [f"Text: {text}, {ev['source']}; `{ev['file']}` of {ev['package']} (sha256 {ev['sha256'][:12]}..., "
                  f"{ev['licence']}): a calibration sample, not an official split, and possibly inside the model's "
                  f"pretraining data. Its first {ev['documents']:,} of {ev['of_documents']:,} documents, joined by a "
                  f"blank line: {ev['tokens']:,} predicted tokens in {ev['windows']} windows of {ev['seq_len']} positions "
                  f"({bos}), the same windows for every type (checked: sha256 {ev['windows_sha256'][:12]}...).", ""]
    lines += ["| type | perplexity | vs bf16 | vs bf16 [95% CI] | weights (MiB) | bits / quantized weight | eval (s) |",
              "|---|---:|---:|---|---:|---:|---:|"]
    for label, r in rec["types"].items():
        bits = r.get("bits_per_quantized_param")
        ci = "" if label == "bf16" else _pct(r["rel_vs_bf16"], r["rel_vs_bf16_ci95"])
        computed = " (computed)" if label == REFERENCE_INT4 else ""
        lines.append(f"| {label} | {r['perplexity']:.4f} | {r['delta_vs_bf16']:+.4f} | {ci} | "
                     f"{r['weight_bytes'] / 2**20:.3f}{computed} | {f'{bits:.3f}' if bits else '-'} | {r['eval_s']:.0f} |")
    bf16_dtype = rec["types"]["bf16"]["compute_dtype"]
    lines += ["", f"`bf16` holds {bf16_dtype} weights here (models.compute_dtype). int4 is qlab's reference "
              "blockwise-absmax quantizer (qlab.claims.kernels, blocksize 64, codes -7..7), applied in place to every "
              "decoder linear weight: bitsandbytes has no int4 type. The interval is paired over the windows "
              "(qlab.results.stats.paired_log_ratio)."]
    notes = [n for label, r in rec["types"].items() if (n := type_note(label, r, env))]
    lines += ["", *(f"- {n}" for n in notes)] if notes else []
    if rec.get("pairs"):
        others = any((p["a"], p["b"]) not in TABLE_2_PAIRS for p in rec["pairs"])
        lines += ["", f"Table 2's order{', then each other backend or block size against its neighbour' if others else ''}"
                      ", pair by pair (perplexity of a / b - 1, paired over the windows):", "",
                  "| a | b | a vs b [95% CI] |", "|---|---|---|"]
        lines += [f"| {p['a']} | {p['b']} | {_pct(p['rel'], p['rel_ci95'])} |" for p in rec["pairs"]]
    other_blocks = any(config.BLOCK_SEP in label for label in rec["weight_error"] or {})
    lines += ["", f"## Quantization error of the {'base' if prov['kind'] == 'base' else 'model'}'s weights "
                  f"(blocksize {rec['blocksize']}{', or the /b<n> a type names' if other_blocks else ''})", ""]
    if not rec["weight_error"]:
        return "\n".join([*lines, "Not computed here (--no-weight-error): it does not depend on the text; another "
                           f"text's measurement of {rec['model']} has it."]) + "\n"
    first = next(iter(rec["weight_error"].values()))
    lines += [f"Every decoder linear weight of the stored float32 checkpoint ({first['n']:,} weights in "
              f"{first['tensors']} tensors), pooled."]
    if prov["kind"] == "gguf":
        lines += ["", "These weights were themselves GGUF values: "
                  f"{', '.join(f'{t} {s:.1%}' for t, s in prov['linear_types'].items())} of the decoder linear weights "
                  f"({GGUF_GRIDS_TEXT}). The errors below are therefore re-quantization errors of data that already "
                  "sits on a coarse grid, not the error on a 16-bit model's weights: a grid that matches the GGUF's "
                  "(uniform levels for Q4_1) can land closer to its values than NF4's normal-quantile levels, "
                  "which bears on the NF4-vs-FP4 (and Int4) comparison."]
    lines += ["", "| type | MSE | max abs error | mean abs error | SQNR (dB) |", "|---|---:|---:|---:|---:|"]
    for label, e in sorted(rec["weight_error"].items(), key=lambda kv: kv[1]["mse"]):
        lines.append(f"| {label} | {e['mse']:.4g} | {e['max_abs_error']:.4g} | {e['mean_abs_error']:.4g} | "
                     f"{e['sqnr_db']:.2f} |")
    skipped = rec.get("weight_error_not_computed") or {}
    lines += ["", *(f"Not computed for {label}: {why}." for label, why in skipped.items())] if skipped else []
    return "\n".join(lines) + "\n"


# What each GGUF type of the decoder weights is (llama.cpp's ggml-quants): block, levels, constants.
GGUF_GRIDS_TEXT = ("Q4_1: blocks of 32, 16 uniform levels from an fp16 scale and minimum; Q5_0: blocks of 32, "
                   "32 levels from an fp16 scale; Q4_K / Q6_K: super-blocks of 256 in sub-blocks of 32 / 16 with "
                   "quantized scales (and minimums for Q4_K); Q8_0: blocks of 32, int8 with an fp16 scale")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlab.claims.ptq", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a base size (tiny|small|gpu), or a conf/model name: smollm2-135m, "
                                                  "gemma3-270m, base-gpu, ...")
    ap.add_argument("--text", default=None, help=f"{HELDOUT} (a base's held-out split, the default for a base) | "
                                                 f"{' | '.join(texts.TEXTS)} (default for other models: wiki)")
    ap.add_argument("--size", default=None, choices=[*pretrain.SIZES, "auto"],
                    help="= --model base-<size> --text heldout; auto: gpu where CUDA is available, else small "
                         "(the default without --model)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--results", type=Path, default=Path("results"), help="writes <results>/ptq-<model>-<text>/")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="predicted tokens (a real text; default: the model's in TEXT_TOKENS, else "
                         f"{DEFAULT_TEXT_TOKENS:,}) or the held-out split's cut (default: the size's)")
    ap.add_argument("--seq-len", type=int, default=None, help=f"window length on a real text (default {SEQ_LEN})")
    ap.add_argument("--types", default="default",
                    help=f"comma-separated labels from {','.join(TYPES)}, or default ({','.join(DEFAULT_TYPES)}) / "
                         "all (every one); quote a label with a space: --types 'bf16,nf4+DQ,hqq int4'")
    ap.add_argument("--no-weight-error", dest="weight_error", action="store_false",
                    help="leave out the weights' quantization error (it does not depend on the text)")
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.model and args.size:
            raise ValueError("give --model (and --text) or --size, not both")
        size = args.size if args.size not in (None, "auto") else ("gpu" if device.startswith("cuda") else "small")
        tgt = target(args.model or size, args.text)
        types = [t.strip() for t in args.types.split(",") if t.strip()]
        out = measure(tgt, device, args.results, args.max_tokens, types, seq_len=args.seq_len,
                      weight_error=args.weight_error)
    except (ValueError, ConfigError, pretrain.BaseError, texts.TextError, gguf.GGUFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((out.parent / "ptq.md").read_text())
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
