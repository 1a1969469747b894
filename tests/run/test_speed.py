"""Speed switches keep the numerics: each switch's loss curve matches the recipe's."""

import json

import pytest
import torch

from qlab.run import adapters, data, models, speed
from qlab import tasks

# dropout off: with it, a switch that changes the order of random draws changes the curve too
# fixed 4 x 48 shapes: one compilation for the compiled arm, cheap steps for all
CURVE = ["train.steps=24", "train.warmup_steps=1", "optim.lr=3e-3", "data.max_seq_len=48", "data.pad_to=max_seq_len",
         "train.save_adapter=false", "adapter.dropout=0", "data.max_eval_samples=8"]


def curve(compose, tmp_path, *overrides):
    from qlab.results import store

    cfg = compose(*CURVE, *overrides)
    assert tasks.single(cfg) == 0
    metrics = store.run_dir(cfg) / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bloom"])
def test_chunked_loss_equals_the_models_loss_and_gradients(compose, model):
    cfg = compose(f"model={model}", "adapter.dropout=0", "data.max_seq_len=64")
    loaded = models.load(cfg.model, cfg.quant, "cpu")
    models.prepare_for_training(loaded.model, True, True)
    m, _ = adapters.attach(loaded.model, cfg.adapter)
    batch = next(data.build(data.read(cfg.data), cfg.data, loaded.tokenizer, 4, 0).train_batches())
    m.train()
    lora = [p for p in m.parameters() if p.requires_grad]
    full = m(**batch).loss
    g_full = torch.autograd.grad(full, lora)
    chunked = speed.chunked_loss(m, batch, chunk_tokens=7)  # odd chunks: the last one is short
    g_chunked = torch.autograd.grad(chunked, lora)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    for a, b in zip(g_full, g_chunked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _step(compose, checkpointing: bool, compile_backend: str | None):
    """One forward + backward of the tiny model: (loss, LoRA gradients, bytes autograd saved)."""
    from omegaconf import OmegaConf

    torch._dynamo.reset()
    cfg = compose("adapter.dropout=0", "data.max_seq_len=48", "data.pad_to=max_seq_len")
    loaded = models.load(cfg.model, cfg.quant, "cpu")
    models.prepare_for_training(loaded.model, True, checkpointing)
    torch.manual_seed(0)  # the same LoRA initialization in every arm
    m, _ = adapters.attach(loaded.model, cfg.adapter)
    if compile_backend:
        n = speed.compile_layers(m, OmegaConf.create({"compile": "layers", "compile_backend": compile_backend,
                                                      "compile_mode": "default"}))
        assert n == loaded.model.config.num_hidden_layers
    batch = next(data.build(data.read(cfg.data), cfg.data, loaded.tokenizer, 4, 0).train_batches())
    m.train()
    lora = [p for p in m.parameters() if p.requires_grad]
    torch.autograd.grad(m(**batch).loss, lora)  # the first call compiles
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        loss = m(**batch).loss
    return loss.item(), torch.autograd.grad(loss, lora), sum(saved), m


def test_compiled_layers_checkpoint_inside_the_compiled_code(compose):
    """speed.compile=layers owns the checkpoint: the compiled layer's backward replays it with the
    eager run's gradients, and it is real (the forward saves fewer bytes than the same compiled
    layers without checkpointing). aot_eager runs AOTAutograd's partitioner, where the checkpoint
    failed on the H200 (transformers 5.17), without inductor, which bitsandbytes' CPU kernel breaks."""
    eager_loss, eager_grads, eager_saved, _ = _step(compose, True, None)
    loss, grads, saved, m = _step(compose, True, "aot_eager")
    _, _, unckpt_saved, _ = _step(compose, False, "aot_eager")
    layers = [x for x in m.modules() if hasattr(x, "qlab_checkpoint")]
    assert layers and all(x.qlab_checkpoint and not x.gradient_checkpointing for x in layers)
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert saved < 0.8 * unckpt_saved
    assert saved == pytest.approx(eager_saved, rel=0.25)  # about what eager checkpointing keeps


def test_switch_curves_match_the_recipe(compose, tmp_path):
    recipe = curve(compose, tmp_path)
    chunked = curve(compose, tmp_path, "speed.loss=chunked", "speed.loss_chunk_tokens=16")
    # tracing bitsandbytes layers is slow on a CPU: the compiled arm runs the first 6 steps (aot_eager:
    # AOTAutograd's partitioner and the checkpoint as it runs under inductor, without inductor's codegen)
    compiled = curve(compose, tmp_path, "speed.compile=layers", "speed.compile_backend=aot_eager", "train.steps=6")
    assert len(recipe) == len(chunked) == 24 and len(compiled) == 6
    assert chunked == pytest.approx(recipe, abs=1e-3)  # same math, another summation order
    assert compiled == pytest.approx(recipe[:6], abs=1e-3)
    assert sum(recipe[-8:]) < sum(recipe[:8])  # and it learns


def test_bf16_switches_stay_close_to_the_bf16_recipe(compose, tmp_path):
    """In bf16 compute (the GPU setting, slow but exact to emulate on a CPU): no up-cast and
    autocast adapters track the recipe's curve within 2% over the last 8 steps."""
    bf16 = ["quant.compute_dtype=bfloat16"]
    recipe = curve(compose, tmp_path, *bf16)
    no_upcast = curve(compose, tmp_path, *bf16, "speed.upcast_non_quantized=false")
    autocast = curve(compose, tmp_path, *bf16, "speed.adapter_autocast=true")
    tail = lambda c: sum(c[-8:]) / 8  # noqa: E731
    assert tail(no_upcast) == pytest.approx(tail(recipe), rel=0.02)
    assert tail(autocast) == pytest.approx(tail(recipe), rel=0.02)


def test_switches_are_recorded_and_validated(compose):
    from qlab.config import ConfigError, validate

    cfg = compose("speed=fast")
    assert cfg.speed.loss == "chunked" and cfg.speed.compile == "layers" and not cfg.speed.upcast_non_quantized
    for bad, key in (("speed.compile=everything", "speed.compile"), ("speed.loss=fused", "speed.loss"),
                     ("speed.loss_chunk_tokens=0", "speed.loss_chunk_tokens")):
        with pytest.raises(ConfigError) as e:
            validate(compose(bad))
        assert e.value.key == key


def test_compiled_layers_take_the_torch_compile_mode_and_graphs_mark_each_step(compose, monkeypatch):
    """speed.compile_mode reaches torch.compile (default: no mode, inductor's own); under CUDA graphs
    every step first marks its start, so the graphs' outputs of the step before may be reused."""
    from omegaconf import OmegaConf

    seen, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw["mode"]) or fn)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    cfg = compose("adapter.dropout=0")
    model = models.load(cfg.model, cfg.quant, "cpu").model
    layers = model.config.num_hidden_layers
    for mode, want in (("default", None), ("reduce-overhead", "reduce-overhead")):
        c = OmegaConf.create({"compile": "layers", "compile_backend": "inductor", "compile_mode": mode})
        assert speed.compile_layers(model, c) == layers and seen[-layers:] == [want] * layers
        speed.begin_step(c)
    assert marks == [1]  # the default mode marks nothing


def test_compile_counts_name_the_graphs_and_their_breaks(compose):
    """A compiled run records how many graphs torch.compile made and how often it broke a layer's
    graph; cudagraph_skips only under CUDA graphs; nothing without compiled layers."""
    from omegaconf import OmegaConf

    from torch._dynamo.utils import counters

    def cfg(compile, mode="default"):
        return OmegaConf.create({"compile": compile, "compile_backend": "inductor", "compile_mode": mode})

    counters.clear()
    counters["stats"]["unique_graphs"] += 2
    counters["graph_break"]["a reason"] += 3
    counters["inductor"]["cudagraph_skips"] += 1
    assert speed.compile_counts(cfg("none")) == {}
    assert speed.compile_counts(cfg("layers")) == {"compile_graphs": 2, "compile_graph_breaks": 3}
    assert speed.compile_counts(cfg("layers", "reduce-overhead"))["cudagraph_skips"] == 1
    counters.clear()
