"""Shared test setup: Triton's interpreter on CPU-only machines, a fixed seed, the device under test.

``TRITON_INTERPRET`` must be set before gptkernels (and so triton.jit) is imported, hence at the top here.
On a CUDA machine the kernels compile for the GPU and the same tests run there.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> str:
    return DEVICE
