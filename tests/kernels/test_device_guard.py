"""Kernels launch on their tensors' GPU, not on the current one (a model on cuda:1, or spread over
GPUs by `device_map="auto"`). Needs two GPUs: without the guard, Triton launches on cuda:0 with
pointers into cuda:1's memory."""

import pytest
import torch

import fused_train
from fused_train.kernels.int8_decode_attention_ref import int8_decode_attention_ref
from fused_train.kernels.int8_kv_quantize_ref import quantize_kv_ref
from fused_train.kernels.linear_cross_entropy_ref import linear_cross_entropy_ref
from fused_train.kernels.lora_ref import lora_linear_ref
from fused_train.kernels.multi_lora_ref import multi_lora_linear_ref
from fused_train.kernels.paged_decode_attention_ref import paged_decode_attention_ref
from fused_train.kernels.varlen_attention_ref import varlen_attention_ref
from fused_train.ops.int8_kv import int8_decode_attention, quantize_kv_append
from fused_train.ops.paged_kv import paged_decode_attention, write_kv_pages

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def _assert_close(got, expected):
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_every_kernel_runs_on_cuda_1_while_cuda_0_is_current():
    device = torch.device("cuda:1")
    torch.cuda.set_device(0)
    bf16 = dict(device=device, dtype=torch.bfloat16)

    q = torch.randn(40, 4, 64, **bf16, requires_grad=True)
    k, v = (torch.randn(40, 2, 64, **bf16, requires_grad=True) for _ in range(2))
    cu_seqlens = torch.tensor([0, 17, 40], device=device, dtype=torch.int32)
    out = fused_train.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, 23, 23, causal=True)
    out.float().sum().backward()
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    expected = varlen_attention_ref(*leaves, cu_seqlens, cu_seqlens, causal=True)
    expected.sum().backward()
    _assert_close(out, expected)
    for got, leaf in zip((q, k, v), leaves):
        _assert_close(got.grad, leaf.grad)

    x = torch.randn(24, 64, **bf16, requires_grad=True)
    weight = torch.randn(48, 64, **bf16) / 8
    lora_a, lora_b = torch.randn(8, 64, **bf16) / 8, torch.randn(48, 8, **bf16)
    y = fused_train.lora_linear(x, weight, lora_a, lora_b, 2.0)
    y.float().sum().backward()
    x_ref = x.detach().float().requires_grad_()
    expected = lora_linear_ref(x_ref, weight.float(), lora_a.float(), lora_b.float(), 2.0)
    expected.sum().backward()
    _assert_close(y, expected)
    _assert_close(x.grad, x_ref.grad)

    new = torch.randn(1, 2, 5, 64, **bf16)
    data, scale = torch.zeros(1, 2, 8, 64, device=device, dtype=torch.int8), torch.zeros(1, 2, 8, device=device)
    quantize_kv_append(new, data, scale, 0)
    expected_data, expected_scale = quantize_kv_ref(new)
    assert torch.equal(data[:, :, :5], expected_data) and torch.equal(scale[:, :, :5], expected_scale)
    query = torch.randn(1, 4, 1, 64, **bf16)
    got = int8_decode_attention(query, data, scale, data, scale, 5)
    _assert_close(got, int8_decode_attention_ref(query, data, scale, data, scale, 5))

    token_slots = torch.tensor([1, -1, 0, 1, 0], device=device, dtype=torch.int32)
    stacked_a, stacked_b = torch.randn(2, 8, 64, **bf16) / 8, torch.randn(2, 48, 8, **bf16)
    scalings, ranks = torch.tensor([2.0, 0.5], device=device), torch.tensor([8, 4], device=device, dtype=torch.int32)
    tokens = torch.randn(5, 64, **bf16)
    got = fused_train.multi_lora_linear(tokens, weight, stacked_a, stacked_b, token_slots, scalings, ranks)
    expected = multi_lora_linear_ref(tokens.float(), weight.float(), stacked_a.float(), stacked_b.float(), token_slots,
                                     scalings, ranks)  # fmt: skip
    _assert_close(got, expected)

    pages = [torch.zeros(3, 2, 8, 64, device=device, dtype=torch.int8) for _ in range(2)]
    page_scales = [torch.zeros(3, 2, 8, device=device) for _ in range(2)]
    tokens_first = new[0].transpose(0, 1)  # [5 tokens, 2 kv heads, 64], into page 1 at offsets 1..5
    write_kv_pages(tokens_first, tokens_first, *pages, torch.arange(9, 14, device=device), k_scales=page_scales[0],
                   v_scales=page_scales[1])
    assert torch.equal(pages[0][1, :, 1:6], expected_data[0])
    assert torch.equal(page_scales[1][1, :, 1:6], expected_scale[0])
    page_table = torch.tensor([[1]], device=device, dtype=torch.int32)
    kv_lens = torch.tensor([6], device=device, dtype=torch.int32)
    got = paged_decode_attention(query[:, :, 0], *pages, page_table, kv_lens, k_scales=page_scales[0],
                                 v_scales=page_scales[1])
    _assert_close(got, paged_decode_attention_ref(query[:, :, 0], *pages, page_table, kv_lens, *page_scales))

    hidden = torch.randn(2, 5, 64, **bf16, requires_grad=True)
    lm_weight = torch.randn(200, 64, **bf16, requires_grad=True)
    labels = torch.randint(0, 200, (2, 5), device=device)
    loss = fused_train.linear_cross_entropy(hidden, lm_weight, labels)
    loss.backward()
    leaves = [t.detach().float().requires_grad_() for t in (hidden, lm_weight)]
    expected = linear_cross_entropy_ref(*leaves, labels)
    expected.backward()
    _assert_close(loss, expected)
    for got, leaf in zip((hidden, lm_weight), leaves):
        _assert_close(got.grad, leaf.grad)

    torch.cuda.synchronize(device)
    assert torch.cuda.current_device() == 0
