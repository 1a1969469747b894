"""qlab.run.presets: the shapes (parameter counts from the architecture's formula, on the meta
device, and the published sizes of the 7B models), the byte-level BPE tokenizer, the same random
weights on every build, the cache key, and build_once (built once, atomic, a failed build leaves
nothing, concurrent callers build once)."""

import json
import threading
import time

import pytest
import torch

from qlab.run import presets


def meta_params(name: str, vocab: int | None = None) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes without memory: a 65B model in milliseconds
        model = AutoModelForCausalLM.from_config(presets.model_config(name, vocab))
    return sum(p.numel() for p in model.parameters())


def llama_params(s: dict, vocab: int) -> int:
    """Embedding and untied head V h each; per layer q, k, v, o (h^2 each, as many KV heads as
    heads), gate/up/down (h i each) and two RMSNorms (h each); the final norm."""
    h, i, n = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    assert s["num_key_value_heads"] == s["num_attention_heads"]
    return 2 * vocab * h + n * (4 * h * h + 3 * h * i + 2 * h) + h


def bloom_params(s: dict, vocab: int) -> int:
    """Embedding V h (tied to the head) with a LayerNorm (2h); per layer fused QKV (3h^2 + 3h), dense
    (h^2 + h), MLP h -> 4h -> h (8h^2 + 5h), two LayerNorms (4h); the final LayerNorm (2h)."""
    h, n = s["hidden_size"], s["n_layer"]
    return vocab * h + 2 * h + n * (12 * h * h + 13 * h) + 2 * h


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_parameter_count_follows_the_architecture(name):
    spec = presets.PRESETS[name]
    vocab = spec["vocab_size"] or 1000  # the tiny ones take their tokenizer's size
    formula = llama_params if spec["arch"] == "llama" else bloom_params
    assert meta_params(name, vocab) == formula(spec, vocab)


def test_the_7b_shapes_are_the_published_models():
    # LLaMA-1 7B: 6.74B parameters; bigscience/bloom-7b1: 7.07B (their model cards)
    assert round(meta_params("llama-7b") / 1e9, 2) == 6.74
    assert round(meta_params("bloom-7b1") / 1e9, 2) == 7.07
    assert presets.model_config("llama-7b").vocab_size == 32000
    assert not presets.model_config("llama-7b").tie_word_embeddings  # the 2 V h above
    assert presets.model_config("bloom-7b1").tie_word_embeddings


def test_tiny_shapes_take_the_tokenizers_vocabulary_and_bnb_friendly_widths():
    for name in ("tiny-llama", "tiny-bloom", "small-llama"):
        spec = presets.PRESETS[name]
        assert spec["vocab_size"] is None and presets.model_config(name, 777).vocab_size == 777
        # bitsandbytes' CPU 4-bit kernel repacks weights in blocks of 32 output rows
        widths = [spec["hidden_size"]] + ([spec["intermediate_size"]] if "intermediate_size" in spec else [])
        assert all(w % 32 == 0 for w in widths)
    cfg = presets.model_config("tiny-llama", 500, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 3)


# ------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return presets.build_tokenizer()


def test_tokenizer_specials_and_size(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == presets.SPECIAL_TOKENS
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2, 3)
    # the 256-byte alphabet and the specials, plus merges, up to the cap
    assert 256 + 4 < len(tokenizer) <= presets.TOKENIZER_VOCAB


@pytest.mark.parametrize("text", ["What is 12 plus 30?", "把“苹果”翻译成英文。", "naïve café 🙂", "  spaces\tand\nlines  "])
def test_tokenizer_round_trips_any_utf8(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids  # byte-level: nothing unknown


def test_tokenizer_is_the_same_on_every_build(tokenizer):
    assert presets.build_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_train_bpe_learns_merges_from_its_texts():
    tok = presets.train_bpe(["hello world"] * 50 + ["help"] * 10, 300)
    assert len(tok.tokenize("hello")) < len("hello")  # a frequent word: fewer tokens than bytes
    assert len(tok.tokenize("xyzzy")) == len("xyzzy")  # never seen: one token per byte
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == presets.SPECIAL_TOKENS


# ------------------------------------------------------------------------------- the model


def test_build_model_gives_the_same_weights_every_time(tokenizer):
    a = presets.build_model("tiny-llama", tokenizer, "cpu")
    b = presets.build_model("tiny-llama", tokenizer, "cpu")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(p.dtype == torch.float32 for p in a.parameters())  # float32 on the CPU
    assert a.get_input_embeddings().weight.shape == (len(tokenizer), presets.PRESETS["tiny-llama"]["hidden_size"])
    assert a.config.num_hidden_layers == presets.PRESETS["tiny-llama"]["num_hidden_layers"]
    assert a.config.pad_token_id == tokenizer.pad_token_id


def test_ensure_saves_the_preset_in_the_cache(qlab_cache, tokenizer):
    path = presets.ensure("tiny-llama")
    assert path == presets.preset_dir("tiny-llama") and path.parent == qlab_cache / "presets"
    saved = json.loads((path / "config.json").read_text())
    spec = presets.PRESETS["tiny-llama"]
    assert {k: saved[k] for k in spec if k not in ("arch", "vocab_size")} == \
        {k: v for k, v in spec.items() if k not in ("arch", "vocab_size")}
    assert saved["vocab_size"] == len(tokenizer) and saved["architectures"] == ["LlamaForCausalLM"]
    assert (path / "tokenizer.json").is_file()


def test_cache_key_changes_with_the_shape_and_the_build_version(monkeypatch, tmp_path):
    monkeypatch.setenv("QLAB_CACHE", str(tmp_path))
    base = presets.preset_dir("tiny-llama")
    assert base.parent == tmp_path / "presets" and base.name.startswith("tiny-llama-")
    assert presets.preset_dir("tiny-llama") == base  # stable
    monkeypatch.setitem(presets.PRESETS, "tiny-llama", {**presets.PRESETS["tiny-llama"], "num_hidden_layers": 3})
    wider = presets.preset_dir("tiny-llama")
    monkeypatch.undo()
    monkeypatch.setenv("QLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(presets, "BUILD_VERSION", presets.BUILD_VERSION + 1)
    assert len({base, wider, presets.preset_dir("tiny-llama")}) == 3


# ------------------------------------------------------------------------------- build_once


def complete(p):
    return (p / "done").is_file()


def test_build_once_builds_once_and_renames_into_place(tmp_path):
    calls = []

    def build(d):
        calls.append(d)
        d.mkdir()
        (d / "done").write_text("1")

    target = tmp_path / "cache" / "thing"
    assert presets.build_once(target, complete, build) == target and complete(target)
    assert presets.build_once(target, complete, build) == target
    assert len(calls) == 1 and calls[0] != target  # built in a temporary directory, then renamed
    assert not calls[0].exists()


def test_a_failed_build_leaves_nothing_and_a_leftover_is_replaced(tmp_path):
    target = tmp_path / "thing"

    def fail(d):
        d.mkdir()
        (d / "half").write_text("x")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        presets.build_once(target, complete, fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".thing.lock"]  # no target, no temporary
    target.mkdir()  # an incomplete leftover (no "done")
    (target / "stale").write_text("x")

    def build(d):
        d.mkdir()
        (d / "done").write_text("1")

    presets.build_once(target, complete, build)
    assert sorted(p.name for p in target.iterdir()) == ["done"]


def test_concurrent_callers_build_once(tmp_path):
    target, calls, results = tmp_path / "thing", [], []

    def build(d):
        calls.append(1)
        time.sleep(0.2)  # long enough for the others to queue on the lock
        d.mkdir()
        (d / "done").write_text("1")

    threads = [threading.Thread(target=lambda: results.append(presets.build_once(target, complete, build)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [target] * 4


def test_a_build_on_the_gpu_gives_its_memory_back(monkeypatch, tmp_path):
    """The run that builds a preset on a GPU empties the allocator's cache after it, so its NVML
    peak is its own, not the build's bf16 weights; on a CPU there is no cache to empty."""
    emptied = []

    class Saved:  # a built model or tokenizer: saving writes nothing here
        def save_pretrained(self, out):
            pass

    monkeypatch.setattr(presets, "build_tokenizer", Saved)
    monkeypatch.setattr(presets, "build_model", lambda name, tokenizer, device: Saved())
    monkeypatch.setattr(presets, "build_once", lambda target, complete, build: build(tmp_path) or tmp_path)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    assert presets.ensure("tiny-llama", "cpu") == tmp_path and emptied == []
    assert presets.ensure("tiny-llama", "cuda") == tmp_path and emptied == [1]
