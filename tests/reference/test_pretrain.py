"""The pretrained reference base: the tiny base's training on the frozen corpus, the cache, and
loading it back quantized (CPU, real bitsandbytes). The corpus itself: tests/reference/test_corpus.py."""

import json
import math
import time

import pytest

from qlab.reference import corpus, pretrain


# ------------------------------------------------------------------------------- tiny base


@pytest.fixture(scope="module")
def tiny_base(qlab_cache):
    t0 = time.perf_counter()
    path = pretrain.ensure_base("tiny", "cpu")
    return path, time.perf_counter() - t0


def test_tiny_base_trains_and_beats_the_untrained_model(tiny_base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = tiny_base
    info = json.loads((path / "base.json").read_text())
    spec = pretrain.spec_for("tiny")
    assert info["key"] == path.name.rsplit("-", 1)[1] and info["corpus"]["sha256"] == corpus.checksum()
    assert info["tokens_seen"] == spec["steps"] * spec["batch_size"] * spec["seq_len"]
    assert 0.5e6 < info["params"] < 1.5e6 and info["vocab_size"] == spec["vocab_size"]
    assert info["heldout_perplexity"] < info["heldout_perplexity_init"] / 4
    curve = [r["heldout_loss"] for r in info["curve"] if "heldout_loss" in r]
    assert curve[-1] < curve[0] - 1.0
    for key in ("python", "torch", "transformers", "cpu"):
        assert key in info["environment"]

    # measured again here, outside the build: the saved model vs the same shape untrained
    tok = AutoTokenizer.from_pretrained(path)
    texts = pretrain.heldout_texts()
    trained = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    untrained = pretrain.build_model(spec, tok, "cpu")
    ppl_trained = pretrain.heldout_perplexity(trained, tok, texts, seq_len=128, max_tokens=4096)
    ppl_untrained = pretrain.heldout_perplexity(untrained, tok, texts, seq_len=128, max_tokens=4096)
    assert ppl_untrained > 500  # about the vocabulary size (1024): it knows nothing
    assert ppl_trained < ppl_untrained / 4


def test_second_ensure_reuses_the_cache(tiny_base):
    path, _ = tiny_base
    stamp = (path / "base.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = pretrain.ensure_base("tiny", "cpu")
    assert again == path and time.perf_counter() - t0 < 2.0
    assert (path / "base.json").stat().st_mtime_ns == stamp
    assert pretrain.base_dir("tiny", "cpu") == path
    # other inputs, other keys: steps, precision
    assert pretrain.base_dir("tiny", "cpu", steps=10) != path
    assert pretrain.build_key(pretrain.spec_for("tiny"), "cuda", corpus.checksum()) != path.name.rsplit("-", 1)[1]


def test_saved_base_loads_through_models_load_as_nf4(tiny_base):
    import bitsandbytes as bnb

    from qlab.run import models
    from qlab.config import ModelConfig, QuantConfig

    path, _ = tiny_base
    loaded = models.load(ModelConfig(name="base-tiny", name_or_path=str(path), preset=None),
                         QuantConfig(type="nf4"), "cpu")
    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 3 * 7  # q k v o gate up down per layer
    assert layers[0].weight.quant_state.quant_type == "nf4"
    tok = loaded.tokenizer  # what qlab.data needs for the chat format
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert tok.decode(tok("def f(x):\n    return 你好", add_special_tokens=False).input_ids) == \
        "def f(x):\n    return 你好"


@pytest.mark.parametrize("quant", ["bf16", "int8", "nf4", "fp4"])
def test_post_training_quantization_perplexity_is_computable(tiny_base, quant):
    from qlab.run import models
    from qlab.config import ModelConfig, QuantConfig

    path, _ = tiny_base
    loaded = models.load(ModelConfig(name="base-tiny", name_or_path=str(path), preset=None),
                         QuantConfig(type=quant), "cpu")
    r = pretrain.heldout_eval(loaded.model, loaded.tokenizer, pretrain.heldout_texts(), seq_len=128, max_tokens=2048)
    assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1.0
    assert r["tokens"] == 2047  # every token after the first, exactly once
    assert r["perplexity"] < 1024 / 2  # quantized, it still knows something


def test_heldout_windows_count_each_token_once():
    """Windows overlap by one token: n tokens -> n - 1 predictions for any seq_len."""
    import torch

    class Uniform(torch.nn.Module):  # log-uniform over V: NLL is exactly log V per token
        def __init__(self, v):
            super().__init__()
            self.v, self.p = v, torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, self.v)})()

    class Tok:
        bos_token_id, eos_token_id = 1, 2

        class backend_tokenizer:  # noqa: N801
            @staticmethod
            def encode_batch(texts, add_special_tokens=False):
                return [type("E", (), {"ids": [5] * len(t)})() for t in texts]

    for seq_len in (2, 3, 7, 64):
        r = pretrain.heldout_eval(Uniform(16), Tok, ["abcdefghij", "xyz"], seq_len=seq_len)
        assert r["tokens"] == (10 + 2) + (3 + 2) - 1
        assert r["perplexity"] == pytest.approx(16.0)


def test_qlora_run_on_the_base_end_to_end(tiny_base, compose):
    from qlab import tasks

    path, _ = tiny_base
    cfg = compose("model=hub", f"model.name_or_path={path}", "model.name=base-tiny", "train.steps=4")
    result = tasks.execute(cfg)
    assert result.status == "ok", result.error
    m = result.metrics
    assert m["steps_completed"] == 4 and math.isfinite(m["eval_loss"])
    assert result.axes["model"] == "base-tiny"


def test_unknown_size_is_a_clear_error():
    with pytest.raises(pretrain.BaseError, match="unknown base size 'huge'"):
        pretrain.spec_for("huge")


def test_cli_returns_the_cached_base(tiny_base, capsys):
    path, _ = tiny_base
    assert pretrain.main(["--size", "tiny", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == str(path) and "held-out perplexity" in out[0]
    assert f"model.name_or_path={path}" in out[2]


def test_model_group_base_tiny_builds_or_reuses_the_base(tiny_base, compose):
    """`model=base-tiny` resolves to the same cached directory through qlab.models."""
    from qlab.run import models
    from qlab import tasks

    path, _ = tiny_base
    cfg = compose("model=base-tiny", "train.steps=3")
    assert models.model_path(cfg.model, "cpu") == str(path)
    result = tasks.execute(cfg)
    assert result.status == "ok" and result.axes["model"] == "base-tiny"
    pvm = result.metrics["predicted_vs_measured"]  # the analytic model follows it too
    assert pvm["weight_bytes"]["predicted"] == pvm["weight_bytes"]["measured"]
    # which build's weights it trained on (a hash of the safetensors files, not of the cache key)
    import hashlib

    [weights] = path.glob("*.safetensors")
    assert result.metrics["base_weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
