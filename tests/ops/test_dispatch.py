"""CUDA tensors that take the PyTorch reference path instead of a kernel warn once per reason.

The decision is pure Python: `dispatch._on_cuda` is made to call the CPU test tensors CUDA ones,
so the reference runs on CPU where it would run on the GPU.
"""

import warnings

import pytest
import torch

import fused_train
from fused_train.kernels.varlen_attention_ref import varlen_attention_ref
from fused_train.ops import dispatch
from fused_train.ops.int8_kv import int8_decode_attention


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(dispatch, "_on_cuda", lambda tensors: True)
    monkeypatch.setattr(dispatch, "_WARNED", set())


@pytest.fixture
def matmul_precision():
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


def _attention_inputs(dtype, head_dim):
    q, k, v = (torch.randn(12, 2, head_dim, dtype=dtype) for _ in range(3))
    return q, k, v, torch.tensor([0, 5, 12], dtype=torch.int32)


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


def _attention(inputs):
    q, k, v, cu_seqlens = inputs
    return fused_train.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, 7, 7, causal=True)


def test_float32_under_highest_precision_warns_once_and_says_how_to_get_the_kernel(fake_cuda, matmul_precision):
    matmul_precision("highest")
    inputs = _attention_inputs(torch.float32, 16)
    out, said = _warnings_of(lambda: _attention(inputs))
    assert len(said) == 1 and 'set_float32_matmul_precision("high")' in said[0], said
    q, k, v, cu_seqlens = inputs
    torch.testing.assert_close(out, varlen_attention_ref(q, k, v, cu_seqlens, cu_seqlens, causal=True))
    _, said_again = _warnings_of(lambda: _attention(inputs))
    assert said_again == []


def test_float32_beyond_the_kernels_head_dim_warns(fake_cuda, matmul_precision):
    matmul_precision("high")
    _, said = _warnings_of(lambda: _attention(_attention_inputs(torch.float32, 160)))
    assert len(said) == 1 and "head_dim 160" in said[0] and "bfloat16" in said[0], said


def test_decode_attention_in_float64_warns(fake_cuda):
    data, scale = torch.zeros(1, 1, 4, 16, dtype=torch.int8), torch.ones(1, 1, 4)
    _, said = _warnings_of(lambda: int8_decode_attention(torch.randn(1, 2, 1, 16, dtype=torch.float64), data, scale,
                                                         data, scale, 4))
    assert len(said) == 1 and "torch.float64" in said[0], said


def test_without_triton_cuda_tensors_warn_that_it_is_missing(fake_cuda, monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    _, said = _warnings_of(lambda: dispatch.triton_runs_on(torch.ones(2, dtype=torch.bfloat16)))
    assert len(said) == 1 and "pip install triton" in said[0], said


def test_cpu_tensors_take_the_reference_without_a_word(matmul_precision, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # a plain CPU: the reference is what runs there
    matmul_precision("highest")
    _, said = _warnings_of(lambda: _attention(_attention_inputs(torch.float32, 16)))
    assert said == []
