import pytest

from qlab.run import adapters, models
from qlab.config import ConfigError


def attach(compose, *overrides):
    cfg = compose(*overrides)
    loaded = models.load(cfg.model, cfg.quant, "cpu")
    models.prepare_for_training(loaded.model, cfg.quant.type != "bf16", True)
    model, targets = adapters.attach(loaded.model, cfg.adapter)
    return model, targets


# LoRA adds r * (in + out) parameters per adapted layer.
# tiny-llama (hidden 64, mlp 192, 2 layers): q,k,v,o 64->64: 128r each; gate, up 64->192
# and down 192->64: 256r each  => all_linear 2*(4*128 + 3*256) r = 2560r; qv 2*2*128 r = 512r.
# tiny-bloom (hidden 64, 2 layers): query_key_value 64->192: 256r; dense 64->64: 128r;
# dense_h_to_4h 64->256 and dense_4h_to_h: 320r each => all_linear 2*1024 r; qv 2*256 r.
@pytest.mark.parametrize("model, targets, expect_names, per_r", [
    ("tiny-llama", "qv", ["q_proj", "v_proj"], 512),
    ("tiny-llama", "all_linear", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"], 2560),
    ("tiny-bloom", "qv", ["query_key_value"], 512),
    ("tiny-bloom", "all_linear", ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"], 2048),
])
@pytest.mark.parametrize("quant", ["nf4", "bf16"])
def test_targets_and_trainable_counts(compose, model, targets, expect_names, per_r, quant):
    peft_model, names = attach(compose, f"model={model}", f"adapter={targets}", f"quant={quant}", "adapter.r=8")
    assert names == expect_names
    assert adapters.count_params(peft_model)["trainable_params"] == 8 * per_r
    # only LoRA weights train; the base stays frozen
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_unresolvable_architecture_is_a_clear_error():
    import torch

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "oddnet"})()
            self.mixer = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 4)

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(ConfigError, match="adapter.targets: cannot resolve query/value projections for architecture 'oddnet'"):
        adapters.resolve_targets(Odd(), "qv")
    assert adapters.resolve_targets(Odd(), "all_linear") == ["mixer"]  # head excluded


@pytest.mark.parametrize("targets", ["qv", "all_linear"])
def test_same_seed_same_lora_init_in_every_quantization(compose, targets):
    """The paired comparison of experiment=real needs it: at one seed the 16-bit, NF4+DQ and FP4
    arms start from the same LoRA weights (bfloat16 compute, as on a GPU: peft moves an adapter to
    a 16-bit base's dtype and back to float32 without changing a value)."""
    import torch
    from transformers import set_seed

    def initial(*quant):
        cfg = compose(*quant, f"adapter={targets}", "quant.compute_dtype=bfloat16")
        loaded = models.load(cfg.model, cfg.quant, "cpu")
        models.prepare_for_training(loaded.model, cfg.quant.type != "bf16", True)
        set_seed(0)  # as train.setup does right before attaching
        model, _ = adapters.attach(loaded.model, cfg.adapter)
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    ref = initial("quant=nf4", "quant.double_quant=true")
    for quant in (["quant=bf16"], ["quant=fp4"]):
        other = initial(*quant)
        assert other.keys() == ref.keys() and all(torch.equal(other[k], ref[k]) for k in ref), quant
        assert all(p.dtype == torch.float32 for p in other.values())


def test_full_fine_tuning_trains_every_weight_in_float32(compose):
    import torch

    cfg = compose("adapter=full", "quant=bf16", "quant.compute_dtype=bfloat16")
    loaded = models.load(cfg.model, cfg.quant, "cpu")
    loaded_values = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    assert {p.dtype for p in loaded_values.values()} == {torch.bfloat16}
    models.prepare_for_training(loaded.model, False, True, full=True)
    model, names = adapters.attach(loaded.model, cfg.adapter)
    assert model is loaded.model and names == []  # no LoRA: the model itself trains
    params = dict(model.named_parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params.values())  # float32 masters
    assert all(torch.equal(params[n].to(torch.bfloat16), v) for n, v in loaded_values.items())  # the loaded values
    assert adapters.count_params(model)["trainable_params"] == sum(p.numel() for p in params.values())
    ids = torch.randint(4, 200, (2, 16))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16  # the forward runs under autocast to the loaded dtype
