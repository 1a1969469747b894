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
