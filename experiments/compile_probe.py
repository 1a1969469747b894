"""Does a compiled decoder layer compute what the eager one does, and keep what it keeps? One
batch, one training step.

    python experiments/compile_probe.py                     # tiny-llama on the GPU, nf4 and bf16
    python experiments/compile_probe.py --model llama-7b --quants nf4 --pads max_seq_len --backends inductor \
        speed.upcast_non_quantized=false speed.adapter_autocast=true     # the fast mode's settings

Each arm (eager, `<backend>+ckpt`, inductor without a recompute policy, inductor without
checkpointing) runs one forward + backward; with LoRA's B = 0 the loss is the base model's. Prints
loss, output and gradient differences from eager, the bytes saved for backward and the peak.
Findings: docs/speed-switches.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlab import config  # noqa: E402
from qlab.run import data, measure, models, speed  # noqa: E402
from qlab.tasks import train  # noqa: E402


def arms(backends):
    """(name, compile backend or None, checkpointing: ckpt | partitioner | none) of every arm."""
    return [("eager", None, "ckpt"), *((f"{b}+ckpt", b, "ckpt") for b in backends),
            ("inductor+ckpt, partitioner", "inductor", "partitioner"), ("inductor (no ckpt)", "inductor", "none")]


def uncompile(model):
    for layer in model.modules():
        if hasattr(layer, "qlab_checkpoint"):
            del layer.forward  # the class's forward again
            layer.gradient_checkpointing = layer.qlab_checkpoint
            del layer.qlab_checkpoint


def step(model, batch, cfg, device, dtype):
    outs = []
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    hooks = [m.register_forward_hook(lambda mod, a, out: outs.append(
        (out[0] if isinstance(out, tuple) else out).detach().float().clone())) for m in layers]
    lora = [p for p in model.parameters() if p.requires_grad]
    for p in lora:
        p.grad = None
    saved = []
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        with speed.autocast(cfg.speed, device, dtype):
            loss = speed.loss_fn(cfg.speed)(model, batch)
    loss.backward()
    measure.sync(device)
    for h in hooks:
        h.remove()
    grad = torch.cat([p.grad.flatten().float() for p in lora if p.grad is not None])
    return float(loss), outs, grad, sum(saved), torch.cuda.max_memory_allocated() if cuda else 0


def probe(model_name, quant, pad, backends, overrides, one_row=False):
    cfg = config.compose([f"model={model_name}", "train=gpu", "adapter=all_linear", "adapter.dropout=0",
                          f"data.pad_to={pad}", "data.max_seq_len=512", f"quant={quant}", *overrides])
    raw = data.read(cfg.data)
    s = train.setup(cfg, raw)
    device, model, batches = s.device, s.model, s.batches
    model.train()
    batch = {k: v.to(device) for k, v in next(batches.train_batches()).items()}
    if one_row:  # one conversation, no padding: the mask is all ones (transformers then passes none)
        keep = batch["attention_mask"][0].bool()
        batch = {k: v[:1, keep] for k, v in batch.items()}
    dtype = models.compute_dtype(cfg.quant, device)
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    print(f"\n== {model_name} {quant} pad_to={pad}{' one row' if one_row else ''}: "
          f"batch {tuple(batch['input_ids'].shape)}, {real} real positions")
    ref = None
    plain = speed.checkpoint

    def without_policy(fn, *args, context_fn=None, **kwargs):  # the partitioner chooses what to save
        return plain(fn, *args, **kwargs)

    for name, backend, ckpt in arms(backends):
        uncompile(model)
        torch._dynamo.reset()
        speed.checkpoint = without_policy if ckpt == "partitioner" else plain
        if backend:
            speed.compile_layers(model, config.OmegaConf.merge(cfg.speed, {"compile": "layers",
                                                                           "compile_backend": backend}))
            if ckpt == "none":
                for layer in model.modules():
                    if hasattr(layer, "qlab_checkpoint"):
                        layer.qlab_checkpoint = False
        try:
            loss, outs, grad, saved, peak = step(model, batch, cfg, device, dtype)
        except Exception as e:  # report and go on: the other arms still say something
            print(f"  {name:28s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        if ref is None:
            ref = (loss, outs, grad)
        layer_diff = max((float((a - b).abs().max()) for a, b in zip(outs, ref[1])), default=float("nan"))
        first_bad = next((i for i, (a, b) in enumerate(zip(outs, ref[1]))
                          if float((a - b).abs().max()) > 1e-2 * float(b.abs().max())), None)
        gdiff = float((grad - ref[2]).norm() / ref[2].norm()) if ref[2].norm() > 0 else float("nan")
        print(f"  {name:28s} loss {loss:.5f} (d {loss - ref[0]:+.5f})  max layer-out diff {layer_diff:.3g}"
              f" (first layer off by >1%: {first_bad})  grad rel diff {gdiff:.3g}  "
              f"saved {saved / 2**20:.1f} MiB  peak {peak / 2**20:.0f} MiB", flush=True)
    speed.checkpoint = plain
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--quants", default="nf4,bf16")
    p.add_argument("--pads", default="max_seq_len,longest")
    p.add_argument("--backends", default="aot_eager,inductor")
    p.add_argument("--one-row", action="store_true", help="also one unpadded conversation per (quant, pad)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    for quant in a.quants.split(","):
        for pad in a.pads.split(","):
            probe(a.model, quant, pad, a.backends.split(","), a.overrides)
            if a.one_row and pad == a.pads.split(",")[0]:
                probe(a.model, quant, pad, a.backends.split(","), a.overrides, one_row=True)


if __name__ == "__main__":
    main()
