"""task=generate: how fast one quantization setting generates greedily, with or without a trained
LoRA adapter (unmerged), and `qlab generate-bench`, which runs it for several settings.

    python -m qlab.run task=generate quant=nf4 quant.double_quant=true generate.adapter_run=results/adhoc/<id>
    qlab generate-bench [--run results/adhoc/<id>] [--model llama-7b] [--quants bf16,nf4,nf4+dq] [--batch-sizes 1,8]

--quants takes quantization labels (qlab/tasks/quant_labels.py: nf4+DQ, nf4+DQ/b128, hqq-int4,
torchao-nf4-dq, ...); by default the six of config.QUANT_SETTINGS, all bitsandbytes at block size 64.
The bench runs one configuration per quantization setting x {no adapter, the run's adapter}, each
in a process of its own through the one launcher, skipping complete results unless --force. Exit
status: 0 all ok (an oom is a result), 1 a configuration failed, 2 bad arguments. What each metric
means, and why 4-bit weights can generate slower: docs/generation.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from omegaconf import DictConfig

from qlab import config
from qlab.results import store
from qlab.results.stats import summarize
from qlab.run import launch
from qlab.run.data import load_conversations
from qlab.tasks import Outcome, failure, quant_labels
from qlab.tasks.chat import ChatError, build_prompt_ids, check_same_base, read_run

# the bench's default settings (bitsandbytes at block size 64), as --quants spells them: nf4+dq
QUANTS = tuple(label.lower() for label in config.QUANT_SETTINGS)
EVAL_DATA = config.ASSETS / "chat" / "eval.jsonl"
WARMUP_CALLS = 1  # per batch size, untimed: first-call costs (allocator growth, kernel setup)
# how the prompts are made and decoded: recorded in every result (the report prints them)
PROTOCOL = {"warmup_calls": WARMUP_CALLS, "decoding": "greedy",
            "prompt_source": "qlab/assets/chat/eval.jsonl, first human turns"}


@dataclass
class Inputs:
    prompts: list[str]
    adapter: Path | None = None
    adapter_metrics: dict = field(default_factory=dict)  # where the adapter came from


def prepare(cfg: DictConfig) -> Inputs:
    """The prompts and the adapter. An adapter missing, or shaped for another base (checked on
    the meta device: no weights load), is a ConfigError naming generate.adapter_run."""
    from qlab.run import models  # imports torch: lazy, so `qlab generate-bench --help` starts fast

    models.check_available(cfg.model)
    prompts = read_prompts(cfg.generate.prompts)
    if not cfg.generate.adapter_run:
        return Inputs(prompts)
    run = Path(config.resolve_path(cfg.generate.adapter_run))
    return Inputs(prompts, *checked_adapter(run, cfg.model, "generate.adapter_run"))


def trained_by(result: dict) -> dict:
    """The metrics naming the training run an adapter (or model) comes from and its quantization."""
    quant = quant_labels.stored(result)
    return {"adapter_run_id": result.get("run_id"),
            "adapter_trained_quant": config.quant_label(quant) if quant.get("type") else "?"}


def checked_adapter(run: Path, model_cfg, key: str) -> tuple[Path, dict]:
    """(the training run's adapter/, the metrics of where it came from): present and shaped for the
    base `model_cfg` (checked on the meta device: no weights load), else a ConfigError naming `key`."""
    from qlab.claims import estimate  # imports torch: lazy

    try:
        result, adapter = read_run(run)
        check_same_base(adapter, estimate.meta_model(estimate.model_config(model_cfg)))
    except ChatError as e:
        raise config.ConfigError(key, str(e)) from None
    # the identity store.IDENTITY_FILES gives the adapter: a re-trained one is another arm
    return adapter, {**trained_by(result),
                     "adapter_weights_sha256": store.files_sha256(sorted(adapter.glob("adapter_model.*")))[:16]}


def read_prompts(n: int) -> list[str]:
    """The first human turn of the first `n` conversations of the embedded eval data."""
    return [conv[0][0] for conv in load_conversations(str(EVAL_DATA))[0][:n]]


def left_pad(rows: list[list[int]], pad_id: int, device: str):
    """A batch of prompts, left-padded (generation appends on the right of every row)."""
    import torch

    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


class Generator:
    """Greedy generation of exactly `n` new tokens per sequence, timed and checked."""

    def __init__(self, model, tokenizer, device: str):
        self.model, self.device = model, device
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def __call__(self, rows: list[list[int]], n: int):
        """(seconds, generated ids [B, n]) of one generate call."""
        import torch

        from qlab.run.measure import sync  # imports torch: lazy, as in prepare

        ids, mask = left_pad(rows, self.pad, self.device)
        sync(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                      max_new_tokens=n, min_new_tokens=n, use_cache=True,
                                      eos_token_id=self.eos, pad_token_id=self.pad)
        sync(self.device)
        seconds = time.perf_counter() - t0
        new = out[:, ids.shape[1]:]
        if tuple(new.shape) != (len(rows), n):  # min_new_tokens must have held off EOS
            raise RuntimeError(f"generate returned {tuple(new.shape)} new tokens, expected {(len(rows), n)}")
        return seconds, new.cpu()


def batches(prompt_ids: list[list[int]], b: int) -> list[list[list[int]]]:
    """ceil(P / b) calls of b prompts each, in order, wrapping around at the end."""
    p = len(prompt_ids)
    return [[prompt_ids[(i * b + j) % p] for j in range(b)] for i in range(math.ceil(p / b))]


@dataclass
class Calls:
    """One batch size's timed calls: T_1 of every call, T_N of the same prompts (a batch size
    of the bench), the first prompt's tokens per repeat, and how many tokens came out."""

    first: list = field(default_factory=list)
    total: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    generated: int = 0


def time_calls(gen: Generator, calls: list, n: int | None, repeats: int, before=None) -> Calls:
    """`repeats` passes over `calls` after one untimed warm-up call; `before` runs between them."""
    for _ in range(WARMUP_CALLS):
        gen(calls[0], n or 1)
    if before:
        before()
    out = Calls()
    for _ in range(repeats):
        for k, rows in enumerate(calls):
            out.first.append(gen(rows, 1)[0])  # time to first token of these prompts
            if n:
                seconds, new = gen(rows, n)
                out.total.append(seconds)
                out.generated += new.numel()  # b * n, checked on the shape
                if k == 0:
                    out.samples.append(new[0].tolist())
    return out


def batch_metrics(b: int, n: int, c: Calls, peaks: dict) -> dict:
    """One batch size's summaries: TTFT at batch 1; for a benched batch size T_N, T_1, end-to-end
    B N / T_N and decode B (N - 1) / (T_N - T_1) tokens/s (T_N <= T_1 dropped), counts and peaks."""
    out = summarize(c.first, "ttft", "s") if b == 1 else {}
    if not c.total:  # batch 1 run for its TTFT alone
        return out
    decode = [b * (n - 1) / (tn - t1) for t1, tn in zip(c.first, c.total) if n > 1 and tn > t1]
    out.update({f"{k}_b{b}": v for k, v in peaks.items() if v is not None})
    out.update(summarize(c.total, f"generate_b{b}", "s"))
    if b > 1:
        out.update(summarize(c.first, f"first_token_b{b}", "s"))
    out.update(summarize([b * n / t for t in c.total], f"e2e_tokens_per_s_b{b}", "tok"))
    out.update(summarize(decode, f"decode_tokens_per_s_b{b}", "tok"))
    out.update({f"generate_calls_b{b}": len(c.total), f"generated_tokens_b{b}": c.generated,
                f"decode_tokens_b{b}": c.generated - b * len(c.total)})  # all but each sequence's first
    return out


def load(cfg: DictConfig, inputs: Inputs, device: str):
    """(model, tokenizer, metrics): the base, quantized, with the adapter beside it (unmerged)."""
    import torch

    from qlab.run import measure, models  # import torch: lazy, as in prepare

    loaded = models.load(cfg.model, cfg.quant, device)
    metrics = {"load_time_s": loaded.load_time_s, **loaded.weight_bytes,
               "compute_dtype": str(models.compute_dtype(cfg.quant, device)).replace("torch.", "")}
    model = loaded.model
    model.config.use_cache = True  # models.load turns the KV cache off for training
    if inputs.adapter:
        from qlab.run import adapters

        t0 = time.perf_counter()
        model = adapters.load_saved(model, inputs.adapter)  # LoRA A/B run beside the base
        measure.sync(device)
        lora = [p for name, p in model.named_parameters() if "lora_" in name]
        metrics.update(adapter_load_time_s=time.perf_counter() - t0, adapter_params=sum(p.numel() for p in lora),
                       adapter_bytes=sum(p.numel() * p.element_size() for p in lora))
    model.eval()
    metrics["torch_num_threads"] = torch.get_num_threads()  # CPU matmul threads (intra-op)
    return model, loaded.tokenizer, metrics


def run(cfg: DictConfig, inputs: Inputs, recorder) -> Outcome:
    from transformers import set_seed

    # these import torch: lazy, as in prepare
    from qlab.run import loop, measure
    from qlab.run.device import resolve_device

    g = cfg.generate
    n, sizes = g.new_tokens, list(g.batch_sizes)
    metrics = {**inputs.adapter_metrics, **PROTOCOL, "pid": os.getpid()}  # pid: one process per run
    window = None  # the memory window a failure struck in: its peaks are recorded
    try:
        set_seed(cfg.seed)
        device = metrics["device"] = resolve_device(cfg.train.device)
        model, tok, loaded = load(cfg, inputs, device)
        metrics.update(loaded)
        context = getattr(model.config, "max_position_embeddings", None) or 2048
        prompt_ids = [build_prompt_ids([], p, tok, max(8, context - n)) for p in inputs.prompts]
        metrics.update(prompt_count=len(prompt_ids), prompt_tokens_mean=sum(map(len, prompt_ids)) / len(prompt_ids))
        gen, peaks, samples = Generator(model, tok, device), {}, []
        for b in ([1] if 1 not in sizes else []) + sizes:  # batch 1 gives TTFT even when not benched
            window = measure.MemoryWindow(device)
            with window:  # QLAB_INJECT_FAULT (tests) fails the last batch size after its warm-up
                c = time_calls(gen, batches(prompt_ids, b), n if b in sizes else None, g.repeats,
                               before=partial(loop.inject_fault, 1, recorder.id) if b == sizes[-1] else None)
            peaks.update({k: max(v, peaks.get(k, v)) for k, v in window.peaks.items() if v is not None})
            metrics.update(batch_metrics(b, n, c, window.peaks))
            samples = c.samples if b == 1 else samples
            window = None
        metrics.update(peaks)  # the largest over the batch sizes
        if samples:
            metrics.update(sample_output_ids=samples[0], greedy_deterministic=all(s == samples[0] for s in samples),
                           sample_output_text=tok.decode(samples[0], skip_special_tokens=True))
    except Exception as e:
        if window is not None:
            metrics.update({k: v for k, v in window.read().items() if v is not None})
        return failure(e, metrics)
    return Outcome("ok", metrics)


# ---------------------------------------------------------------- qlab generate-bench

def parse_quants(text: str) -> list[str]:
    """Comma-separated quantization labels (quant_labels.parse) -> their lowercased labels, once each."""
    out = list(dict.fromkeys(quant_labels.parse(q) for q in text.split(",") if q.strip()))
    if not out:
        raise argparse.ArgumentTypeError("empty")
    return out


def parse_batch_sizes(text: str) -> list[int]:
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"integers separated by commas, got {text!r}") from None


def override_value(v) -> str:
    """A config value as a Hydra override's right-hand side."""
    if isinstance(v, str):
        return f"'{v}'"
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def quant_overrides(q: dict) -> list[str]:
    """Overrides setting every key of the quant group to `q`'s (quant_labels.KEYS, and compute_dtype
    where `q` has one): nothing falls back to the group's default (bitsandbytes at block size 64)."""
    return [f"quant.{k}={override_value(q[k])}" for k in (*quant_labels.KEYS, "compute_dtype") if k in q]


def model_overrides(args) -> list[str]:
    """--model: a conf/model/ name, else a preset, else a local directory or hub id; without
    it, the model the --run's adapter was trained on, else tiny-llama."""
    spec = args.model
    if spec is None and args.run:
        trained = store.read_result(args.run)
        if trained is None:
            raise config.ConfigError("--run", f"{args.run}: no result.json; pass the directory of a qlab run")
        return [f"model.{k}={override_value(v)}" for k, v in trained["config"]["model"].items()]
    if spec is None or (Path(config.PROJECT_ROOT) / "conf" / "model" / f"{spec}.yaml").is_file():
        return [f"model={spec or 'tiny-llama'}"]
    if spec in config.SHAPES["presets"]:
        return [f"model.name={override_value(spec)}", f"model.preset={override_value(spec)}", "model.name_or_path=null"]
    name = Path(spec.rstrip("/")).name or spec
    return ["model=hub", f"model.name={override_value(name)}", f"model.name_or_path={override_value(spec)}"]


def plan(args) -> list[tuple[list[str], DictConfig]]:
    """(overrides, config) of every configuration, in bench order, all validated and prepared
    before any runs: a bad argument costs no run."""
    # absolute paths: a run process starts in the project root (launch.launch)
    common = ["task=generate", *model_overrides(args), f"train.device={args.device}",
              f"tracker.results_dir={override_value(str(args.results_dir.resolve()))}",
              f"tracker.sweep={override_value(args.sweep)}", f"generate.prompts={args.prompts}",
              f"generate.repeats={args.repeats}", f"generate.new_tokens={args.new_tokens}",
              f"generate.batch_sizes=[{','.join(map(str, args.batch_sizes))}]"]
    adapters = ["null"] + ([override_value(str(args.run.resolve()))] if args.run else [])
    out = []
    for label in args.quants:
        for adapter in adapters:
            overrides = [*common, *quant_overrides(quant_labels.setting(label)), f"generate.adapter_run={adapter}"]
            if not out:
                config.check_overrides(overrides)  # Hydra's own errors as one line naming the key
            cfg = config.compose(overrides)
            config.validate(cfg)
            out.append((overrides, cfg))
    for _, cfg in out[:len(adapters)]:  # the adapter fits the base whatever the quantization
        prepare(cfg)
    return out


def describe(cfg: DictConfig) -> str:
    return f"{cfg.model.name} {config.quant_label(cfg.quant)} adapter={'lora' if cfg.generate.adapter_run else 'none'}"


def one_line(result: dict) -> str:
    m = result.get("metrics") or {}
    if result["status"] == "failed":
        e = result.get("error") or {}
        return f"failed: {e.get('type')}: {e.get('message')}"
    parts = [result["status"]] + ([f"TTFT {1000 * m['ttft_median_s']:.1f} ms"] if m.get("ttft_median_s") else [])
    parts += [f"decode b{b} {m[k]:,.0f} tok/s" for b in result["config"]["generate"]["batch_sizes"]
              if m.get(k := f"decode_tokens_per_s_b{b}_median_tok") is not None]
    peak, _ = store.peak_bytes(m)
    return ", ".join(parts + ([f"peak {peak / 2**30:.2f} GiB"] if peak else []))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qlab generate-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a conf/model/ name, preset, local directory or hub id (default: the --run's "
                                   "base model, else tiny-llama)")
    p.add_argument("--run", type=Path, help="a qlab run directory with adapter/: bench with that adapter too "
                                            "(default: without adapter only)")
    p.add_argument("--quants", type=parse_quants, default=list(QUANTS),
                   help=f"comma-separated quantization labels (default {','.join(QUANTS)}): "
                        f"{quant_labels.CHOICES}")
    p.add_argument("--batch-sizes", type=parse_batch_sizes, default=[1, 8],
                   help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--prompts", type=int, default=8, help="prompts from the eval data (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the prompts (default 3)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence (default 64)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--results-dir", type=Path, default=Path("results"))
    p.add_argument("--sweep", default="generate", help="results/<sweep>/ (default generate)")
    p.add_argument("--force", action="store_true", help="re-run configurations whose result is complete")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        plans = plan(args)
    except config.ConfigError as e:
        print(f"qlab generate-bench: invalid, nothing was run: {e}", file=sys.stderr)
        return 2
    counts = {"ok": 0, "oom": 0, "failed": 0, "skipped": 0}
    root = args.results_dir / args.sweep
    for i, (overrides, cfg) in enumerate(plans, 1):
        done = None if args.force else store.complete_result(cfg)
        if done is not None:
            counts["skipped"] += 1
            status = store.read_result(done)["status"]
            print(f"[{i}/{len(plans)}] skip {describe(cfg)}: complete ({status})", flush=True)
            continue
        print(f"[{i}/{len(plans)}] start {describe(cfg)}", flush=True)
        t0 = time.perf_counter()
        result = launch.run_isolated(cfg, overrides, root / ".logs" / f"{store.run_id(cfg)}.log")
        counts[result["status"]] += 1
        print(f"[{i}/{len(plans)}] end {describe(cfg)}: {one_line(result)}, {time.perf_counter() - t0:.0f} s "
              "(process)", flush=True)
    print("qlab generate-bench: " + " / ".join(f"{v} {k}" for k, v in counts.items())
          + f" -> {root}; tables: qlab report {root}", flush=True)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
