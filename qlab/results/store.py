"""Results on disk (the source of truth) and, optionally, W&B (a mirror).

Layout: results/<sweep>/<run id>/
  result.json    written once, atomically, when the run ends (ok, oom or failed); its
                 presence with status ok/oom is what "complete" means to a resumed sweep
  metrics.jsonl  one line per step, appended as the run goes (a killed run leaves only this)
  config.yaml    the resolved config, written at start
  adapter/       the LoRA adapter (save_pretrained), when train.save_adapter
  model/         instead, for adapter.targets=full: the fine-tuned weights and tokenizer (a checkpoint)
W&B calls are wrapped: a W&B failure becomes a warning and never costs the local result.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from dataclasses import asdict, dataclass  # noqa: F401  (asdict: callers write Results)
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from qlab.config import PROJECT_ROOT, adapter_label, quant_label, resolve_path
from qlab.reference.transfer import sha256_files as files_sha256  # the identity of weights (and of the corpus)

RESULT = "result.json"
COMPLETE_STATUSES = ("ok", "oom")
CONCURRENCY_ENV = "QLAB_RUN_CONCURRENCY"  # {"runs_per_gpu": R, "gpu_slots": S}, set by qlab.sweep
SCHEMA = "qlab.result/1"
# Keys that do not change what a run measures: excluded from its id.
NON_IDENTITY_KEYS = ("tracker", "force", "experiment", "train.progress", "train.save_adapter",
                     "train.profile_steps")  # profiling leaves what a run measures as it was
# The config a task reads (dotted keys), where it is not everything: the rest never enters its
# id. Training reads every section but the other tasks' own.
TASK_KEYS = {"generate": ("task", "model", "quant", "generate", "seed", "train.device"),
             "compare": ("task", "compare", "seed", "train.device"),
             "eval": ("task", "model", "quant", "eval", "seed", "train.device")}
TASK_SECTIONS = ("generate", "compare", "eval")  # sections that belong to one task each
# Config keys naming a run directory whose weights (adapter, or a fully fine-tuned model), not
# its path, define a run: key -> glob pattern(s) inside that directory
IDENTITY_FILES = {"generate.adapter_run": "adapter/adapter_model.*",
                  "eval.adapter_run": ("adapter/adapter_model.*", "model/*.safetensors")}


@dataclass
class Result:
    """One run's record: result.json, written only by RunRecorder.finish."""

    run_id: str
    kind: str  # the task: train | generate | compare | eval
    sweep: str
    status: str  # ok | oom | failed
    error: Optional[dict]  # {type, message, traceback} unless ok
    axes: dict  # the ablation axes, for tables
    metrics: dict  # unit-suffixed keys: peak_allocated_bytes, tokens_per_s, ...
    config: dict  # the resolved config
    env: dict  # versions and hardware (environment())
    git_commit: Optional[str]
    seed: int
    started_at: str
    finished_at: str
    argv: list
    schema: str = SCHEMA


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# Keys the schema gained after results were committed, each with the value that reproduces how
# runs behaved before the key existed. A run's id hashes its whole config, so a new key changes
# every id; `complete_result` compares configs with these keys at their neutral value left
# out, so growing the schema never orphans earlier results: a resumed sweep still finds them
# complete. Add every new key here with its neutral value; never change an entry.
ADDED_KEYS = {
    "model.base": None,
    "train.max_device_memory_gib": None,
    "speed.upcast_non_quantized": True, "speed.adapter_autocast": False, "speed.compile": "none",
    "speed.compile_backend": "inductor", "speed.loss": "full", "speed.loss_chunk_tokens": 1024,
    "data.pack": False, "data.pack_tokens": None,
    "task": "train", "train.runner": "qlab", "data.pack_budget": "positions",
    "model.gguf": None, "data.source": None,
    "quant.backend": "bitsandbytes", "quant.blocksize": 64, "adapter.init": "gaussian", "adapter.dora": False,
    "speed.liger": False, "speed.compile_mode": "default",
}


def quant_config(config: dict) -> dict:
    """A stored config's quant group with the keys it predates at their neutral values (ADDED_KEYS:
    bitsandbytes, block size 64): the base it really ran with."""
    added = {key.split(".", 1)[1]: v for key, v in ADDED_KEYS.items() if key.startswith("quant.")}
    return {**added, **(config.get("quant") or {})}


def _drop(ident: dict, key: str, only_if=...) -> None:
    """Remove dotted `key` from the nested dict (if its value is `only_if`, when given), then
    any group that removal left empty."""
    *parents, leaf = key.split(".")
    nodes = [ident]
    for p in parents:
        nodes.append(nodes[-1].get(p) if isinstance(nodes[-1].get(p), dict) else {})
    if leaf in nodes[-1] and (only_if is ... or nodes[-1][leaf] == only_if):
        nodes[-1].pop(leaf)
    for parent, name, node in zip(reversed(nodes[:-1]), reversed(parents), reversed(nodes[1:])):
        if node == {} and name in parent:
            parent.pop(name)


def _get(config: dict, key: str):
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _set(config: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[leaf] = value


def identity(config: dict, neutral: bool = False) -> dict:
    """What defines a run: the config its task reads (TASK_KEYS, TASK_SECTIONS) less NON_IDENTITY_KEYS,
    run directories named in it replaced by their weights' hash (IDENTITY_FILES) and, with
    `neutral`, less the ADDED_KEYS at their neutral value."""
    config = json.loads(json.dumps(config))  # a deep copy
    task = config.get("task", "train")
    if task in TASK_KEYS:
        ident: dict = {}
        for key in TASK_KEYS[task]:
            _set(ident, key, _get(config, key))
    else:
        ident = {k: v for k, v in config.items() if k not in TASK_SECTIONS or k == task}
    for key in NON_IDENTITY_KEYS:
        _drop(ident, key)
    for key, pattern in IDENTITY_FILES.items():
        path = _get(ident, key)
        if path:
            patterns = (pattern,) if isinstance(pattern, str) else pattern
            _set(ident, key, files_sha256(sorted(f for p in patterns for f in Path(path).glob(p)))[:16])
    for key, value in (ADDED_KEYS.items() if neutral else ()):
        _drop(ident, key, value)
    return ident


def run_id(cfg: DictConfig) -> str:
    """Readable axes plus a hash of everything that defines the run (tracker settings aside),
    so the same configuration always lands in the same directory and a sweep can resume."""
    ident = identity(OmegaConf.to_container(cfg, resolve=True))
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
    q = quant_tag(cfg.quant)
    if cfg.task == "compare":  # the arms' model, by conf/experiment/speed.yaml's convention
        return f"compare_{cfg.model.name}_{len(cfg.compare.arms)}arms_s{cfg.seed}_{digest}"
    if cfg.task == "generate":
        return f"{cfg.model.name}_{q}_{'lora' if cfg.generate.adapter_run else 'none'}_{digest}"
    if cfg.task == "eval":
        return f"{cfg.model.name}_{q}_{eval_adapter(cfg.eval.adapter_run)}_{digest}"
    adapter = adapter_label(cfg.adapter).lower().replace("+", "-")  # all_linear, all_linear-loftq, qv-dora
    return f"{cfg.model.name}_{q}_{cfg.optim.name}_{adapter}_s{cfg.seed}_{digest}"


def quant_tag(quant) -> str:
    """config.quant_label spelled for a path: nf4-dq, nf4-dq-b128, hqq-int4, torchao-nf4-dq."""
    return quant_label(quant).lower().replace("+", "-").replace(" ", "-").replace("/", "-")


def eval_adapter(run: str | None) -> str:
    """What task=eval runs beside the base: none, a run's LoRA adapter (lora), or the model a full
    fine-tuning run saved in model/ in place of the base (full)."""
    if not run:
        return "none"
    return "full" if (Path(resolve_path(run)) / "model").is_dir() else "lora"


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.tracker.results_dir) / cfg.tracker.sweep / run_id(cfg)


def staging_dir(cfg: DictConfig) -> Path:
    return Path(cfg.tracker.results_dir) / cfg.tracker.sweep / ".staging" / run_id(cfg)


def fresh_dir(final: Path, since: float) -> Path | None:
    """Where the run whose result belongs in `final` wrote it after `since` (epoch seconds): `final`,
    or its staging directory when it failed beside an earlier complete result (`publish`); else None."""
    for directory in (final, final.parent / ".staging" / final.name):
        path = directory / RESULT
        if path.exists() and path.stat().st_mtime >= since:
            return directory
    return None


def fresh_result(cfg: DictConfig, since: float) -> dict | None:
    """The result a run process wrote after `since`, or None (fresh_dir)."""
    directory = fresh_dir(run_dir(cfg), since)
    return read_result(directory) if directory else None


SPEED_PRESETS = Path(PROJECT_ROOT) / "conf" / "speed"
RECIPE = "recipe"  # the speed label that adds nothing to a quant label (the paper's recipe)


def speed_presets(directory: Path = SPEED_PRESETS) -> dict[str, dict]:
    """conf/speed/<name>.yaml -> its switches, the recipe first."""
    files = sorted(Path(directory).glob("*.yaml"), key=lambda p: (p.stem != RECIPE, p.stem))
    return {p.stem: yaml.safe_load(p.read_text()) for p in files}


def speed_label(speed: dict | None, runner: str | None, presets: dict[str, dict]) -> str:
    """A training run's speed path: `trainer` for the HF Trainer's loop (train.runner=hf_trainer, or
    speed.runner in older results; `trainer+liger` with Liger's kernels), `unsloth` for Unsloth's
    model, else the preset whose switches the run's equal (`recipe`, `fast`), else the nearest one
    and what differs: `fast (compile=none)`. No speed block: the recipe."""
    if runner == "unsloth":
        return "unsloth"
    if runner == "hf_trainer" or (speed or {}).get("runner"):
        return "trainer+liger" if (speed or {}).get("liger") else "trainer"
    if not speed:
        return RECIPE
    diffs = {name: {k: speed[k] for k, v in preset.items() if k in speed and speed[k] != v}
             for name, preset in presets.items()}
    name = min(diffs, key=lambda n: len(diffs[n]))  # ties: the recipe first (presets are ordered)
    extra = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in diffs[name].items())
    return f"{name} ({extra})" if extra else name


# The peak a run is judged by, most complete first: NVML's device-used sees the CUDA context and
# paged optimizers' managed memory, torch's counters see neither, a CPU run has only its RSS.
PEAK_SOURCES = (("nvml_peak_device_used_bytes", "NVML device used"),
                ("peak_allocated_bytes", "torch peak allocated"), ("rss_peak_bytes", "process RSS"))


def peak_bytes(metrics: dict) -> tuple[float | None, str | None]:
    """(bytes, source) of a run's peak memory by PEAK_SOURCES; (None, None) if it has none."""
    for key, source in PEAK_SOURCES:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value:
            return float(value), source
    return None, None


def read_result(directory: Path) -> dict | None:
    try:
        return json.loads((Path(directory) / RESULT).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def training_result(result: dict, where: Path) -> dict | None:
    """The result of the training run whose adapter (or saved model) an eval or generation result
    ran with: at the directory its config names (`<task>.adapter_run`) or, where results have moved
    (another machine's results root), at <results root>/<that sweep>/<run id>, the results root being
    the one above `where`'s sweep. None when neither holds a result of that run id."""
    kind = result.get("kind")
    run = ((result.get("config") or {}).get(kind) or {}).get("adapter_run") if kind in TASK_SECTIONS else None
    run_id = (result.get("metrics") or {}).get("adapter_run_id")
    if not run or not run_id:
        return None
    recorded = Path(run)
    for directory in (recorded, Path(where).parent.parent / recorded.parent.name / recorded.name):
        found = read_result(directory)
        if found is not None and found.get("run_id") == run_id:
            return found
    return None


def is_complete(directory: Path) -> bool:
    r = read_result(directory)
    return r is not None and r.get("status") in COMPLETE_STATUSES


def complete_result(cfg: DictConfig) -> Path | None:
    """The directory of a complete result for this configuration: its own run directory, else one in
    the same sweep whose config is the same once the ADDED_KEYS at their neutral value are left out."""
    final = run_dir(cfg)
    if is_complete(final):
        return final
    wanted = identity(OmegaConf.to_container(cfg, resolve=True), neutral=True)
    for path in sorted(final.parent.glob(f"*/{RESULT}")):
        r = read_result(path.parent)
        if (r is not None and r.get("status") in COMPLETE_STATUSES and r.get("kind", "train") == cfg.task
                and identity(r.get("config", {}), neutral=True) == wanted):
            return path.parent
    return None


def atomic_write_json(path: Path, obj) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`:
    a reader (or a kill -9) sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def git_commit() -> str | None:
    """HEAD (+ "-dirty"), or QLAB_GIT_COMMIT where the tree was copied without .git."""
    if os.environ.get("QLAB_GIT_COMMIT"):
        return os.environ["QLAB_GIT_COMMIT"]
    root = Path(PROJECT_ROOT)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def package_version(dist: str) -> str | None:
    """An installed distribution's version, or None."""
    try:
        return version(dist)
    except Exception:
        return None


# the optional packages a run may use, where installed: quant.backend's (hqq, torchao) and a
# comparison's stacks (pyproject's liger and unsloth extras); environment's key -> distribution
OPTIONAL_PACKAGES = {"hqq": "hqq", "torchao": "torchao", "liger_kernel": "liger-kernel", "unsloth": "unsloth",
                     "unsloth_zoo": "unsloth-zoo", "trl": "trl"}


def versions_of(*keys: str) -> dict:
    """`<key>_version` -> version of each installed OPTIONAL_PACKAGES key (what an arm records it ran)."""
    return {f"{key}_version": v for key in keys if (v := package_version(OPTIONAL_PACKAGES[key]))}


def environment() -> dict:
    """Versions and hardware, recorded beside every result."""
    import torch  # lazy, as measure (which imports torch): reading results needs neither

    from qlab.run.measure import sampler_interval_s

    env = {
        "python": platform.python_version(), "torch": torch.__version__,
        **{name: package_version(name) for name in ("transformers", "peft", "bitsandbytes")},
        **{key: v for key, dist in OPTIONAL_PACKAGES.items() if (v := package_version(dist))},
        "cuda": torch.version.cuda, "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "gpu": None, "gpu_count": 0, "driver": None,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "sampler_interval_ms": sampler_interval_s() * 1000,  # the memory sampler's period (0: off)
        # how many runs shared this run's GPU, set by the sweep that launched it (qlab.sweep);
        # a run started on its own was alone: throughput of shared runs is not a solo figure
        **json.loads(os.environ.get(CONCURRENCY_ENV) or '{"runs_per_gpu": 1, "gpu_slots": null}'),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_count"] = torch.cuda.device_count()
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            pass
    return env


def machine_line(env: dict, with_cuda: bool = False) -> str:
    """The hardware and versions an environment() recorded, as the benchmark reports print them:
    "NVIDIA H200; torch 2.11.0+cu130, transformers 5.17.0, peft 0.21.0, bitsandbytes 0.50.2"
    (`with_cuda`: then ", CUDA 13.0, driver 580.159.04")."""
    keys = ("torch", "transformers", "peft", "bitsandbytes") + (("CUDA", "driver") if with_cuda else ())
    versions = ", ".join(f"{k} {env[k.lower()]}" for k in keys if k.lower() in env)
    return f"{env.get('gpu') or env.get('cpu')}" + (f"; {versions}" if versions else "")


def device_slug(env: dict) -> str:
    """A file-name stem for the machine an environment() describes: its GPU, else its CPU
    ("NVIDIA H200" -> nvidia-h200); the benchmark scripts name their result files by it."""
    return re.sub(r"[^a-z0-9]+", "-", (env.get("gpu") or env.get("cpu") or "cpu").lower()).strip("-")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class WandbMirror:
    """Mirrors a run to W&B (offline by default). Every call is guarded."""

    def __init__(self, cfg: DictConfig, directory: Path, name: str):
        self.run = None
        tc = cfg.tracker
        if not tc.wandb or tc.wandb_mode == "disabled":
            return
        try:
            import wandb

            self.run = wandb.init(
                project=tc.wandb_project, entity=tc.wandb_entity, name=name, group=tc.sweep,
                mode=tc.wandb_mode, dir=str(directory), reinit="finish_previous",
                config=OmegaConf.to_container(cfg, resolve=True),
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as e:  # never lose a run to W&B
            warnings.warn(f"W&B init failed, continuing without it: {e}")

    def _guard(self, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:
            warnings.warn(f"W&B call failed, continuing without it: {e}")
            self.run = None

    def log(self, rec: dict) -> None:
        self._guard(lambda: self.run.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"]))

    def finish(self, result: Result) -> None:
        def _finish():
            flat = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str, bool))}
            self.run.summary.update({**flat, "status": result.status})
            self.run.finish(exit_code=0 if result.status in COMPLETE_STATUSES else 1)

        self._guard(_finish)


def publish(staging: Path, final: Path, status: str) -> Path:
    """Move a finished attempt's directory from `staging` to `final` by renames (a reader sees the old
    result or the new one); a failed attempt never replaces a complete result: it stays in `staging`."""
    if status not in COMPLETE_STATUSES and is_complete(final):
        warnings.warn(f"attempt failed; keeping the earlier complete result in {final}, "
                      f"the failed attempt is in {staging}")
        return staging
    if final.exists():
        old = final.parent / ".staging" / f"{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old)
    else:
        os.replace(staging, final)
    return final


class RunRecorder:
    """Owns one run for its length: it writes into results/<sweep>/.staging/<run id>/, published to
    results/<sweep>/<run id>/ when it ends (`publish`), so a killed run never looks complete."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.id = run_id(cfg)
        self.final_dir = run_dir(cfg)
        self.dir = staging_dir(cfg)
        self.started_at = now()

    def start(self) -> None:
        if self.dir.exists():  # debris of a killed attempt
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        (self.dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        self.metrics_file = open(self.dir / "metrics.jsonl", "a", buffering=1)
        self.wandb = WandbMirror(self.cfg, self.dir, self.id)

    def adopt(self) -> None:
        """Take over the staging directory of a run process that died, its metrics.jsonl kept."""
        self.dir.mkdir(parents=True, exist_ok=True)

    def log_step(self, rec: dict) -> None:
        self.metrics_file.write(json.dumps(rec) + "\n")
        self.wandb.log(rec)

    def finish(self, status: str, metrics: dict, error: dict | None = None) -> Result:
        """Write result.json and publish the run directory; the only writer of a Result."""
        c = self.cfg
        axes = {"model": c.model.name, "quant": c.quant.type, "double_quant": bool(c.quant.double_quant),
                "optim": c.optim.name, "adapter": c.adapter.targets, "seed": c.seed}
        if c.task == "train":
            axes["speed"] = speed_label(OmegaConf.to_container(c.speed), c.train.runner, speed_presets())
        elif c.task == "generate":  # no training: no optimizer; with or without a run's adapter
            axes.update(optim=None, adapter="lora" if c.generate.adapter_run else "none")
        elif c.task == "eval":  # the base with nothing, a run's adapter, or a fully fine-tuned model
            axes.update(optim=None, adapter=eval_adapter(c.eval.adapter_run))
        else:  # a comparison: its arms carry their own settings
            axes.update(quant=None, double_quant=False, optim=None, adapter=None)
        result = Result(run_id=self.id, kind=c.task, sweep=c.tracker.sweep, status=status, error=error, axes=axes,
                        metrics=metrics, config=OmegaConf.to_container(c, resolve=True), env=environment(),
                        git_commit=git_commit(), seed=c.seed, started_at=self.started_at, finished_at=now(),
                        argv=sys.argv)
        if getattr(self, "metrics_file", None):
            self.metrics_file.close()
        atomic_write_json(self.dir / RESULT, asdict(result))
        if hasattr(self, "wandb"):
            self.wandb.finish(result)
        self.published_dir = publish(self.dir, self.final_dir, status)
        return result


def error_record(e: BaseException, with_traceback: bool = True) -> dict:
    """An exception as a result's `error`: its type, its message's first line and (unless not wanted) traceback."""
    msg = str(e).splitlines()[0] if str(e) else ""
    return {"type": type(e).__name__, "message": msg,
            "traceback": traceback.format_exc() if with_traceback else None}


def record_lost_run(cfg: DictConfig, message: str) -> Result:
    """Record a run whose process died without writing a result, as failed."""
    recorder = RunRecorder(cfg)
    recorder.adopt()
    return recorder.finish("failed", {}, {"type": "LostRun", "message": message, "traceback": None})
