"""task=compare: speed compared, not read off: arms in interleaved rounds, paired ratios.

Every arm (compare.common + its overrides, composed like any run) runs in a worker process of its
own (qlab/tasks/arm_worker.py: Unsloth and Liger patch transformers for the whole process), set up,
warmed up and profiled one after another, on the same device. Each round then asks every arm for
compare.steps_per_round device-timed steps, one arm at a time, in an order from a balanced
(Williams) Latin square, so drift hits every arm alike. A pair a/b's ratio is the geometric mean
over rounds of its per-round tokens/s ratios, with a 95% t-interval; rounds go on until every
interval is within +-target_half_width (or max_rounds, or the time budget). compare.aa_control
runs one arm twice: the noise floor. An arm that fails (in its set-up or a step, its process dying
or silent) is recorded with its error and leaves the rounds; the others go on, and its pairs are
reported as not measured, with the reason. Method: docs/speed.md.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from omegaconf import DictConfig, OmegaConf

from qlab import config
from qlab.results import stats, store, tables
from qlab.run import data, models
from qlab.tasks import Outcome, arm_worker, failure

log = logging.getLogger("qlab")
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
    """The arm's tokens/s in each round it ran in: its block's tokens over its block's device time."""
    return [r["tokens"][arm] / sum(r["step_time_s"][arm]) for r in rounds if arm in r["tokens"]]


def paired_rates(rounds: list[dict], a: str, b: str) -> tuple[list[float], list[float]]:
    """a's and b's tokens/s in the rounds that ran both (every round, unless one of them failed or
    was not yet an arm when a killed attempt ran)."""
    both = [r for r in rounds if a in r["tokens"] and b in r["tokens"]]
    return rates(both, a), rates(both, b)


# ------------------------------------------------------------------ the task

@dataclass
class Plan:
    arms: dict[str, DictConfig]  # name -> composed, validated config (the A/A twin included)
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
    for arm in arms.values():  # each worker reads its data again; a malformed file fails here, before any starts
        models.check_available(arm.model)
        data.read(arm.data)
    earlier = []
    staged = store.staging_dir(cfg)
    if (staged / "metrics.jsonl").is_file() and not (staged / store.RESULT).exists():
        for line in (staged / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                break  # the half-written last line of a killed attempt
            if rec.get("round") != len(earlier) or not set(rec.get("tokens") or {"?"}) <= set(arms):
                break
            earlier.append(rec)
    return Plan(arms, earlier)


def static_info(name: str, cfg: DictConfig, k) -> dict:
    """What the arm's config says of it, known before its process starts (a failed arm keeps it)."""
    return {"status": "ok", "runner": cfg.train.runner, "quant": cfg.quant.type,
            "double_quant": bool(cfg.quant.double_quant),
            "backend": cfg.quant.backend, "blocksize": cfg.quant.blocksize,  # the arms table's quant label
            "speed": store.speed_label(OmegaConf.to_container(cfg.speed), cfg.train.runner, store.speed_presets()),
            "optim": cfg.optim.name, "lora_dropout": cfg.adapter.dropout, "overrides": arm_overrides(k, name)}


@dataclass
class Arm:
    info: dict  # static_info, then what its worker reports (pid, device, params, set-up, profile)
    worker: object = None  # arm_worker.ArmProcess
    peak: int = 0  # torch's max allocated over this arm's windows (its own process's allocator)
    rise: int = 0  # the most it rose above what was allocated when a window began
    nvml: int | None = None  # its process's most GPU memory as NVML saw it (None: NVML hides it)

    @property
    def ok(self) -> bool:
        return self.info["status"] == "ok"


spawn = arm_worker.ArmProcess  # (name, cfg, out) -> the arm's worker, started


def attempt(name: str, arm: Arm, stage: str, call):
    """call()'s value, or None where the arm failed in it: its worker's error (an OOM stays an oom),
    its death or silence, recorded as this arm's status and error; its worker is closed at once (the
    device memory it holds goes back to the arms still running) and the comparison goes on."""
    try:
        return call()
    except Exception as e:
        if isinstance(e, arm_worker.ArmFailure):
            status, error = e.status, e.error
        else:  # spawning it failed
            outcome = failure(e)
            status, error = outcome.status, outcome.error
        arm.info.update(status=status, error=error, failed_in=stage)
        if arm.worker is not None:
            arm.worker.close()
        log.warning("compare: arm %s %s in %s: %s: %s", name, status, stage, error["type"], error["message"])
        return None


def start(arms: dict[str, Arm], plan: Plan, k, out: Path) -> None:
    """Every arm's worker started, set up, warmed up and profiled."""
    for name, arm in arms.items():  # all at once: interpreters and imports (Unsloth's ~30 s) overlap
        arm.worker = attempt(name, arm, "start", lambda: spawn(name, plan.arms[name], out))
    for name, arm in arms.items():
        if arm.ok:
            arm.info.update(attempt(name, arm, "start", arm.worker.started) or {})
    for name, arm in arms.items():  # one at a time: loads, warm-ups and profiles never share the device
        if arm.ok:
            arm.info.update(attempt(name, arm, "setup", lambda: arm.worker.build(k.warmup_steps, k.profile_steps,
                                                                                 k.setup_timeout_s))
                            or {})


def run_round(arms: dict[str, Arm], order: list[str], steps: int, index: int) -> dict:
    """Each arm's block of `steps` steps, in `order`: their per-step seconds and tokens. An arm that
    fails leaves the round (and the rounds after it) without a block."""
    rec = {"order": order, "step_time_s": {}, "tokens": {}}
    for name in order:
        arm = arms[name]
        block = attempt(name, arm, f"round {index}", lambda: arm.worker.window(steps))
        if block is None:
            rec.setdefault("failed", []).append(name)
            continue
        rec["step_time_s"][name], rec["tokens"][name] = block["step_time_s"], block["tokens"]
        if "peak_allocated_bytes" in block:
            arm.peak = max(arm.peak, block["peak_allocated_bytes"])
            arm.rise = max(arm.rise, block["window_rise_bytes"])
        if block.get("nvml_peak_process_bytes") is not None:
            arm.nvml = max(arm.nvml or 0, block["nvml_peak_process_bytes"])
    return rec


def failed_pair(arms: dict[str, Arm], pair: str) -> str | None:
    """Why `pair` cannot be measured, where one of its arms failed; else None."""
    for x in pair.split("/"):
        a = arms[x].info
        if a["status"] != "ok":
            return f"arm {x} {a['status']} in {a['failed_in']}: {a['error']['type']}: {a['error']['message']}"
    return None


def progress(rounds: list[dict], pairs: list[str]) -> dict:
    """The pairs' statistics so far (an infinite half-width before two rounds hold both arms)."""
    out = {}
    for p in pairs:
        a, b = paired_rates(rounds, *p.split("/"))
        out[p] = pair_stats(a, b) if len(a) > 1 else {"half_width": math.inf}
    return out


def run_rounds(k, arms: dict[str, Arm], rounds: list[dict], recorder, started: float) -> str:
    """Rounds until the stopping rule, the round budget or the time budget; why they stopped
    (or "no_pair": every pair has an arm that failed)."""
    members = [n for n, a in arms.items() if a.ok]
    first, last_s = 0, 0.0  # the round the square's cycle began in (it begins anew when an arm fails)
    while True:
        pairs = [p for p in k.pairs if failed_pair(arms, p) is None]
        if not pairs:
            return "no_pair"
        stopped = stop_reason(progress(rounds, pairs), len(rounds), k)
        if not stopped and k.time_budget_s and time.time() - started + last_s > k.time_budget_s:
            stopped = "time_budget"
        if stopped:
            return stopped
        if members != (live := [n for n, a in arms.items() if a.ok]):
            members, first = live, len(rounds)
        square = williams(len(members))
        t0 = time.perf_counter()
        rec = {"step": len(rounds), "round": len(rounds), "attempt": recorder.started_at,
               **run_round(arms, [members[i] for i in square[(len(rounds) - first) % len(square)]],
                           k.steps_per_round, len(rounds))}
        rounds.append(rec)
        recorder.log_step(rec)
        last_s = time.perf_counter() - t0


def summarize(cfg: DictConfig, arms: dict[str, Arm], rounds: list[dict], stopped: str | None) -> dict:
    """The result's metrics: arms (a failed one with its status, stage and error), pairs (those an
    arm's failure left unmeasured in pairs_not_measured, with the reason), the A/A floor, the rounds."""
    k = cfg.compare
    gpu = next((a.info["gpu"] for a in arms.values() if a.info.get("gpu")), None)  # the workers' device
    peak = k.peak_flops or next((v for key, v in PEAK_FLOPS.items() if gpu and key in gpu), None)
    out = {"rounds_completed": len(rounds), "stopped": stopped, "steps_per_round": k.steps_per_round,
           "target_half_width": k.target_half_width, "peak_flops": peak, "arms": {}, "pairs": {}}
    for name, arm in arms.items():
        steps = [t for r in rounds if name in r["step_time_s"] for t in r["step_time_s"][name]]
        tps = sum(r["tokens"].get(name, 0) for r in rounds) / sum(steps) if steps else None
        a = {**arm.info, "tokens_per_s": tps, "tokens_per_s_rounds": rates(rounds, name),
             "step_time_median_s": stats.percentile(steps, 50) if steps else None,
             "step_time_mean_s": sum(steps) / len(steps) if steps else None}
        kernel = arm.info.get("profile_kernel_ms_per_step")
        a["gpu_busy_fraction"] = kernel / (1e3 * a["step_time_mean_s"]) if kernel and steps else None
        # LoRA with checkpointing: forward 2N, recompute 2N, input gradients 2N = 6N FLOPs per token,
        # N the base's weights as the arm's model counts them (models.param_count)
        n = arm.info.get("total_params")
        a["mfu"] = 6 * n * tps / peak if peak and tps and n else None
        if str(arm.info.get("device", "")).startswith("cuda"):
            a.update(peak_allocated_bytes=arm.peak, window_rise_bytes=arm.rise, nvml_peak_process_bytes=arm.nvml)
        out["arms"][name] = a
    failed = {name: arm for name, arm in arms.items() if not arm.ok}
    aa = f"{k.aa_control}-aa/{k.aa_control}" if k.aa_control else None
    missing = {p: why for p in [*k.pairs, *([aa] if aa else [])] if (why := failed_pair(arms, p))}
    if len(rounds) >= 2:
        for pair in k.pairs:
            a, b = paired_rates(rounds, *pair.split("/"))
            if pair not in missing and len(a) >= 2:
                out["pairs"][pair] = pair_stats(a, b)
        if aa and aa not in missing and len((both := paired_rates(rounds, *aa.split("/")))[0]) >= 2:
            twin = pair_stats(*both)
            out["aa_control"] = {"pair": aa, **twin, "covers_1": twin["ci95"][0] <= 1 <= twin["ci95"][1]}
        floor = out.get("aa_control", {}).get("ci95")
        for p in out["pairs"].values():
            p["verdict"] = verdict(p, floor)
        if out["pairs"]:
            out["half_width_reached"] = max(p["half_width"] for p in out["pairs"].values())
        # no A/A ratio where one was asked for: the comparison's fairness is unchecked
        out["valid"] = out["aa_control"]["covers_1"] if "aa_control" in out else not aa
    if failed:
        out["arms_failed"] = list(failed)
    if missing:
        out["pairs_not_measured"] = missing
    out["rounds"] = rounds
    return out


def run(cfg: DictConfig, plan: Plan, recorder) -> Outcome:
    k = cfg.compare
    started = psutil.Process().create_time()
    rounds = list(plan.earlier)
    for rec in rounds:  # the resumed rounds stay in this attempt's log
        recorder.log_step(rec)
    arms = {name: Arm(static_info(name, arm_cfg, k)) for name, arm_cfg in plan.arms.items()}
    stopped, failed = None, None
    try:
        start(arms, plan, k, Path(recorder.dir).resolve())
        stopped = run_rounds(k, arms, rounds, recorder, started)
    except Exception as e:  # the comparison's own failure (not an arm's): the rounds so far are kept
        failed = failure(e)
    finally:
        for arm in arms.values():
            if arm.worker is not None:
                arm.worker.close()
    metrics = summarize(cfg, arms, rounds, stopped)
    if failed is not None:
        return Outcome(failed.status, metrics, failed.error)
    if metrics.get("arms_failed") and not metrics["pairs"]:  # nothing measured: a failure, never an ok
        reasons = "; ".join(f"{p}: {why}" for p, why in metrics["pairs_not_measured"].items())
        return Outcome("failed", metrics, {"type": "ArmsFailed", "message": f"no pair was measured ({reasons})",
                                           "traceback": None})
    (recorder.dir / "compare.md").write_text(tables.compare_markdown(metrics, store.machine_line(store.environment())))
    return Outcome("ok", metrics)
