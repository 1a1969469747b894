"""Result files as a real run writes them, with chosen numbers, for the report's and frame's tests."""

import json
import math

GiB = 2**30


def fake_run(root, quant="nf4", dq=False, optim="paged_adamw_32bit", adapter="all_linear", seed=0, status="ok",
             peak=10.0, tps=1000.0, eval_loss=1.0, train_loss=2.0, steps=10, gpu="Fake GPU 80GB", wandb=False,
             sweep="syn", runs_per_gpu=1, model=None, env=None, quant_cfg=None, adapter_cfg=None):
    """Write <root>/<run id>/result.json + metrics.jsonl as a real run would, with these numbers:
    peak = NVML device peak in GiB (torch's peak allocated is 1 GiB less), tps = tokens/s with
    2,048 tokens/step and a step-time CI of +-10% of the mean step time. `model`: the stored model
    config; by default a pretrained checkpoint (a random-init preset: {"name": "tiny", "preset": "tiny"}).
    `env`: versions and hardware to change in the recorded environment. `quant_cfg`, `adapter_cfg`:
    keys added to the stored quant and adapter configs (backend, blocksize; init, dora), which a
    result from before them lacks."""
    model = model or {"name": "tiny", "preset": None, "name_or_path": "/models/tiny"}
    q = quant + ("-dq" if dq else "")
    extra = "".join(f"-{v}" for v in (*(quant_cfg or {}).values(), *(adapter_cfg or {}).values()))
    run_id = f"{model['name']}_{q}_{optim}_{adapter}{extra}_s{seed}_{steps}{gpu[:1]}"
    step_time = 2048 / tps
    metrics = {} if status == "failed" else {
        "weight_bytes": 4 * GiB, "quantized_weight_bytes": 3 * GiB, "quant_state_bytes": GiB // 4,
        "unquantized_weight_bytes": 3 * GiB // 4, "weight_bytes_after_prepare": 4 * GiB + 3 * GiB // 4,
        "trainable_params": 1_000_000, "total_params": 7_000_000_000, "lora_target_modules": ["q_proj", "v_proj"],
        "nvml_peak_device_used_bytes": int(peak * GiB), "peak_allocated_bytes": int((peak - 1) * GiB),
        "rss_peak_bytes": GiB, "optimizer_state_bytes": 8_000_000, "optimizer_state_location": "managed",
    }
    if status == "ok":
        metrics.update(tokens_per_s=tps, step_time_mean_s=step_time, step_time_ci95_low_s=0.9 * step_time,
                       step_time_ci95_high_s=1.1 * step_time, train_loss_first=5.0, train_loss_final=train_loss,
                       eval_loss=eval_loss, eval_perplexity=math.exp(eval_loss), steps_completed=steps)
    error = None
    if status == "oom":
        error = {"type": "OutOfMemoryError", "message": "CUDA out of memory. Tried to allocate 2 GiB", "traceback": ""}
    elif status == "failed":
        error = {"type": "RuntimeError", "message": "boom\nsecond line", "traceback": "..."}
    result = {
        "schema": "qlab.result/1", "run_id": run_id, "sweep": sweep, "status": status, "error": error,
        "axes": {"model": model["name"], "quant": quant, "double_quant": dq, "optim": optim, "adapter": adapter,
                 "seed": seed},
        "metrics": metrics,
        "config": {"model": model, "quant": {"type": quant, "double_quant": dq, **(quant_cfg or {})},
                   "adapter": {"targets": adapter, "r": 8, **(adapter_cfg or {})}, "optim": {"name": optim, "lr": 2e-4},
                   "data": {"name": "chat", "max_seq_len": 512, "pad_to": "max_seq_len", "max_eval_samples": 16},
                   "train": {"steps": steps, "warmup_steps": 1, "batch_size": 4, "device": "cuda", "progress": False},
                   "tracker": {"results_dir": str(root.parent), "sweep": sweep, "wandb": wandb,
                               "wandb_mode": "offline", "wandb_project": "qlab-test", "wandb_entity": None},
                   "seed": seed, "force": False, "experiment": None},
        "env": {"python": "3.11", "torch": "2.x", "transformers": "5", "peft": "0.1", "bitsandbytes": "0.5",
                "cuda": "13.0", "cpu": "Fake CPU", "gpu": gpu, "gpu_count": 1, "driver": "1.0",
                "runs_per_gpu": runs_per_gpu, **(env or {})},
        "git_commit": "abc123", "seed": seed, "started_at": "2026-01-01T00:00:00+00:00",
        "finished_at": "2026-01-01T00:01:00+00:00",
    }
    d = root / run_id
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(result))
    if status != "failed":
        n = 5
        with open(d / "metrics.jsonl", "w") as f:
            for step in range(n):  # loss falls linearly from 5.0 to train_loss
                f.write(json.dumps({"step": step, "loss": 5.0 + (train_loss - 5.0) * step / (n - 1), "lr": 2e-4,
                                    "tokens": 2048, "real_tokens": 900, "target_tokens": 300}) + "\n")
    return run_id
