"""Speed switches of the training step, each an ablation axis (conf/speed/), never silent.

  upcast_non_quantized  true: the QLoRA recipe (peft's prepare_model_for_kbit_training casts
                        every non-quantized weight — embeddings, norms, head — to float32, so
                        hidden states and attention run in float32); false: they stay in the
                        compute dtype (norms still compute in float32 inside, outputs in bf16)
  adapter_autocast      run the forward under torch.autocast(compute dtype): the float32 LoRA
                        weights stay the optimizer's master copies, their GEMMs run in bf16 on
                        tensor cores (a no-op when the compute dtype is float32)
  compile               none | layers: torch.compile each decoder layer of the peft-wrapped model,
                        its activation checkpoint inside the compiled code (compile_layers),
                        `compile_backend` inductor by default
  loss                  full: the model's own loss over full float32 logits [batch, seq, vocab];
                        chunked: logits only for the target positions, `loss_chunk_tokens` at a
                        time, each chunk recomputed in backward, so full logits never exist
                        (BLOOM's 250,880-token vocabulary: 4 x 512 x 250,880 x 4 B = 2.05 GB
                        of float32 logits, more with their gradient, per step)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlab.run.data import IGNORE_INDEX


def autocast(speed_cfg, device: str, dtype: torch.dtype):
    enabled = bool(speed_cfg.adapter_autocast) and dtype != torch.float32
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype, enabled=enabled)


def compile_layers(model: torch.nn.Module, speed_cfg) -> int:
    """Compile every decoder layer in place, its activation checkpoint inside the compiled code;
    returns how many were compiled.

    Each layer's `forward` becomes torch.compile(checkpoint(forward)): torch.compile traces
    torch.utils.checkpoint as a higher-order op and recomputes the layer in backward, every op of
    it (recompute_everything; torchtitan compiles its checkpointed blocks the same way). qlab
    takes checkpointing over from transformers for these layers (`gradient_checkpointing` off,
    `qlab_checkpoint` on) because transformers up to 5.17 checkpoints the module call from
    outside: the compiled code
    then ran inside a checkpoint, and backward's replay saved other tensors than the forward had
    (CheckpointError on an H200 with transformers 5.17 and torch 2.11, every step; the record is in
    results/logs/2026-11-28-h200x4-call1/). Transformers 5.24 checkpoints inside `forward`,
    which this replaces, so both versions run the same compiled, checkpointed code."""
    if speed_cfg.compile == "none":
        return 0
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.qlab_checkpoint, layer.gradient_checkpointing = layer.gradient_checkpointing, False
        layer.forward = torch.compile(_checkpointed(layer, layer.forward),
                                      backend=speed_cfg.compile_backend, dynamic=False)
    return len(layers)


def _checkpointed(layer: torch.nn.Module, forward):
    """`forward`, non-reentrantly checkpointed while `layer` trains with gradients on (what
    transformers' own wrapper does; the KV cache is off in training: models.load), every op
    recomputed in backward (recompute_everything)."""
    def run(*args, **kwargs):
        if layer.qlab_checkpoint and layer.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, context_fn=recompute_everything, **kwargs)
        return forward(*args, **kwargs)
    return run


def recompute_everything():
    """A selective-checkpoint policy of MUST_RECOMPUTE for every op: the layer keeps only its
    inputs for backward, as eager checkpointing does. Without it, inductor's partitioner treats the
    checkpoint as a preference and saves activations it finds cheaper to keep than to recompute.
    On the llama-7b shape (batch 4 x 512, nf4, bf16 hidden states, an H200): one step of
    experiments/compile_probe.py saved 9.6 GiB for backward with the partitioner's choice, 4.9 GiB
    with this policy and 1.3 GiB eager (the compiled counts include the 3.6 GiB of 4-bit weights a
    compiled graph saves by reference); over the speed bench's measured steps the fast mode's torch
    peak was 10.22 GiB with the partitioner's choice and 5.75 GiB with this policy (the recipe's:
    6.74 GiB), at 1.7-2.1x the Trainer's tokens/s either way (results/speed-bench/)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(lambda ctx, op, *args, **kwargs: CheckpointPolicy.MUST_RECOMPUTE)


def _head_and_decoder(model: torch.nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def chunked_loss(model: torch.nn.Module, batch: dict, chunk_tokens: int) -> torch.Tensor:
    """The causal-LM loss (mean over target tokens) without full logits: the decoder's hidden
    states at positions whose next token is a target go through the output head
    `chunk_tokens` rows at a time, each chunk checkpointed (its logits are recomputed in
    backward instead of stored). Equal to the model's own loss up to float rounding."""
    decoder, head = _head_and_decoder(model)
    # a padded batch has attention_mask, a packed row (data.pack) position_ids instead
    masks = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    hidden = decoder(input_ids=batch["input_ids"], **masks).last_hidden_state
    labels = batch["labels"][:, 1:].reshape(-1)  # position t predicts token t+1
    keep = labels != IGNORE_INDEX
    h, y = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep], labels[keep]

    def piece(h_chunk, y_chunk):
        return F.cross_entropy(head(h_chunk).float(), y_chunk, reduction="sum")

    total = sum(checkpoint(piece, h[i:i + chunk_tokens], y[i:i + chunk_tokens], use_reentrant=False)
                for i in range(0, len(y), chunk_tokens))
    return total / max(1, len(y))


def loss_fn(speed_cfg):
    """`fn(model, batch) -> loss` for the configured loss."""
    if speed_cfg.loss == "chunked":
        return lambda model, batch: chunked_loss(model, batch, speed_cfg.loss_chunk_tokens)
    return lambda model, batch: model(**batch).loss
