"""`python -m qlab.run <overrides>`: one measured QLoRA run, or a sweep with `-m`.

The pipeline of ARCHITECTURE.md, as plain calls:
  validate -> data.read -> models.load -> adapters.attach -> data.build -> optim.build
  -> train.train (inside measure.* trackers) -> train.evaluate -> track.RunRecorder.finish

Exit codes of a single run: 0 ok, 1 failed, 2 invalid config or data, 3 out of memory.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from omegaconf import DictConfig

from qlab import config as qconfig

log = logging.getLogger("qlab")
EXIT = {"ok": 0, "failed": 1, "invalid": 2, "oom": 3}


def run_one(cfg: DictConfig) -> dict:
    """Run one configuration in this process and return its result (also written to disk).
    Raises ConfigError / DataError, before anything is loaded, for bad input."""
    import psutil

    from qlab.run import data
    from qlab.results import store

    t_start = time.perf_counter()
    # process start -> here: interpreter, imports, Hydra compose (the fixed cost of isolation)
    startup_s = time.time() - psutil.Process().create_time()
    qconfig.validate(cfg)
    raw = data.read(cfg.data)  # a malformed line fails here, before any model loads
    recorder = store.RunRecorder(cfg)
    recorder.start()
    log.info("run %s -> %s", recorder.id, recorder.final_dir)
    metrics: dict = {"startup_s": startup_s}
    try:
        status, error = _pipeline(cfg, raw, recorder, metrics)
    except Exception as e:  # outside the loop: loading, adapters, data, optimizer, eval
        import torch

        from qlab.run.loop import error_record

        oom = isinstance(e, torch.OutOfMemoryError)
        status, error = ("oom" if oom else "failed"), error_record(e, with_traceback=not oom)
        log.error("run %s %s: %s: %s", recorder.id, status, error["type"], error["message"])
    metrics["wall_time_s"] = time.perf_counter() - t_start
    return recorder.finish(status, metrics, error)


def setup(cfg: DictConfig, raw, metrics: dict):
    """Everything before the optimizer, shared by qlab's loop and the HF Trainer worker
    (experiments/speed_bench.py): device, load + quantize, the k-bit preparation, adapters,
    compiled layers, data. Records what it measures into `metrics`; returns
    (device, peft model, weight bytes after preparation, batches)."""
    from transformers import set_seed

    from qlab.run import adapters, data, models, speed

    set_seed(cfg.seed)
    device = models.resolve_device(cfg.train.device)
    models.cap_device_memory(device, cfg.train.max_device_memory_gib)
    loaded = models.load(cfg.model, cfg.quant, device)
    metrics.update(loaded.weight_bytes)
    metrics["load_time_s"] = loaded.load_time_s
    if cfg.model.get("base"):  # a base built here: which build's weights (base.weights_sha256)
        from qlab.reference import pretrain

        metrics["base_weights_sha256"] = pretrain.weights_sha256(loaded.path)
    metrics["total_params"] = sum(
        p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
        for p in loaded.model.parameters()
    )
    quantized = cfg.quant.type != "bf16"
    models.prepare_for_training(loaded.model, quantized, cfg.train.gradient_checkpointing,
                                upcast=cfg.speed.upcast_non_quantized)
    prepared = models.weight_bytes(loaded.model)  # the recipe up-casts non-quantized weights
    metrics["weight_bytes_after_prepare"] = prepared["weight_bytes"]
    # seed right before the adapters draw their initial weights: loading may have consumed
    # random numbers (building a preset the first time does), which must not change the run
    set_seed(cfg.seed)
    model, targets = adapters.attach(loaded.model, cfg.adapter)
    metrics["compiled_layers"] = speed.compile_layers(model, cfg.speed)
    metrics.update(adapters.count_params(model))
    metrics["lora_target_modules"] = targets
    batches = data.build(raw, cfg.data, loaded.tokenizer, cfg.train.batch_size, cfg.seed)
    metrics.update({f"data_{k}": v for k, v in batches.stats.items()})
    return device, model, prepared, batches


def _pipeline(cfg: DictConfig, raw, recorder, metrics: dict):
    t_setup = time.perf_counter()
    import torch

    from qlab.run import loop, models, optim

    device, model, prepared, batches = setup(cfg, raw, metrics)
    opt, sched = optim.build(cfg.optim, list(model.parameters()), device)
    metrics["optimizer_class"] = type(opt).__name__
    metrics["optimizer_state_location"] = optim.state_location(cfg.optim.name, device)
    metrics["compute_dtype"] = str(models.compute_dtype(cfg.quant, device)).replace("torch.", "")
    metrics["device"] = device

    # everything before the first step: imports, load + quantize, prepare, adapters, data, optimizer
    metrics["setup_s"] = time.perf_counter() - t_setup
    t_train = time.perf_counter()
    outcome = loop.train(model, batches, opt, sched, cfg, device, recorder.log_step, recorder.id)
    metrics.update(outcome.metrics)
    if outcome.profile:
        (recorder.dir / "profile.txt").write_text(outcome.profile)
    record_memory(cfg, device, model, prepared, optim.measured_state_bytes(opt), metrics)
    if outcome.status != "ok":
        return outcome.status, outcome.error
    metrics["train_s"] = time.perf_counter() - t_train
    t_eval = time.perf_counter()
    metrics.update(loop.evaluate(model, batches, cfg, device))
    metrics["eval_s"] = time.perf_counter() - t_eval
    if cfg.train.save_adapter:
        model.save_pretrained(recorder.dir / "adapter")
    del opt, model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return "ok", None


def record_memory(cfg: DictConfig, device: str, model, prepared: dict, state: dict, metrics: dict) -> None:
    """After the steps: the optimizer state (`state`: optim.measured_state_bytes), what the peak is
    made of (measure.memory_breakdown) and the analytic model's prediction beside the measurement;
    qlab's loop and the HF Trainer worker (experiments/speed_bench.py) record the same."""
    from qlab.run import measure

    metrics["optimizer_state_bytes"] = sum(state.values())
    _predicted_vs_measured(cfg, device, metrics)
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    vocab = model.get_output_embeddings().weight.shape[0]
    logits = metrics.get("max_tokens_per_step", 0) * vocab * 4  # float32 logits of the largest batch
    metrics["memory_breakdown"] = measure.memory_breakdown(
        prepared, adapter_bytes, state, logits, metrics.get("peak_allocated_bytes"))


# measured key -> predicted key of qlab.estimate; all but the peak are exact predictions
COMPARED = {"weight_bytes": "weight_bytes", "quant_state_bytes": "quant_state_bytes",
            "weight_bytes_after_prepare": "weight_bytes_after_prepare", "trainable_params": "trainable_params",
            "optimizer_state_bytes": "optimizer_state_bytes", "peak_allocated_bytes": "device_bytes"}


def _predicted_vs_measured(cfg: DictConfig, device: str, metrics: dict) -> None:
    """Record the analytic model's prediction beside what the run measured. A prediction that
    cannot be made (an architecture the model does not know) is noted, never fatal."""
    from qlab.claims import estimate

    try:
        predicted = estimate.estimate_for_config(cfg, device).as_metrics()
    except Exception as e:
        metrics["predicted_error"] = f"{type(e).__name__}: {e}"
        return
    metrics["predicted"] = predicted
    metrics["predicted_vs_measured"] = {
        key: {"predicted": predicted[p], "measured": metrics[key]} for key, p in COMPARED.items() if key in metrics}


def single(cfg: DictConfig) -> int:
    from qlab.run.data import DataError

    try:
        result = run_one(cfg)
    except (qconfig.ConfigError, DataError) as e:
        log.error("invalid input, nothing was run: %s", e)
        return EXIT["invalid"]
    m = result["metrics"]
    log.info("status=%s weight=%.1f MiB tokens/s=%s eval_loss=%s -> %s", result["status"],
             m.get("weight_bytes", 0) / 2**20, _fmt(m.get("tokens_per_s")), _fmt(m.get("eval_loss")),
             result["run_id"])
    return EXIT[result["status"]]


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"
