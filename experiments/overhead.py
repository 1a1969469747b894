"""How much does measuring cost, and how does qlab's step compare with the HF Trainer path?

    python experiments/overhead.py                         # llama-7b shape on a GPU, nf4+DQ
    python experiments/overhead.py --model tiny-llama --quick --out /tmp/overhead   # CPU check

One process, one model, one batch shape, one optimizer, three ways to run the same steps:
  bare     a plain PyTorch loop: forward, backward, clip, step, zero_grad; timed per window of
           steps with one device sync at each window's end, the loss read only at the end
  harness  qlab.train.train: the same step inside qlab's trackers (NVML/RSS sampler thread,
           per-step device-timed clock, per-step loss read and logged)
  trainer  transformers.Trainer with the original QLoRA code's arguments (paged AdamW 32-bit,
           constant schedule, max_grad_norm 0.3, gradient checkpointing), timed by a callback
The methods run in interleaved rounds (bare, harness, trainer, bare, ...) so drift of the card
(clocks, temperature) spreads over all three. Tokens/s are positions processed (batch x seq).
Harness overhead = 1 - harness / bare tokens/s. Results: <out>/<device slug>.json and .md,
with the hardware and versions.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlab import adapters, config, data, measure, models, optim, track, train  # noqa: E402


def compose_cfg(args) -> DictConfig:
    config.register()
    overrides = [f"model={args.model}", f"quant={args.quant}", f"quant.double_quant={args.double_quant}",
                 f"optim={args.optim}", "adapter=all_linear", f"adapter.r={args.r}", "data.pad_to=max_seq_len",
                 f"data.max_seq_len={args.seq}", f"train.batch_size={args.batch}", "train.progress=false",
                 f"train.steps={args.steps}", "train.warmup_steps=0", f"train.device={args.device}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def build(cfg, device: str):
    loaded = models.load(cfg.model, cfg.quant, device)
    models.prepare_for_training(loaded.model, cfg.quant.type != "bf16", True)
    model, _ = adapters.attach(loaded.model, cfg.adapter)
    batches = data.build(data.read(cfg.data), cfg.data, loaded.tokenizer, cfg.train.batch_size, cfg.seed)
    return model, batches


def bare(model, batches, cfg, device: str, steps: int) -> float:
    """Seconds for `steps` steps of the plainest loop doing the same work."""
    opt, sched = optim.build(cfg.optim, list(model.parameters()), device)
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
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    measure.sync(device)
    float(loss.detach())
    return time.perf_counter() - t0


def harness(model, batches, cfg, device: str, steps: int) -> float:
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(cfg, {"train": {"steps": steps}})
    opt, sched = optim.build(cfg.optim, list(model.parameters()), device)
    measure.sync(device)
    t0 = time.perf_counter()
    outcome = train.train(model, batches, opt, sched, cfg, device)
    measure.sync(device)
    assert outcome.status == "ok" and outcome.metrics["steps_completed"] == steps, outcome.error
    return time.perf_counter() - t0


def trainer(model, batches, cfg, device: str, steps: int) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Fixed(torch.utils.data.Dataset):  # the same fixed-shape samples the other two see
        def __init__(self):
            it = batches.train_batches()
            rows = [next(it) for _ in range(steps)]
            self.items = [{k: v[i] for k, v in b.items()} for b in rows for i in range(len(b["input_ids"]))]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            measure.sync(device)
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            measure.sync(device)
            self.seconds = time.perf_counter() - self.t0

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.train.batch_size, max_steps=steps,
            learning_rate=cfg.optim.lr, lr_scheduler_type="constant", max_grad_norm=cfg.optim.max_grad_norm,
            optim=cfg.optim.name if cfg.optim.name != "adamw" else "adamw_torch",
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            bf16=device.startswith("cuda"), use_cpu=not device.startswith("cuda"), report_to=[],
            logging_steps=steps, save_strategy="no", dataloader_num_workers=0, remove_unused_columns=False,
        )
        Trainer(model=model, args=targs, train_dataset=Fixed(), callbacks=[clock]).train()
    return clock.seconds


METHODS = {"bare": bare, "harness": harness, "trainer": trainer}


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
    p.add_argument("--steps", type=int, default=10, help="steps per round and method")
    p.add_argument("--rounds", type=int, default=5)
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
    for fn in METHODS.values():  # warm-up: allocator, kernels, lazy init of every path
        fn(model, batches, cfg, device, min(2, args.steps))
    rates = {name: [] for name in METHODS}
    for _ in range(args.rounds):
        for name, fn in METHODS.items():
            rates[name].append(tokens * args.steps / fn(model, batches, cfg, device, args.steps))
    summary = {}
    for name, xs in rates.items():
        lo, hi = ci95(xs)
        summary[name] = {"tokens_per_s_median": statistics.median(xs), "tokens_per_s_ci95": [lo, hi],
                         "tokens_per_s_cv": statistics.stdev(xs) / statistics.fmean(xs) if len(xs) > 1 else None,
                         "tokens_per_s_rounds": xs}
    bare_rate = summary["bare"]["tokens_per_s_median"]
    summary["harness"]["overhead_vs_bare"] = 1 - summary["harness"]["tokens_per_s_median"] / bare_rate
    summary["trainer"]["speed_vs_harness"] = summary["trainer"]["tokens_per_s_median"] / summary["harness"]["tokens_per_s_median"]
    env = track.environment()
    record = {"setup": {k: v for k, v in vars(args).items() if k != "out"} | {"device": device},
              "methods": summary, "env": env, "git_commit": track.git_commit(), "finished_at": track.now()}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", (env["gpu"] or env["cpu"] or "cpu").lower()).strip("-")
    track.atomic_write_json(args.out / f"{slug}.json", record)
    lines = [f"# Harness overhead and the Trainer path: {args.model} {args.quant}"
             f"{'+DQ' if args.double_quant == 'true' else ''}, {args.optim}, r={args.r}, "
             f"{args.batch} x {args.seq} tokens, {args.rounds} rounds x {args.steps} steps",
             "", f"{env['gpu'] or env['cpu']}; torch {env['torch']}, transformers {env['transformers']}, "
             f"peft {env['peft']}, bitsandbytes {env['bitsandbytes']}", "",
             "| method | tok/s median | 95% CI | CV | vs bare |", "|---|---|---|---|---|"]
    for name, s in summary.items():
        lo, hi = s["tokens_per_s_ci95"]
        cv = f"{s['tokens_per_s_cv']:.1%}" if s["tokens_per_s_cv"] is not None else "n/a"
        lines.append(f"| {name} | {s['tokens_per_s_median']:,.0f} | [{lo:,.0f}, {hi:,.0f}] | {cv} | "
                     f"{s['tokens_per_s_median'] / bare_rate - 1:+.1%} |")
    (args.out / f"{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
