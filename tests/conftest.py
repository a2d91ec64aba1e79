"""Test setup: Triton runs under its interpreter on CPU tensors when no GPU is present."""
import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # Must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_GPU:
            item.add_marker(skip_cuda)


@pytest.fixture
def triton_device():
    """Where Triton kernels run in this session: the GPU, or the CPU under TRITON_INTERPRET=1."""
    return torch.device("cuda" if HAS_GPU else "cpu")
