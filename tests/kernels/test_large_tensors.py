"""Tensors of more than 2**31 elements through the compiled kernels (GPU only), checked against the
reference on a slice. In 32 bits their offsets wrap: reads and writes land outside the tensor.

The compile tests check on CPU that the offsets are 64-bit (tests/kernels/test_compile_sm90_*.py);
these run the sizes themselves: one long document of a fused qkv projection, a LoRA'd
`lm_head`-sized GEMM, and one head's int8 cache of 16.7M positions.
"""

import pytest
import torch
import torch.nn.functional as F

import fused_train
from fused_train.kernels import lora_gemm as gemm_kernels
from fused_train.kernels.int8_kv_quantize_ref import quantize_kv_ref
from fused_train.ops.int8_kv import int8_decode_attention, quantize_kv_append

BIG = 2**31
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
    reason="needs a CUDA GPU with 40 GiB",
)


def _relative_error(got, expected):
    return ((got.float() - expected).abs().max() / expected.abs().max()).item()


def test_long_document_of_a_fused_qkv_projection():
    # q, k, v are heads of one [tokens, 256, 128] projection: their token stride is 32768 elements,
    # so rows past 65536 sit more than 2**31 elements into the buffer.
    tokens, head_dim, rows = 65536 + 512, 128, 64
    qkv = torch.randn(tokens, 256, head_dim, device="cuda", dtype=torch.bfloat16)
    assert qkv.numel() > BIG
    q, k, v = (qkv[:, i : i + 1].detach().requires_grad_() for i in range(3))
    cu_seqlens = torch.tensor([0, tokens], device="cuda", dtype=torch.int32)
    scale = 0.5  # sharp attention: a row's output is a few value rows, not an average near 0
    out = fused_train.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, tokens, tokens, causal=True,
                                       softmax_scale=scale)
    dout = torch.zeros_like(out)
    dout[-rows:] = torch.randn_like(out[-rows:])
    out.backward(dout)

    # The last rows, which see every key, in float32.
    q_last, k_ref, v_ref = (t.detach()[..., 0, :].float().requires_grad_() for t in (q[-rows:], k, v))
    scores = (q_last @ k_ref.T) * scale
    query_positions = torch.arange(tokens - rows, tokens, device="cuda")
    visible = torch.arange(tokens, device="cuda")[None, :] <= query_positions[:, None]
    expected = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v_ref
    expected.backward(dout[-rows:, 0].float())
    assert _relative_error(out[-rows:, 0], expected) < 2e-2
    assert _relative_error(q.grad[-rows:, 0], q_last.grad) < 3e-2
    assert _relative_error(k.grad[:, 0], k_ref.grad) < 3e-2
    assert _relative_error(v.grad[:, 0], v_ref.grad) < 3e-2


@pytest.mark.parametrize("way", [("pointer", "large"), ("tma", "large"), ("cublas", "large")])
def test_lora_gemm_whose_output_and_gradient_pass_2_31_elements(monkeypatch, way):
    # 17000 tokens through a LoRA'd 131072-word lm_head: y and dy hold 2.2e9 elements.
    tokens, in_features, out_features, rank, scaling = 17000, 256, 131072, 16, 2.0
    if way[0] == "tma" and not gemm_kernels.tma_applies(*(torch.empty(8, 8, device="cuda", dtype=torch.bfloat16)
                                                            for _ in range(3))):
        pytest.skip("TMA needs a Hopper-or-newer GPU and a Triton with tensor descriptors")
    monkeypatch.setattr(gemm_kernels, "gemm_ways_of", lambda a, w, out: [way])
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(out_features, in_features, device="cuda") / in_features**0.5).bfloat16()
    lora_a = (torch.randn(rank, in_features, device="cuda") / in_features**0.5).requires_grad_()
    lora_b = torch.randn(out_features, rank, device="cuda").requires_grad_()
    y = fused_train.lora_linear(x, weight, lora_a, lora_b, scaling)
    assert y.numel() > BIG
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    rows = slice(tokens - 64, tokens)  # the rows whose offsets pass 2**31
    x32, w32 = x.detach().float(), weight.float()
    lora_s = x32 @ lora_a.detach().T
    expected_y = x32[rows] @ w32.T + scaling * lora_s[rows] @ lora_b.detach().T
    assert _relative_error(y[rows], expected_y) < 2e-2
    # dS = s·dy·B, dB = s·dyᵀ·S, dA = dSᵀ·x, dx = dy·W + dS·A, over token chunks in float32.
    chunks = [grad_y[i : i + 4096].float() for i in range(0, tokens, 4096)]
    grad_s = torch.cat([scaling * chunk @ lora_b.detach() for chunk in chunks])
    expected_db = scaling * sum(chunk.T @ s for chunk, s in zip(chunks, lora_s.split(4096)))
    expected_dx = grad_y[rows].float() @ w32 + grad_s[rows] @ lora_a.detach()
    assert _relative_error(x.grad[rows], expected_dx) < 2e-2
    assert _relative_error(lora_b.grad, expected_db) < 2e-2
    assert _relative_error(lora_a.grad, grad_s.T @ x32) < 2e-2


def test_int8_cache_head_of_16m_positions():
    # One kv head's data holds capacity × 128 > 2**31 int8 values; the newest 64 positions lie past it.
    head_dim, new = 128, 64
    capacity = BIG // head_dim + new
    k_data, v_data = (torch.zeros(1, 1, capacity, head_dim, device="cuda", dtype=torch.int8) for _ in range(2))
    k_scale, v_scale = (torch.zeros(1, 1, capacity, device="cuda") for _ in range(2))
    keys, values = torch.randn(2, 1, 1, new, head_dim, device="cuda", dtype=torch.bfloat16).unbind(0)
    start = capacity - new
    quantize_kv_append(keys, k_data, k_scale, start)
    quantize_kv_append(values, v_data, v_scale, start)
    for new_values, data, scale in ((keys, k_data, k_scale), (values, v_data, v_scale)):
        expected_data, expected_scale = quantize_kv_ref(new_values)
        assert torch.equal(data[:, :, start:], expected_data) and torch.equal(scale[:, :, start:], expected_scale)

    # Four query heads over the window of the last 64 keys, which the kernel reads past 2**31.
    q = torch.randn(1, 4, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    out = int8_decode_attention(q, k_data, k_scale, v_data, v_scale, capacity, window_left=new - 1)
    dequantized = [data[:, :, start:].float() * scale[:, :, start:, None]
                   for data, scale in ((k_data, k_scale), (v_data, v_scale))]
    expected = F.scaled_dot_product_attention(q.float(), *dequantized, enable_gqa=True)
    assert _relative_error(out, expected) < 2e-2
