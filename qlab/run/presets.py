"""Architecture presets: random-init models of a known shape, built once and loaded back.

A preset is a row of `PRESETS` (conf/shapes.yaml). `ensure(name)` builds it with random weights
and a byte-level BPE tokenizer trained on the embedded chat data (nothing is downloaded), saved
into `$QLAB_CACHE/presets/<name>-<hash>/`. Runs load it through the `from_pretrained` +
`BitsAndBytesConfig` path of a real checkpoint, so it is quantized exactly as a hub model of that
shape (its values aside: the 7B shapes' losses mean nothing; they are for memory and speed).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from qlab.config import ASSETS, SHAPES
from qlab.run.data import load_conversations

PRESETS: dict[str, dict] = SHAPES["presets"]  # conf/shapes.yaml

TOKENIZER_VOCAB = 2048  # BPE merges learned on the embedded chat data
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
TOKENIZER_CORPUS = ASSETS / "chat" / "train.jsonl"
BUILD_VERSION = 1  # bump when the build procedure changes, so caches rebuild


def cache_root() -> Path:
    return Path(os.environ.get("QLAB_CACHE", Path.home() / ".cache" / "qlab"))


def build_once(target: Path, complete: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """`target`, first built with `build(directory)` unless `complete(target)`. Builders take a
    file lock beside it and rename a temporary directory into place, so a reader never sees a
    half-written model, concurrent callers build once, and a failed build leaves nothing."""
    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete(target):  # another process built it meanwhile
            return target
        tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            if target.exists():  # an incomplete leftover (not complete, so not ours to keep)
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def preset_dir(name: str) -> Path:
    spec = json.dumps(PRESETS[name], sort_keys=True)
    corpus = hashlib.sha256(TOKENIZER_CORPUS.read_bytes()).hexdigest()
    key = hashlib.sha256(f"{spec}|{corpus}|{TOKENIZER_VOCAB}|{BUILD_VERSION}".encode()).hexdigest()[:12]
    return cache_root() / "presets" / f"{name}-{key}"


def ensure(name: str, device: str = "cpu") -> Path:
    """Return the directory of preset `name`, building it first if needed (build_once)."""
    def build(out: Path) -> None:
        tokenizer = build_tokenizer()
        build_model(name, tokenizer, device).save_pretrained(out)  # the model is freed here
        tokenizer.save_pretrained(out)
        if device.startswith("cuda"):
            import torch

            # the build's weights (llama-7b: 6.7 G params x 2 B = 13.5 GB) stay in the allocator's
            # reserve otherwise, inside the NVML peak of the run that happened to build the preset
            torch.cuda.empty_cache()

    return build_once(preset_dir(name), lambda p: (p / "config.json").is_file(), build)


def build_tokenizer():
    """Byte-level BPE trained on the embedded chat data: covers any UTF-8 text (Chinese too)."""
    convs, _ = load_conversations(str(TOKENIZER_CORPUS))
    texts = [text for conv in convs for turn in conv for text in turn]
    return train_bpe(texts, TOKENIZER_VOCAB)


def train_bpe(texts: list[str], vocab_size: int, **tokenizer_kwargs):
    """A byte-level BPE with qlab's specials (<unk> <s> </s> <pad>), as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", **tokenizer_kwargs)


def model_config(name: str, vocab_size: int | None = None, **token_ids):
    """Preset `name`'s transformers config; `vocab_size` fills in the tiny presets' (their
    tokenizer's, conf/shapes.yaml leaves it null)."""
    from transformers import BloomConfig, LlamaConfig

    spec = dict(PRESETS[name])
    arch = spec.pop("arch")
    spec["vocab_size"] = spec["vocab_size"] or vocab_size
    return (LlamaConfig if arch == "llama" else BloomConfig)(**spec, **token_ids)


def build_model(name: str, tokenizer, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(name, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # 16-bit on a GPU (a 7B model is 13.5 GB there), float32 for the tiny CPU presets.
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)  # the same weights every build (per device type: CPU and CUDA RNGs differ)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
