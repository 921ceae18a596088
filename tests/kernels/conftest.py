import math

import pytest
import torch


@pytest.fixture(autouse=True)
def float32_kernels_on_gpu():
    """Kernel tests exercise the kernels in float32 too: on a GPU those take tf32, as torch's
    "high" matmul precision allows (under "highest" float32 goes to the exact reference)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Tensors the launchers allocate (outputs, split workspaces) start as NaN, so an element a
    kernel forgets to write fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        return empty(*args, **kwargs).fill_(math.nan)

    def nan_empty_like(*args, **kwargs):
        return empty_like(*args, **kwargs).fill_(math.nan)

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
