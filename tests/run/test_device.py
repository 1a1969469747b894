"""qlab/run/device.py."""

import pytest
import torch

from qlab.run.device import resolve_device


def test_auto_is_the_accelerator_when_there_is_one():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(RuntimeError, match="train.device=cuda:1 but CUDA is not available"):
        resolve_device("cuda:1")
