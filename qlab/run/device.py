"""Where a run computes: "auto" resolved to the machine's accelerator, checked before use."""

from __future__ import annotations

import torch


def resolve_device(spec: str) -> str:
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={spec} but CUDA is not available on this machine")
    return spec
