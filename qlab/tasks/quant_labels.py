"""A base's quantization by its label, for the tools that load one: `qlab eval --quant`,
`qlab chat --quant`, `qlab generate-bench --quants`, and a training run's own setting.

A label is config.quant_label's spelling, the one tables and logs use: bf16, int8, nf4, nf4+DQ,
fp4, fp4+DQ, with another block size nf4+DQ/b128, with another backend hqq int4 or torchao
nf4+DQ (hqq int4/b32, ...). Case does not matter, and the run-id spelling (store.quant_tag:
nf4-dq-b128, hqq-int4) is accepted too, which needs no quoting in a shell. The settings are every
combination config.validate_quant accepts, so a label names exactly what a training run's
quant= can say (its compute dtype aside, which the tools take from the run or leave at auto).
"""

from __future__ import annotations

import argparse
from functools import cache

from omegaconf import OmegaConf

from qlab import config
from qlab.results import store

KEYS = ("type", "double_quant", "backend", "blocksize")  # what a label names


@cache
def settings() -> dict[str, dict]:
    """Every valid setting: lowercased label -> {type, double_quant, backend, blocksize}, in the order
    bitsandbytes (bf16, int8, nf4, fp4), hqq, torchao; block sizes ascending."""
    out = {}
    for backend, types in config.QUANT_BACKENDS.items():
        for qtype in ("bf16", *types):
            for dq in (False, True):
                for blocksize in config.BLOCKSIZES:
                    q = {"type": qtype, "double_quant": dq, "backend": backend, "blocksize": blocksize}
                    try:
                        config.validate_quant(OmegaConf.create({**q, "compute_dtype": "auto"}))
                    except config.ConfigError:  # pruned ones too: DQ of int8, a bf16 "hqq" base
                        continue
                    out[config.quant_label(q).lower()] = q
    return out


def spellings() -> dict[str, str]:
    """Every accepted spelling -> its lowercased label (the label itself and its run-id tag)."""
    return {**{store.quant_tag(q): label for label, q in settings().items()}, **{label: label for label in settings()}}


def parse(text: str) -> str:
    """A label or run-id tag (any case) -> the lowercased label; argparse's `type=`."""
    label = spellings().get(text.strip().lower())
    if label is None:
        raise argparse.ArgumentTypeError(f"unknown quantization {text.strip()!r}; {CHOICES}")
    return label


def setting(label: str) -> dict:
    """The quant config values (KEYS) a label names (`parse` spellings accepted)."""
    return dict(settings()[parse(label)])


def stored(result: dict) -> dict:
    """A run's quant config as it really trained (store.quant_config)."""
    return store.quant_config(result.get("config") or {})


CHOICES = ("one of bf16, int8, nf4, nf4+DQ, fp4, fp4+DQ, hqq int4, torchao nf4+DQ; a 4-bit one at another block "
           f"size with /b<n> (n in {', '.join(str(b) for b in config.BLOCKSIZES if b != config.DEFAULT_BLOCKSIZE)}: "
           "nf4+DQ/b128, hqq int4/b32); "
           "or the run-id spelling (nf4-dq-b128, hqq-int4)")
