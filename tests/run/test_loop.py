"""qlab.run.loop on the tiny preset (16-bit on the CPU, real peft, a few steps): Stepper and drive
count steps and tokens, time only the measured window, and train (the loss falls on a repeated
batch); an injected OOM or crash ends the run early with its steps kept; the bare runner reads
the loss once per window; evaluate's token-weighted mean against one conversation at a time;
the gradient-checkpointing probe; the pure helpers by hand."""

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST
from qlab import config
from qlab.reference import synthetic_chat
from qlab.run import loop, optim
from qlab.run.data import IGNORE_INDEX
from qlab.tasks import train as train_task


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These steps are tiny: on a busy 2-core machine two OpenMP threads spin-wait for each other
    (seconds per step instead of tens of milliseconds). One thread here; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qlab_cache):
    """One conversation to train on (every batch is the same two copies of it), eight to evaluate;
    the model loaded once, its trainable weights restored before each test (`fresh`)."""
    d = tmp_path_factory.mktemp("loop")
    synthetic_chat.write(d / "train.jsonl", 1, seed=5)
    synthetic_chat.write(d / "eval.jsonl", 8, seed=6)
    cfg = config.compose([f"tracker.results_dir={d / 'results'}", *FAST, "quant=bf16", "optim=adamw",
                          "optim.lr=1e-2", "data.max_seq_len=64", "train.batch_size=2", "train.steps=6",
                          "train.warmup_steps=2", f"data.train_file={d / 'train.jsonl'}",
                          f"data.eval_file={d / 'eval.jsonl'}"])
    s = train_task.setup(cfg, train_task.prepare(cfg))
    initial = {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}
    return cfg, s, initial


@pytest.fixture
def fresh(tiny):
    cfg, s, initial = tiny
    with torch.no_grad():
        for n, p in s.model.named_parameters():
            if n in initial:
                p.copy_(initial[n])
    return cfg, s


def stepper(cfg, s, records=None, run_id="run"):
    opt, sched = optim.build(cfg.optim, list(s.model.parameters()), s.device)
    on_step = records.append if records is not None else None
    return loop.Stepper(s.model, s.batches, opt, sched, cfg, s.device, on_step, run_id)


def with_runner(cfg, runner):
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    cfg.train.runner = runner
    return cfg


def test_drive_counts_steps_times_the_window_and_trains(fresh):
    cfg, s = fresh
    records = []
    out = loop.drive(stepper(cfg, s, records), cfg, s.device)
    assert out.status == "ok" and out.error is None
    m = out.metrics
    assert m["steps_completed"] == 6 and [r["step"] for r in records] == list(range(6))
    assert len(out.losses) == 6 and all(math.isfinite(x) for x in out.losses)
    # the same batch every step at lr 1e-2: the adapters fit it
    assert out.losses[-1] < out.losses[0]
    assert (m["train_loss_first"], m["train_loss_final"]) == (out.losses[0], out.losses[-1])
    assert m["train_loss_tail_mean"] == out.losses[-1]  # the last 10% of 6 steps: one step
    # warm-up steps (0, 1) are not timed; the 4 window steps are
    assert all("step_time_s" not in r for r in records[:2]) and all(r["step_time_s"] > 0 for r in records[2:])
    assert m["step_time_n"] == 4
    # one conversation, two copies per batch, padded to the longest: no padding at all
    ids, labels = s.batches.train.samples[0]
    targets = sum(label != IGNORE_INDEX for label in labels[1:])  # the first label never counts
    assert all((r["tokens"], r["real_tokens"], r["target_tokens"]) == (2 * len(ids), 2 * len(ids), 2 * targets)
               for r in records)
    assert m["max_tokens_per_step"] == 2 * len(ids)
    window = sum(r["step_time_s"] for r in records[2:])
    assert m["tokens_per_s"] == pytest.approx(4 * 2 * len(ids) / window)
    assert m["target_tokens_per_s"] == pytest.approx(4 * 2 * targets / window)
    assert all(r["lr"] == pytest.approx(cfg.optim.lr) for r in records)  # no lr warm-up configured


@pytest.mark.parametrize("fault, status, error", [("oom@3", "oom", "OutOfMemoryError"),
                                                  ("crash@3", "failed", "InjectedCrash")])
def test_a_fault_ends_the_run_early_keeping_what_ran(fresh, monkeypatch, fault, status, error):
    cfg, s = fresh
    monkeypatch.setenv("QLAB_INJECT_FAULT", fault)
    records = []
    out = loop.drive(stepper(cfg, s, records), cfg, s.device)
    assert out.status == status and out.error["type"] == error
    # steps 0, 1, 2 ran (two warm-up, one timed); step 3 failed before its forward pass
    assert out.metrics["steps_completed"] == 3 and len(out.losses) == 3 and len(records) == 3
    assert out.metrics["step_time_n"] == 1 and out.metrics["train_loss_final"] == out.losses[-1]
    # an OOM is an expected outcome (no traceback); a crash keeps its traceback
    assert (out.error["traceback"] is None) == (status == "oom")
    if status == "failed":
        assert "InjectedCrash" in out.error["traceback"]


def test_inject_fault_matches_step_and_run_id(monkeypatch):
    monkeypatch.delenv("QLAB_INJECT_FAULT", raising=False)
    loop.inject_fault(1, "any")  # unset: nothing happens
    monkeypatch.setenv("QLAB_INJECT_FAULT", "crash@2:fp4")
    loop.inject_fault(2, "tiny_nf4_s0")  # another run
    loop.inject_fault(1, "tiny_fp4_s0")  # another step
    with pytest.raises(loop.InjectedCrash):
        loop.inject_fault(2, "tiny_fp4_s0")
    monkeypatch.setenv("QLAB_INJECT_FAULT", "oom")  # default step 1, every run
    with pytest.raises(torch.OutOfMemoryError):
        loop.inject_fault(1, "x")


def test_bare_runner_reads_the_loss_once_per_window(fresh):
    """As task=compare drives it: warm-up, then timed windows."""
    cfg, s = fresh
    records = []
    st = stepper(with_runner(cfg, "bare"), s, records)
    st.warmup(2)
    assert st.done == 2 and st.losses == []  # nothing read during warm-up
    times = st.window(4)
    assert len(times) == 4 and all(t > 0 for t in times) and st.done == 6
    assert len(st.losses) == 1 and math.isfinite(st.losses[0])  # the window's last step, read once
    assert [r["step"] for r in records] == list(range(6))
    assert all(set(r) == {"step", "tokens"} for r in records)  # no per-step loss, lr or time read
    ids, _ = s.batches.train.samples[0]
    assert all(r["tokens"] == 2 * len(ids) for r in records)
    st.window(1)
    assert len(st.losses) == 2 and len(st.times) == 5
    st.close()


def test_window_returns_its_own_step_times(fresh):
    cfg, s = fresh
    st = stepper(cfg, s)
    st.warmup(1)
    first, second = st.window(2), st.window(3)
    assert len(first) == 2 and len(second) == 3 and st.times == first + second
    assert st.done == 6 and len(st.counts) == 5 and len(st.losses) == 6
    st.close()


def test_evaluate_is_the_token_weighted_mean_over_conversations(fresh):
    cfg, s = fresh
    got = loop.evaluate(s.model, s.batches, cfg, s.device)
    total, count = 0.0, 0
    s.model.eval()
    with torch.no_grad():  # one conversation at a time: no padding, each target token counted once
        for ids, labels in s.batches.eval.samples:
            n = sum(label != IGNORE_INDEX for label in labels[1:])
            loss = s.model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            total, count = total + float(loss) * n, count + n
    s.model.train()
    assert got["eval_target_tokens"] == count
    assert got["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["eval_perplexity"] == pytest.approx(math.exp(got["eval_loss"]))
    no_eval = SimpleNamespace(eval=None)
    assert loop.evaluate(s.model, no_eval, cfg, s.device) == {}


# ------------------------------------------------------------------ gradient checkpointing probe


def test_the_probe_sees_recompute_only_when_checkpointing_is_active(tokenizer_model):
    model = tokenizer_model
    cfg = SimpleNamespace(train=SimpleNamespace(gradient_checkpointing=True, runner="qlab"))
    with pytest.raises(RuntimeError, match="no layer has checkpointing enabled"):
        loop.probe_layers(model, cfg)
    model.gradient_checkpointing_enable()
    model.train()
    layers = loop.probe_layers(model, cfg)
    assert len(layers) == model.config.num_hidden_layers
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    probe = loop.CheckpointProbe(layers)
    model(input_ids=ids, labels=ids).loss.backward()
    probe.check()  # each layer ran twice: forward, then recomputed in backward
    assert probe.calls == 2 * len(layers)
    probe = loop.CheckpointProbe(layers)
    with torch.no_grad():  # no backward, no recompute: the probe must complain
        model(input_ids=ids)
    with pytest.raises(RuntimeError, match="gradient checkpointing is not active"):
        probe.check()
    assert loop.probe_layers(model, SimpleNamespace(train=SimpleNamespace(gradient_checkpointing=False))) == []
    # Unsloth's layers run their norms' kernels on the weights and checkpoint themselves: nothing to probe
    assert loop.probe_layers(model, SimpleNamespace(train=SimpleNamespace(gradient_checkpointing=True,
                                                                          runner="unsloth"))) == []


@pytest.fixture
def tokenizer_model():
    from qlab.run import presets

    tok = presets.train_bpe(["a b c d e f g"] * 20, 300)
    return presets.build_model("tiny-llama", tok, "cpu")


# ------------------------------------------------------------------ the helpers, by hand


def test_loss_summary_tail_is_the_last_tenth():
    assert loop.loss_summary([]) == {}
    losses = [float(20 - i) for i in range(20)]  # 20 .. 1
    assert loop.loss_summary(losses) == {"train_loss_first": 20.0, "train_loss_final": 1.0,
                                         "train_loss_tail_mean": 1.5}  # mean of the last 2: (2 + 1) / 2


def test_batch_tokens_counts_positions_real_and_targets():
    padded = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
              "labels": torch.tensor([[5, -100, 7, 8, 9], [-100, 6, 7, -100, -100]])}
    # targets: positions 1.. only (the first label predicts nothing): 3 in row 0, 2 in row 1
    assert loop.batch_tokens(padded) == {"tokens": 10, "real_tokens": 8, "target_tokens": 5}
    packed = {"input_ids": torch.zeros(1, 7, dtype=torch.long), "labels": torch.tensor([[-100, 1, 2, -100, -100, 3, 4]])}
    assert loop.batch_tokens(packed) == {"tokens": 7, "real_tokens": 7, "target_tokens": 4}


def test_throughput_pools_tokens_over_time():
    assert loop.throughput([], [], [], []) == {}
    m = loop.throughput([0.5, 1.0], [100, 300], [80, 200], [10, 50])
    assert m["tokens_per_s"] == pytest.approx(400 / 1.5)  # pooled, not the mean of 200 and 300 tok/s
    assert m["real_tokens_per_s"] == pytest.approx(280 / 1.5) and m["target_tokens_per_s"] == pytest.approx(40)
    assert m["max_tokens_per_step"] == 300 and m["step_time_n"] == 2
    assert m["step_time_mean_s"] == pytest.approx(0.75) and m["tokens_per_s_median_tok"] == pytest.approx(250)


def test_error_record_keeps_the_first_line():
    rec = loop.error_record(ValueError("first line\nsecond"), with_traceback=False)
    assert rec == {"type": "ValueError", "message": "first line", "traceback": None}
