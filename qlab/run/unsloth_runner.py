"""runner=unsloth: Unsloth's model (FastLanguageModel) trained by qlab's step, an arm of task=compare.

Unsloth loads and adapts the model itself: nf4+DQ in bitsandbytes with bf16 compute, LoRA on every
linear layer without dropout or bias (its fast LoRA path; config.UNSLOTH_FIXED holds a config to
that), its own offloading checkpointing (use_gradient_checkpointing="unsloth"), RMSNorm, RoPE,
SwiGLU and cross-entropy kernels (LLaMA's; BLOOM, which it has no kernels for, goes through its
generic FastModel path, compiled modules). Everything else is qlab's, as for every arm: the same batches
(qlab's tokenizer and data.build), paged AdamW 32-bit from optim.build, and loop.Stepper's step
(forward under bf16 autocast, as the Trainer's bf16=True, backward, clip, optimizer step),
device-timed. Unsloth patches transformers when imported, so it is imported first, before
transformers, in a comparison worker of its own (FIRST_IMPORTS, ENV: qlab/tasks/arm_worker.py),
never in a training run. Install: pip install qlab[unsloth] (docs/speed.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from qlab.results import store
from qlab.run import data, models
from qlab.run.adapters import linear_leaf_names
from qlab.run.device import resolve_device
from qlab.run.loop import Stepper  # noqa: F401  (qlab's step; probe_layers leaves Unsloth's checkpointing be)

FIRST_IMPORTS = ("unsloth",)  # before transformers, peft, trl: Unsloth patches them when imported
# Offline, no statistics download per load (unsloth otherwise tries one), no silent CPU backend on a
# GPU machine; its generated sources go to its working directory, the worker's scratch directory
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "UNSLOTH_DISABLE_STATISTICS": "1", "UNSLOTH_DISABLE_CPU_FALLBACK": "1", "WANDB_DISABLED": "true"}
SCRATCH_ENV = "UNSLOTH_COMPILE_LOCATION"  # set to <scratch>/unsloth_compiled_cache by the worker


@dataclass
class Setup:  # what the comparison's worker reads of tasks/train.Setup
    device: str
    model: torch.nn.Module
    batches: data.Data
    metrics: dict


def setup(cfg, raw: data.RawData) -> Setup:
    """Unsloth's 4-bit model with its LoRA adapters, and qlab's batches from qlab's tokenizer."""
    from transformers import AutoTokenizer, set_seed
    from unsloth import FastLanguageModel

    device = resolve_device(cfg.train.device)
    if not device.startswith("cuda"):
        raise RuntimeError(f"runner=unsloth needs a CUDA device; this arm's is {device}")
    path = models.model_path(cfg.model, device)
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    model, _ = FastLanguageModel.from_pretrained(path, load_in_4bit=True, dtype=torch.bfloat16,
                                                 max_seq_length=cfg.data.max_seq_len, local_files_only=True,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    load_s = time.perf_counter() - t0
    total = models.param_count(model)  # the base's weights, as every arm counts them (MFU's N)
    weights = models.weight_bytes(model)
    # every linear layer but the output head (q/k/v/o/gate/up/down_proj for LLaMA): all_linear's targets
    targets = sorted(linear_leaf_names(model))
    set_seed(cfg.seed)
    model = FastLanguageModel.get_peft_model(model, r=cfg.adapter.r, lora_alpha=cfg.adapter.alpha, lora_dropout=0,
                                             target_modules=targets, bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=cfg.seed)
    FastLanguageModel.for_training(model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    batches = data.build(raw, cfg.data, tokenizer, cfg.train.batch_size, cfg.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics = {"load_time_s": load_s, "total_params": total, "trainable_params": trainable,
               **weights, "lora_target_modules": targets, "compiled_layers": 0,
               **store.versions_of("unsloth", "unsloth_zoo", "trl")}
    return Setup(device, model, batches, metrics)
