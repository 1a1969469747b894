"""Post-training quantization of the pretrained base (qlab.ptq) on the tiny base, CPU, real
bitsandbytes, and the other backends and block sizes (HQQ, torchao, NF4+DQ at 32 and 128);
the paired noise estimate; the PTQ claim kinds on synthetic ptq.json files, and
`qlab claims` running a missing PTQ measurement."""

import copy
import json
import math

import pytest
import torch
import yaml

from qlab.reference import pretrain
from qlab.run import launch
from qlab.claims import kernels, ptq, verdicts


@pytest.fixture(scope="module")
def tiny_base(qlab_cache):
    return pretrain.ensure_base("tiny", "cpu")


@pytest.fixture(scope="module")
def tiny_ptq(tiny_base, tmp_path_factory):
    results = tmp_path_factory.mktemp("ptq-results")
    path = ptq.measure("tiny", "cpu", results, max_tokens=2048, progress=False)
    return results, json.loads(path.read_text())


# ------------------------------------------------------------------------------ the measurement


def test_every_type_is_measured_on_the_same_tokens(tiny_ptq, tiny_base):
    results, rec = tiny_ptq
    assert list(rec["types"]) == ["bf16", "int8", "nf4", "nf4+DQ", "fp4", "fp4+DQ", "int4"]
    assert rec["eval"]["tokens"] == 2047 and sum(rec["eval"]["window_tokens"]) == 2047
    assert len(rec["eval"]["window_tokens"]) == math.ceil(2047 / 127)  # windows of 128 overlapping by one
    info = json.loads((tiny_base / "base.json").read_text())
    assert rec["base"]["key"] == info["key"] and rec["base"]["path_name"] == tiny_base.name
    for key in ("torch", "transformers", "bitsandbytes", "cpu", "python"):
        assert rec["env"][key]
    ref = rec["types"]["bf16"]
    assert ref["delta_vs_bf16"] == 0 and ref["rel_vs_bf16"] == 0
    for label, r in rec["types"].items():
        assert r["tokens"] == 2047 and len(r["window_nll"]) == len(rec["eval"]["window_tokens"])
        assert math.isfinite(r["perplexity"]) and 1 < r["perplexity"] < 1024 / 2  # quantized, it still knows
        # perplexity is exp of the token-weighted mean of the windows' NLL
        assert math.log(r["perplexity"]) == pytest.approx(sum(r["window_nll"]) / 2047, rel=1e-9)
        assert r["delta_vs_bf16"] == pytest.approx(r["perplexity"] - ref["perplexity"])
        if label != "bf16":
            assert r["perplexity"] != ref["perplexity"]  # each type really changed the weights
            lo, hi = r["rel_vs_bf16_ci95"]
            assert lo <= r["rel_vs_bf16"] <= hi
    # the same numbers as qlab.base.heldout_perplexity on a model loaded independently
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert pretrain.heldout_perplexity(model, tok, pretrain.heldout_texts(), 128, 2048) == pytest.approx(ref["perplexity"],
                                                                                                   rel=1e-6)
    page = (results / "ptq-base-tiny" / "ptq.md").read_text()
    assert "| int4 |" in page and "(computed)" in page and "bitsandbytes has no int4 type" in page


def test_weight_bytes_per_type(tiny_ptq):
    _, rec = tiny_ptq
    t = rec["types"]
    assert t["bf16"]["weight_bytes"] > t["int8"]["weight_bytes"] > t["nf4"]["weight_bytes"] > t["nf4+DQ"]["weight_bytes"]
    assert t["nf4"]["weight_bytes"] == t["fp4"]["weight_bytes"]
    n = t["nf4"]["quantized_params"]
    assert t["int4"]["quantized_params"] == n == 3 * (4 * 128 * 128 + 3 * 128 * 384) == 638_976  # 3 layers
    # int4 storage: 4 bits + a float32 absmax per 64 weights = 4.5 bits; nf4 adds its 16-entry code tables
    assert t["int4"]["quantized_weight_bytes"] + t["int4"]["quant_state_bytes"] == n * 4.5 / 8
    assert t["int4"]["unquantized_weight_bytes"] == t["nf4"]["unquantized_weight_bytes"]
    assert t["int4"]["weight_bytes_basis"].startswith("computed")


def test_weight_error_on_the_real_weights(tiny_ptq, tiny_base):
    _, rec = tiny_ptq
    err = rec["weight_error"]
    assert set(err) == {"nf4", "fp4", "int4", "nf4+DQ", "fp4+DQ"}
    assert all(e["n"] == 638_976 and e["tensors"] == 21 for e in err.values())
    # pooled == the kernels' error of all decoder weights concatenated
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    ws = [m.weight.detach() for _, m in ptq.decoder_linears(model)]
    per = kernels.combine_errors([kernels.quantization_error(w, "int4", 64) for w in ws])
    assert err["int4"]["mse"] == pytest.approx(per["mse"]) and err["int4"]["max_abs_error"] == per["max_abs_error"]
    assert err["nf4"]["mse"] < err["fp4"]["mse"]  # on these weights, as on N(0, 1)


def test_int4_rounds_exactly_the_layers_bitsandbytes_quantizes(tiny_base):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from qlab.run import models
    from qlab.config import ModelConfig, QuantConfig

    nf4 = models.load(ModelConfig(name="base-tiny", preset=None, base="tiny"), QuantConfig(type="nf4"), "cpu").model
    quantized = {n for n, m in nf4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    assert {n for n, _ in ptq.decoder_linears(model)} == quantized
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert ptq.int4_in_place(model) == 638_976
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        if layer in quantized:
            assert torch.equal(p, kernels.round_trip(before[name], "int4", 64))
            blocks = p.detach().reshape(-1, 64)  # at most 15 levels (codes -7..7) per block of 64
            assert max(len(torch.unique(b)) for b in blocks) <= 15
            assert not torch.equal(p, before[name])
        else:  # embeddings, norms, the head: untouched
            assert torch.equal(p, before[name])


# ------------------------------------------------------------------------------ other backends, other block sizes

BACKENDS = ["bf16", "nf4+DQ", "int4", "nf4+DQ/b32", "nf4+DQ/b128", "hqq int4", "torchao nf4+DQ"]
TINY_LAYERS = [128 * 128] * 4 + [128 * 384] * 3  # a tiny base's decoder layer: q, k, v, o; gate, up, down
N_TINY = 3 * sum(TINY_LAYERS)  # 638,976 quantized weights in 21 tensors


@pytest.fixture(scope="module")
def tiny_backends(tiny_base, tmp_path_factory):
    """The CLI measuring bitsandbytes' NF4+DQ at block sizes 32 and 128, HQQ's int4 and torchao's
    NF4 beside NF4+DQ, bf16 and the reference int4 on the tiny base, 1,024 tokens of its held-out split."""
    results = tmp_path_factory.mktemp("ptq-backends")
    assert ptq.main(["--size", "tiny", "--device", "cpu", "--max-tokens", "1024", "--types", ",".join(BACKENDS),
                     "--results", str(results)]) == 0
    return results, json.loads((results / "ptq-base-tiny" / "ptq.json").read_text())


def test_the_type_table():
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from qlab import config

    assert ptq.DEFAULT_TYPES == ("bf16", "int8", "nf4", "nf4+DQ", "fp4", "fp4+DQ", "int4")  # results/ptq-*/ hold these
    for label, q in ptq.TYPES.items():
        config.validate_quant(OmegaConf.structured(q))  # every type is a config a run accepts
        # labelled as a run's quant is; the reference int4 loads in 16 bits and is rounded after
        assert config.quant_label(asdict(q)) == ("bf16" if label == ptq.REFERENCE_INT4 else label)
    assert (ptq.TYPES["hqq int4"].backend, ptq.TYPES["hqq int4"].type) == ("hqq", "int4")
    assert ptq.select_types(None) == list(ptq.DEFAULT_TYPES)
    assert ptq.select_types(["all"]) == list(ptq.TYPES)
    assert ptq.select_types(["default", "hqq int4", "nf4"]) == [*ptq.DEFAULT_TYPES, "hqq int4"]  # each once
    with pytest.raises(ValueError, match=r"unknown type 'hqq': choose from bf16, .*, hqq int4, torchao nf4\+DQ, "
                                         r"or default / all"):
        ptq.select_types(["bf16", "hqq"])
    with pytest.raises(ValueError, match="must include bf16"):
        ptq.select_types(["hqq int4"])


def test_committed_records_render_as_committed():
    """A record of Table 2's types renders as before the other backends: each committed real-model
    ptq.md is its ptq.json rendered (ptq-base-gpu's page predates the current renderer)."""
    from pathlib import Path

    from qlab import config

    paths = [p for p in sorted(Path(config.PROJECT_ROOT, "results").glob("ptq-*/ptq.json"))
             if json.loads(p.read_text())["eval"].get("text", ptq.HELDOUT) != ptq.HELDOUT]
    assert len(paths) == 6  # smollm2-135m, gemma3-270m x wiki, c4, tinystories
    for path in paths:
        assert ptq.render(json.loads(path.read_text())) == (path.parent / "ptq.md").read_text(), path


def test_other_backends_are_measured_on_the_same_windows(tiny_backends):
    results, rec = tiny_backends
    t = rec["types"]
    assert list(t) == BACKENDS and rec["eval"]["tokens"] == 1023
    assert [(t[k]["quant"], t[k]["double_quant"], t[k]["backend"], t[k]["blocksize"]) for k in BACKENDS[3:]] == [
        ("nf4", True, "bitsandbytes", 32), ("nf4", True, "bitsandbytes", 128), ("int4", False, "hqq", 64),
        ("nf4", True, "torchao", 64)]
    assert t["int4"]["backend"] == "qlab.claims.kernels" and t["bf16"]["blocksize"] is None
    for label, r in t.items():
        assert r["tokens"] == 1023 and math.log(r["perplexity"]) == pytest.approx(sum(r["window_nll"]) / 1023)
        if label != "bf16":
            # each changed the weights, and this base still knows its text: 4-bit costs well under 5%
            assert r["perplexity"] != t["bf16"]["perplexity"] and abs(r["rel_vs_bf16"]) < 0.05
    pairs = {(p["a"], p["b"]): p for p in rec["pairs"]}
    assert list(pairs) == [("nf4+DQ", "int4"), ("hqq int4", "int4"), ("hqq int4", "nf4+DQ"),
                           ("torchao nf4+DQ", "nf4+DQ"), ("nf4+DQ/b32", "nf4+DQ"), ("nf4+DQ/b128", "nf4+DQ")]
    for p in pairs.values():
        assert p["rel_ci95"][0] <= p["rel"] <= p["rel_ci95"][1]
    # torchao's NF4 holds the same NF4 levels per block of 64; only its scales are stored otherwise
    assert abs(pairs[("torchao nf4+DQ", "nf4+DQ")]["rel"]) < 0.01
    assert rec["env"]["hqq"] and rec["env"]["torchao"]
    page = (results / "ptq-base-tiny" / "ptq.md").read_text()
    assert f"--size tiny --types '{','.join(BACKENDS)}'" in page
    assert "| hqq int4 | int4 |" in page and "| torchao nf4+DQ | nf4+DQ |" in page and "| nf4+DQ/b128 | nf4+DQ |" in page
    assert "- hqq int4: HQQ's asymmetric int4" in page and "(float32): 4 + 2*32/64 = 5 bits" in page
    assert "an absmax per 32 weights" in page and "Table 2's order, then each other backend or block size" in page


def test_weight_bytes_of_each_backend(tiny_backends):
    _, rec = tiny_backends
    t = rec["types"]
    assert all(t[k]["quantized_params"] == N_TINY and t[k]["quantized_weight_bytes"] == N_TINY // 2 for k in BACKENDS[1:])

    def bnb_dq_state(b):  # per tensor of m: a uint8 absmax per b, a float32 one per 256 of those, 273 float32 constants
        return 3 * sum(m // b + 4 * math.ceil(m / b / 256) + 4 * (16 + 256 + 1) for m in TINY_LAYERS)

    assert [t[k]["quant_state_bytes"] for k in ("nf4+DQ/b32", "nf4+DQ", "nf4+DQ/b128")] == [
        bnb_dq_state(32), bnb_dq_state(64), bnb_dq_state(128)] == [43_212, 33_072, 28_044]
    # HQQ: a float32 scale and zero point (the CPU's compute dtype) per 64: 4 + 2*32/64 = 5 bits
    assert t["hqq int4"]["quant_state_bytes"] == N_TINY // 64 * 2 * 4 and t["hqq int4"]["bits_per_quantized_param"] == 5
    # torchao: an int8 scale per 64, a float32 one per 256 of those, a float32 mean and 16 levels per tensor
    assert t["torchao nf4+DQ"]["quant_state_bytes"] == N_TINY // 64 + 4 * N_TINY // (64 * 256) + 21 * 4 * 17


def test_weight_error_per_block_size_and_not_for_other_backends(tiny_backends, tiny_base):
    _, rec = tiny_backends
    err = rec["weight_error"]
    assert set(err) == {*ptq.ERROR_KINDS, "nf4+DQ/b32", "nf4+DQ/b128"}
    assert err["nf4+DQ/b32"]["mse"] < err["nf4+DQ"]["mse"] < err["nf4+DQ/b128"]["mse"]  # a scale per fewer weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    ws = [m.weight.detach() for _, m in ptq.decoder_linears(model)]
    assert err["nf4+DQ/b128"]["mse"] == pytest.approx(
        kernels.combine_errors([kernels.quantization_error(w, "nf4", 128, True) for w in ws])["mse"])
    skipped = rec["weight_error_not_computed"]
    assert set(skipped) == {"hqq int4", "torchao nf4+DQ"} and "own solver" in skipped["hqq int4"]
    page = (tiny_backends[0] / "ptq-base-tiny" / "ptq.md").read_text()
    assert "Not computed for torchao nf4+DQ: torchao's NF4 quantizes its scales its own way" in page
    assert "(blocksize 64, or the /b<n> a type names)" in page and "| nf4+DQ/b32 |" in page


def test_unknown_and_unavailable_types_are_refused(tiny_base, tmp_path, monkeypatch, capsys):
    from qlab.run import quantize

    argv = ["--size", "tiny", "--device", "cpu", "--results", str(tmp_path), "--types"]
    assert ptq.main([*argv, "bf16,hqq"]) == 2
    assert "unknown type 'hqq': choose from" in capsys.readouterr().err
    monkeypatch.setitem(quantize.BACKEND_MODULES, "hqq", "qlab_has_no_such_module")  # hqq not installed
    assert ptq.main([*argv, "bf16,nf4+DQ,hqq int4"]) == 2
    assert "type 'hqq int4' cannot be measured here: quant.backend=hqq needs the hqq package" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_block_size_a_cpu_row_cannot_hold_is_refused_before_loading(qlab_cache, tmp_path, monkeypatch):
    """tiny-llama's rows hold 64 weights: bitsandbytes' CPU kernel takes blocks of 32 there, not 128
    (a GPU, which splits the whole tensor, takes both)."""
    from qlab.run import models

    cfg = ptq.model_config("tiny-llama")
    ptq.check_types(["bf16", "nf4+DQ/b32", "hqq int4", "torchao nf4+DQ"], cfg, "cpu")
    ptq.check_types(["bf16", "nf4+DQ/b128"], cfg, "cuda")  # shapes only: no GPU needed
    monkeypatch.setattr(models, "load", lambda *a: pytest.fail("loaded a model before checking the types"))
    with pytest.raises(ValueError, match=r"'nf4\+DQ/b128' cannot be measured on cpu: quant.blocksize: "
                                         r"model.layers.0.self_attn.q_proj's rows of 64 weights do not split"):
        ptq.measure(ptq.target("tiny-llama", "tinystories"), "cpu", tmp_path, 30, ["bf16", "nf4+DQ/b128"], False, 16)


# ------------------------------------------------------------------------------ the claims


def synthetic_ptq(results, size="gpu", ppl=None, mse=None, noise=0.0):
    """A ptq.json whose types have the given perplexities: every window's NLL per token is
    log(ppl), plus +-noise alternating (a paired noise the comparison has to see)."""
    ppl = ppl or {"bf16": 27.0, "nf4+DQ": 27.4, "fp4": 31.1, "int4": 34.3}
    mse = mse or {"nf4": 1.0e-5, "fp4": 1.4e-5, "int4": 1.2e-5}
    tokens = [1023] * 40
    types = {}
    for i, (label, p) in enumerate(ppl.items()):
        sign = [(1 if (w + i) % 2 else -1) for w in range(len(tokens))]
        types[label] = {"perplexity": p, "window_nll": [n * (math.log(p) + s * noise) for n, s in zip(tokens, sign)]}
    rec = {"size": size, "types": types, "eval": {"window_tokens": tokens},
           "weight_error": {k: {"mse": v, "max_abs_error": 10 * v, "n": 25_000_000} for k, v in mse.items()}}
    out = ptq.result_dir(results, size)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ptq.json").write_text(json.dumps(rec))
    return rec


def shipped(claim_id):
    """A shipped PTQ claim as its kind judges it: the base-gpu rows are shown as information in
    claims.yaml (a 34M model, not citable), which would hide the verdict these tests check."""
    c = next(c for c in verdicts.load_claims(verdicts.DEFAULT_CLAIMS) if c["id"] == claim_id)
    return {k: v for k, v in c.items() if k != "information"}


def one(c, results):
    [row] = verdicts.evaluate([c], results)
    return row


def test_ptq_claims_reproduced_on_table_2_like_numbers(tmp_path):
    synthetic_ptq(tmp_path)
    r = one(shipped("ptq_nf4_lowest_ppl"), tmp_path)
    assert r["verdict"] == "reproduced" and r["evidence"] == "ptq-base-gpu"
    assert r["measured"] == pytest.approx(100 * (27.4 / 31.1 - 1))  # vs the closer type, fp4
    assert r["paper"] == -11.8 and "nf4+DQ 27.4, fp4 31.1, int4 34.3" in r["reason"]
    assert one(shipped("ptq_fp4_beats_int4"), tmp_path)["verdict"] == "reproduced"
    e = one(shipped("nf4_lowest_error_base"), tmp_path)
    assert e["verdict"] == "reproduced" and e["measured"] == 1.0e-5
    assert e["reason"].startswith("mse on base-gpu's 25,000,000 decoder weights: nf4 1e-05 < int4 1.2e-05 < fp4")


def test_ptq_claims_not_reproduced_when_fp4_wins(tmp_path):
    # FP4 clearly below NF4+DQ, and Int4 with the least error: both claims must fail
    synthetic_ptq(tmp_path, ppl={"bf16": 27.0, "nf4+DQ": 31.1, "fp4": 27.4, "int4": 34.3},
                  mse={"nf4": 1.3e-5, "fp4": 1.4e-5, "int4": 1.2e-5}, noise=0.01)
    r = one(shipped("ptq_nf4_lowest_ppl"), tmp_path)
    assert r["verdict"] == "not reproduced" and r["reason"].startswith("fp4 significantly lower than nf4+DQ")
    assert r["measured"] > 0 and r["ci"][0] > 0
    e = one(shipped("nf4_lowest_error_base"), tmp_path)
    assert e["verdict"] == "not reproduced" and "int4 1.2e-05 < nf4" in e["reason"]


def test_ptq_tie_within_noise_is_inconclusive(tmp_path):
    # nf4+DQ 0.1% below fp4, but windows disagree by +-2% of NLL: the interval includes 0
    synthetic_ptq(tmp_path, ppl={"bf16": 27.0, "nf4+DQ": 27.40, "fp4": 27.43, "int4": 34.3}, noise=0.05)
    r = one(shipped("ptq_nf4_lowest_ppl"), tmp_path)
    assert r["verdict"] == "inconclusive" and "nf4+DQ vs fp4 within noise" in r["reason"]
    lo, hi = r["ci"]
    assert lo < 0 < hi


def test_ptq_claims_without_a_measurement(tmp_path):
    r = one(shipped("ptq_nf4_lowest_ppl"), tmp_path)
    assert r["verdict"] == "inconclusive" and "results/ptq-base-gpu/ has no ptq.json" in r["reason"]
    rec = synthetic_ptq(tmp_path)
    del rec["types"]["int4"]
    (ptq.result_dir(tmp_path, "gpu") / "ptq.json").write_text(json.dumps(rec))
    r = one(shipped("ptq_nf4_lowest_ppl"), tmp_path)
    assert r["verdict"] == "inconclusive" and "no perplexity for int4" in r["reason"]
    bad = tmp_path / "bad.yaml"
    c = copy.deepcopy(shipped("ptq_fp4_beats_int4"))
    c["ptq"] = "huge"
    bad.write_text(yaml.safe_dump({"claims": [c]}))
    with pytest.raises(ValueError, match="needs ptq: tiny|small|gpu"):
        verdicts.load_claims(bad)


def test_qlab_claims_runs_the_missing_ptq_measurement(tiny_base, tmp_path, monkeypatch, capsys):
    """GPU-sized measurements only on a GPU; the tiny one runs here, in its own process (cut to
    1,024 tokens and four types to keep the test short)."""
    mine = tmp_path / "claims.yaml"
    specs = [dict(shipped(i), ptq="tiny") for i in ("nf4_lowest_error_base", "ptq_nf4_lowest_ppl", "ptq_fp4_beats_int4")]
    specs.append(shipped("ptq_nf4_lowest_ppl"))  # size gpu: not run without CUDA
    specs[-1]["id"] = "gpu_one"
    mine.write_text(yaml.safe_dump({"claims": specs}))
    real_launch, calls = launch.launch, []

    def cut(args, log, module="qlab.run", **kw):
        calls.append((module, args))
        return real_launch([*args, "--max-tokens", "1024", "--types", "bf16,nf4+DQ,fp4,int4"], log, module, **kw)

    monkeypatch.setattr(launch, "launch", cut)
    monkeypatch.setattr(verdicts, "_has_cuda", lambda: False)
    results = tmp_path / "results"
    assert verdicts.main(["--claims", str(mine), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert calls == [("qlab.claims.ptq", ["--size", "tiny", "--results", str(results)])]
    assert "not running the PTQ measurement of base-gpu: it needs a GPU" in out
    rec = json.loads((results / "ptq-base-tiny" / "ptq.json").read_text())
    assert set(rec["types"]) == {"bf16", "nf4+DQ", "fp4", "int4"} and rec["eval"]["tokens"] == 1023
    rows = {r["id"]: r for r in json.loads((results / "claims" / "claims.json").read_text())["claims"]}
    assert rows["gpu_one"]["verdict"] == "inconclusive" and "not run yet" in rows["gpu_one"]["reason"]
    for i in ("nf4_lowest_error_base", "ptq_nf4_lowest_ppl", "ptq_fp4_beats_int4"):
        assert rows[i]["measured"] is not None and rows[i]["evidence"] == "ptq-base-tiny"
    summary = (results / "claims" / "summary.md").read_text()
    assert summary.startswith("| claim | measured on | paper | measured | margin | n | verdict |\n"
                              "|---|---|---|---|---|---|---|\n")
    assert summary.count("\n| ") == 4  # a row per claim
    # a second call finds the measurement and runs nothing
    calls.clear()
    assert verdicts.main(["--claims", str(mine), "--results", str(results)]) == 0 and calls == []
