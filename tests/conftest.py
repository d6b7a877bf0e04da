"""Test setup: GPU tests skipped without a GPU, a fresh random seed per test (printed with its output)."""
import os

import torch

import pytest

import fusedlab  # noqa: F401  (the root conftest.py has already chosen the Triton interpreter when no GPU)

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def gen():
    """A generator with a fresh seed per test (printed on failure through the test id's captured output)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
