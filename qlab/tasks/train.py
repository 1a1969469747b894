"""task=train: one measured fine-tuning run, the pipeline of ARCHITECTURE.md as plain calls:
  data.read -> models.load -> adapters.attach -> data.build -> optim.build
  -> the runner's loop (inside measure.* trackers) -> loop.evaluate -> the recorder
Each stage returns its values; `run` gathers them into the result's metrics.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from qlab.claims import estimate
from qlab.run import adapters, data, loop, measure, models, optim, speed
from qlab.run.device import resolve_device
from qlab.tasks import Outcome, failure

# train.runner -> the module whose train(model, data, optimizer, scheduler, cfg, device,
# on_step, run_id) -> loop.TrainOutcome runs the steps, and whose Stepper(same arguments) drives
# them in blocks (task=compare); runner=bare (loop.Stepper's plain loop) and runner=unsloth (its own
# setup(), loop.Stepper's step) are a comparison's only. A runner's check(cfg), where it has one,
# says before anything loads what it needs of the machine (ConfigError).
RUNNERS = {"qlab": "qlab.run.loop", "hf_trainer": "qlab.run.hf_trainer", "bare": "qlab.run.loop",
           "unsloth": "qlab.run.unsloth_runner"}


def runner(cfg: DictConfig):
    return importlib.import_module(RUNNERS[cfg.train.runner])


def check_runner(cfg: DictConfig) -> None:
    check = getattr(runner(cfg), "check", None)
    if check is not None:
        check(cfg)


def prepare(cfg: DictConfig):
    """The conversations (a malformed line fails here, before any model loads); a hub id
    that can be neither found in the local cache nor reached fails here too, and so does a runner
    whose stack the machine lacks (Liger without CUDA)."""
    models.check_available(cfg.model)
    check_runner(cfg)
    return data.read(cfg.data)


@dataclass
class Setup:
    device: str
    model: torch.nn.Module  # the peft model
    prepared: dict  # weight bytes after the k-bit preparation (models.weight_bytes)
    batches: data.Data
    metrics: dict
    tokenizer: object = None  # saved beside a full fine-tuning run's weights
    initial_adapter: str | None = None  # a PiSSA adapter as initialized (adapters.save_initial)


def setup(cfg: DictConfig, raw) -> Setup:
    """Everything before the optimizer, shared by every runner: device, load + quantize, the
    k-bit preparation, adapters, compiled layers, data."""
    from transformers import set_seed

    set_seed(cfg.seed)
    device = resolve_device(cfg.train.device)
    models.cap_device_memory(device, cfg.train.max_device_memory_gib)
    loaded = models.load(cfg.model, cfg.quant, device)
    metrics = {**loaded.weight_bytes, "load_time_s": loaded.load_time_s, **models.identity(cfg.model, loaded),
               "total_params": models.param_count(loaded.model)}
    models.prepare_for_training(loaded.model, cfg.quant.type != "bf16", cfg.train.gradient_checkpointing,
                                upcast=cfg.speed.upcast_non_quantized, full=cfg.adapter.targets == "full")
    prepared = models.weight_bytes(loaded.model)  # the recipe up-casts non-quantized weights
    # seed right before the adapters draw their initial weights: loading may have consumed
    # random numbers (building a preset the first time does), which must not change the run
    set_seed(cfg.seed)
    model, targets = adapters.attach(loaded.model, cfg.adapter, loaded.path)
    initial = adapters.save_initial(model, cfg.adapter)
    batches = data.build(raw, cfg.data, loaded.tokenizer, cfg.train.batch_size, cfg.seed)
    metrics.update(weight_bytes_after_prepare=prepared["weight_bytes"],
                   compiled_layers=speed.compile_layers(model, cfg.speed), **adapters.count_params(model),
                   lora_target_modules=targets, **{f"data_{k}": v for k, v in batches.stats.items()})
    return Setup(device, model, prepared, batches, metrics, loaded.tokenizer, initial)


def run(cfg: DictConfig, raw, recorder) -> Outcome:
    t_setup = time.perf_counter()
    metrics: dict = {}
    try:
        s = setup(cfg, raw)
        metrics.update(s.metrics)
        opt, sched = optim.build(cfg.optim, list(s.model.parameters()), s.device)
        metrics.update(optimizer_class=type(opt).__name__, device=s.device,
                       optimizer_state_location=optim.state_location(cfg.optim.name, s.device),
                       compute_dtype=str(models.compute_dtype(cfg.quant, s.device)).replace("torch.", ""),
                       # everything before the first step: imports, load, prepare, adapters, data, optimizer
                       setup_s=time.perf_counter() - t_setup)
        t_train = time.perf_counter()
        outcome = runner(cfg).train(s.model, s.batches, opt, sched, cfg, s.device, recorder.log_step, recorder.id)
        metrics.update(outcome.metrics)
        if outcome.profile:
            (recorder.dir / "profile.txt").write_text(outcome.profile)
        metrics.update(record_memory(cfg, s.device, s.model, s.prepared, optim.measured_state_bytes(opt), metrics))
        if outcome.status != "ok":
            return Outcome(outcome.status, metrics, outcome.error)
        metrics["train_s"] = time.perf_counter() - t_train
        t_eval = time.perf_counter()
        metrics.update(loop.evaluate(s.model, s.batches, cfg, s.device))
        metrics["eval_s"] = time.perf_counter() - t_eval
        if cfg.train.save_adapter and cfg.adapter.targets == "full":  # the weights, loadable as a checkpoint
            s.model.save_pretrained(recorder.dir / "model")
            s.tokenizer.save_pretrained(recorder.dir / "model")
        elif cfg.train.save_adapter:
            adapters.save(s.model, recorder.dir / "adapter", s.initial_adapter)
    except Exception as e:  # outside the loop: loading, adapters, data, optimizer, eval
        return failure(e, metrics)
    return Outcome("ok", metrics)


def record_memory(cfg: DictConfig, device: str, model, prepared: dict, state: dict, metrics: dict) -> dict:
    """After the steps: the optimizer state (`state`: optim.measured_state_bytes), what the peak
    is made of (measure.memory_breakdown) and the analytic model's prediction beside what was
    measured (`metrics`: the run's so far)."""
    out = {"optimizer_state_bytes": sum(state.values())}
    out.update(predicted_vs_measured(cfg, device, {**metrics, **out}))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    vocab = model.get_output_embeddings().weight.shape[0]
    logits = metrics.get("max_tokens_per_step", 0) * vocab * 4  # float32 logits of the largest batch
    # full fine-tuning: what trains is the weights, counted as weights; no adapter, their gradients
    adapter_bytes = 0 if cfg.adapter.targets == "full" else trainable
    out["memory_breakdown"] = measure.memory_breakdown(prepared, adapter_bytes, state, logits,
                                                       metrics.get("peak_allocated_bytes"), gradient_bytes=trainable)
    return out


# measured key -> predicted key of claims.estimate; all but the peak are exact predictions
COMPARED = {"weight_bytes": "weight_bytes", "quant_state_bytes": "quant_state_bytes",
            "weight_bytes_after_prepare": "weight_bytes_after_prepare", "trainable_params": "trainable_params",
            "optimizer_state_bytes": "optimizer_state_bytes", "peak_allocated_bytes": "device_bytes"}


def predicted_vs_measured(cfg: DictConfig, device: str, metrics: dict) -> dict:
    """The analytic model's prediction beside what the run measured. A prediction that cannot be
    made (an architecture the model does not know) is noted, never fatal."""
    try:
        predicted = estimate.estimate_for_config(cfg, device).as_metrics()
    except Exception as e:
        return {"predicted_error": f"{type(e).__name__}: {e}"}
    return {"predicted": predicted, "predicted_vs_measured": {
        key: {"predicted": predicted[p], "measured": metrics[key]} for key, p in COMPARED.items() if key in metrics}}
