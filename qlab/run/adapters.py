"""Attach LoRA adapters (peft) to the query/value projections or to every linear layer.

Targets are resolved from the model's own modules: `all_linear` is every linear layer but the
output head (the paper's choice); `qv` the query and value projections, or where an architecture
fuses q, k and v into one linear (BLOOM, GPT-NeoX, Falcon) that fused layer (docs/running.md);
`full` no LoRA: every weight of the model trains (the baseline LoRA is compared to).

`adapter.init`: gaussian is peft's default (A random, B = 0: the adapted model starts as the base);
pissa is peft's (A, B the weight's top-r singular directions, the base left the residual; its
adapter is saved converted to a plain LoRA of rank 2r on the original base, so `qlab eval` loads
it as any other); loftq is `loftq` below. `adapter.dora`: peft's DoRA.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile

import torch

from qlab.config import ConfigError
from qlab.run import quantize

# Separate projections first, then fused ones; first pair found in the model wins.
QV_CANDIDATES = (("q_proj", "v_proj"), ("query", "value"), ("query_key_value",), ("qkv_proj",), ("Wqkv",))


def linear_leaf_names(model: torch.nn.Module) -> set[str]:
    """Last name component of every linear layer, output head excluded."""
    import bitsandbytes as bnb

    linear = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, *{type(m) for m in quantize.hqq_layers(model)})
    head = model.get_output_embeddings()
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


def attach(model: torch.nn.Module, adapter_cfg, checkpoint: str | None = None):
    """(the model that trains, the adapted layers' names): a peft model, or for targets=full the
    model itself and no names. `checkpoint`: what the base loaded from, whose 16-bit weights
    adapter.init=loftq reads."""
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
        init_lora_weights="pissa" if adapter_cfg.init == "pissa" else True,
        use_dora=bool(adapter_cfg.dora),
    )
    peft_model = get_peft_model(model, lora)
    if adapter_cfg.init == "loftq":
        loftq(peft_model, checkpoint)
    if adapter_cfg.dora:
        keep_cpu_layout(peft_model)
    return peft_model, target_modules


def load_saved(model: torch.nn.Module, directory):
    """A saved adapter on a loaded base (qlab eval, generate, chat), a DoRA one keeping the 4-bit
    layout on a CPU as in training (keep_cpu_layout)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(directory))
    if getattr(peft_model.peft_config["default"], "use_dora", False):
        keep_cpu_layout(peft_model)
    return peft_model


def keep_cpu_layout(model) -> None:
    """bitsandbytes repacks a 4-bit layer's weight for its CPU kernel on the first forward without
    gradients (evaluation), after which dequantize_4bit, which DoRA reads for its weight norm at every
    step, returns other values (0.12 off on tiny-llama's q_proj): on a CPU the weights keep the
    layout they were quantized in. A GPU never repacks."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def save(model, directory, initial: str | None = None) -> None:
    """The adapter into `directory`; `initial` (a PiSSA adapter as initialized, `save_initial`):
    saved as the difference from it, a rank-2r LoRA on the original base, and then removed."""
    model.save_pretrained(directory, path_initial_model_for_weight_conversion=initial)
    if initial:
        shutil.rmtree(initial, ignore_errors=True)


def save_initial(model, adapter_cfg) -> str | None:
    """Before training: the adapter a saved PiSSA adapter is converted against, in a temporary
    directory; None for the other initializations (their adapter saves as it is)."""
    if adapter_cfg.targets == "full" or adapter_cfg.init != "pissa":
        return None
    directory = tempfile.mkdtemp(prefix="qlab-pissa-init-")
    model.save_pretrained(directory)
    return directory


def checkpoint_tensors(checkpoint: str) -> dict[str, str]:
    """tensor name -> safetensors file of a local checkpoint or a cached hub id (nothing downloaded)."""
    from safetensors import safe_open

    folder = checkpoint
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download

        folder = snapshot_download(checkpoint, local_files_only=True, allow_patterns=["*.safetensors"])
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ConfigError("adapter.init", f"loftq reads the 16-bit weights from safetensors files; none in {folder}")
    out = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            out.update(dict.fromkeys(st.keys(), f))
    return out


@torch.no_grad()
def loftq(model, checkpoint: str) -> None:
    """LoftQ's initialization with one alternation, as peft's replace_lora_weights_loftq: each
    adapted 4-bit layer's A and B from the rank-r SVD of its quantization error W - Q (W the
    checkpoint's 16-bit weight, Q the dequantized 4-bit one), so that it starts at
    Q + (alpha/r) B A = Q + U_r S_r V_r^T, the closest the rank allows to W. Written here, not
    called: peft's computes on CUDA only and leaves out the LoRA scaling alpha/r (16/64 = 1/4 by
    default: its adapter would cancel a quarter of the error), which qlab divides out of A and B
    (each by sqrt(alpha/r))."""
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit
    from safetensors import safe_open

    where, prefix, found = checkpoint_tensors(checkpoint), "base_model.model.", False
    with contextlib.ExitStack() as stack:
        files = {f: stack.enter_context(safe_open(f, framework="pt")) for f in set(where.values())}
        for name, module in model.named_modules():
            if not isinstance(module, Linear4bit):
                continue
            found, weight, key = True, module.get_base_layer().weight, name.removeprefix(prefix) + ".weight"
            if key not in where:
                raise ConfigError("adapter.init", f"loftq needs {key}'s 16-bit weight, which {checkpoint}'s "
                                                  "safetensors files do not hold")
            w = files[where[key]].get_tensor(key).to(weight.device, torch.float32)
            error = w - bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
            u, s, vh = torch.linalg.svd(error, full_matrices=False)
            r, scaling = module.r["default"], module.scaling["default"]
            root = (s[:r] / scaling).sqrt()  # B A = U_r S_r V_r^T / scaling
            module.lora_A["default"].weight.copy_(root[:, None] * vh[:r])
            module.lora_B["default"].weight.copy_(u[:, :r] * root)
    if not found:
        raise ConfigError("adapter.init", "loftq found no 4-bit bitsandbytes layer among the adapted ones")


def count_params(model: torch.nn.Module) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable}
