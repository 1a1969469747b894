"""A *pretrained* reference base model, built offline from the embedded corpus (`make base`).

The paper's quality claims need a base that has learned something, so qlab pretrains a
LLaMA-architecture model from scratch on the frozen corpus (qlab.reference.corpus) with a BPE
tokenizer trained here, and saves both with `save_pretrained` beside `base.json` (held-out
perplexity, curve, hardware) in `$QLAB_CACHE/base/<size>-<hash>/`. The hash covers everything the
build depends on, so a second `ensure_base` reuses it. Sizes: conf/shapes.yaml; docs/pretrained-base.md.

    python -m qlab.reference.pretrain --size tiny|small|gpu|auto [--device auto] [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qlab.config import SHAPES
from qlab.reference import corpus
from qlab.results import store
from qlab.run.device import resolve_device
from qlab.run.measure import sync
from qlab.run.presets import SPECIAL_TOKENS, build_once, cache_root, train_bpe

BUILD_VERSION = 1  # bump when the build procedure changes, so cached bases rebuild

SIZES: dict[str, dict] = SHAPES["bases"]  # shape, tokenizer and training budget (conf/shapes.yaml)
# Shared by every size.
COMMON = dict(
    max_position_embeddings=2048,  # RoPE: no parameters; room for qlab's 512-token chat samples
    min_lr_ratio=0.1,  # cosine decays to 10% of the peak
    betas=(0.9, 0.95), weight_decay=0.1, max_grad_norm=1.0,  # weight decay on matrices only
    seed=0,
)
MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
LOG_EVERY = 10


class BaseError(RuntimeError):
    pass


def spec_for(size: str, steps: int | None = None) -> dict:
    if size not in SIZES:
        raise BaseError(f"unknown base size {size!r} (choose from {', '.join(SIZES)})")
    spec = {**COMMON, **SIZES[size], "size": size}
    if steps is not None:
        if steps < 1:
            raise BaseError(f"--steps must be >= 1, got {steps}")
        spec["steps"] = steps
        spec["warmup_steps"] = min(spec["warmup_steps"], max(steps // 10, 0))
    spec["betas"] = list(spec["betas"])
    return spec


def precision(device: str) -> str:
    return "bf16-autocast" if device.startswith("cuda") else "fp32"


def build_key(spec: dict, device: str, corpus_sha256: str) -> str:
    ident = {"corpus_sha256": corpus_sha256, "spec": spec, "precision": precision(device),
             "special_tokens": SPECIAL_TOKENS, "build_version": BUILD_VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def base_dir(size: str, device: str = "cpu", steps: int | None = None) -> Path:
    return cache_root() / "base" / f"{size}-{build_key(spec_for(size, steps), device, corpus.checksum())}"


def _complete(path: Path, key: str) -> bool:
    try:
        info = json.loads((path / "base.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (path / "config.json").is_file() and info.get("key") == key


def ensure_base(size: str, device: str = "cpu", *, steps: int | None = None, out: Path | str | None = None,
                compile: bool = False, progress: bool = False) -> Path:
    """The directory of the pretrained base `size`, trained on `device` first if needed
    (presets.build_once: safe under concurrency). `steps` overrides the size's budget (another
    cache key); `out` builds there instead of `$QLAB_CACHE/base/...`."""
    device = resolve_device(device)
    spec = spec_for(size, steps)
    key = build_key(spec, device, corpus.checksum())
    target = Path(out).expanduser().resolve() if out else cache_root() / "base" / f"{size}-{key}"
    if _complete(target, key):
        return target
    if out and target.exists() and any(target.iterdir()):  # never replace what we did not build
        raise BaseError(f"{target} exists and holds something other than base {size}-{key}; "
                        "choose another --out or remove it")
    return build_once(target, lambda p: _complete(p, key),
                      lambda tmp: build(spec, device, tmp, key, compile=compile, progress=progress))


def weights_sha256(path: Path | str) -> str:
    """The identity of a built base's weights (its safetensors files): two GPU builds of one cache
    key differ (CUDA training is not bit-reproducible), so runs record it and results are compared
    only between runs of the same weights."""
    return store.files_sha256(sorted(Path(path).glob("*.safetensors")))


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each document as <s> ids </s>: the base sees the chat format's delimiters."""
    # the backend directly: batched in Rust threads, and no "longer than model_max_length"
    # warning for whole files (they are cut into seq_len windows afterwards)
    encs = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [[tokenizer.bos_token_id, *e.ids, tokenizer.eos_token_id] for e in encs]


def packed_batches(docs: list[list[int]], seq_len: int, batch_size: int, seed: int):
    """Endless (batch_size, seq_len) LongTensors. Each epoch shuffles the documents, concatenates
    them, cuts the stream into non-overlapping seq_len blocks (the tail shorter than a block is
    dropped) and shuffles the blocks; a batch never repeats a block within an epoch."""
    rng = random.Random(seed)
    pending: list[torch.Tensor] = []
    tensors = [torch.tensor(d, dtype=torch.long) for d in docs]  # once: an epoch only reorders them
    while True:
        order = list(range(len(docs)))
        rng.shuffle(order)
        stream = torch.cat([tensors[i] for i in order]) if tensors else torch.empty(0, dtype=torch.long)
        n = len(stream) // seq_len
        if n == 0:
            raise BaseError(f"the training split holds {len(stream)} tokens, fewer than one sequence of {seq_len}")
        blocks = stream[: n * seq_len].view(n, seq_len)
        perm = list(range(n))
        rng.shuffle(perm)
        pending.extend(blocks[i] for i in perm)
        while len(pending) >= batch_size:
            yield torch.stack(pending[:batch_size])
            del pending[:batch_size]


def model_config(spec: dict, tokenizer=None):
    """The base's LlamaConfig; without a tokenizer, no special-token ids (enough for the
    analytic memory model, which must not train a base to learn its shape)."""
    from transformers import LlamaConfig

    ids = {} if tokenizer is None else dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaConfig(**{k: spec[k] for k in MODEL_KEYS}, **ids, tie_word_embeddings=False)


def build_model(spec: dict, tokenizer, device: str):
    from transformers import AutoModelForCausalLM

    config = model_config(spec, tokenizer)
    if len(tokenizer) != config.vocab_size:
        raise BaseError(f"tokenizer has {len(tokenizer)} tokens, the size asks for {config.vocab_size}")
    torch.manual_seed(spec["seed"])
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # fp32 master weights


def lr_factor(step: int, spec: dict) -> float:
    """Linear warm-up over warmup_steps, then cosine from 1 to min_lr_ratio at the last step."""
    warm, total, floor = spec["warmup_steps"], spec["steps"], spec["min_lr_ratio"]
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(total - warm, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def heldout_windows(tokenizer, texts: list[str], seq_len: int, max_tokens: int | None = None) -> list[list[int]]:
    """`texts` encoded as in training, cut to `max_tokens`, in windows of seq_len tokens
    overlapping by one: every token but the first is predicted once (score_windows)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = [t for doc in encode_documents(tokenizer, list(texts)) for t in doc]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("need at least two tokens of held-out text")
    stride = seq_len - 1
    windows = [ids[s: s + seq_len] for s in range(0, len(ids) - 1, stride)]
    return [w for w in windows if len(w) >= 2]


def score_windows(model, windows: list[list[int]], batch_size: int = 8, amp_dtype=None,
                  per_window: bool = False) -> dict:
    """Token-weighted mean negative log-likelihood of every token of each window but its first,
    given the ones before it in the window. Any causal LM, quantized ones included; `amp_dtype`
    autocasts on CUDA. `per_window` adds each window's summed NLL (`window_nll`) and predictions
    (`window_tokens`) in the windows' order, so two models compare window by window (ptq)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    window_nll: list[float] = [math.nan] * len(windows)
    window_tokens: list[int] = [len(w) - 1 for w in windows]
    amp = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None and device.type == "cuda")
    try:
        with torch.no_grad(), amp:
            # windows of one length in batches (all but a shorter last one)
            groups: dict[int, list[int]] = {}
            for i, w in enumerate(windows):
                groups.setdefault(len(w), []).append(i)
            for length, idx in groups.items():
                for j in range(0, len(idx), batch_size):
                    rows = idx[j: j + batch_size]
                    x = torch.tensor([windows[i] for i in rows], dtype=torch.long, device=device)
                    logits = model(input_ids=x).logits[:, :-1].float()
                    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                          reduction="none").view(x.shape[0], length - 1).double().sum(1)
                    for i, v in zip(rows, nll.tolist()):
                        window_nll[i] = v
                    total += float(nll.sum())
                    count += x.shape[0] * (length - 1)
    finally:
        model.train(was_training)
    loss = total / count
    out = {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
    if per_window:
        out.update(window_nll=window_nll, window_tokens=window_tokens)
    return out


def heldout_eval(model, tokenizer, texts: list[str], seq_len: int, max_tokens: int | None = None,
                 batch_size: int = 8, amp_dtype=None, per_window: bool = False) -> dict:
    """score_windows on heldout_windows: the held-out loss and perplexity of `texts`."""
    return score_windows(model, heldout_windows(tokenizer, texts, seq_len, max_tokens), batch_size, amp_dtype,
                         per_window)


def heldout_perplexity(model, tokenizer, texts: list[str], seq_len: int, max_tokens: int | None = None,
                       **kw) -> float:
    """exp(token-weighted mean NLL) on `texts`: see heldout_eval."""
    return heldout_eval(model, tokenizer, texts, seq_len, max_tokens, **kw)["perplexity"]


def heldout_texts() -> list[str]:
    return [d.text for d in corpus.load().split()[1]]


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def build(spec: dict, device: str, out: Path, key: str, compile: bool = False, progress: bool = False) -> dict:
    """Train the base described by `spec` on `device` and save it into `out` (model, tokenizer,
    base.json). Returns the base.json record."""
    t_start = time.perf_counter()
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = corpus.load()
    train_docs, held_docs = data.split()
    train_texts = [d.text for d in train_docs]
    held_texts = [d.text for d in held_docs]

    t0 = time.perf_counter()
    # byte-level BPE (any UTF-8 round-trips) with qlab's specials, as presets.build_tokenizer's
    tokenizer = train_bpe(train_texts, spec["vocab_size"], model_max_length=COMMON["max_position_embeddings"])
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    docs = encode_documents(tokenizer, train_texts)
    train_tokens = sum(len(d) for d in docs)
    encode_s = time.perf_counter() - t0
    _log(progress, f"[base {spec['size']}] tokenizer {len(tokenizer)} in {tokenizer_s:.1f}s; "
                   f"train split {train_tokens:,} tokens ({encode_s:.1f}s)")

    model = build_model(spec, tokenizer, device)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    amp_dtype = torch.bfloat16 if cuda else None

    def evaluate(max_tokens):
        return heldout_eval(model, tokenizer, held_texts, spec["seq_len"], max_tokens, amp_dtype=amp_dtype)

    init = evaluate(spec["eval_tokens"])
    _log(progress, f"[base {spec['size']}] {n_params / 1e6:.2f} M params; held-out ppl before training "
                   f"{init['perplexity']:.1f} ({init['tokens']:,} tokens)")

    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": spec["weight_decay"]},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]  # matrices decay
    opt = torch.optim.AdamW(groups, lr=spec["lr"], betas=tuple(spec["betas"]), fused=cuda)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, spec))
    step_fn = torch.compile(model) if compile else model
    batches = packed_batches(docs, spec["seq_len"], spec["batch_size"], spec["seed"])
    tok_per_step = spec["seq_len"] * spec["batch_size"]

    curve: list[dict] = [{"step": 0, "tokens": 0, "heldout_loss": evaluate(spec["curve_eval_tokens"])["loss"]}]
    model.train()
    sync(device)
    t_train = time.perf_counter()
    eval_s = 0.0
    window_loss, window_n = 0.0, 0
    for step in range(spec["steps"]):
        x = next(batches).to(device, non_blocking=True)
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = step_fn(input_ids=x, labels=x).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window_loss += loss.item()  # synchronizes: fine at these sizes, and keeps timings honest
        window_n += 1
        done = step + 1
        if done % LOG_EVERY == 0 or done == spec["steps"] or done % spec["eval_every"] == 0:
            rec = {"step": done, "tokens": done * tok_per_step, "train_loss": window_loss / window_n,
                   "lr": opt.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                   "elapsed_s": round(time.perf_counter() - t_train - eval_s, 3)}
            window_loss, window_n = 0.0, 0
            if done % spec["eval_every"] == 0 or done == spec["steps"]:
                te = time.perf_counter()
                rec["heldout_loss"] = evaluate(spec["curve_eval_tokens"])["loss"]
                eval_s += time.perf_counter() - te
                _log(progress, f"[base {spec['size']}] step {done}/{spec['steps']} loss {rec['train_loss']:.3f} "
                               f"held-out {rec['heldout_loss']:.3f} lr {rec['lr']:.2e} "
                               f"({rec['elapsed_s']:.0f}s)")
            curve.append(rec)
    sync(device)
    train_s = time.perf_counter() - t_train - eval_s
    final = evaluate(spec["eval_tokens"])
    _log(progress, f"[base {spec['size']}] held-out ppl {final['perplexity']:.2f} "
                   f"(was {init['perplexity']:.1f}); trained {train_s:.1f}s")

    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tokens_seen = spec["steps"] * tok_per_step
    record = {  # what was built, from what, how well it predicts held-out text, and how long it took
        "name": f"base-{spec['size']}", "key": key, "size": spec["size"], "spec": spec, "precision": precision(device),
        "device": device, "compile": compile, "build_version": BUILD_VERSION,
        "corpus": {"file": f"qlab/assets/corpus/{corpus.CORPUS_NAME}", "sha256": data.sha256,
                   "train_files": len(train_docs), "heldout_files": len(held_docs), "train_tokens": train_tokens},
        "params": n_params, "non_embedding_params": n_params - n_embed, "vocab_size": len(tokenizer),
        "tokens_per_step": tok_per_step, "tokens_seen": tokens_seen, "epochs": tokens_seen / train_tokens,
        "train_flops_6nt": 6 * n_params * tokens_seen,
        "heldout_loss": final["loss"], "heldout_perplexity": final["perplexity"], "heldout_tokens": final["tokens"],
        "heldout_loss_init": init["loss"], "heldout_perplexity_init": init["perplexity"],
        "train_loss_final": curve[-1].get("train_loss"),
        "tokenizer_s": tokenizer_s, "encode_s": encode_s, "train_s": train_s, "eval_s": eval_s,
        "tokens_per_s": tokens_seen / train_s if train_s > 0 else None, "wall_time_s": time.perf_counter() - t_start,
        "curve": curve, "environment": store.environment(), "git_commit": store.git_commit(), "created": store.now(),
    }
    store.atomic_write_json(out / "base.json", record)  # written last: its presence means complete
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlab.reference.pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="auto", choices=[*SIZES, "auto"],
                    help="auto: gpu where CUDA is available, else small")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--steps", type=int, default=None, help="override the size's number of steps")
    ap.add_argument("--out", type=Path, default=None, help="build here instead of $QLAB_CACHE/base/<size>-<hash>")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    size = args.size if args.size != "auto" else ("gpu" if device.startswith("cuda") else "small")
    try:
        path = ensure_base(size, device, steps=args.steps, out=args.out, compile=args.compile,
                           progress=not args.quiet)
    except (BaseError, corpus.CorpusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = json.loads((path / "base.json").read_text())
    print(f"base-{size}: {info['params'] / 1e6:.2f} M params, {info['tokens_seen']:,} tokens "
          f"({info['epochs']:.2f} epochs), held-out perplexity {info['heldout_perplexity']:.2f} "
          f"(untrained {info['heldout_perplexity_init']:.1f}), trained {info['train_s']:.1f}s on {info['device']}")
    print(path)
    print(f"use it: python -m qlab.run model=hub model.name_or_path={path} model.name=base-{size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
