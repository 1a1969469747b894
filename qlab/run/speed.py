"""Speed switches of the training step, each an ablation axis (conf/speed/), never silent: the
recipe's float32 up-cast of non-quantized weights, the forward under torch.autocast, torch.compile
per decoder layer, and a chunked loss over the target positions only (no full float32 logits:
for BLOOM 4 x 512 positions x 250,880 tokens x 4 B = 2.05 GB per step). docs/speed-switches.md.
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
    """Compile every decoder layer in place as torch.compile(checkpoint(forward)); returns how many.
    qlab, not transformers, checkpoints these layers (`qlab_checkpoint` on, `gradient_checkpointing`
    off): a compiled layer checkpointed from outside breaks backward's replay."""
    if speed_cfg.compile == "none":
        return 0
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.qlab_checkpoint, layer.gradient_checkpointing = layer.gradient_checkpointing, False
        layer.forward = torch.compile(_checkpointed(layer, layer.forward), backend=speed_cfg.compile_backend,
                                      mode=None if speed_cfg.compile_mode == "default" else speed_cfg.compile_mode,
                                      dynamic=False)
    return len(layers)


def begin_step(speed_cfg) -> None:
    """Under CUDA graphs a new step begins here: the graphs' outputs of the step before (held in
    their memory pool) may be overwritten from now on. Without this mark torch has to guess the
    step's start from the order of forwards and backwards."""
    if speed_cfg.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def compile_counts(speed_cfg) -> dict:
    """What torch.compile made of the compiled layers in this process so far: its graphs, its graph
    breaks (each splits a layer into more graphs, with eager code between them) and, under CUDA
    graphs, the graphs inductor ran without them (cudagraph_skips; the reason is in the log)."""
    if speed_cfg.compile == "none":
        return {}
    from torch._dynamo.utils import counters

    out = {"compile_graphs": counters["stats"]["unique_graphs"],
           "compile_graph_breaks": sum(counters["graph_break"].values())}
    if speed_cfg.compile_mode == "reduce-overhead":
        out["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    return out


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
    """A selective-checkpoint policy of MUST_RECOMPUTE for every op: the layer keeps only its inputs
    for backward, as eager checkpointing does, where inductor's partitioner would save activations."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(lambda ctx, op, *args, **kwargs: CheckpointPolicy.MUST_RECOMPUTE)


def chunked_loss(model: torch.nn.Module, batch: dict, chunk_tokens: int) -> torch.Tensor:
    """The causal-LM loss (mean over target tokens) without full logits: the decoder's hidden
    states at positions whose next token is a target go through the output head
    `chunk_tokens` rows at a time, each chunk checkpointed (its logits are recomputed in
    backward instead of stored). Equal to the model's own loss up to float rounding."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
    decoder, head = base.get_decoder(), base.get_output_embeddings()
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
