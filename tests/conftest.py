"""Test set-up shared by every test file.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on
before triton is first imported -- hence this happens here, before anything imports flashtile.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test-gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """NaN-fill every float tensor from torch.empty, so an element a kernel forgot to write
    shows up as NaN instead of passing by luck with whatever memory held."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
