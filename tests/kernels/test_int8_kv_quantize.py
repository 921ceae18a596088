"""Triton quantize-on-append vs `quantize_kv_ref`: bit-exact int8 data and float32 scales.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py), so shapes stay small.
"""

import math

import pytest
import torch

from fused_train.kernels.int8_kv_quantize import quantize_grid, quantize_kv_ref
from fused_train.ops.int8_kv import quantize_kv_append, quantize_kv_append_op
from tests.conftest import DEVICE
from tests.kernels.conftest import assert_bad_input_named

SENTINEL_DATA, SENTINEL_SCALE = 77, -3.0
POISON_DATA, POISON_SCALE = -128, float("nan")


def _cache(batch, num_kv_heads, capacity, head_dim):
    data = torch.full((batch, num_kv_heads, capacity, head_dim), SENTINEL_DATA, dtype=torch.int8, device=DEVICE)
    scale = torch.full((batch, num_kv_heads, capacity), SENTINEL_SCALE, dtype=torch.float32, device=DEVICE)
    return data, scale


def _append_and_check(x, capacity, start):
    """Append `x` at `start` into a cache of sentinels whose target positions are poisoned; the
    target must equal the reference bit for bit and every other position keep its sentinel."""
    batch, num_kv_heads, new_tokens, head_dim = x.shape
    data, scale = _cache(batch, num_kv_heads, capacity, head_dim)
    end = start + new_tokens
    data[:, :, start:end], scale[:, :, start:end] = POISON_DATA, POISON_SCALE
    quantize_kv_append(x, data, scale, start)
    expected_data, expected_scale = quantize_kv_ref(x)
    assert torch.equal(data[:, :, start:end], expected_data)
    assert torch.equal(scale[:, :, start:end], expected_scale)
    untouched = torch.ones(capacity, dtype=torch.bool, device=DEVICE)
    untouched[start:end] = False
    assert (data[:, :, untouched] == SENTINEL_DATA).all() and (scale[:, :, untouched] == SENTINEL_SCALE).all()
    return data[:, :, start:end], scale[:, :, start:end]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_append_matches_reference_bit_for_bit(dtype, head_dim):
    generator = torch.Generator().manual_seed(head_dim)
    # Magnitudes spread over many binades, so that scales and quotients hit many roundings.
    x = torch.randn(2, 3, 11, head_dim, generator=generator) * torch.rand(2, 3, 11, 1, generator=generator) * 40
    _append_and_check(x.to(DEVICE, dtype), capacity=23, start=5)


def test_append_of_one_token_at_start_zero_and_at_the_end():
    x = torch.randn(1, 2, 1, 128, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _append_and_check(x, capacity=9, start=0)
    _append_and_check(x, capacity=9, start=8)


def test_grid_of_a_prefill_past_2m_tokens_fits_cuda_limits():
    """Every (sequence, kv head, token block) gets a program, within CUDA's grid limits (2**31 - 1
    in dimension 0, 65535 in the others), for a 4M-token prefill at head_dim 128."""
    new_tokens, block_t = 4 * 2**20, 32  # 32 tokens of head_dim 128 a program
    grid = quantize_grid(2, 8, new_tokens, block_t)
    assert math.prod(grid) == 2 * 8 * (new_tokens // block_t)
    assert grid[0] < 2**31 and all(size <= 65535 for size in grid[1:])


def test_strided_x_matches_reference():
    """x from a transposed projection ([batch, tokens, heads, head_dim] memory): only head_dim is contiguous."""
    x = torch.randn(2, 7, 4, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE).transpose(1, 2)
    _append_and_check(x, capacity=10, start=2)


def test_zero_vector_gets_zero_scale_and_data():
    x = torch.randn(1, 2, 5, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    x[0, 1, 3] = 0.0
    data, scale = _append_and_check(x, capacity=8, start=1)
    assert scale[0, 1, 3] == 0 and (data[0, 1, 3] == 0).all()


def test_exact_halves_round_to_even():
    # amax 127 makes the scale exactly 1, so x / scale are the halves themselves.
    halves = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, -126.5, 127.0, 3.25], device=DEVICE)
    expected = torch.tensor([0, 2, 2, 0, -2, -2, 126, -126, 127, 3], dtype=torch.int8, device=DEVICE)
    data, scale = _append_and_check(halves.view(1, 1, 1, -1), capacity=3, start=1)
    assert scale.item() == 1.0
    assert torch.equal(data.view(-1), expected)


def _valid_args():
    data, scale = _cache(2, 2, 10, 32)
    return dict(x=torch.randn(2, 2, 3, 32, device=DEVICE), data=data, scale=scale, start=4)


BAD_INPUTS = {
    "x_int": (lambda a: a.update(x=a["x"].to(torch.int32)), "x"),
    "x_3d": (lambda a: a.update(x=a["x"][0]), "x"),
    "data_not_int8": (lambda a: a.update(data=a["data"].float()), "data"),
    "scale_not_float32": (lambda a: a.update(scale=a["scale"].half()), "scale"),
    "head_dim_mismatch": (lambda a: a.update(x=a["x"][..., :16]), "head_dim"),
    "heads_mismatch": (lambda a: a.update(x=a["x"][:, :1]), "num_kv_heads"),
    "scale_shape": (lambda a: a.update(scale=a["scale"][:, :, :9]), "scale"),
    "start_negative": (lambda a: a.update(start=-1), "start"),
    "past_capacity": (lambda a: a.update(start=8), "capacity"),
    "mixed_devices": (lambda a: a.update(scale=a["scale"].to("meta")), "device"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_argument(case):
    assert_bad_input_named(quantize_kv_append, _valid_args(), *BAD_INPUTS[case])


def test_op_passes_opcheck():
    args = _valid_args()
    torch.library.opcheck(quantize_kv_append_op, (args["x"], args["data"], args["scale"], args["start"]))
