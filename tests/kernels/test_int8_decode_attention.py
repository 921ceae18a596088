"""Triton int8 decode attention vs `int8_decode_attention_ref` in float64, on fresh random caches.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py), so shapes stay small and
its block of 16 keys makes short caches cross several blocks and splits.
"""

import math

import pytest
import torch

from fused_train.kernels import int8_decode_attention as kernel_module
from fused_train.kernels.int8_decode_attention import (
    CONFIGS,
    CONFIGS_FP32,
    block_d_at_least_16,
    int8_decode_attention_ref,
)
from fused_train.kernels.int8_kv_quantize import quantize_kv_ref
from fused_train.ops.int8_kv import int8_decode_attention, int8_decode_attention_op
from tests.conftest import DEVICE
from tests.kernels.conftest import assert_bad_input_named

ON_GPU = DEVICE == "cuda"
# Max error relative to the reference's largest magnitude. fp32 dots run as tf32 on the GPU and
# exactly in the interpreter; 16-bit q rounds the probabilities to its precision before P·V.
TOLERANCE = {
    torch.float32: 1e-2 if ON_GPU else 2e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def _inputs(batch, num_heads, num_kv_heads, num_queries, head_dim, kv_len, dtype, seed, capacity=None):
    """q and a quantized cache of `capacity` positions whose unfilled tail holds NaN scales."""
    generator = torch.Generator().manual_seed(seed)
    capacity = capacity or kv_len + 5
    k = torch.randn(batch, num_kv_heads, capacity, head_dim, generator=generator) * 2
    v = torch.randn(batch, num_kv_heads, capacity, head_dim, generator=generator)
    (k_data, k_scale), (v_data, v_scale) = quantize_kv_ref(k), quantize_kv_ref(v)
    k_scale[:, :, kv_len:] = math.nan
    v_scale[:, :, kv_len:] = math.nan
    q = torch.randn(batch, num_heads, num_queries, head_dim, generator=generator).to(dtype)
    return [t.to(DEVICE) for t in (q, k_data, k_scale, v_data, v_scale)]


def _assert_close(actual, expected, dtype):
    assert actual.dtype == dtype and actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite values"
    scale = expected.abs().max().item() or 1.0
    error = (actual.double() - expected).abs().max().item() / scale
    assert error <= TOLERANCE[dtype], f"relative max error {error:.2e} > {TOLERANCE[dtype]:.0e}"


def _check(batch, num_heads, num_kv_heads, num_queries, head_dim, kv_len, dtype=torch.float32, key_start=None,
           seed=0, **kwargs):
    q, k_data, k_scale, v_data, v_scale = _inputs(batch, num_heads, num_kv_heads, num_queries, head_dim, kv_len,
                                                  dtype, seed)
    key_start = None if key_start is None else torch.tensor(key_start, dtype=torch.int32, device=DEVICE)
    out = int8_decode_attention(q, k_data, k_scale, v_data, v_scale, kv_len, key_start, **kwargs)
    kwargs.pop("num_splits", None)
    expected = int8_decode_attention_ref(q.double(), k_data, k_scale, v_data, v_scale, kv_len, key_start, **kwargs)
    _assert_close(out, expected, dtype)
    return out, expected


CASES = {
    # name: (batch, num_heads, num_kv_heads, num_queries, head_dim, kv_len, kwargs)
    "kv_len_1": (2, 4, 2, 1, 32, 1, {}),
    "kv_len_off_block_decode": (2, 4, 2, 1, 64, 77, {}),
    "four_queries": (2, 4, 2, 4, 64, 77, {}),
    "gqa_4_to_1": (1, 8, 2, 1, 32, 130, {}),
    "mqa_chunk_over_64_rows": (1, 8, 1, 9, 32, 60, {}),
    "sliding_window": (2, 4, 2, 4, 32, 150, dict(window_left=20)),
    "softcap": (2, 4, 1, 2, 32, 90, dict(softcap=5.0, softmax_scale=0.3)),
    "head_dim_80": (2, 4, 2, 3, 80, 70, {}),
    "head_dim_128": (1, 2, 1, 1, 128, 40, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, poisoned_outputs):
    batch, num_heads, num_kv_heads, num_queries, head_dim, kv_len, kwargs = CASES[case]
    _check(batch, num_heads, num_kv_heads, num_queries, head_dim, kv_len, seed=list(CASES).index(case), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_matches_reference(dtype, poisoned_outputs):
    _check(2, 8, 2, 2, 64, 100, dtype=dtype, key_start=[0, 37])


def test_left_padding_and_a_sequence_that_sees_no_key(poisoned_outputs):
    """Sequence 2 is all padding up to its last key; sequence 3 to past the end: its queries see
    nothing and output zeros."""
    out, _ = _check(4, 4, 2, 3, 32, 90, key_start=[0, 41, 89, 90], window_left=50)
    assert (out[3] == 0).all() and (out[2, :, :2] == 0).all() and (out[2, :, 2] != 0).any()


def test_split_count_fills_the_gpu_as_the_context_allows():
    """Batch 1 with 8 KV heads over a long context gets a few programs per SM; a short context only
    as many splits as it has runs of 4 key blocks; a grid that fills the SMs already, one split."""
    sms = 132
    long_context = kernel_module.choose_num_splits(8, 32768, 64, sms)
    assert 8 * long_context >= 3 * sms and long_context <= kernel_module.MAX_SPLITS
    assert kernel_module.choose_num_splits(8, 1024, 64, sms) == 1024 // 64 // 4
    assert kernel_module.choose_num_splits(8, 100, 64, sms) == 1
    assert kernel_module.choose_num_splits(4 * sms, 32768, 64, sms) == 1
    assert kernel_module.choose_num_splits(8, 32768, 64, 16) == 8  # a small GPU: 4 programs per SM
    assert kernel_module.sm_count(torch.device("cpu")) == kernel_module.DEFAULT_SMS


def test_forced_splits_agree(poisoned_outputs):
    """One split, several, and more splits than key blocks (some empty) give the same output."""
    q, k_data, k_scale, v_data, v_scale = _inputs(2, 4, 2, 2, 32, 150, torch.float32, seed=5)
    key_start = torch.tensor([0, 70], dtype=torch.int32, device=DEVICE)
    outs = [int8_decode_attention(q, k_data, k_scale, v_data, v_scale, 150, key_start, num_splits=n)
            for n in (1, 3, 16, kernel_module.MAX_SPLITS)]
    expected = int8_decode_attention_ref(q.double(), k_data, k_scale, v_data, v_scale, 150, key_start)
    for out in outs:
        _assert_close(out, expected, torch.float32)
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)


def _ring_inputs(batch, num_heads, num_kv_heads, num_queries, head_dim, kv_len, residual_length, exact_from, dtype,
                 seed):
    """`_inputs` plus an exact ring holding positions [exact_from, kv_len); the ring's other slots
    and the int8 scales of those positions are NaN, so reading the wrong one fails the test."""
    q, k_data, k_scale, v_data, v_scale = _inputs(batch, num_heads, num_kv_heads, num_queries, head_dim, kv_len,
                                                  dtype, seed)
    generator = torch.Generator().manual_seed(seed + 1000)
    shape = (batch, num_kv_heads, residual_length, head_dim)
    rings = []
    for scale in (k_scale, v_scale):
        ring = torch.full(shape, math.nan)
        slots = torch.arange(exact_from, kv_len) % residual_length
        ring[:, :, slots] = torch.randn(batch, num_kv_heads, len(slots), head_dim, generator=generator)
        scale[:, :, exact_from:kv_len] = math.nan
        rings.append(ring.to(dtype).to(DEVICE))
    return q, k_data, k_scale, v_data, v_scale, *rings


RING_CASES = {
    # name: (batch, num_heads, num_kv_heads, num_queries, head_dim, kv_len, residual_length, exact_from, kwargs)
    "ring_wraps": (2, 4, 2, 1, 32, 77, 32, 45, {}),
    "ring_partly_filled": (2, 4, 2, 1, 32, 77, 32, 70, {}),
    "ring_empty": (1, 4, 2, 1, 32, 50, 16, 50, {}),
    "all_exact": (2, 4, 1, 2, 64, 20, 32, 0, {}),
    "left_padding_in_ring": (2, 4, 2, 3, 32, 60, 32, 28, dict(key_start=[0, 40])),
    "window_and_softcap": (2, 4, 2, 4, 32, 150, 32, 118, dict(window_left=20, softcap=5.0)),
    "split_inside_ring": (1, 4, 2, 2, 32, 150, 64, 86, dict(num_splits=5)),
}


@pytest.mark.parametrize("case", list(RING_CASES))
def test_exact_ring_matches_reference(case, poisoned_outputs):
    (batch, num_heads, num_kv_heads, num_queries, head_dim, kv_len, residual_length, exact_from,
     kwargs) = RING_CASES[case]  # fmt: skip
    tensors = _ring_inputs(batch, num_heads, num_kv_heads, num_queries, head_dim, kv_len, residual_length, exact_from,
                           torch.float32, seed=list(RING_CASES).index(case))
    key_start = kwargs.pop("key_start", None)
    key_start = None if key_start is None else torch.tensor(key_start, dtype=torch.int32, device=DEVICE)
    q, k_data, k_scale, v_data, v_scale, k_recent, v_recent = tensors
    ring = dict(k_recent=k_recent, v_recent=v_recent, exact_from=exact_from)
    out = int8_decode_attention(q, k_data, k_scale, v_data, v_scale, kv_len, key_start, **ring, **kwargs)
    kwargs.pop("num_splits", None)
    expected = int8_decode_attention_ref(q.double(), k_data, k_scale, v_data, v_scale, kv_len, key_start, **ring,
                                         **kwargs)
    _assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_exact_ring_half_precision_matches_reference(dtype, poisoned_outputs):
    q, k_data, k_scale, v_data, v_scale, k_recent, v_recent = _ring_inputs(2, 8, 2, 1, 64, 100, 32, 70, dtype, seed=3)
    ring = dict(k_recent=k_recent, v_recent=v_recent, exact_from=70)
    out = int8_decode_attention(q, k_data, k_scale, v_data, v_scale, 100, **ring)
    expected = int8_decode_attention_ref(q.double(), k_data, k_scale, v_data, v_scale, 100, **ring)
    _assert_close(out, expected, dtype)


SHIPPED_CONFIGS = [(torch.float32, 128), (torch.bfloat16, 64), (torch.float16, 80)]


@pytest.mark.parametrize("dtype,head_dim", SHIPPED_CONFIGS, ids=[f"{t}_{d}" for t, d in SHIPPED_CONFIGS])
def test_shipped_gpu_configs_match_reference(dtype, head_dim, poisoned_outputs):
    """The launcher with the GPU tables' block sizes (the interpreter otherwise uses 16 keys)."""
    config = (CONFIGS_FP32 if dtype == torch.float32 else CONFIGS)[block_d_at_least_16(head_dim)]
    q, k_data, k_scale, v_data, v_scale = _inputs(1, 4, 2, 1, head_dim, 200, dtype, seed=head_dim)
    out = kernel_module.int8_decode_attention(q, k_data, k_scale, v_data, v_scale, 200, num_splits=2, config=config)
    expected = int8_decode_attention_ref(q.double(), k_data, k_scale, v_data, v_scale, 200)
    _assert_close(out, expected, dtype)


def _valid_args():
    q, k_data, k_scale, v_data, v_scale = _inputs(2, 4, 2, 2, 32, 20, torch.float32, seed=9)
    return dict(q=q, k_data=k_data, k_scale=k_scale, v_data=v_data, v_scale=v_scale, kv_len=20,
                key_start=torch.zeros(2, dtype=torch.int32, device=DEVICE))


BAD_INPUTS = {
    "q_3d": (lambda a: a.update(q=a["q"][0]), "q"),
    "k_data_not_int8": (lambda a: a.update(k_data=a["k_data"].float()), "k_data"),
    "v_scale_not_float32": (lambda a: a.update(v_scale=a["v_scale"].half()), "v_scale"),
    "v_data_shape": (lambda a: a.update(v_data=a["v_data"][:, :1]), "v_data"),
    "k_scale_shape": (lambda a: a.update(k_scale=a["k_scale"][:, :, :10]), "k_scale"),
    "head_dim_mismatch": (lambda a: a.update(q=a["q"][..., :16]), "head_dim"),
    "heads_not_divisible": (lambda a: a.update(q=a["q"][:, :3]), "num_heads"),
    "kv_len_past_capacity": (lambda a: a.update(kv_len=26), "kv_len"),
    "more_queries_than_kv_len": (lambda a: a.update(kv_len=1), "num_queries"),
    "key_start_int64": (lambda a: a.update(key_start=a["key_start"].long()), "key_start"),
    "key_start_shape": (lambda a: a.update(key_start=a["key_start"][:1]), "key_start"),
    "mixed_devices": (lambda a: a.update(v_scale=a["v_scale"].to("meta")), "device"),
    "ring_without_exact_from": (lambda a: a.update(k_recent=_ring(a), v_recent=_ring(a)), "exact_from"),
    "exact_from_before_the_ring": (
        lambda a: a.update(k_recent=_ring(a), v_recent=_ring(a), exact_from=3), "exact_from"
    ),
    "exact_from_past_kv_len": (lambda a: a.update(k_recent=_ring(a), v_recent=_ring(a), exact_from=21), "exact_from"),
    "ring_head_dim": (lambda a: a.update(k_recent=_ring(a)[..., :8], v_recent=_ring(a), exact_from=20), "k_recent"),
    "ring_shapes_differ": (
        lambda a: a.update(k_recent=_ring(a), v_recent=_ring(a)[:, :, :4], exact_from=20), "v_recent"
    ),
}


def _ring(args):
    """An exact ring of 8 positions for `_valid_args`' cache."""
    return torch.zeros(2, 2, 8, 32, device=DEVICE)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_argument(case):
    assert_bad_input_named(int8_decode_attention, _valid_args(), *BAD_INPUTS[case])


def test_op_passes_opcheck():
    args = _valid_args()
    torch.library.opcheck(int8_decode_attention_op, (*args.values(), None, 4, 0.0, None, None, None, 2))
    ring = torch.randn(2, 2, 8, 32, device=DEVICE)
    torch.library.opcheck(int8_decode_attention_op, (*args.values(), None, -1, 0.0, ring, ring.clone(), 15, None))


def test_torch_compile_fullgraph_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    args = _valid_args()

    def attention_sum(q):
        return int8_decode_attention(q, *list(args.values())[1:], softcap=3.0).sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attention_sum, backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(args["q"]), attention_sum(args["q"]))
    assert counter.frame_count == 1
