"""Padding-free packing (data.pack): rows, boundaries, loss equivalence, validation, a real run."""

import json
from pathlib import Path

import pytest
import torch

from qlab.config import PROJECT_ROOT
from qlab.run import adapters, data, models, speed
from qlab import tasks
from qlab.results import store
from qlab.config import ConfigError, check_packing, validate
from qlab.run.data import IGNORE_INDEX

ROOT = Path(PROJECT_ROOT)


def sample(n, first=1):
    """A conversation of n tokens: <s>, then targets (the <s> is never a target)."""
    return [first] + [5] * (n - 1), [IGNORE_INDEX] + [6] * (n - 1)


def test_rows_are_greedy_in_data_order_with_restarting_positions():
    samples = [sample(n) for n in (3, 7, 5, 9, 2, 6, 4, 8)]
    padded = data.Data(data.Split(samples), None, 2, 0, None, seed=3)
    packed = data.Data(data.Split(samples), None, 2, 0, None, seed=3, pack_tokens=12)
    order = padded.order()
    expected = [next(order) for _ in range(40)]  # the conversations the padded batches draw
    rows, seen = packed.train_batches(), []
    while len(seen) < 30:
        row = next(rows)
        assert set(row) == {"input_ids", "labels", "position_ids"}  # no attention_mask: see data.py
        pos = row["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0]
        lengths = [b - a for a, b in zip(starts, starts[1:] + [len(pos)])]
        assert pos == [p for n in lengths for p in range(n)]
        assert row["input_ids"].shape == (1, sum(lengths)) and sum(lengths) <= 12
        assert (row["labels"][0, starts] == IGNORE_INDEX).all()  # nothing predicted across a boundary
        seen += lengths
        # greedy: the next conversation would not have fitted
        assert sum(lengths) + len(samples[expected[len(seen)]][0]) > 12
    assert seen == [len(samples[i][0]) for i in expected[: len(seen)]]  # same data, same order


def test_the_budget_holds_batch_size_conversations_on_average():
    """pack_budget=conversations: (batch_size + 1/2) x the mean length, from the data alone; a
    greedy row stops half a conversation short on average, so a row holds batch_size of them."""
    from types import SimpleNamespace

    cfg = lambda budget: SimpleNamespace(pack_budget=budget, max_seq_len=512)  # noqa: E731
    lengths = [30 + (7 * i) % 61 for i in range(2000)]  # 30..90 positions, mean ~60
    split = data.Split([sample(n) for n in lengths])
    budget = data.pack_budget(split, cfg("conversations"), 4)
    assert budget == round(4.5 * sum(lengths) / len(lengths))
    assert data.pack_budget(split, cfg("positions"), 4) == 4 * 512
    rows = data.Data(split, None, 4, 0, None, 0, pack_tokens=budget).train_batches()
    per_row = [int((next(rows)["position_ids"][0] == 0).sum()) for _ in range(400)]
    assert sum(per_row) / len(per_row) == pytest.approx(4, rel=0.05)


def test_a_conversation_longer_than_the_budget_gets_a_row_of_its_own():
    rows = data.Data(data.Split([sample(9), sample(3)]), None, 1, 0, None, 0, pack_tokens=8).train_batches()
    assert sorted(next(rows)["input_ids"].shape[1] for _ in range(2)) == [3, 9]


@pytest.fixture(scope="module")
def tiny_llama(qlab_cache):
    """tiny-llama, nf4 (float32 compute on CPU), LoRA attached, dropout off."""
    from hydra import compose, initialize_config_dir

    from qlab import config

    config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["adapter.r=8", "adapter.dropout=0", "data.max_seq_len=64"])
    loaded = models.load(cfg.model, cfg.quant, "cpu")
    models.prepare_for_training(loaded.model, True, False)
    model, _ = adapters.attach(loaded.model, cfg.adapter)
    model.eval()
    split = data.tokenize_split(data.read(cfg.data).train[:5], loaded.tokenizer, 64, "train")
    return model, split.samples


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_loss_is_the_token_weighted_loss_of_its_conversations(tiny_llama, attn):
    """Packing changes nothing but the batching: the row's loss (mean over its targets) equals
    the conversations run one by one, unpadded, weighted by their target counts. An all-ones
    attention_mask turns transformers' packed-sequence detection off: the conversations then
    attend to each other and the loss moves (the reason packed rows carry none)."""
    model, samples = tiny_llama
    model.config._attn_implementation = attn
    try:
        with torch.no_grad():
            alone = [(model(**data.collate([s], 0)).loss.item(), sum(t != IGNORE_INDEX for t in s[1][1:]))
                     for s in samples]
            expected = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
            row = data.pack(samples)
            assert row["input_ids"].shape[1] == sum(len(ids) for ids, _ in samples)
            assert model(**row).loss.item() == pytest.approx(expected, rel=1e-5)
            assert speed.chunked_loss(model, row, chunk_tokens=7).item() == pytest.approx(expected, rel=1e-5)
            leaky = model(**row, attention_mask=torch.ones_like(row["input_ids"])).loss.item()
            assert leaky != pytest.approx(expected, rel=1e-3)
    finally:
        model.config._attn_implementation = "sdpa"


def test_validation_names_the_key(compose, tmp_path):
    for overrides, key in ((["model=tiny-bloom", "data.pack=true"], "data.pack"),
                           (["data.pack=true", "data.pad_to=max_seq_len"], "data.pack"),
                           (["data.pack_tokens=512"], "data.pack_tokens"),
                           (["data.pack=true", "data.pack_tokens=4"], "data.pack_tokens"),
                           (["data.pack_budget=conversations"], "data.pack_budget"),
                           (["data.pack=true", "data.pack_budget=rows"], "data.pack_budget"),
                           (["data.pack=true", "data.pack_tokens=64", "data.pack_budget=conversations"],
                            "data.pack_budget")):
        with pytest.raises(ConfigError) as e:
            validate(compose(*overrides))
        assert e.value.key == key
    validate(compose("data.pack=true"))  # a llama preset packs
    validate(compose("model=base-tiny", "data.pack=true"))
    local = tmp_path / "bloom-ckpt"  # a local checkpoint: its config.json tells the architecture
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    with pytest.raises(ConfigError, match="data.pack: a bloom model"):
        validate(compose("model=hub", f"model.name_or_path={local}", "model.name=x", "data.pack=true"))
    # a hub id is only known once loaded: train.train checks the loaded model's type
    validate(compose("model=hub", "model.name_or_path=bigscience/bloom-560m", "model.name=x", "data.pack=true"))
    with pytest.raises(ConfigError, match="data.pack"):
        check_packing("bloom")


def test_a_hub_bloom_is_refused_before_the_first_step():
    """A hub id's architecture is known once loaded: train.train checks it before any step."""
    from types import SimpleNamespace

    from qlab.run import loop

    bloom = SimpleNamespace(config=SimpleNamespace(model_type="bloom"))
    packed = data.Data(data.Split([sample(3)]), None, 1, 0, None, 0, pack_tokens=8)
    cfg = SimpleNamespace(train=None, optim=SimpleNamespace(max_grad_norm=0.3))
    with pytest.raises(ConfigError, match="data.pack: a bloom model cannot be packed"):
        loop.train(bloom, packed, None, None, cfg, "cpu")


@pytest.mark.parametrize("loss", ["full", "chunked"])
def test_packed_run_counts_every_position_as_real(compose, loss):
    cfg = compose("data.pack=true", "data.max_seq_len=64", "train.batch_size=2", f"speed.loss={loss}",
                  "train.save_adapter=false")
    assert tasks.single(cfg) == 0
    result = store.read_result(store.run_dir(cfg))
    steps = [json.loads(line) for line in (store.run_dir(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert result["config"]["data"]["pack"] is True and result["metrics"]["data_pack_tokens"] == 2 * 64
    for rec in steps:
        assert rec["real_tokens"] == rec["tokens"] <= 128  # no padding, within the budget
        assert 0 < rec["target_tokens"] < rec["tokens"]
    assert result["metrics"]["eval_loss"] > 0  # evaluation stays padded and works as before
