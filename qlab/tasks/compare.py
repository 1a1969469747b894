"""task=compare: speed compared, not read off: arms in interleaved rounds, paired ratios.

Every arm (compare.common + its overrides, composed like any run) is set up in this one process,
warmed up and profiled. Each round then runs every arm for compare.steps_per_round device-timed
steps, in an order from a balanced (Williams) Latin square, so drift hits every arm alike. A pair
a/b's ratio is the geometric mean over rounds of its per-round tokens/s ratios, with a 95%
t-interval; rounds go on until every interval is within +-target_half_width (or max_rounds, or the
time budget). compare.aa_control runs one arm twice: the noise floor. Method: docs/speed.md.
Memory peaks of co-resident arms are not isolated: they come from isolated runs.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass, field

import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from qlab import config
from qlab.results import stats, store, tables
from qlab.run import data, models, optim, profiling
from qlab.tasks import Outcome, failure
from qlab.tasks import train as train_task

# dense bf16 FLOP/s by a substring of the GPU's name, the peak MFU is measured against (the figure
# issue 15 uses for the H200; compare.peak_flops sets another); no entry: no MFU
PEAK_FLOPS = {"H200": 790e12, "H100": 790e12}


# ------------------------------------------------------------------ schedule and statistics

def williams(n: int) -> list[list[int]]:
    """A balanced Latin square (Williams design) of n arms: every row runs each arm once, each arm
    takes each position once and follows every other arm exactly once per cycle of rows (n rows
    for even n, 2n for odd n, the square and its mirror)."""
    first = [0] + [(k + 1) // 2 if k % 2 else n - k // 2 for k in range(1, n)]
    rows = [[(x + i) % n for x in first] for i in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]


def pair_stats(rates_a: list[float], rates_b: list[float]) -> dict:
    """Round by round tokens/s of a over b (stats.paired_log_ratio): the geometric-mean ratio, its
    95% interval, half_width = the interval's relative half-width (e^h - 1 for log half-width h)."""
    r = stats.paired_log_ratio([math.log(x) for x in rates_a], [math.log(x) for x in rates_b])
    lo, hi = r["ci95"]
    return {"ratio": math.exp(r["log_ratio"]), "ci95": [math.exp(lo), math.exp(hi)],
            "half_width": math.expm1((hi - lo) / 2), "rounds": r["n"],
            "round_ratios": [a / b for a, b in zip(rates_a, rates_b)]}


def verdict(pair: dict, floor: list[float] | None) -> str:
    """"no difference" for an interval inside the A/A floor or covering 1, else a faster / a slower."""
    lo, hi = pair["ci95"]
    if (floor and floor[0] <= lo and hi <= floor[1]) or lo <= 1 <= hi:
        return "no difference"
    return "a faster" if lo > 1 else "a slower"


def stop_reason(pairs: dict, rounds: int, k) -> str | None:
    """Why to stop before another round, or None: the target reached (after min_rounds) or the round
    budget spent."""
    if rounds >= k.min_rounds and all(p["half_width"] <= k.target_half_width for p in pairs.values()):
        return "target"
    return "max_rounds" if rounds >= k.max_rounds else None


def rates(rounds: list[dict], arm: str) -> list[float]:
    """The arm's tokens/s in each round: its block's tokens over its block's device time."""
    return [r["tokens"][arm] / sum(r["step_time_s"][arm]) for r in rounds]


# ------------------------------------------------------------------ the task

@dataclass
class Plan:
    arms: dict[str, DictConfig]  # name -> composed, validated config (the A/A twin included)
    raw: dict[str, data.RawData]
    earlier: list[dict] = field(default_factory=list)  # rounds of a killed attempt, resumed


def arm_names(k) -> list[str]:
    return list(k.arms) + ([f"{k.aa_control}-aa"] if k.aa_control else [])


def arm_overrides(k, name: str) -> list[str]:
    """An arm's own overrides (the A/A twin <arm>-aa has its arm's)."""
    return list(k.arms[name] if name in k.arms else k.arms[k.aa_control])


def compose_arm(cfg: DictConfig, name: str) -> DictConfig:
    """The arm's config: compare.common + its overrides + this run's seed and device; a bad one
    raises ConfigError naming compare.arms.<name>."""
    k = cfg.compare
    overrides = [*k.common, *arm_overrides(k, name), f"seed={cfg.seed}"] + (
        [f"train.device={cfg.train.device}"] if cfg.train.device != "auto" else [])
    try:
        arm = config.check_overrides(overrides)
        config.validate(arm, arm=True)
        if arm.task != "train":
            raise config.ConfigError("task", f"an arm trains; got task={arm.task}")
    except config.ConfigError as e:
        raise config.ConfigError(f"compare.arms.{name}", str(e)) from None
    return arm


def prepare(cfg: DictConfig) -> Plan:
    """Every arm composed and validated, its data read and its model found, before anything loads;
    the rounds a killed attempt of this run left in its staging directory, to go on from."""
    arms = {name: compose_arm(cfg, name) for name in arm_names(cfg.compare)}
    for arm in arms.values():
        models.check_available(arm.model)
    raw = {name: data.read(arm.data) for name, arm in arms.items()}
    earlier = []
    staged = store.staging_dir(cfg)
    if (staged / "metrics.jsonl").is_file() and not (staged / store.RESULT).exists():
        for line in (staged / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                break  # the half-written last line of a killed attempt
            if rec.get("round") != len(earlier) or set(rec.get("tokens", {})) != set(arms):
                break
            earlier.append(rec)
    return Plan(arms, raw, earlier)


@dataclass
class Arm:
    stepper: object
    device: str
    info: dict
    peak: int = 0  # torch's max allocated over this arm's windows (every co-resident arm's tensors)
    rise: int = 0  # the most it rose above what was allocated when a window began


def build(name: str, cfg: DictConfig, raw, k, out) -> Arm:
    """Set up, warm up and profile one arm."""
    t0 = time.perf_counter()
    s = train_task.setup(cfg, raw)
    opt, sched = optim.build(cfg.optim, list(s.model.parameters()), s.device)
    stepper = train_task.runner(cfg).Stepper(s.model, s.batches, opt, sched, cfg, s.device)
    t1 = time.perf_counter()
    stepper.warmup(k.warmup_steps)
    prof = profiling.StepProfile(s.device, k.profile_steps)
    with prof:
        stepper.warmup(k.profile_steps)
    if prof.report():
        (out / f"profile-{name}.txt").write_text(prof.report())
    m = s.metrics
    info = {"runner": cfg.train.runner, "quant": cfg.quant.type, "double_quant": bool(cfg.quant.double_quant),
            "backend": cfg.quant.backend, "blocksize": cfg.quant.blocksize,  # the arms table's quant label
            "speed": store.speed_label(OmegaConf.to_container(cfg.speed), cfg.train.runner, store.speed_presets()),
            "optim": cfg.optim.name, "overrides": arm_overrides(k, name),
            "total_params": m["total_params"], "trainable_params": m.get("trainable_params"),
            "weight_bytes": m.get("weight_bytes"), "compiled_layers": m.get("compiled_layers"),
            "setup_s": t1 - t0, "warmup_s": time.perf_counter() - t1, **prof.metrics()}
    return Arm(stepper, s.device, info)


def run_round(arms: dict[str, Arm], order: list[str], steps: int) -> dict:
    """Each arm's block of `steps` steps, in `order`: their per-step seconds and tokens."""
    rec = {"order": order, "step_time_s": {}, "tokens": {}}
    for name in order:
        arm = arms[name]
        cuda = arm.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats(arm.device)
            base = torch.cuda.memory_allocated(arm.device)
        rec["step_time_s"][name] = arm.stepper.window(steps)
        rec["tokens"][name] = sum(c["tokens"] for c in arm.stepper.counts[-steps:])
        if cuda:
            top = torch.cuda.max_memory_allocated(arm.device)
            arm.peak, arm.rise = max(arm.peak, top), max(arm.rise, top - base)
    return rec


def summarize(cfg: DictConfig, arms: dict[str, Arm], rounds: list[dict], stopped: str | None) -> dict:
    """The result's metrics: arms, pairs, the A/A floor, the rounds."""
    k = cfg.compare
    device = next(iter(arms.values())).device if arms else "cpu"
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    peak = k.peak_flops or next((v for key, v in PEAK_FLOPS.items() if gpu and key in gpu), None)
    out = {"rounds_completed": len(rounds), "stopped": stopped, "steps_per_round": k.steps_per_round,
           "target_half_width": k.target_half_width, "peak_flops": peak, "arms": {}, "pairs": {}}
    for name, arm in arms.items():
        steps = [t for r in rounds for t in r["step_time_s"][name]]
        tps = sum(r["tokens"][name] for r in rounds) / sum(steps) if steps else None
        a = {**arm.info, "tokens_per_s": tps, "tokens_per_s_rounds": rates(rounds, name),
             "step_time_median_s": stats.percentile(steps, 50) if steps else None,
             "step_time_mean_s": sum(steps) / len(steps) if steps else None}
        kernel = arm.info.get("profile_kernel_ms_per_step")
        a["gpu_busy_fraction"] = kernel / (1e3 * a["step_time_mean_s"]) if kernel and steps else None
        # LoRA with checkpointing: forward 2N, recompute 2N, input gradients 2N = 6N FLOPs per token
        a["mfu"] = 6 * arm.info["total_params"] * tps / peak if peak and tps else None
        if arm.device.startswith("cuda"):
            a.update(peak_allocated_bytes=arm.peak, window_rise_bytes=arm.rise)
        out["arms"][name] = a
    if len(rounds) >= 2:
        for pair in k.pairs:
            a, _, b = pair.partition("/")
            out["pairs"][pair] = pair_stats(rates(rounds, a), rates(rounds, b))
        if k.aa_control:
            aa = pair_stats(rates(rounds, f"{k.aa_control}-aa"), rates(rounds, k.aa_control))
            out["aa_control"] = {"pair": f"{k.aa_control}-aa/{k.aa_control}", **aa,
                                 "covers_1": aa["ci95"][0] <= 1 <= aa["ci95"][1]}
        floor = out.get("aa_control", {}).get("ci95")
        for p in out["pairs"].values():
            p["verdict"] = verdict(p, floor)
        out["half_width_reached"] = max(p["half_width"] for p in out["pairs"].values())
        out["valid"] = out.get("aa_control", {}).get("covers_1", True)
    out["rounds"] = rounds
    return out


def run(cfg: DictConfig, plan: Plan, recorder) -> Outcome:
    k = cfg.compare
    started = psutil.Process().create_time()
    arms: dict[str, Arm] = {}
    rounds = list(plan.earlier)
    for rec in rounds:  # the resumed rounds stay in this attempt's log
        recorder.log_step(rec)
    stopped, failed = None, None
    try:
        for name, arm_cfg in plan.arms.items():
            arms[name] = build(name, arm_cfg, plan.raw[name], k, recorder.dir)
        # the arms' Python objects live as long as the comparison: frozen, a full collection
        # (0.5 s with eight tiny arms on a CPU, docs/speed.md) never walks them inside a block
        gc.collect()
        gc.freeze()
        order = list(arms)
        square = williams(len(order))
        last_s = 0.0
        while True:
            if len(rounds) > 1:  # an interval needs two rounds
                pairs = {p: pair_stats(*(rates(rounds, x) for x in p.split("/"))) for p in k.pairs}
                stopped = stop_reason(pairs, len(rounds), k)
            if not stopped and k.time_budget_s and time.time() - started + last_s > k.time_budget_s:
                stopped = "time_budget"
            if stopped:
                break
            t0 = time.perf_counter()
            rec = {"step": len(rounds), "round": len(rounds), "attempt": recorder.started_at,
                   **run_round(arms, [order[i] for i in square[len(rounds) % len(square)]], k.steps_per_round)}
            rounds.append(rec)
            recorder.log_step(rec)
            last_s = time.perf_counter() - t0
    except Exception as e:  # an arm out of memory or failing: the rounds so far are kept
        failed = failure(e)
    finally:
        gc.unfreeze()
        for arm in arms.values():
            arm.stepper.close()
    metrics = summarize(cfg, arms, rounds, stopped)
    if failed is not None:
        return Outcome(failed.status, metrics, failed.error)
    (recorder.dir / "compare.md").write_text(tables.compare_markdown(metrics, store.machine_line(store.environment())))
    return Outcome("ok", metrics)
