"""task=compare: the round schedule, the paired statistics on synthetic step times with known
answers (drift included), the stopping rule, the A/A control, resuming a killed attempt (arms
with synthetic step times, the task's real loop around them), validation, and a real tiny
comparison on a CPU through `python -m qlab.run experiment=speed-cpu` (composition inside a
running Hydra app) read back by `qlab report`."""

import importlib.util
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from qlab import config, tasks
from qlab.results import report, store, tables
from qlab.tasks import arm_worker, compare


# ---------------------------------------------------------------- the round schedule

@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_williams_square_is_balanced(n):
    rows = compare.williams(n)
    cycle = len(rows) // n  # 1 square for even n, the square and its mirror for odd n
    assert len(rows) == (n if n % 2 == 0 else 2 * n)
    assert all(sorted(row) == list(range(n)) for row in rows)  # every arm once per round
    for position in range(n):  # every arm in every position equally often
        assert set(Counter(row[position] for row in rows).values()) == {cycle}
    follows = Counter((row[i], row[i + 1]) for row in rows for i in range(n - 1))
    assert len(follows) == n * (n - 1) and set(follows.values()) == {cycle}  # each arm after each other


# ---------------------------------------------------------------- paired ratios, known answers

def block(seconds: float, steps: int = 3) -> list[float]:
    return [seconds] * steps


def test_ratio_interval_is_the_t_interval_of_the_log_ratios():
    rng = np.random.default_rng(0)
    logs = np.log(1.2) + rng.normal(0, 0.1, 30)  # a is 20% faster, 10% block-to-block noise
    rounds = [{"tokens": {"a": 6144, "b": 6144}, "step_time_s": {"a": block(0.25 / math.exp(x)), "b": block(0.25)}}
              for x in logs]
    p = compare.pair_stats(compare.rates(rounds, "a"), compare.rates(rounds, "b"))
    half = 2.045229642132703 * logs.std(ddof=1) / math.sqrt(30)  # t(0.975, 29)
    assert p["ratio"] == pytest.approx(math.exp(logs.mean())) and p["rounds"] == 30
    assert p["ci95"] == pytest.approx([math.exp(logs.mean() - half), math.exp(logs.mean() + half)])
    assert p["half_width"] == pytest.approx(math.expm1(half))
    assert p["ci95"][0] < 1.2 < p["ci95"][1]


def test_pairing_sees_through_drift_that_separate_runs_get_wrong():
    """The card slows by 40% for a while (a neighbour, a clock change), as the H200s do in blocks.
    Arm a is 10% faster than b. Run one after the other (the retired speed bench), a lands in the
    slow stretch and its median says it is slower; in interleaved rounds both arms see the same
    card in each round and the paired ratio finds the 10%."""
    rnd = random.Random(1)
    card = [1.4 if 10 <= t < 30 else 1.0 for t in range(60)]  # the slowdown, in blocks of one arm's steps
    step = lambda arm, t: 0.25 * card[t] / (1.1 if arm == "a" else 1.0) * rnd.uniform(0.97, 1.03)  # noqa: E731
    a_alone = [2048 / step("a", t) for t in range(10, 30)]  # a's run: 20 steps in the slow stretch
    b_alone = [2048 / step("b", t) for t in range(30, 50)]  # then b's, after it
    unpaired = statistics.median(a_alone) / statistics.median(b_alone)
    assert unpaired < 0.85  # wrong: a looks slower
    rounds = []
    for r in range(30):  # a round: both arms' blocks back to back, the order alternating
        t = 2 * r
        first, second = ("a", "b") if r % 2 == 0 else ("b", "a")
        times = {first: [step(first, t) for _ in range(3)], second: [step(second, t + 1) for _ in range(3)]}
        rounds.append({"tokens": {"a": 6144, "b": 6144}, "step_time_s": times})
    p = compare.pair_stats(compare.rates(rounds, "a"), compare.rates(rounds, "b"))
    assert p["ci95"][0] < 1.1 < p["ci95"][1] and p["ci95"][0] > 1.0  # right: faster, by about 10%


def test_stopping_rule():
    k = OmegaConf.create({"min_rounds": 4, "max_rounds": 10, "target_half_width": 0.05})
    narrow, wide = {"x/y": {"half_width": 0.04}}, {"x/y": {"half_width": 0.04}, "x/z": {"half_width": 0.2}}
    assert compare.stop_reason(narrow, 3, k) is None  # never before min_rounds
    assert compare.stop_reason(narrow, 4, k) == "target"
    assert compare.stop_reason(wide, 9, k) is None  # every pair must be narrow
    assert compare.stop_reason(wide, 10, k) == "max_rounds"


def test_verdict_against_the_aa_floor():
    pair = lambda lo, hi: {"ci95": [lo, hi]}  # noqa: E731
    floor = [0.96, 1.05]
    assert compare.verdict(pair(1.01, 1.04), floor) == "no difference"  # excludes 1, inside the floor
    assert compare.verdict(pair(1.01, 1.08), floor) == "a faster"
    assert compare.verdict(pair(0.90, 0.95), floor) == "a slower"
    assert compare.verdict(pair(0.97, 1.10), None) == "no difference"  # covers 1


# ---------------------------------------------------------------- the task's loop on synthetic arms

class FakeWorker:
    """An arm's worker (arm_worker.ArmProcess's interface) whose step takes `seconds` times the card's
    speed in this round (it drifts: every third round 30% slower) times the block's own noise.
    `fails`: ("build", status) fails its set-up, ("window", n, status) its n-th block (from 0).
    `memory`: a GPU arm's (torch peak GiB, NVML GiB or None) for each block in turn."""

    def __init__(self, seconds: float, noise: float, rng: random.Random, card: dict, fails: tuple = (),
                 memory: list | None = None):
        self.seconds, self.noise, self.rng, self.card, self.fails = seconds, noise, rng, card, fails
        self.memory = memory
        self.closed, self.windows = False, 0

    def started(self):
        return {"pid": 0}

    def build(self, warmup, profile, timeout_s):
        self.setup_timeout_s = timeout_s
        if self.fails[:1] == ("build",):
            raise arm_worker.ArmFailure(self.fails[-1], {"type": "Broken", "message": "in set-up", "traceback": None})
        return {"device": "cuda:0" if self.memory else "cpu", "total_params": 1000}

    def window(self, n):
        self.windows += 1
        if self.fails[:2] == ("window", self.windows - 1):
            raise arm_worker.ArmFailure(self.fails[-1], {"type": "Broken", "message": "in a step", "traceback": None})
        self.card["windows"] += 1
        rnd = (self.card["windows"] - 1) // self.card["arms"]
        factor = (1.3 if rnd % 3 == 0 else 1.0) * math.exp(self.rng.gauss(0, self.noise))
        block = {"step_time_s": [self.seconds * factor] * n, "tokens": 256 * n}
        if self.memory:
            peak, nvml = self.memory[self.windows - 1]
            block.update(peak_allocated_bytes=int(peak * 2**30), window_rise_bytes=0,
                         nvml_peak_process_bytes=None if nvml is None else int(nvml * 2**30))
        return block

    def close(self):
        self.closed = True
        self.card.setdefault("closed", []).append(self)  # the order workers were closed in


@pytest.fixture
def fake_arms(monkeypatch):
    """compare.spawn replaced: arm `name` steps in SECONDS[name] (0.1 s if not listed)."""
    made = {}

    def use(seconds: dict, noise: float = 0.01, fails: dict | None = None, memory: dict | None = None):
        rng = random.Random(0)
        card = {"windows": 0, "arms": 0}

        def spawn(name, cfg, out):
            card["arms"] += 1
            made[name] = FakeWorker(seconds.get(name, 0.1), noise, rng, card, (fails or {}).get(name, ()),
                                    (memory or {}).get(name))
            return made[name]

        monkeypatch.setattr(compare, "spawn", spawn)
        return made

    return use


def small(compose, *overrides):
    return compose("task=compare", "compare.common=['model=tiny-llama','train.device=cpu','data.eval_file=null']",
                   "+compare.arms={a:['quant=nf4'],b:['quant=bf16']}", "compare.pairs=[a/b]", "compare.aa_control=a",
                   *overrides)


def result_of(cfg) -> dict:
    return json.loads((store.run_dir(cfg) / store.RESULT).read_text())


def test_stops_at_the_target_with_the_aa_control(compose, fake_arms):
    made = fake_arms({"a": 0.08, "a-aa": 0.08, "b": 0.1}, noise=0.01)
    cfg = small(compose, "compare.min_rounds=4", "compare.max_rounds=30", "compare.setup_timeout_s=90")
    assert tasks.single(cfg) == 0
    m = result_of(cfg)["metrics"]
    assert all(w.setup_timeout_s == 90 for w in made.values())  # each set-up's limit (the worker kills past it)
    assert m["stopped"] == "target" and m["rounds_completed"] == 4  # 1% noise: narrow at once
    p = m["pairs"]["a/b"]
    assert p["ratio"] == pytest.approx(1.25, rel=0.02) and p["half_width"] <= 0.05 and p["verdict"] == "a faster"
    assert m["aa_control"]["pair"] == "a-aa/a" and m["aa_control"]["covers_1"] and m["valid"]
    assert all(sorted(r["order"]) == ["a", "a-aa", "b"] for r in m["rounds"])  # every arm once per round
    assert [len(r["step_time_s"]["b"]) for r in m["rounds"]] == [5] * 4  # every block's raw step times
    assert m["arms"]["a"]["tokens_per_s"] == pytest.approx(256 / 0.08, rel=0.3)
    assert all(worker.closed for worker in made.values())


def test_stops_at_the_round_budget_with_the_width_it_reached(compose, fake_arms):
    fake_arms({"a": 0.1, "b": 0.1}, noise=0.3)
    cfg = small(compose, "compare.min_rounds=2", "compare.max_rounds=5")
    assert tasks.single(cfg) == 0
    m = result_of(cfg)["metrics"]
    assert m["stopped"] == "max_rounds" and m["rounds_completed"] == 5
    assert m["half_width_reached"] == m["pairs"]["a/b"]["half_width"] > 0.05


def test_stops_at_the_time_budget(compose, fake_arms, monkeypatch):
    """Each look at the clock finds the run 100 s older: a budget of 450 s allows 5 rounds."""
    import time
    from types import SimpleNamespace

    fake_arms({}, noise=0.3)
    clock = iter(range(10**6))
    born = compare.psutil.Process().create_time()
    monkeypatch.setattr(compare, "time", SimpleNamespace(time=lambda: born + 100 * next(clock),
                                                         perf_counter=time.perf_counter))
    cfg = small(compose, "compare.min_rounds=2", "compare.max_rounds=50", "compare.time_budget_s=450")
    assert tasks.single(cfg) == 0
    m = result_of(cfg)["metrics"]
    assert m["stopped"] == "time_budget" and m["rounds_completed"] == 5


def test_an_arm_keeps_the_most_memory_of_its_blocks(compose, fake_arms):
    """On a GPU each block brings its process's torch peak and NVML memory: an arm records the most
    of each over its blocks (None where NVML hides its process), and compare.md tables both."""
    fake_arms({}, memory={"a": [(3, 4), (5, 4.5), (4, 6)], "b": [(2, None)] * 3})
    cfg = small(compose, "compare.min_rounds=3", "compare.max_rounds=3", "compare.aa_control=null")
    assert tasks.single(cfg) == 0
    a, b = (result_of(cfg)["metrics"]["arms"][x] for x in "ab")
    assert (a["peak_allocated_bytes"], a["nvml_peak_process_bytes"]) == (5 * 2**30, 6 * 2**30)
    assert (b["peak_allocated_bytes"], b["nvml_peak_process_bytes"]) == (2 * 2**30, None)
    md = (store.run_dir(cfg) / "compare.md").read_text()
    assert re.search(r"\| a +\|.*\| +5\.00 +\| +6\.00 +\|$", md, re.M)
    assert re.search(r"\| b +\|.*\| +2\.00 +\| +- +\|$", md, re.M)


def test_a_broken_aa_control_voids_the_comparison(compose, fake_arms):
    fake_arms({"a": 0.1, "a-aa": 0.08, "b": 0.1})  # the twin runs 25% faster: the harness is not fair
    cfg = small(compose, "compare.min_rounds=3", "compare.max_rounds=3")
    assert tasks.single(cfg) == 0
    m = result_of(cfg)["metrics"]
    assert not m["aa_control"]["covers_1"] and m["valid"] is False


def three(compose, *overrides):
    return small(compose, "+compare.arms.c=['quant=bf16','adapter.r=4']", "compare.pairs=[a/b,a/c]",
                 "compare.aa_control=null", *overrides)


def test_an_arm_failing_in_a_step_leaves_the_others_going(compose, fake_arms):
    """c's third block fails: the rounds go on with a and b (a Williams square of the two from then
    on), a/b is measured over every round, a/c is not measured and says why, c's failure is its own."""
    made = fake_arms({"a": 0.08, "b": 0.1, "c": 0.1}, fails={"c": ("window", 2, "oom")})
    cfg = three(compose, "compare.min_rounds=5", "compare.max_rounds=5")
    assert tasks.single(cfg) == 0
    r = result_of(cfg)
    m = r["metrics"]
    assert r["status"] == "ok" and m["rounds_completed"] == 5 and m["arms_failed"] == ["c"]
    c = m["arms"]["c"]
    assert (c["status"], c["failed_in"], c["error"]["type"]) == ("oom", "round 2", "Broken")
    assert m["arms"]["a"]["status"] == "ok" and m["pairs"]["a/b"]["rounds"] == 5
    assert set(m["pairs"]) == {"a/b"} and m["pairs_not_measured"] == {"a/c": "arm c oom in round 2: Broken: in a step"}
    assert [sorted(x["step_time_s"]) for x in m["rounds"]] == [["a", "b", "c"]] * 2 + [["a", "b"]] * 3
    assert m["rounds"][2]["failed"] == ["c"] and all(sorted(x["order"]) == ["a", "b"] for x in m["rounds"][3:])
    assert m["arms"]["c"]["tokens_per_s_rounds"] and m["arms"]["c"]["tokens_per_s"]  # its blocks are kept
    assert all(w.closed for w in made.values()) and made["c"].card["closed"][0] is made["c"]  # c's at its failure
    md = (store.run_dir(cfg) / "compare.md").read_text()
    assert "- Arm c oom in round 2: Broken: in a step" in md
    assert re.search(r"\| a/c +\| +not measured +\| +- +\| +- +\| arm c oom in round 2: Broken: in a step +\|", md)


def test_a_comparison_that_measured_no_pair_is_a_failure(compose, fake_arms):
    fake_arms({}, fails={"b": ("build", "failed"), "c": ("build", "failed")})
    cfg = three(compose, "compare.min_rounds=2", "compare.max_rounds=3")
    assert tasks.single(cfg) == tasks.EXIT["failed"]
    r = result_of(cfg)
    assert r["status"] == "failed" and r["error"]["type"] == "ArmsFailed"
    assert "a/b: arm b failed in setup: Broken: in set-up" in r["error"]["message"]
    m = r["metrics"]
    assert m["stopped"] == "no_pair" and m["rounds_completed"] == 0 and m["pairs"] == {}
    assert m["arms"]["a"]["status"] == "ok" and m["arms_failed"] == ["b", "c"]


def test_an_unmeasured_aa_control_voids_the_comparison(compose, fake_arms):
    fake_arms({}, fails={"a-aa": ("window", 0, "failed")})
    cfg = small(compose, "compare.min_rounds=2", "compare.max_rounds=3")
    assert tasks.single(cfg) == 0
    m = result_of(cfg)["metrics"]
    assert "aa_control" not in m and m["valid"] is False and "a-aa/a" in m["pairs_not_measured"]
    assert m["pairs"]["a/b"]["rounds"] == 3


def test_resumes_the_rounds_of_a_killed_attempt(compose, fake_arms):
    fake_arms({"a": 0.08, "b": 0.1}, noise=0.2)
    cfg = small(compose, "compare.aa_control=null", "compare.min_rounds=2", "compare.max_rounds=4")
    staged = store.staging_dir(cfg)
    staged.mkdir(parents=True)
    killed = [{"step": r, "round": r, "attempt": "earlier", "order": ["b", "a"], "tokens": {"a": 1280, "b": 1280},
               "step_time_s": {"a": block(0.5 + 0.2 * (r % 2), 5), "b": block(0.5, 5)}} for r in range(3)]
    (staged / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in killed) + '{"step": 3, "rou')
    assert tasks.single(cfg) == 0
    m = result_of(cfg)["metrics"]
    assert m["rounds_completed"] == 4 and [r["attempt"] for r in m["rounds"]][:3] == ["earlier"] * 3
    assert m["rounds"][3]["attempt"] != "earlier"  # one new round: the budget was 4
    lines = (store.run_dir(cfg) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [0, 1, 2, 3]  # the log holds every round


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("overrides, key", [
    (["~compare.arms.b"], "compare.arms"),
    (["compare.pairs=[a/c]"], "compare.pairs"),
    (["compare.aa_control=c"], "compare.aa_control"),
    (["compare.min_rounds=1"], "compare.min_rounds"),
    (["compare.max_rounds=3", "compare.min_rounds=4"], "compare.max_rounds"),
    (["compare.arms.a=['quant=int4']"], "compare.arms.a: quant"),
    (["compare.arms.a=['train.runner=turbo']"], "compare.arms.a: train.runner"),
])
def test_bad_comparisons_run_nothing_and_name_the_key(compose, tmp_path, caplog, overrides, key):
    assert tasks.single(small(compose, *overrides)) == tasks.EXIT["invalid"]
    assert f"invalid input, nothing was run: {key}" in caplog.text
    assert not list(tmp_path.rglob(store.RESULT))


@pytest.mark.parametrize("arm", [["train.runner=bare"], ["+arm=[nf4-dq,unsloth]", "adapter.dropout=0"]])
def test_the_bare_loop_and_unsloth_are_arms_never_training_runs(compose, arm):
    runner = arm[0].rsplit(",", 1)[-1].strip("]").split("=")[-1]
    with pytest.raises(config.ConfigError, match=f"train.runner: {runner} runs only as an arm of task=compare"):
        config.validate(compose(*arm))
    config.validate(compose(*arm), arm=True)


def test_compose_inside_a_running_hydra_app():
    """What `python -m qlab.run task=compare` does: compose an arm while Hydra's app holds
    GlobalHydra, which stays as it was."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        running = GlobalHydra.instance().hydra
        assert config.compose(["+arm=fast"]).speed.compile == "layers"
        assert GlobalHydra.instance().hydra is running


# ---------------------------------------------------------------- a real comparison on a CPU

def test_tiny_comparison_end_to_end(tmp_path):
    """The CPU variant cut to four arms (the Trainer's loop, qlab's fast step, the bare loop, the
    A/A twin) for time: each a real model in a worker process of its own, through the CLI."""
    cut = [f"~compare.arms.{a}" for a in ("recipe", "bf16", "bf16-fast", "fast-adamw")]
    proc = subprocess.run([sys.executable, "-m", "qlab.run", "experiment=speed-cpu", f"tracker.results_dir={tmp_path}",
                           *cut, "compare.pairs=[fast/trainer,fast/bare]", "compare.max_rounds=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [path] = list((tmp_path / "compare-tiny-llama").glob("*/result.json"))
    r = json.loads(path.read_text())
    assert r["kind"] == "compare" and r["status"] == "ok" and r["run_id"] == path.parent.name
    m = r["metrics"]
    assert set(m["arms"]) == {"trainer", "fast", "bare", "fast-aa"} and m["rounds_completed"] == 2
    t = m["arms"]["trainer"]
    assert t["runner"] == "hf_trainer" and t["speed"] == "trainer" and t["tokens_per_s"] > 0
    assert m["arms"]["bare"]["runner"] == "bare" and m["arms"]["fast"]["speed"] == "fast (compile=none)"
    assert all(len(r["step_time_s"][a]) == 2 for r in m["rounds"] for a in m["arms"])
    assert set(m["pairs"]) == {"fast/trainer", "fast/bare"} and m["aa_control"]["pair"] == "fast-aa/fast"
    assert (path.parent / "compare.md").is_file() and (path.parent / "profile-trainer.txt").is_file()
    assert len({a["pid"] for a in m["arms"].values()}) == 4 and all(a["status"] == "ok" for a in m["arms"].values())
    assert all((path.parent / f"worker-{a}.log").is_file() for a in m["arms"]) and "arms_failed" not in m
    page = report.build(tmp_path / "compare-tiny-llama", wandb=False)
    text = page.read_text()
    assert "fast-aa/fast (A/A floor)" in text and "| trainer " in text and "hf_trainer" in text


# ---------------------------------------------------------------- arms in processes of their own, on a CPU

STACK_COMMON = ("compare.common=['model=tiny-llama','train=cpu','train.device=cpu','adapter.r=8','adapter.dropout=0',"
                "'data.max_seq_len=64','data.pad_to=max_seq_len','data.eval_file=null','train.batch_size=2',"
                "'train.progress=false','train.save_adapter=false']")
STACK_ARMS = ("+compare.arms={a:['+arm=[nf4-dq,recipe]'],e:['+arm=[bf16,recipe]'],"
              "b:['+arm=[nf4-dq,recipe]','train.runner=bare'],liger:['+arm=[nf4-dq,liger]'],"
              "unsloth:['+arm=[nf4-dq,unsloth]']}")
NO_UNSLOTH = pytest.mark.skipif(importlib.util.find_spec("unsloth") is not None, reason="unsloth is installed here")


@pytest.mark.slow
@NO_UNSLOTH
def test_arms_run_in_processes_of_their_own_and_a_failed_arm_is_recorded(compose, monkeypatch):
    """The stacks' arms (conf/experiment/speed-stacks.yaml) on the tiny preset: qlab's recipe (a) and
    16-bit LoRA (e) run; the bare loop (b) crashes in its second block; Liger needs CUDA (a ConfigError
    in its set-up); Unsloth is not installed (its import, first thing in its process, fails). Every arm
    ran in its own process; a/e is measured, with MFU for every arm that ran; each failed arm is
    recorded with its error and its pairs as not measured, with the reason, in an ok comparison."""
    monkeypatch.setenv("QLAB_INJECT_FAULT", "crash@4:b")  # warm-up 1 + profile 1, 2 steps a round: round 1
    cfg = compose("task=compare", STACK_COMMON, STACK_ARMS, "compare.pairs=[a/e,a/b,a/liger,a/unsloth]",
                  "compare.aa_control=null", "compare.warmup_steps=1", "compare.profile_steps=1",
                  "compare.steps_per_round=2", "compare.min_rounds=3", "compare.max_rounds=3",
                  "compare.peak_flops=1e12")
    assert tasks.single(cfg) == 0
    r = result_of(cfg)
    m = r["metrics"]
    arms = m["arms"]
    assert r["status"] == "ok" and m["rounds_completed"] == 3 and m["stopped"] == "max_rounds"
    pids = {name: arms[name]["pid"] for name in ("a", "e", "b", "liger")}
    assert len(set(pids.values())) == 4 and os.getpid() not in pids.values()  # a process per arm
    assert all((store.run_dir(cfg) / f"worker-{name}.log").is_file() for name in arms)
    assert arms["a"]["imported_before_first"] == [] and all(arms[x]["lora_dropout"] == 0 for x in arms)
    liger, unsloth, b = arms["liger"], arms["unsloth"], arms["b"]
    assert (liger["status"], liger["failed_in"], liger["error"]["type"]) == ("failed", "setup", "ConfigError")
    assert liger["error"]["message"].startswith("speed.liger: Liger Kernel's Triton kernels need a CUDA device")
    assert (unsloth["status"], unsloth["failed_in"], unsloth["error"]["type"]) == ("failed", "start",
                                                                                   "ModuleNotFoundError")
    assert unsloth["error"]["message"] == "No module named 'unsloth'" and "pid" not in unsloth
    assert (b["status"], b["failed_in"], b["error"]["type"]) == ("failed", "round 1", "InjectedCrash")
    assert m["arms_failed"] == ["b", "liger", "unsloth"] and set(m["pairs"]) == {"a/e"}
    assert m["pairs"]["a/e"]["rounds"] == 3 and len(b["tokens_per_s_rounds"]) == 1  # its one block is kept
    assert set(m["pairs_not_measured"]) == {"a/b", "a/liger", "a/unsloth"}
    assert "ModuleNotFoundError: No module named 'unsloth'" in m["pairs_not_measured"]["a/unsloth"]
    assert [sorted(x["step_time_s"]) for x in m["rounds"]] == [["a", "b", "e"], ["a", "e"], ["a", "e"]]
    for name in ("a", "e"):  # 6 N tokens/s over the peak, for every arm that ran
        assert arms[name]["mfu"] == pytest.approx(6 * arms[name]["total_params"] * arms[name]["tokens_per_s"] / 1e12)
    assert liger["mfu"] is None and unsloth["mfu"] is None and liger["speed"] == "trainer+liger"
    assert unsloth["speed"] == "unsloth" and unsloth["runner"] == "unsloth"
    md = (store.run_dir(cfg) / "compare.md").read_text()
    assert "- Arm unsloth failed in start: ModuleNotFoundError: No module named 'unsloth'" in md
    assert re.search(r"\| a/liger +\| +not measured +\|.*\| arm liger failed in setup: ConfigError: speed.liger: ", md)
    assert "LoRA dropout 0 in every arm." in md and "Each arm runs in a process of its own" in md
    # a comparison from before the workers (no pid) keeps its own note on its peaks
    assert "co-resident arms are not isolated" in tables.compare_notes([{"runner": "qlab"}])



def test_the_stacks_comparison_runs_every_arm_at_dropout_0():
    """conf/experiment/speed-stacks.yaml: the issue's six arms, fast under CUDA graphs and the A/A
    twin, each valid, each at LoRA dropout 0 (Unsloth's fast path needs it), its ratios in a sweep
    of their own."""
    cfg = config.compose(["experiment=speed-stacks"])
    config.validate(cfg)
    arms = {name: compare.compose_arm(cfg, name) for name in compare.arm_names(cfg.compare)}
    assert set(arms) == {"trainer", "liger", "unsloth", "recipe", "fast", "bf16-fast", "graphs", "fast-aa"}
    assert all(a.adapter.dropout == 0 and a.model.name == "llama-7b" for a in arms.values())
    assert {n: a.train.runner for n, a in arms.items() if a.train.runner != "qlab"} == {
        "trainer": "hf_trainer", "liger": "hf_trainer", "unsloth": "unsloth"}
    assert arms["liger"].speed.liger and not arms["trainer"].speed.liger
    assert list(cfg.compare.pairs) == ["fast/bf16-fast", "fast/unsloth", "fast/liger", "fast/trainer",
                                       "graphs/unsloth", "graphs/liger", "graphs/trainer"]
    assert arms["graphs"].speed.compile_mode == "reduce-overhead"
    assert cfg.tracker.sweep == "compare-stacks-llama-7b" and cfg.compare.time_budget_s == 450
    bloom = config.compose(["experiment=speed-stacks", "model=bloom-7b1"])
    assert compare.compose_arm(bloom, "unsloth").model.name == "bloom-7b1"


def test_the_graphs_comparison_pairs_each_step_with_and_without_cuda_graphs():
    """conf/experiment/speed-graphs.yaml: fast and bf16-fast, each with and without CUDA graphs (the
    only key their pairs differ in), the graphs arm's A/A twin, every arm at dropout 0 on a GPU."""
    cfg = config.compose(["experiment=speed-graphs"])
    config.validate(cfg)
    arms = {name: compare.compose_arm(cfg, name) for name in compare.arm_names(cfg.compare)}
    assert set(arms) == {"fast", "graphs", "bf16-fast", "bf16-graphs", "graphs-aa"}
    for name, a in arms.items():
        config.validate(a, arm=True)
        assert a.adapter.dropout == 0 and a.train.device == "cuda"
        assert a.speed.compile_mode == ("reduce-overhead" if "graphs" in name else "default")
    for with_graphs, without in (("graphs", "fast"), ("bf16-graphs", "bf16-fast")):
        assert OmegaConf.to_container(arms[with_graphs].speed) == {
            **OmegaConf.to_container(arms[without].speed), "compile_mode": "reduce-overhead"}
