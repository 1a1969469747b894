"""Speed benchmark (issue #8): the HF Trainer recipe vs qlab's recipe and fast paths vs 16-bit LoRA.

    python experiments/speed_bench.py                          # llama-7b and bloom-7b1 shapes, one GPU
    python experiments/speed_bench.py --models llama-7b --steps 30
    python experiments/speed_bench.py --quick                  # CPU check: tiny-llama + tiny-bloom
    make bench-speed [ARGS="--modes trainer,recipe,fast,bf16,bf16-fast"]

For each model shape, every mode runs as its own fresh process, one after another, at the same
batch (4 x 512 tokens, every sequence padded to 512: 2,048 tok/step), LoRA r=64 on every linear
layer, paged AdamW 32-bit, gradient checkpointing and seed:
  trainer    transformers.Trainer as the original QLoRA code runs it: nf4+DQ, peft's
             prepare_model_for_kbit_training (non-quantized weights up-cast to float32), float32
             LoRA, optim=paged_adamw_32bit, bf16=True (autocast), constant LR, max_grad_norm 0.3
             (this file's --trainer-worker). It follows the issue's "QLoRA recipe" (peft's
             preparation, float32 adapters). The original qlora.py with --bf16 goes further and
             casts the LoRA layers, embeddings and head to bfloat16 after that preparation: a
             faster baseline than this one, with bf16 adapter weights (no float32 master copy)
  recipe     python -m qlab.run quant=nf4 quant.double_quant=true speed=recipe
  fast       python -m qlab.run quant=nf4 quant.double_quant=true speed=fast
  bf16       python -m qlab.run quant=bf16 speed=recipe: 16-bit LoRA, no quantization, eager
  bf16-fast  python -m qlab.run quant=bf16 speed=fast (not in the default --modes)
Each writes a normal result.json into <results>/speed-<model>/ (qlab's RunRecorder: staging,
atomic publish; the Trainer run's config carries speed.runner=trainer), so `make report
SWEEP=speed-<model>` tables them side by side. Warm-up steps (--warmup; torch.compile needs
them) are excluded from step times and memory peaks; --steps steps are measured, with CUDA
events around each optimizer step (qlab's StepClock; in the Trainer, a callback's
on_step_begin / on_step_end).

Resumable: a mode whose result is complete (ok or oom) for the same configuration is skipped
(--force re-runs). A run that fails, runs out of memory, crashes or exceeds --timeout-per-run
is recorded as such and the bench goes on. Then <results>/speed-bench/<device>.md and .json:
the mode x model table (tokens/s median with 95% CI, CV, peaks, weight bytes), the ratios and
the issue's three targets with a computed verdict each, hardware and versions.
--no-run tables the results already there, running nothing, with the hardware and versions the
runs recorded (each model's runs write <device>-<model>.md; the full set <device>.md).
Exit status: 0 every run complete (whatever the verdicts), 1 a run failed (or, with --no-run, is
missing), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from qlab import config as qconfig  # noqa: E402
from qlab.run import sweep  # noqa: E402
from qlab.results import store

MODES = {  # mode -> (runner, overrides on top of the common ones)
    "trainer": ("trainer", ["quant=nf4", "quant.double_quant=true", "speed=recipe"]),
    "recipe": ("qlab", ["quant=nf4", "quant.double_quant=true", "speed=recipe"]),
    "fast": ("qlab", ["quant=nf4", "quant.double_quant=true", "speed=fast"]),
    "bf16": ("qlab", ["quant=bf16", "speed=recipe"]),
    "bf16-fast": ("qlab", ["quant=bf16", "speed=fast"]),
}
DEFAULT_MODES = "trainer,recipe,fast,bf16"
DEFAULT_MODELS = "llama-7b,bloom-7b1"
QUICK_MODELS = "tiny-llama,tiny-bloom"


@dataclass(frozen=True)
class Target:
    name: str
    ratio: str  # column of tables.speed_ratios
    op: str  # ">=" | "<="
    threshold: float


TARGETS = (
    Target("fast >= 1.5x trainer tokens/s", "fast/trainer tok/s", ">=", 1.5),
    Target("fast >= 0.9x bf16 tokens/s", "fast/bf16 tok/s", ">=", 0.9),
    Target("fast peak <= recipe peak", "peak fast/recipe", "<=", 1.0),
)


# ---------------------------------------------------------------- configs

def common_overrides(args, model: str) -> list[str]:
    """What every mode of one model shares; the sweep directory is speed-<model>."""
    out = [f"model={model}", f"train={'cpu' if args.quick else 'gpu'}", "adapter=all_linear", f"adapter.r={args.r}",
           "optim=paged_adamw_32bit", f"data.max_seq_len={args.seq}", "data.pad_to=max_seq_len",
           "data.eval_file=null",  # speed only: no held-out evaluation after the steps
           f"train.batch_size={args.batch}", "train.gradient_checkpointing=true",
           f"train.steps={args.warmup + args.steps}", f"train.warmup_steps={args.warmup}",
           "train.save_adapter=false", "train.progress=false", f"seed={args.seed}",
           f"tracker.results_dir={args.results}", f"tracker.sweep=speed-{model}"]
    if args.quick:
        out.append("train.device=cpu")
    return out


def mode_overrides(args, model: str, mode: str) -> list[str]:
    extra = list(MODES[mode][1])
    if MODES[mode][0] == "qlab" and args.profile:
        extra.append(f"train.profile_steps={args.profile}")  # not part of the run's id
    if args.quick and extra[-1] == "speed=fast":
        extra.append("speed.compile=none")  # a CPU check: compiling costs more than the few steps
    return common_overrides(args, model) + extra


def on_cuda(cfg: DictConfig) -> bool:
    device = cfg.train.device
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def trainer_config(cfg: DictConfig) -> DictConfig:
    """The Trainer run's config: the recipe's, with its speed block saying what the Trainer path
    does (`runner: trainer`; bf16=True autocasts the forward on a GPU) so its run id, and its
    label in reports, differ from qlab's recipe run."""
    c = OmegaConf.to_container(cfg, resolve=True)
    c["speed"] = {**c["speed"], "upcast_non_quantized": True, "adapter_autocast": on_cuda(cfg), "compile": "none",
                  "loss": "full", "runner": "trainer"}
    return OmegaConf.create(c)


def config_for(args, model: str, mode: str) -> tuple[list[str], DictConfig]:
    overrides = mode_overrides(args, model, mode)
    cfg = qconfig.compose(overrides)
    qconfig.validate(cfg)
    return overrides, trainer_config(cfg) if MODES[mode][0] == "trainer" else cfg


# ---------------------------------------------------------------- the Trainer worker

def trainer_worker(argv: list[str]) -> int:
    """`speed_bench.py --trainer-worker [--force] <overrides>`: one Trainer run in this process,
    recorded like qlab.run records its runs. Exit codes as qlab.run: 0 ok, 1 failed, 3 oom."""
    import psutil

    from qlab.run import data
    from qlab.tasks.train import EXIT

    force = "--force" in argv
    overrides = [a for a in argv if a != "--force"]
    t_start = time.perf_counter()
    startup_s = time.time() - psutil.Process().create_time()
    base = qconfig.compose(overrides)
    qconfig.validate(base)
    cfg = trainer_config(base)
    if store.is_complete(store.run_dir(cfg)) and not force:
        print(f"skip {store.run_id(cfg)}: complete ({store.read_result(store.run_dir(cfg))['status']})")
        return 0
    raw = data.read(cfg.data)
    recorder = store.RunRecorder(cfg)
    recorder.start()
    metrics: dict = {"startup_s": startup_s}
    try:
        status, error = _trainer_pipeline(cfg, raw, recorder, metrics)
    except Exception as e:  # loading, adapters, data, Trainer setup
        import torch

        from qlab.run.loop import error_record

        oom = isinstance(e, torch.OutOfMemoryError)
        status, error = ("oom" if oom else "failed"), error_record(e, with_traceback=not oom)
        print(f"run {recorder.id} {status}: {error['type']}: {error['message']}", file=sys.stderr)
    metrics["wall_time_s"] = time.perf_counter() - t_start
    result = recorder.finish(status, metrics, error)
    m = result["metrics"]
    print(f"status={status} tokens/s={m.get('tokens_per_s')} -> {result['run_id']}")
    return EXIT[status]


def _trainer_pipeline(cfg: DictConfig, raw, recorder, metrics: dict):
    """qlab.run's pipeline with transformers.Trainer as the training loop."""
    t_setup = time.perf_counter()
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from qlab.run import loop, measure, models, optim
    from qlab.tasks.train import record_memory, setup

    # as qlab.run, with the recipe's speed settings (the QLoRA code: prepare_model_for_kbit_training's
    # float32 up-cast, checkpointing on, float32 LoRA, eager): the same model, adapters and batches
    assert cfg.speed.upcast_non_quantized and cfg.speed.compile == "none", "the Trainer runs the recipe"
    device, model, prepared, batches = setup(cfg, raw, metrics)
    tc = cfg.train
    it = batches.train_batches()
    feed = [next(it) for _ in range(tc.steps)]  # the batches qlab's loop takes, in its order
    samples = [{k: v[i] for k, v in b.items()} for b in feed for i in range(len(b["input_ids"]))]

    class Fixed(torch.utils.data.Dataset):
        items = samples

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    class InOrder(Trainer):  # no shuffling: step k trains on batch k, as in qlab's loop
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    params = [p for p in model.parameters() if p.requires_grad]
    optim.guard_managed_memory(cfg.optim.name, params, device)  # never oversubscribe managed memory
    cuda = device.startswith("cuda")
    probe_layers = loop.checkpointed_layers(model) if tc.gradient_checkpointing else []
    if tc.gradient_checkpointing and not probe_layers:
        raise RuntimeError("train.gradient_checkpointing=true but no layer has checkpointing enabled")

    class Clock(TrainerCallback):
        """CUDA events around each optimizer step (measure.StepClock), peaks over the measured
        steps (measure.MemoryWindow), the loss of every step, one metrics.jsonl line per step."""

        def __init__(self):
            self.clock, self.window, self.open = measure.StepClock(device), measure.MemoryWindow(device), False
            self.losses, self.done, self.probe = [], 0, None

        def on_step_begin(self, args, state, control, **kw):
            step = state.global_step  # steps completed so far = this step's index
            if step == 0 and probe_layers:
                self.probe = loop.CheckpointProbe(probe_layers)
            if step == tc.warmup_steps:
                self.window.__enter__()  # resets torch's peaks, starts the NVML/RSS sampler
                self.open = True
            if step >= tc.warmup_steps:
                self.clock.__enter__()

        def on_step_end(self, args, state, control, **kw):
            step = state.global_step - 1
            if step >= tc.warmup_steps:
                self.clock.__exit__(None, None, None)
            if self.probe is not None:
                calls, self.probe = self.probe.remove(), None
                if calls != 2 * len(probe_layers):
                    raise RuntimeError(f"gradient checkpointing is not active: {len(probe_layers)} layers ran "
                                       f"{calls} times in one step (expected {2 * len(probe_layers)})")
            self.done += 1

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            step = state.global_step - 1
            self.losses.append(float(logs["loss"]))
            b = feed[step]
            rec = {"step": step, "loss": self.losses[-1], "lr": logs.get("learning_rate"), **loop.batch_tokens(b)}
            if step >= tc.warmup_steps and len(self.clock.times) == step - tc.warmup_steps + 1:
                rec["step_time_s"] = self.clock.times[-1]
            recorder.log_step(rec)

        def close(self):
            if self.open:
                self.window.__exit__(None, None, None)
                self.open = False

    oc = cfg.optim
    trainer_args = dict(
        per_device_train_batch_size=tc.batch_size, gradient_accumulation_steps=1, max_steps=tc.steps,
        learning_rate=oc.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=oc.weight_decay,
        adam_beta1=oc.betas[0], adam_beta2=oc.betas[1], max_grad_norm=oc.max_grad_norm,
        optim=oc.name if oc.name != "adamw" else "adamw_torch",
        gradient_checkpointing=tc.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=cuda, use_cpu=not cuda, seed=cfg.seed, logging_steps=1, save_strategy="no", report_to="none",
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=not tc.progress)
    metrics["runner"] = "transformers.Trainer"
    metrics["trainer_args"] = trainer_args
    clock = Clock()
    metrics["compute_dtype"] = str(models.compute_dtype(cfg.quant, device)).replace("torch.", "")
    metrics["device"] = device
    status, error = "ok", None
    with tempfile.TemporaryDirectory() as out:
        trainer = InOrder(model=model, args=TrainingArguments(output_dir=out, **trainer_args), train_dataset=Fixed(),
                          callbacks=[clock])
        metrics["setup_s"] = time.perf_counter() - t_setup
        t_train = time.perf_counter()
        try:
            trainer.train()
        except torch.OutOfMemoryError as e:  # an OOM is a result: keep what was measured
            status, error = "oom", loop.error_record(e, with_traceback=False)
        except Exception as e:
            status, error = "failed", loop.error_record(e)
        finally:
            clock.close()
        if status == "oom" and cuda:
            torch.cuda.empty_cache()
    metrics.update(clock.window.peaks)  # empty when no measured step began
    times = clock.clock.times
    measured = feed[tc.warmup_steps: tc.warmup_steps + len(times)]
    counts = [loop.batch_tokens(b) for b in measured]
    metrics.update(loop.throughput(times, *([c[k] for c in counts]
                                             for k in ("tokens", "real_tokens", "target_tokens"))))
    metrics["steps_completed"] = clock.done
    metrics.update(loop.loss_summary(clock.losses))
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    if opt is not None:
        metrics["optimizer_class"] = type(opt).__name__
        state = optim.measured_state_bytes(opt)
    else:
        state = {"device": 0, "managed": 0, "cpu": 0}
    metrics["optimizer_state_location"] = optim.state_location(cfg.optim.name, device)
    record_memory(cfg, device, model, prepared, state, metrics)
    if status == "ok":
        metrics["train_s"] = time.perf_counter() - t_train
    return status, error


# ---------------------------------------------------------------- the bench

def launch(args, mode: str, overrides: list[str], cfg: DictConfig) -> tuple[dict, float]:
    """Run one mode in a fresh process; its result (recorded as failed if the process died
    without one or ran past --timeout-per-run) and the process' seconds."""
    rid = store.run_id(cfg)
    logs = Path(cfg.tracker.results_dir) / cfg.tracker.sweep / ".logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{rid}.log"
    if MODES[mode][0] == "trainer":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--trainer-worker", *(["--force"] if args.force else []),
               *overrides]
    else:
        cmd = [sys.executable, "-m", "qlab.run", *overrides]
    t0, started = time.perf_counter(), time.time()
    note = None
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=sweep._die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            proc.wait(timeout=args.timeout_per_run)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the run and its compile workers
            proc.wait()
            note = f"timed out after {args.timeout_per_run:g} s (--timeout-per-run) and was killed"
    seconds = time.perf_counter() - t0
    result = store.fresh_result(cfg, since=started)
    if result is None or note:
        result = store.record_lost_run(cfg, (note or f"run process exited with code {proc.returncode} without a "
                                                     "result") + f"; its log: {log_path}")
    return result, seconds


def _peak(m: dict) -> str:
    peak = m.get("nvml_peak_device_used_bytes") or m.get("peak_allocated_bytes") or m.get("rss_peak_bytes")
    return f"{peak / 2**30:.2f} GiB" if peak else "n/a"


def run_all(args, plan: list[tuple[str, str, list[str], DictConfig]]) -> dict:
    """Every (model, mode) of the plan, skipped when complete; {(model, mode): record}."""
    done = {}
    for i, (model, mode, overrides, cfg) in enumerate(plan, 1):
        rid, final = store.run_id(cfg), store.run_dir(cfg)
        head = f"[{i}/{len(plan)}] {model} {mode}"
        if store.is_complete(final) and not args.force:
            result, outcome, seconds = store.read_result(final), "skipped", None
            print(f"{head}: skip, complete ({result['status']}) {final}", flush=True)
        else:
            print(f"{head}: start {rid}", flush=True)
            result, seconds = launch(args, mode, overrides, cfg)
            outcome = "ran"
            m = result.get("metrics") or {}
            err = result.get("error") or {}
            print(f"{head}: {result['status']}"
                  + (f" ({err.get('type')}: {err.get('message')})" if result["status"] != "ok" else "")
                  + (f", {m['tokens_per_s_median_tok']:.0f} tok/s (median)" if m.get("tokens_per_s_median_tok")
                     else "")
                  + f", peak {_peak(m)}, {seconds:.0f} s (process)", flush=True)
        done[(model, mode)] = {"model": model, "mode": mode, "run_id": rid, "status": result["status"],
                               "outcome": outcome, "process_s": seconds, "overrides": overrides,
                               "result": str(final / store.RESULT),
                               "error": result.get("error")}
    return done


def read_all(args, plan: list[tuple[str, str, list[str], DictConfig]]) -> dict:
    """--no-run: every (model, mode) of the plan as its result.json left it, running nothing
    (status "missing" where there is none)."""
    done = {}
    for model, mode, overrides, cfg in plan:
        final = store.run_dir(cfg)
        result = store.read_result(final) if (final / store.RESULT).is_file() else {"status": "missing"}
        done[(model, mode)] = {"model": model, "mode": mode, "run_id": store.run_id(cfg), "status": result["status"],
                               "outcome": "read", "process_s": None, "overrides": overrides,
                               "result": str(final / store.RESULT), "error": result.get("error")}
    return done


def recorded_machine(done: dict) -> tuple[dict, str | None]:
    """The hardware, versions and commit the runs recorded (--no-run tables them elsewhere)."""
    for d in done.values():
        path = Path(d["result"])
        result = store.read_result(path.parent) if path.is_file() else None
        if result and result.get("env"):
            return result["env"], result.get("git_commit")
    return store.environment(), store.git_commit()


# ---------------------------------------------------------------- tables, targets, output

def evaluate_targets(ratios, table) -> list[dict]:
    """Each target for each model: the ratio, pass / fail, or n/a (a mode it needs has no ok
    run or no value) with the reason."""
    from qlab.results.tables import SPEED_RATIOS

    out = []
    for _, r in ratios.iterrows():
        g = table[table.model == r.model]
        for t in TARGETS:
            value = float(r[t.ratio])
            entry = {"model": r.model, "target": t.name, "ratio": t.ratio, "op": t.op, "threshold": t.threshold,
                     "value": None if math.isnan(value) else value}
            if math.isnan(value):
                num, den, _ = SPEED_RATIOS[t.ratio]
                missing = [m for m in (num, den) if not ((g["mode"] == m) & (g.n > 0)).any()]
                entry.update(verdict="n/a", reason=("no ok run of " + ", ".join(missing)) if missing
                             else "no value to compare")
            else:
                ok = value >= t.threshold if t.op == ">=" else value <= t.threshold
                entry.update(verdict="pass" if ok else "fail", reason="")
            out.append(entry)
    return out


def overall(targets: list[dict]) -> str:
    verdicts = {t["verdict"] for t in targets}
    if "fail" in verdicts:
        return "fail"
    return "pass" if verdicts == {"pass"} else "incomplete"


def load_table(args, done: dict):
    """The speed table of exactly the runs of this invocation (read back from their result.json
    through qlab.frame, as `qlab report` reads them)."""
    import pandas as pd

    from qlab.results import frame, tables

    runs = []
    for model in dict.fromkeys(k[0] for k in done):
        root = Path(args.results) / f"speed-{model}"
        if root.is_dir():
            runs.append(frame.load_runs(root))
    runs = pd.concat([r for r in runs if not r.empty], ignore_index=True) if runs else pd.DataFrame()
    modes = {d["run_id"]: d["mode"] for d in done.values()}
    runs = runs[runs.run_id.isin(modes)] if not runs.empty else runs
    if runs.empty:
        return None, None
    table = tables.speed_table(runs, modes)
    return table, tables.speed_ratios(table)


def records(df) -> list[dict]:
    """Rows as dicts, NaN as null (strict JSON)."""
    if df is None:
        return []
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in df.to_dict(orient="records")]


def write_outputs(args, done: dict, table, ratios, env: dict, commit: str | None) -> tuple[Path, Path]:
    from qlab.results import tables

    targets = evaluate_targets(ratios, table) if table is not None else []
    verdict = overall(targets) if targets else "incomplete"
    setup = {"models": args.models, "modes": args.modes, "steps": args.steps, "warmup": args.warmup,
             "batch_size": args.batch, "max_seq_len": args.seq, "tokens_per_step": args.batch * args.seq,
             "lora_r": args.r, "seed": args.seed, "quick": args.quick, "results": str(args.results)}
    record = {"schema": "qlab.speed_bench/1", "setup": setup, "verdict": verdict, "targets": targets,
              "table": records(table), "ratios": records(ratios),
              "runs": list(done.values()), "env": env, "git_commit": commit, "finished_at": store.now()}
    out = Path(args.results) / "speed-bench"
    out.mkdir(parents=True, exist_ok=True)
    # one file per device for the full model set; a run of some models writes its own, so two
    # runs on two GPUs of one host never write the same file
    stem = out / (store.device_slug(env) + ("" if args.models == DEFAULT_MODELS.split(",") else "-" + "-".join(args.models)))
    store.atomic_write_json(stem.with_suffix(".json"), record)
    lines = [f"# Speed benchmark: HF Trainer vs qlab recipe vs qlab fast vs 16-bit LoRA ({', '.join(args.models)})",
             "", f"{store.machine_line(env, with_cuda=True)}; git {record['git_commit']}", "",
             f"Every run: batch {args.batch} x {args.seq} tokens (padded: {args.batch * args.seq:,} tok/step), LoRA "
             f"r={args.r} on every linear layer, paged AdamW 32-bit, gradient checkpointing, seed {args.seed}; "
             f"{args.warmup} warm-up + {args.steps} measured steps, one fresh process per run"
             + (" (--quick: CPU, fast without torch.compile)" if args.quick else "") + ".", "",
             f"## Targets: {verdict}", ""]
    if targets:
        lines += ["| model | target | value | verdict |", "|---|---|---|---|"]
        for t in targets:
            value = f"{t['value']:.2f}x" if t["value"] is not None else "-"
            lines.append(f"| {t['model']} | {t['target']} | {value} | **{t['verdict']}**"
                         + (f" ({t['reason']})" if t["reason"] else "") + " |")
    else:
        lines.append("No run produced a result.")
    if table is not None:
        sources = ", ".join(sorted(set(table.peak_source.dropna()))) or "n/a"
        lines += ["", "## Throughput and memory, mode x model", "",
                  tables.to_markdown(tables.speed_display(table)), "",
                  "tok/s: positions processed (padding included) per second of device time, the median over the "
                  "measured steps of each step's rate [95% t-interval of the mean per-step rate]; CV: coefficient of "
                  "variation of the per-step rate. torch peak alloc: torch.cuda peak allocated bytes over the "
                  "measured steps; NVML peak: device-used memory (includes the CUDA context and the paged "
                  "optimizer's managed memory). weights: as loaded; after prepare: after the k-bit preparation "
                  "(the recipe and the Trainer up-cast non-quantized weights to float32).",
                  "", "## Ratios", "", tables.to_markdown(tables.ratios_display(ratios)), "",
                  f"Ratios of the table's medians. peak fast/recipe: {sources} (the target's peak).", ""]
    lines += profile_section(done)
    lines += ["## Modes", "",
              "- trainer: transformers.Trainer as the original QLoRA code runs it (nf4+DQ, "
              "prepare_model_for_kbit_training, float32 LoRA, paged_adamw_32bit, bf16=True, constant LR, "
              "max_grad_norm 0.3); experiments/speed_bench.py --trainer-worker",
              "- recipe / fast: python -m qlab.run quant=nf4 quant.double_quant=true speed=recipe / speed=fast",
              "- bf16 / bf16-fast: python -m qlab.run quant=bf16 speed=recipe / speed=fast (16-bit LoRA)", "",
              "## Runs", "", "| model | mode | status | run | process (s) |", "|---|---|---|---|---|"]
    for d in done.values():
        err = d["error"] or {}
        status = d["status"] + (f" ({err.get('type')}: {err.get('message')})" if err and d["status"] != "ok" else "")
        secs = (f"{d['process_s']:.0f}" if d["process_s"] is not None else
                "skipped (complete)" if d["outcome"] == "skipped" else "-")
        lines.append(f"| {d['model']} | {d['mode']} | {status} | `{d['run_id']}` | {secs} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".md"), stem.with_suffix(".json")


def profile_section(done: dict) -> list[str]:
    """Where each qlab run's step time went (its train.profile_steps warm-up steps under
    torch.profiler, qlab/profiling.py); nothing when no run was profiled."""
    rows = []
    for d in done.values():
        path = Path(d["result"])
        m = (store.read_result(path.parent).get("metrics") or {}) if path.is_file() else {}
        if "profile_kernel_ms_per_step" not in m:
            continue
        top = ", ".join(f"{k} {v:.0f}" for k, v in list(m["profile_kernel_ms_by_class"].items())[:4])
        step_ms = 1e3 * m["step_time_median_s"] if m.get("step_time_median_s") else math.nan
        rows.append(f"| {d['model']} | {d['mode']} | {step_ms:.0f} | {m['profile_kernel_ms_per_step']:.0f} | "
                    f"{step_ms - m['profile_kernel_ms_per_step']:.0f} | "
                    f"{m['profile_kernel_launches_per_step']:,.0f} | {top} |")
    if not rows:
        return []
    return ["## Where a step's time goes (torch.profiler)", "",
            "| model | mode | step ms (measured median) | GPU kernel ms/step | GPU idle ms/step | kernel "
            "launches/step | kernel ms/step by class (top 4) |", "|---|---|---|---|---|---|---|", *rows, "",
            "Kernel time and launches: the last warm-up steps of each qlab run under torch.profiler (--profile; "
            "the measured steps are never profiled), per step. GPU idle: the measured median step time less "
            "the kernel time, the part of a step in which no kernel runs (launch gaps, Python, host work; "
            "the profiler's own wall time, which its overhead inflates, is in profile.txt). Each run's full "
            "table: profile.txt beside its result.json.", ""]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma-separated presets/model configs (default llama-7b,bloom-7b1; "
                                                  f"--quick: {QUICK_MODELS})")
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=None, help="measured steps per run (default 20; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured warm-up steps (default 8; --quick 1)")
    p.add_argument("--results", default="results", help="results directory (sweeps speed-<model>, speed-bench/)")
    p.add_argument("--timeout-per-run", type=float, default=1800, help="seconds before a run is killed (failed)")
    p.add_argument("--force", action="store_true", help="re-run complete runs")
    p.add_argument("--profile", type=int, default=None, help="warm-up steps of each qlab run to profile with "
                                                             "torch.profiler (default 3; --quick 0; < --warmup)")
    p.add_argument("--no-run", action="store_true", help="run nothing: table the results already there (their "
                                                         "own hardware and versions)")
    p.add_argument("--quick", action="store_true", help="CPU check: tiny presets, 4 x 128 tokens, r=8, few steps, "
                                                        "fast without compile")
    args = p.parse_args(argv)
    quick = args.quick
    args.models = [m for m in (args.models or (QUICK_MODELS if quick else DEFAULT_MODELS)).split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    args.steps = args.steps if args.steps is not None else (3 if quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 8)
    args.profile = args.profile if args.profile is not None else (0 if quick else 3)
    if args.steps < 2 or args.warmup < 0:
        p.error("--steps must be >= 2 (a confidence interval needs two steps) and --warmup >= 0")
    if not 0 <= args.profile < max(1, args.warmup):
        p.error("--profile profiles the last warm-up steps, never the first: must be >= 0 and < --warmup")
    args.batch, args.seq, args.r, args.seed = 4, (128 if quick else 512), (8 if quick else 64), 0
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--trainer-worker"]:
        return trainer_worker(argv[1:])
    args = parse(argv)
    try:  # every configuration composed and validated before the first run starts
        plan = [(model, mode, *config_for(args, model, mode)) for model in args.models for mode in args.modes]
    except Exception as e:  # unknown model config, invalid combination
        print(f"speed_bench: invalid configuration: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    done = read_all(args, plan) if args.no_run else run_all(args, plan)
    table, ratios = load_table(args, done)
    # after the runs: this process touches no GPU while they measure
    env, commit = recorded_machine(done) if args.no_run else (store.environment(), store.git_commit())
    md, js = write_outputs(args, done, table, ratios, env, commit)
    print(md.read_text())
    print(f"speed_bench: wrote {md} and {js} ({time.perf_counter() - t0:.0f} s)")
    return 1 if any(d["status"] in ("failed", "missing") for d in done.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
