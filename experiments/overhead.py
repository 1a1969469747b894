"""How much does measuring cost, and how does qlab's step compare with the HF Trainer path?

    python experiments/overhead.py                         # llama-7b shape on a GPU, nf4+DQ
    python experiments/overhead.py --model tiny-llama --quick --out /tmp/overhead   # CPU check

One process, one model, one batch shape, one optimizer type, four ways to run the same steps:
  bare       a plain PyTorch loop: forward, backward, clip, step, zero_grad; the loss read only
             at the end of the window
  harness    qlab.train.train: the same step inside qlab's trackers (NVML/RSS sampler thread,
             per-step device-timed clock, per-step loss read and logged)
  harness0   the same with the sampler thread off (QLAB_SAMPLER_INTERVAL_MS=0): what the
             20 ms NVML polling itself costs
  trainer    transformers.Trainer with the original QLoRA code's arguments (paged AdamW 32-bit,
             constant schedule, max_grad_norm 0.3, gradient checkpointing)
  harness_std  the harness with torch's (non-paged) AdamW instead of --optim: the paper's
             "paged optimizers run at the same speed when memory suffices" (Section 4),
             measured interleaved in one process on one model, so only the optimizer differs
Each method owns one optimizer, created once and kept across rounds (a fresh optimizer per
round would put the state allocation, and a paged optimizer's first page faults, into every
window); the Trainer gets it through `optimizers=`. Every window is `steps` steps of wall time
between two device synchronizations, so launch gaps and Python overhead count. The methods run
in interleaved rounds (bare, harness, harness0, trainer, bare, ...) so drift of the card
(clocks, temperature, neighbours) spreads over all of them. Tokens/s are positions processed
(batch x seq). Harness overhead = 1 - harness / bare tokens/s (medians over rounds); the CV
is over rounds ("repeated measurement"); the harness's own per-step CV (CUDA events) is
reported beside it. Results: <out>/<device slug>.json and .md, with the hardware and versions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlab.run import adapters, data, loop, measure, models, optim  # noqa: E402
from qlab import config
from qlab.results import store


def compose_cfg(args) -> DictConfig:
    overrides = [f"model={args.model}", f"quant={args.quant}", f"quant.double_quant={args.double_quant}",
                 f"optim={args.optim}", "adapter=all_linear", f"adapter.r={args.r}", "data.pad_to=max_seq_len",
                 f"data.max_seq_len={args.seq}", f"train.batch_size={args.batch}", "train.progress=false",
                 f"train.steps={args.steps}", "train.warmup_steps=0", f"train.device={args.device}"]
    return config.compose(overrides)


def build(cfg, device: str):
    loaded = models.load(cfg.model, cfg.quant, device)
    models.prepare_for_training(loaded.model, cfg.quant.type != "bf16", True)
    model, _ = adapters.attach(loaded.model, cfg.adapter)
    batches = data.build(data.read(cfg.data), cfg.data, loaded.tokenizer, cfg.train.batch_size, cfg.seed)
    return model, batches


def bare(model, batches, cfg, device: str, steps: int, opt) -> dict:
    """Seconds for `steps` steps of the plainest loop doing the same work."""
    optimizer, scheduler = opt
    params = [p for p in model.parameters() if p.requires_grad]
    it = batches.train_batches()
    feed = [{k: v.to(device) for k, v in next(it).items()} for _ in range(steps)]
    model.train()
    measure.sync(device)
    t0 = time.perf_counter()
    for batch in feed:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    measure.sync(device)
    float(loss.detach())
    return {"seconds": time.perf_counter() - t0}


def harness(model, batches, cfg, device: str, steps: int, opt) -> dict:
    cfg = OmegaConf.merge(cfg, {"train": {"steps": steps}})
    measure.sync(device)
    t0 = time.perf_counter()
    outcome = loop.train(model, batches, *opt, cfg, device)
    measure.sync(device)
    seconds = time.perf_counter() - t0
    assert outcome.status == "ok" and outcome.metrics["steps_completed"] == steps, outcome.error
    return {"seconds": seconds, "step_cv": outcome.metrics.get("tokens_per_s_cv")}


def harness_without_sampler(model, batches, cfg, device: str, steps: int, opt) -> dict:
    previous = os.environ.get("QLAB_SAMPLER_INTERVAL_MS")
    os.environ["QLAB_SAMPLER_INTERVAL_MS"] = "0"
    try:
        return harness(model, batches, cfg, device, steps, opt)
    finally:
        if previous is None:
            os.environ.pop("QLAB_SAMPLER_INTERVAL_MS")
        else:
            os.environ["QLAB_SAMPLER_INTERVAL_MS"] = previous


def trainer(model, batches, cfg, device: str, steps: int, opt) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Fixed(torch.utils.data.Dataset):  # the same fixed-shape samples the other methods see
        def __init__(self):
            it = batches.train_batches()
            rows = [next(it) for _ in range(steps)]
            self.items = [{k: v[i] for k, v in b.items()} for b in rows for i in range(len(b["input_ids"]))]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    class Clock(TrainerCallback):  # from the first step's start to the last step's end
        t0 = None

        def on_step_begin(self, *a, **k):
            if self.t0 is None:
                measure.sync(device)
                self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            measure.sync(device)
            self.seconds = time.perf_counter() - self.t0

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.train.batch_size, max_steps=steps,
            learning_rate=cfg.optim.lr, lr_scheduler_type="constant", max_grad_norm=cfg.optim.max_grad_norm,
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            bf16=device.startswith("cuda"), use_cpu=not device.startswith("cuda"), report_to=[],
            logging_steps=steps, save_strategy="no", dataloader_num_workers=0, remove_unused_columns=False,
        )
        Trainer(model=model, args=targs, train_dataset=Fixed(), callbacks=[clock], optimizers=opt).train()
    return {"seconds": clock.seconds}


METHODS = {"bare": bare, "harness": harness, "harness0": harness_without_sampler, "trainer": trainer,
           "harness_std": harness}
STANDARD_OPTIM = "adamw"  # harness_std's optimizer


def ci95(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2 or statistics.stdev(xs) == 0:
        return xs[0], xs[0]
    m, se = statistics.fmean(xs), statistics.stdev(xs) / len(xs) ** 0.5
    return tuple(float(v) for v in stats.t.interval(0.95, len(xs) - 1, loc=m, scale=se))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-7b")
    p.add_argument("--quant", default="nf4")
    p.add_argument("--double-quant", default="true")
    p.add_argument("--optim", default="paged_adamw_32bit")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=8, help="steps per round and method")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="a small CPU check: 3 rounds of 4 steps, seq 64")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "overhead")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.seq, args.r = 3, 4, 64, 8
    device = models.resolve_device(args.device)
    cfg = compose_cfg(argparse.Namespace(**{**vars(args), "device": device}))
    model, batches = build(cfg, device)
    tokens = args.batch * args.seq  # positions per step, e.g. 4 seq x 512 tok = 2,048
    params = list(model.parameters())
    standard = OmegaConf.merge(cfg.optim, {"name": STANDARD_OPTIM})
    opts = {name: optim.build(standard if name == "harness_std" else cfg.optim, params, device)
            for name in METHODS}  # one optimizer per method, kept across rounds
    for name, fn in METHODS.items():  # warm-up: allocator, kernels, optimizer state, lazy init
        fn(model, batches, cfg, device, min(3, args.steps), opts[name])
    rates = {name: [] for name in METHODS}
    step_cvs = {name: [] for name in METHODS}
    for _ in range(args.rounds):
        for name, fn in METHODS.items():
            window = fn(model, batches, cfg, device, args.steps, opts[name])
            rates[name].append(tokens * args.steps / window["seconds"])
            if window.get("step_cv") is not None:
                step_cvs[name].append(window["step_cv"])
    summary = {}
    for name, xs in rates.items():
        lo, hi = ci95(xs)
        summary[name] = {"tokens_per_s_median": statistics.median(xs), "tokens_per_s_ci95": [lo, hi],
                         "tokens_per_s_cv": statistics.stdev(xs) / statistics.fmean(xs) if len(xs) > 1 else None,
                         "tokens_per_s_rounds": xs,
                         "step_cv_median": statistics.median(step_cvs[name]) if step_cvs[name] else None}
    bare_rate = summary["bare"]["tokens_per_s_median"]
    for name in ("harness", "harness0"):
        summary[name]["overhead_vs_bare"] = 1 - summary[name]["tokens_per_s_median"] / bare_rate
    summary["harness_std"]["optimizer"] = STANDARD_OPTIM
    summary["harness_std"]["paged_vs_standard"] = (summary["harness"]["tokens_per_s_median"]
                                                   / summary["harness_std"]["tokens_per_s_median"])
    summary["trainer"]["speed_vs_harness"] = summary["trainer"]["tokens_per_s_median"] / summary["harness"]["tokens_per_s_median"]
    env = store.environment()
    record = {"setup": {k: v for k, v in vars(args).items() if k != "out"} | {"device": device},
              "methods": summary, "env": env, "git_commit": store.git_commit(), "finished_at": store.now()}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = store.device_slug(env)
    store.atomic_write_json(args.out / f"{slug}.json", record)
    lines = [f"# Harness overhead and the Trainer path: {args.model} {args.quant}"
             f"{'+DQ' if args.double_quant == 'true' else ''}, {args.optim}, r={args.r}, "
             f"{args.batch} x {args.seq} tokens, {args.rounds} rounds x {args.steps} steps",
             "", store.machine_line(env), "",
             "| method | tok/s median | 95% CI | CV over rounds | per-step CV (median) | vs bare |",
             "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lo, hi = s["tokens_per_s_ci95"]
        cv = f"{s['tokens_per_s_cv']:.1%}" if s["tokens_per_s_cv"] is not None else "n/a"
        step_cv = f"{s['step_cv_median']:.1%}" if s["step_cv_median"] is not None else "n/a"
        lines.append(f"| {name} | {s['tokens_per_s_median']:,.0f} | [{lo:,.0f}, {hi:,.0f}] | {cv} | {step_cv} | "
                     f"{s['tokens_per_s_median'] / bare_rate - 1:+.1%} |")
    (args.out / f"{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
