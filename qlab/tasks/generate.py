"""`qlab generate-bench`: how fast each quantization type generates, with and without a LoRA adapter.

    qlab generate-bench                                       # tiny-llama, every quant type, no adapter
    qlab generate-bench --run results/adhoc/<run id>          # also with that run's adapter (unmerged)
    qlab generate-bench --model llama-7b --quants bf16,nf4,nf4+dq --batch-sizes 1,8 --new-tokens 128
    python -m qlab.generate_bench ...                         # the same

Why is 4-bit inference slower than 16-bit? A bitsandbytes 4-bit layer does more work per call
than a 16-bit one: it dequantizes its weights to the compute dtype before the matmul (prompts and
batches) or runs its own 4-bit matrix-vector kernel (one token per sequence), while 16-bit
weights go straight into the matmul; LLM.int8 also quantizes the activations and splits off
outlier columns. Whether reading 4x fewer weight bytes pays that back depends on the batch size
and the hardware: this bench measures it, per quantization setting, with and without a LoRA
adapter (which adds two small matmuls per adapted layer when left unmerged).

One configuration = one quantization setting x {no adapter, the run's adapter}, and each runs in
ONE FRESH PROCESS, so memory peaks, the CUDA context and allocator state never carry from one
configuration into the next: on a GPU (or --device auto) `python -m qlab.generate_bench --one
<json spec>`, a new interpreter, as qlab.sweep runs training points; with --device cpu, a child
forked from a fork server that has only imported the libraries (`ForkServer`), which saves
~5 s of imports per configuration on a small CPU. Each writes
results/<sweep>/<id>/result.json (schema qlab.result/1, kind "generate", status ok | oom | failed),
atomically; a configuration whose result is complete (ok or oom) is skipped unless --force, so
an interrupted bench resumes where it stopped. A forced re-run that fails never replaces a
complete result (the failed one goes to results/<sweep>/.staging/<id>/). With --run, the base
model defaults to the one the adapter was trained on, and every quantization setting gets the
same adapter (trained on one of them: allowed, as in `qlab chat`).

What one configuration measures (all times are wall-clock with the device synchronized before
and after, `measure.sync`: what a user waits for, host-side overhead of the kernels included):
  load_time_s           from_pretrained with quantization (models.load)
  weight_bytes ...      bytes the loaded weights hold (models.weight_bytes)
  adapter_load_time_s   PeftModel.from_pretrained (adapter NOT merged: LoRA runs beside the base)
  prompts               the first human turns of the embedded eval data (qlab/assets/chat/
                        eval.jsonl) in the training format `<s>human</s>` (chat.build_prompt_ids)
  ttft_*_s              time to first token at batch 1: generate(max_new_tokens=1) = prefill of the
                        prompt + the first token; one sample per prompt per repeat
  per batch size B (left padding; greedy; min_new_tokens = max_new_tokens = N, so every
  sequence generates exactly N tokens, which is checked on the output shape):
    generate_b{B}_*_s               T_N: one generate(N) call on B prompts
    first_token_b{B}_*_s            T_1: generate(1) on the same B prompts (B > 1; at B = 1: ttft)
    e2e_tokens_per_s_b{B}_*_tok     B * N / T_N   (prefill included)
    decode_tokens_per_s_b{B}_*_tok  B * (N - 1) / (T_N - T_1): the N - 1 tokens after the first,
                                    over the time after the first (T_1 of the same prompts, same
                                    repeat; a sample with T_N <= T_1 is dropped as noise)
    generated_tokens_b{B}, decode_tokens_b{B}, generate_calls_b{B}: what the timed calls produced
    peak_allocated_bytes_b{B} (GPU) / rss_peak_bytes_b{B} (CPU): memory peak while generating
  peak_allocated_bytes, nvml_peak_device_used_bytes, rss_peak_bytes: the largest over batch sizes
Each batch size gets one untimed warm-up call first. B prompts per call are taken in order from
the prompt list, wrapping around when it runs out (8 prompts at B = 8: one call per repeat).
Summaries are `measure.summarize`: median, p90, mean, CV and a 95% t-interval of the mean over
the timed calls. Greedy decoding must be deterministic: the first prompt's tokens of every
repeat are compared (`greedy_deterministic`) and recorded (`sample_output_ids`).

Exit status: 0 all ok (or oom: a result), 1 a configuration failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from qlab.results import store
from qlab.config import ASSETS, QUANT_SETTINGS

KIND = "generate"
# label -> (quant.type, quant.double_quant); the order is the default order of the bench
QUANTS = {label.lower(): setting for label, setting in QUANT_SETTINGS.items()}  # --quants spells nf4+dq
EVAL_DATA = ASSETS / "chat" / "eval.jsonl"
WARMUP_CALLS = 1  # per batch size, untimed: first-call costs (allocator growth, cuBLAS/kernel setup)


# ---------------------------------------------------------------- configurations (parent side)

def parse_quants(text: str) -> list[str]:
    out = []
    for q in (x.strip().lower() for x in text.split(",") if x.strip()):
        if q not in QUANTS:
            raise ValueError(f"--quants: unknown quantization {q!r}; one of {', '.join(QUANTS)}")
        if q not in out:
            out.append(q)
    if not out:
        raise ValueError("--quants: empty")
    return out


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--batch-sizes: integers separated by commas, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--batch-sizes: every batch size must be >= 1, got {text!r}")
    return sizes


def model_config(spec: str) -> dict:
    """A preset name, or a local directory / hub id loaded through from_pretrained."""
    from qlab.run.presets import PRESETS

    if spec in PRESETS:
        return {"name": spec, "name_or_path": None, "preset": spec, "trust_remote_code": False}
    return {"name": Path(spec.rstrip("/")).name or spec, "name_or_path": spec, "preset": None,
            "trust_remote_code": False}


def adapter_config(run_dir: Path) -> dict:
    """What the result records about the adapter: where it came from and how it was shaped."""
    from qlab.tasks.chat import read_run

    result, adapter = read_run(run_dir)
    cfg = result.get("config") or {}
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    return {"run_dir": str(run_dir), "run_id": result.get("run_id"), "path": str(adapter.resolve()),
            "targets": (cfg.get("adapter") or {}).get("targets"), "r": acfg.get("r"),
            "alpha": acfg.get("lora_alpha"), "trained_quant": (cfg.get("quant") or {}).get("type"),
            "trained_double_quant": (cfg.get("quant") or {}).get("double_quant"),
            "weights_sha256": _weights_sha256(adapter)}


def _weights_sha256(adapter: Path) -> str:
    """The adapter's identity: a hash of its weight file(s). Not of adapter_config.json, which
    lists target_modules in set order: two trainings of one config wrote two orders."""
    return store.files_sha256(sorted(adapter.glob("adapter_model.*")))[:16]


def config_id(config: dict) -> str:
    """Readable axes plus a hash of what defines the measurement (results dir, sweep and paths
    aside), so the same configuration always lands in the same directory and a bench resumes."""
    ident = {"model": config["model"], "quant": config["quant"], "bench": config["bench"],
             "adapter": None if config["adapter"] is None else
             {k: config["adapter"][k] for k in ("run_id", "weights_sha256")}}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
    q = config["quant"]["type"] + ("-dq" if config["quant"]["double_quant"] else "")
    return f"{config['model']['name']}_{q}_{'lora' if config['adapter'] else 'none'}_{digest}"


def configurations(args) -> list[dict]:
    """One config dict per (quantization, adapter) pair, in bench order."""
    adapter = adapter_config(args.run) if args.run else None
    if args.model:
        model = model_config(args.model)
    elif args.run:  # the base the adapter was trained on
        model = dict(store.read_result(args.run)["config"]["model"])
    else:
        model = model_config("tiny-llama")
    bench = {"prompts": args.prompts, "repeats": args.repeats, "new_tokens": args.new_tokens,
             "batch_sizes": args.batch_sizes, "device": args.device, "warmup_calls": WARMUP_CALLS,
             "decoding": "greedy", "prompt_source": "qlab/assets/chat/eval.jsonl, first human turns"}
    out = []
    for label in args.quants:
        qtype, dq = QUANTS[label]
        for a in ([None, adapter] if adapter else [None]):
            config = {"model": model, "quant": {"type": qtype, "double_quant": dq, "compute_dtype": "auto"},
                      "adapter": a, "bench": bench,
                      "tracker": {"results_dir": str(args.results_dir), "sweep": args.sweep},
                      "seed": 0, "force": args.force}
            config["id"] = config_id(config)
            config["argv"] = ["qlab generate-bench", *getattr(args, "argv", [])]
            out.append(config)
    return out


def sweep_root(config: dict) -> Path:
    return Path(config["tracker"]["results_dir"]) / config["tracker"]["sweep"]


def describe(config: dict) -> str:
    q = config["quant"]["type"] + ("+dq" if config["quant"]["double_quant"] else "")
    return f"{config['model']['name']} {q} adapter={'lora' if config['adapter'] else 'none'}"


# What a CPU bench's fork server imports once (see `launch`): the libraries every configuration
# needs, ~5 s of imports per process on a small CPU. Importing them runs no device code.
PRELOAD = ("torch", "transformers.modeling_utils", "transformers.models.auto.modeling_auto", "bitsandbytes",
           "peft", "scipy.stats", "qlab.run.models", "qlab.tasks.chat", "qlab.run.measure", "qlab.run.loop")


def launch(config: dict, log_path: Path, server: "ForkServer") -> int:
    """Run one configuration in a fresh process, its output into `log_path`; its exit code.

    GPU (or --device auto): `python -m qlab.generate_bench --one <spec>`, a new interpreter, as
    qlab.sweep runs training points. CPU (--device cpu): a process forked from `ForkServer`, an
    interpreter that has only imported the libraries (PRELOAD) and forks one child per
    configuration: still one new process per configuration, with its own memory and allocator,
    without paying ~5 s of imports each time. Never on a GPU: CUDA does not survive a fork
    (importing bitsandbytes may already initialize it)."""
    if config["bench"]["device"] == "cpu":
        return server.run(config, log_path)
    from qlab.run.sweep import _die_with_parent

    with open(log_path, "w") as log:
        return subprocess.run([sys.executable, "-m", "qlab.tasks.generate", "--one", json.dumps(config)],
                              stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent).returncode


class ForkServer:
    """`python -m qlab.generate_bench --fork-server`, started on first use: reads one request
    per line on stdin (config, log path, environment, directory), forks a child that runs the
    configuration, waits for it and answers its exit code on stdout. It exits when its stdin
    closes (this process ended or called close); its children die with it (PDEATHSIG)."""

    def __init__(self):
        self.proc = None

    def run(self, config: dict, log_path: Path) -> int:
        from qlab.run.sweep import _die_with_parent

        if self.proc is None or self.proc.poll() is not None:
            with open(Path(log_path).parent / "fork-server.log", "a") as err:
                self.proc = subprocess.Popen([sys.executable, "-m", "qlab.tasks.generate", "--fork-server"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                             preexec_fn=_die_with_parent)
        request = {"config": config, "log": str(log_path), "env": dict(os.environ), "cwd": os.getcwd()}
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            answer = ""
        return int(answer) if answer.strip() else -1  # -1: the server itself died

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()
            self.proc = None


def serve() -> int:
    """The fork server's loop (see ForkServer). Only imports happen before a fork: no device
    work, no thread pools, so each child starts as a fresh interpreter would, minus the imports."""
    import importlib

    from qlab.run.sweep import _die_with_parent

    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # the child imports it (or fails) itself
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: one configuration
            code = 1
            try:
                _die_with_parent()
                os.environ.clear()
                os.environ.update(request["env"])
                os.chdir(request["cwd"])
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                code = 0 if bench_one(request["config"])["status"] in store.COMPLETE_STATUSES else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
    return 0


def run_all(configs: list[dict]) -> dict:
    """Each configuration in its own process, one after another; returns outcome counts."""
    counts = {"ok": 0, "oom": 0, "failed": 0, "skipped": 0}
    server = ForkServer()
    try:
        for i, config in enumerate(configs, 1):
            _run_one(i, len(configs), config, server, counts)
    finally:
        server.close()
    return counts


def _run_one(i: int, n: int, config: dict, server: ForkServer, counts: dict) -> None:
    """One configuration: skipped when complete (unless config["force"]), else run and recorded."""
    root, cid = sweep_root(config), config["id"]
    final = root / cid
    earlier = None if config["force"] else store.read_result(final)
    if earlier is not None and earlier.get("status") in store.COMPLETE_STATUSES:
        print(f"[{i}/{n}] skip {describe(config)}: complete ({earlier['status']}) in {final}", flush=True)
        counts["skipped"] += 1
        return
    print(f"[{i}/{n}] start {describe(config)}", flush=True)
    (root / ".logs").mkdir(parents=True, exist_ok=True)
    log_path = root / ".logs" / f"{cid}.log"
    config = {**config, "attempt": uuid.uuid4().hex[:12]}
    t0 = time.perf_counter()
    code = launch(config, log_path, server)
    result = fresh_result(root, cid, config["attempt"])
    if result is None:  # the process died without a result (killed, segfault)
        result = make_result(config, "failed", {}, {
            "type": "LostRun", "traceback": None,
            "message": f"bench process exited with code {code} without a result; log: {log_path}"},
            store.now())
        publish(config, result)
    counts[result["status"]] = counts.get(result["status"], 0) + 1
    print(f"[{i}/{n}] end {describe(config)}: {one_line(result)}, "
          f"{time.perf_counter() - t0:.0f} s (process)", flush=True)


def fresh_result(root: Path, cid: str, attempt: str) -> dict | None:
    """The result this attempt wrote: published, or in .staging when it failed beside an
    earlier complete one. None if it wrote none (an older result carries another attempt)."""
    for directory in (root / cid, root / ".staging" / cid):
        r = store.read_result(directory)
        if r is not None and r.get("attempt") == attempt:
            return r
    return None


def one_line(result: dict) -> str:
    m = result.get("metrics") or {}
    if result["status"] == "failed":
        e = result.get("error") or {}
        return f"failed: {e.get('type')}: {e.get('message')}"
    parts = [result["status"]]
    if m.get("ttft_median_s") is not None:
        parts.append(f"TTFT {1000 * m['ttft_median_s']:.1f} ms")
    for b in result["config"]["bench"]["batch_sizes"]:
        v = m.get(f"decode_tokens_per_s_b{b}_median_tok")
        if v is not None:
            parts.append(f"decode b{b} {v:,.0f} tok/s")
    peak = m.get("peak_allocated_bytes") or m.get("rss_peak_bytes")
    if peak:
        parts.append(f"peak {peak / 2**30:.2f} GiB")
    return ", ".join(parts)


# ---------------------------------------------------------------- results

def make_result(config: dict, status: str, metrics: dict, error: dict | None, started_at: str) -> dict:
    clean = {k: v for k, v in config.items() if k not in ("id", "argv", "attempt")}
    return {
        "schema": "qlab.result/1",
        "kind": KIND,
        "run_id": config["id"],
        "attempt": config.get("attempt"),  # which launch wrote it (the parent matches it)
        "sweep": config["tracker"]["sweep"],
        "status": status,
        "error": error,
        "axes": {"model": config["model"]["name"], "quant": config["quant"]["type"],
                 "double_quant": bool(config["quant"]["double_quant"]),
                 "adapter": "lora" if config["adapter"] else "none", "optim": None, "seed": config["seed"]},
        "metrics": metrics,
        "config": clean,
        "env": store.environment(),
        "git_commit": store.git_commit(),
        "seed": config["seed"],
        "started_at": started_at,
        "finished_at": store.now(),
        "argv": config.get("argv", sys.argv),  # the bench command, not the child's JSON spec
    }


def publish(config: dict, result: dict) -> Path:
    """results/<sweep>/<id>/result.json, published like a training run's (track.publish): a
    failure never replaces a complete result (it stays in .staging/<id>/ then)."""
    root, cid = sweep_root(config), config["id"]
    staging = root / ".staging" / cid
    shutil.rmtree(staging, ignore_errors=True)  # an older failed attempt
    staging.mkdir(parents=True)
    store.atomic_write_json(staging / store.RESULT, result)
    return store.publish(staging, root / cid, result["status"])


# ---------------------------------------------------------------- one configuration (child side)

def read_prompts(n: int) -> list[str]:
    """The first human turn of the first `n` conversations of the embedded eval data."""
    prompts = []
    with open(EVAL_DATA, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                prompts.append(json.loads(line)["conversation"][0]["human"])
            if len(prompts) == n:
                break
    return prompts


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

        from qlab.run.measure import sync

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


def measure_generation(gen: Generator, prompt_ids: list[list[int]], bench: dict, device: str,
                       metrics: dict, state: dict) -> None:
    from qlab.run.measure import MemoryWindow, summarize

    n, repeats = bench["new_tokens"], bench["repeats"]
    sizes = bench["batch_sizes"]
    peaks: dict[str, list] = {}
    samples = []  # the first prompt's tokens at batch 1, per repeat: greedy must repeat itself
    ttft = []
    for b in ([1] if 1 not in sizes else []) + sizes:
        calls = batches(prompt_ids, b)
        timed_decode = b in sizes
        total, first, e2e, decode = [], [], [], []
        generated = 0
        with MemoryWindow(device) as mem:
            state["window"] = mem
            for _ in range(WARMUP_CALLS):
                gen(calls[0], n if timed_decode else 1)
            if b == sizes[-1] and os.environ.get("QLAB_INJECT_FAULT"):  # tests of oom/failure recording
                from qlab.run.loop import injected_fault

                injected_fault(1, state["id"])
            for _ in range(repeats):
                for k, rows in enumerate(calls):
                    t1, _ = gen(rows, 1)  # time to first token of these prompts
                    first.append(t1)
                    if b == 1:
                        ttft.append(t1)
                    if not timed_decode:
                        continue
                    tn, new = gen(rows, n)
                    generated += new.numel()  # b * n, checked on the shape
                    total.append(tn)
                    e2e.append(b * n / tn)
                    if n > 1 and tn > t1:
                        decode.append(b * (n - 1) / (tn - t1))  # the tokens after the first / the time after it
                    if b == 1 and k == 0:
                        samples.append(new[0].tolist())
        state["window"] = None
        for key, v in mem.peaks.items():
            if v is not None:
                peaks.setdefault(key, []).append(v)
                if timed_decode:
                    metrics[f"{key}_b{b}"] = v
        if timed_decode:
            metrics.update(summarize(total, f"generate_b{b}", "s"))
            if b > 1:
                metrics.update(summarize(first, f"first_token_b{b}", "s"))
            metrics.update(summarize(e2e, f"e2e_tokens_per_s_b{b}", "tok"))
            metrics.update(summarize(decode, f"decode_tokens_per_s_b{b}", "tok"))
            metrics[f"generate_calls_b{b}"] = len(total)
            metrics[f"generated_tokens_b{b}"] = generated
            metrics[f"decode_tokens_b{b}"] = generated - b * len(total)  # all but each sequence's first
    metrics.update(summarize(ttft, "ttft", "s"))
    for key, values in peaks.items():
        metrics[key] = max(values)
    if samples:
        metrics["sample_output_ids"] = samples[0]
        metrics["greedy_deterministic"] = all(s == samples[0] for s in samples)


def bench_one(config: dict) -> dict:
    """Measure one configuration in this process; writes and returns its result."""
    import torch

    started_at = store.now()
    metrics: dict = {}
    state: dict = {"window": None, "id": config["id"]}
    try:
        _measure(config, metrics, state)
        status, error = "ok", None
    except Exception as e:
        from qlab.run.loop import error_record

        oom = isinstance(e, (torch.OutOfMemoryError, MemoryError))
        status, error = ("oom" if oom else "failed"), error_record(e, with_traceback=not oom)
        if state["window"] is not None:  # the peaks seen until the failure
            metrics.update({k: v for k, v in state["window"].read().items() if v is not None})
        print(f"{status}: {error['type']}: {error['message']}", file=sys.stderr)
    result = make_result(config, status, metrics, error, started_at)
    where = publish(config, result)
    print(f"{config['id']}: {one_line(result)} -> {where / store.RESULT}", file=sys.stderr)
    return result


def _measure(config: dict, metrics: dict, state: dict) -> None:
    import torch
    from omegaconf import OmegaConf
    from transformers import set_seed

    from qlab.run import models
    from qlab.tasks.chat import build_prompt_ids

    set_seed(config["seed"])
    bench = config["bench"]
    device = models.resolve_device(bench["device"])
    metrics["device"] = device
    metrics["pid"] = os.getpid()  # one process per configuration: distinct in every result
    metrics["torch_num_threads"] = torch.get_num_threads()  # CPU matmul threads (intra-op)
    quant = OmegaConf.create(config["quant"])
    metrics["compute_dtype"] = str(models.compute_dtype(quant, device)).replace("torch.", "")
    loaded = models.load(OmegaConf.create(config["model"]), quant, device)
    metrics["load_time_s"] = loaded.load_time_s
    metrics.update(loaded.weight_bytes)
    model = loaded.model
    model.config.use_cache = True  # models.load turns the KV cache off for training
    if config["adapter"]:
        from peft import PeftModel

        from qlab.tasks.chat import _check_same_base
        from qlab.run.measure import sync

        adapter = Path(config["adapter"]["path"])
        _check_same_base(adapter, model)
        t0 = time.perf_counter()
        model = PeftModel.from_pretrained(model, str(adapter))  # unmerged: LoRA A/B run beside the base
        sync(device)
        metrics["adapter_load_time_s"] = time.perf_counter() - t0
        lora = [p for name, p in model.named_parameters() if "lora_" in name]
        metrics["adapter_params"] = sum(p.numel() for p in lora)
        metrics["adapter_bytes"] = sum(p.numel() * p.element_size() for p in lora)
    model.eval()
    tok = loaded.tokenizer
    context = getattr(loaded.model.config, "max_position_embeddings", None) or 2048
    prompts = read_prompts(bench["prompts"])
    prompt_ids = [build_prompt_ids([], p, tok, max(8, context - bench["new_tokens"])) for p in prompts]
    metrics["prompt_count"] = len(prompt_ids)
    metrics["prompt_tokens_mean"] = sum(map(len, prompt_ids)) / len(prompt_ids)
    gen = Generator(model, tok, device)
    measure_generation(gen, prompt_ids, bench, device, metrics, state)
    if "sample_output_ids" in metrics:
        metrics["sample_output_text"] = tok.decode(metrics["sample_output_ids"], skip_special_tokens=True)


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:  # a child: one configuration, in this fresh process
        config = json.loads(argv[1])
        return 0 if bench_one(config)["status"] in store.COMPLETE_STATUSES else 1
    if argv[:1] == ["--fork-server"]:  # CPU benches: forks one child per configuration
        return serve()
    p = argparse.ArgumentParser(prog="qlab generate-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="preset name or local directory / hub id (default: the --run's base model, "
                                   "else tiny-llama)")
    p.add_argument("--run", type=Path, help="a qlab run directory with adapter/: bench with that adapter too "
                                            "(default: without adapter only)")
    p.add_argument("--quants", default=",".join(QUANTS), help=f"comma-separated, of {', '.join(QUANTS)}")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--prompts", type=int, default=8, help="prompts from the eval data (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the prompts (default 3)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sequence (default 64)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--results-dir", type=Path, default=Path("results"))
    p.add_argument("--sweep", default="generate", help="results/<sweep>/ (default generate)")
    p.add_argument("--force", action="store_true", help="re-run configurations whose result is complete")
    args = p.parse_args(argv)
    args.argv = list(argv)
    try:
        args.quants = parse_quants(args.quants)
        args.batch_sizes = parse_batch_sizes(args.batch_sizes)
        for name in ("prompts", "repeats", "new_tokens"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
        configs = configurations(args)
    except ValueError as e:
        p.error(str(e))
    except Exception as e:  # a bad --run: no result.json or no adapter
        print(f"qlab generate-bench: {e}", file=sys.stderr)
        return 2
    counts = run_all(configs)
    root = sweep_root(configs[0])
    print("qlab generate-bench: " + " / ".join(f"{v} {k}" for k, v in counts.items())
          + f" -> {root}; tables: qlab report {root}", flush=True)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
