import bitsandbytes as bnb
import pytest
import torch

from qlab.run import models


def load(compose, *overrides):
    cfg = compose(*overrides)
    return models.load(cfg.model, cfg.quant, "cpu")


def first_linear(m):
    return m.model.model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("quant, cls", [
    ("bf16", torch.nn.Linear), ("int8", bnb.nn.Linear8bitLt), ("nf4", bnb.nn.Linear4bit), ("fp4", bnb.nn.Linear4bit),
])
def test_each_quant_type_loads_the_right_module(compose, quant, cls):
    loaded = load(compose, f"quant={quant}")
    layer = first_linear(loaded)
    assert type(layer) is cls
    if quant in ("nf4", "fp4"):
        assert layer.weight.quant_state.quant_type == quant
        assert layer.weight.dtype == torch.uint8
    if quant == "int8":
        assert layer.weight.dtype == torch.int8
    # the output head is never quantized
    assert type(loaded.model.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_double_quant_changes_the_stored_quant_state(compose, quant):
    plain = first_linear(load(compose, f"quant={quant}")).weight.quant_state
    dq = first_linear(load(compose, f"quant={quant}", "quant.double_quant=true")).weight.quant_state
    assert not plain.nested and plain.absmax.dtype == torch.float32
    assert dq.nested and dq.absmax.dtype == torch.uint8 and dq.state2.absmax.dtype == torch.float32
    # one first-level constant per 64 weights, one second-level constant per 256 of those
    n = plain.shape.numel()
    assert plain.absmax.numel() == n // 64 == dq.absmax.numel()
    assert dq.state2.absmax.numel() == -(-(n // 64) // 256)


def test_weight_bytes_counts_exactly_what_is_held(compose):
    loaded = load(compose, "quant=nf4", "quant.double_quant=true")
    wb = loaded.weight_bytes
    m = loaded.model
    expect_packed = sum(l.weight.numel() for l in m.modules() if isinstance(l, bnb.nn.Linear4bit))
    assert wb["quantized_weight_bytes"] == expect_packed
    assert wb["quantized_params"] == 2 * expect_packed  # two 4-bit weights per byte
    qs = [l.weight.quant_state for l in m.modules() if isinstance(l, bnb.nn.Linear4bit)]
    expect_state = sum(q.absmax.numel() + 16 * 4 + q.state2.absmax.numel() * 4 + 256 * 4 + 4 for q in qs)
    assert wb["quant_state_bytes"] == expect_state
    assert wb["weight_bytes"] == wb["quantized_weight_bytes"] + wb["quant_state_bytes"] + wb["unquantized_weight_bytes"]
    bf16 = load(compose, "quant=bf16").weight_bytes
    assert bf16["quantized_params"] == 0 and bf16["quant_state_bytes"] == 0
    # the 16-bit arm holds the same weights unquantized (float32 compute dtype on CPU: 4 bytes)
    assert bf16["weight_bytes"] == wb["unquantized_weight_bytes"] + 4 * wb["quantized_params"]


def test_preset_is_built_once_and_loaded_through_from_pretrained(compose, qlab_cache):
    from qlab.run import presets

    path = presets.ensure("tiny-llama")
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert str(path).startswith(str(qlab_cache))
    assert presets.ensure("tiny-llama") == path  # cached: same directory, not rebuilt
    loaded = load(compose)
    assert loaded.path == str(path)
    # a user pointing name_or_path at the saved directory gets the same model
    same = load(compose, f"model.name_or_path={path}", "model.preset=null")
    assert same.weight_bytes == loaded.weight_bytes


def test_memory_cap_names_the_device_index(monkeypatch):
    """torch wants an index (or an indexed device) for the per-process fraction; plain "cuda"
    means the current device. A 7.4 GiB cap on an 80 GiB card is a fraction of 7.4 / 80."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: type("P", (), {"total_memory": 80 * 2**30})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, i: calls.update(fraction=f, index=i))
    models.cap_device_memory("cuda", 7.4)
    assert calls == {"fraction": pytest.approx(7.4 / 80), "index": 1}
    models.cap_device_memory("cuda:0", 100.0)
    assert calls == {"fraction": 1.0, "index": 0}
    calls.clear()
    models.cap_device_memory("cpu", 7.4)
    models.cap_device_memory("cuda", None)
    assert calls == {}


def test_int8_cast_warning_is_logged_once(compose, caplog, monkeypatch):
    # bitsandbytes logs it on every int8 matmul with float32 input; a 300-step run logged 36,400
    monkeypatch.setattr(models._BNB_ONCE, "seen", set())  # as in a fresh process
    loaded = load(compose, "quant=int8")
    ids = torch.tensor([[1, 2, 3, 4]])
    with caplog.at_level("WARNING", logger="bitsandbytes.autograd._functions"), torch.no_grad():
        for _ in range(3):
            loaded.model(input_ids=ids)
    casts = [r for r in caplog.records if str(r.msg).startswith("MatMul8bitLt: inputs will be cast")]
    assert len(casts) == 1
    other = models.logging.LogRecord("bitsandbytes", models.logging.WARNING, "", 0, "something else", None, None)
    assert models._BNB_ONCE.filter(other) and not models._BNB_ONCE.filter(other)  # each message once
