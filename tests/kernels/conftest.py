"""What the kernel tests share: frozen base weights in each format, NaN-poisoned outputs, and the
bad-input check of each launcher's table."""

import math

import pytest
import torch

from fused_train.kernels.lora_ref import quantize_int4, quantize_int8
from tests.conftest import DEVICE


def make_base_weight(out_features, in_features, dtype, bits):
    """A random frozen base `W` and its quantization kwargs: `bits` None for a float weight in
    `dtype`, 8 for int8 (`weight_scale`), 4 for packed int4 (`weight_scale`, `weight_offset`)."""
    weight = torch.randn(out_features, in_features, device=DEVICE) / in_features**0.5
    if bits == 8:
        weight, scale = quantize_int8(weight)
        return weight, {"weight_scale": scale}
    if bits == 4:
        weight, scale, offset = quantize_int4(weight)
        return weight, {"weight_scale": scale, "weight_offset": offset}
    return weight.to(dtype), {}


def assert_bad_input_named(fn, args, break_args, expected_name):
    """`fn(**args)`, once `break_args(args)` has broken them, raises a ValueError matching `expected_name`
    (each launcher's table of bad inputs: case -> (break_args, expected_name))."""
    break_args(args)
    with pytest.raises(ValueError, match=expected_name):
        fn(**args)


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
