"""Attach LoRA adapters (peft) to the query/value projections or to every linear layer.

Targets are resolved from the model's own modules: `all_linear` is every linear layer but the
output head (the paper's choice); `qv` the query and value projections, or where an architecture
fuses q, k and v into one linear (BLOOM, GPT-NeoX, Falcon) that fused layer (docs/running.md);
`full` no LoRA: every weight of the model trains (the baseline LoRA is compared to).
"""

from __future__ import annotations

import torch

from qlab.config import ConfigError

# Separate projections first, then fused ones; first pair found in the model wins.
QV_CANDIDATES = (("q_proj", "v_proj"), ("query", "value"), ("query_key_value",), ("qkv_proj",), ("Wqkv",))


def linear_leaf_names(model: torch.nn.Module) -> set[str]:
    """Last name component of every linear layer, output head excluded."""
    import bitsandbytes as bnb

    linear, head = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt), model.get_output_embeddings()
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, linear) and m is not head}


def resolve_targets(model: torch.nn.Module, targets: str) -> list[str]:
    """The leaf names peft's `target_modules` should match for `targets` (qv | all_linear)."""
    names = linear_leaf_names(model)
    arch = getattr(model.config, "model_type", type(model).__name__)
    if targets == "all_linear":
        if not names:
            raise ConfigError("adapter.targets", f"no linear layers found in {arch}")
        return sorted(names)
    for candidate in QV_CANDIDATES:
        if all(n in names for n in candidate):
            return list(candidate)
    raise ConfigError(
        "adapter.targets",
        f"cannot resolve query/value projections for architecture {arch!r}: none of "
        f"{[list(c) for c in QV_CANDIDATES]} among its linear layers {sorted(names)}; "
        "use adapter=all_linear",
    )


def attach(model: torch.nn.Module, adapter_cfg):
    """(the model that trains, the adapted layers' names): a peft model, or for targets=full the
    model itself and no names."""
    from peft import LoraConfig, get_peft_model

    if adapter_cfg.targets == "full":
        return model, []
    target_modules = resolve_targets(model, adapter_cfg.targets)
    lora = LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.alpha,
        lora_dropout=adapter_cfg.dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), target_modules


def count_params(model: torch.nn.Module) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable}
