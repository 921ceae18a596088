"""Fused LoRA linear layer: Triton kernels and their launchers.

The math (forward and backward) and the weight formats are in `lora_ref` (its module docstring),
beside the plain-PyTorch reference and the quantizers, which need no Triton; this module
re-exports them. Both passes run on `lora_gemm.lora_gemm`, the GEMM seeded with the rank-r term:
forward `y = s·S·Bᵀ + x·Wᵀ + bias`; backward `dx = (dS·A) ⊙ m/(1-p) + dy·W`. The kernels here:
- `_lora_shrink_kernel`: `out = scale · (a ⊙ m) · Mᵀ` with `M` `[r, K]`; gives `S` and `dS`.
- `_lora_reduce_tokens_kernel`: `out = scale · (q ⊙ m)ᵀ · P`, a reduction over tokens split into
  chunks whose fp32 partial sums are added by the launcher (deterministic, no atomics); gives
  `dB` and `dAᵀ`.

Matmul inputs are cast to the compute dtype, the dtype of `x` (bf16/fp16 MMA, fp32 as tf32 on the
GPU); accumulators are fp32; `S` and `dS` are kept in fp32. The rank is padded to 16 inside the
kernels (masked loads), the smallest `tl.dot` the GPU accepts. Row indices are widened to int64
before they meet the row stride of `x`, `dy` or the dropout mask (each can pass 2³¹ elements);
offsets into the rank-r operands stay int32.
"""

import torch
import triton
import triton.language as tl

from .jit_helpers import dot_dtype, wrapped_block
from .launch import interpreting, on_device_of_first_argument, output_buffer
from .lora_gemm import GEMM_CONFIGS, TensorDescriptor, gemm_config_name  # noqa: F401 (importable here before)
from .lora_gemm import lora_gemm, rank_block
from .lora_ref import (  # noqa: F401
    INT4_GROUP_SIZE,
    MAX_RANK,
    dequantize_int4,
    lora_linear_ref,
    quantize_int4,
    quantize_int8,
)


@triton.jit
def _lora_shrink_kernel(
    a_ptr, m_ptr, keep_ptr, out_ptr,
    M, K, rank,
    stride_am, stride_ak, stride_mr, stride_mk, stride_keep_m, stride_om,
    scale,
    HAS_KEEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """out[M, rank] (fp32) = scale · (a ⊙ keep) · Mᵀ, `a` `[M, K]`, `M` `[rank, K]` (strided)."""
    pid = tl.program_id(0)
    offs_m, rows = wrapped_block(pid, BLOCK_M, M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    compute_dtype: tl.constexpr = dot_dtype(a_ptr.dtype.element_ty, UPCAST)

    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    m_ptrs = m_ptr + offs_k[:, None] * stride_mk + offs_r[None, :] * stride_mr
    keep_ptrs = keep_ptr + rows.to(tl.int64)[:, None] * stride_keep_m + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        if HAS_KEEP:
            keep = tl.load(keep_ptrs, mask=offs_k[None, :] < k_left, other=0)
            a = tl.where(keep != 0, a, 0.0)
            keep_ptrs += BLOCK_K
        m = tl.load(m_ptrs, mask=(offs_k[:, None] < k_left) & (offs_r[None, :] < rank), other=0.0)
        acc = tl.dot(a.to(compute_dtype), m.to(compute_dtype), acc)
        a_ptrs += BLOCK_K * stride_ak
        m_ptrs += BLOCK_K * stride_mk

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_r[None, :]
    tl.store(out_ptrs, acc * scale, mask=(offs_m[:, None] < M) & (offs_r[None, :] < rank))


@triton.jit
def _lora_reduce_tokens_kernel(
    p_ptr, q_ptr, keep_ptr, out_ptr,
    T, N, rank, tokens_per_split,
    stride_pt, stride_pr, stride_qt, stride_qn, stride_keep_t, stride_os, stride_on,
    scale,
    HAS_KEEP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """out[split, N, rank] (fp32) = scale · Σ_{t in split} (q[t, :] ⊙ keep[t, :])ᵀ · P[t, :].

    `P` `[T, rank]`, `q` `[T, N]`; program (n-block, split) owns `tokens_per_split` tokens. The
    wide side (N) is the dot's M so the dot is BLOCK_N rows tall (wgmma) rather than rank rows.
    """
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n, cols = wrapped_block(pid_n, BLOCK_N, N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_t = tl.arange(0, BLOCK_T)
    compute_dtype: tl.constexpr = dot_dtype(q_ptr.dtype.element_ty, UPCAST)

    t_start = split * tokens_per_split
    t_end = min(T, t_start + tokens_per_split)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for t in range(t_start, t_end, BLOCK_T):
        tokens = t + offs_t
        in_split = tokens < t_end
        p = tl.load(
            p_ptr + tokens[:, None] * stride_pt + offs_r[None, :] * stride_pr,
            mask=in_split[:, None] & (offs_r[None, :] < rank), other=0.0,
        )  # fmt: skip
        tokens_64 = tokens.to(tl.int64)
        q = tl.load(q_ptr + tokens_64[:, None] * stride_qt + cols[None, :] * stride_qn, mask=in_split[:, None],
                    other=0.0)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + tokens_64[:, None] * stride_keep_t + cols[None, :], mask=in_split[:, None],
                           other=0)
            q = tl.where(keep != 0, q, 0.0)
        acc = tl.dot(tl.trans(q.to(compute_dtype)), p.to(compute_dtype), acc)

    out_ptrs = out_ptr + split * stride_os + offs_n[:, None] * stride_on + offs_r[None, :]
    tl.store(out_ptrs, acc * scale, mask=(offs_n[:, None] < N) & (offs_r[None, :] < rank))


# Configs, each compiled for sm_90 in tests/kernels/test_compile_sm90_lora.py.
# Shrink and token reductions are memory-bound (rank columns only): many small programs keep every
# SM streaming. The reduction's [rank, n] dot is below wgmma's 64 rows for rank < 64 (mma.sync).
# The fast configs won an H200 timing (kernels/TUNING.md) but spill once a dropout mask is loaded
# too, or above rank 64 (the shrink above rank 32 under triton 3.6); there the "careful" configs
# run, whose smaller tiles or extra warps keep everything in registers.
SHRINK_CONFIG_FAST = dict(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=4)
SHRINK_CONFIG_CAREFUL = dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=4)
SHRINK_CONFIG_WIDE = dict(BLOCK_M=64, BLOCK_K=64, num_warps=8, num_stages=4)
REDUCE_CONFIG_FAST = dict(BLOCK_T=64, BLOCK_N=128, num_warps=4, num_stages=4)
REDUCE_CONFIG_CAREFUL = dict(BLOCK_T=32, BLOCK_N=128, num_warps=8, num_stages=3)


def shrink_config(rank, has_keep):
    if rank > 64:
        return SHRINK_CONFIG_WIDE
    return SHRINK_CONFIG_CAREFUL if has_keep or rank > 32 else SHRINK_CONFIG_FAST


def reduce_config(rank, has_keep):
    return REDUCE_CONFIG_CAREFUL if has_keep or rank > 64 else REDUCE_CONFIG_FAST


def _sm_count(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


@on_device_of_first_argument
def lora_shrink(a, m, scale, keep_mask=None):
    """fp32 `[M, r]` = scale · (a ⊙ keep_mask) · mᵀ for `a` `[M, K]`, `m` `[r, K]` (any strides)."""
    M, K = a.shape
    rank = m.shape[0]
    out = output_buffer((M, rank), a.device, torch.float32)
    config = shrink_config(rank, keep_mask is not None)
    grid = (triton.cdiv(M, config["BLOCK_M"]),)
    _lora_shrink_kernel[grid](
        a, m, keep_mask if keep_mask is not None else a, out,
        M, K, rank,
        a.stride(0), a.stride(1), m.stride(0), m.stride(1),
        keep_mask.stride(0) if keep_mask is not None else 0, out.stride(0),
        float(scale),
        HAS_KEEP=keep_mask is not None, BLOCK_M=config["BLOCK_M"], BLOCK_K=config["BLOCK_K"],
        BLOCK_R=rank_block(rank), UPCAST=interpreting(), num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return out


@on_device_of_first_argument
def lora_reduce_tokens(p, q, scale, keep_mask=None):
    """fp32 `[N, r]` = scale · (q ⊙ keep_mask)ᵀ · p for `p` `[T, r]`, `q` `[T, N]`."""
    T, N = q.shape
    rank = p.shape[1]
    config = reduce_config(rank, keep_mask is not None)
    blocks_n = triton.cdiv(N, config["BLOCK_N"])
    # Split the tokens so that about two programs per SM run; each split writes its own partial sum.
    splits = max(1, min(triton.cdiv(T, config["BLOCK_T"]), triton.cdiv(2 * _sm_count(q.device), blocks_n)))
    tokens_per_split = triton.cdiv(triton.cdiv(T, splits), config["BLOCK_T"]) * config["BLOCK_T"]
    splits = triton.cdiv(T, tokens_per_split) if T > 0 else 1
    partial = output_buffer((splits, N, rank), q.device, torch.float32)
    if T == 0:
        partial.zero_()
        return partial.sum(0)
    _lora_reduce_tokens_kernel[(blocks_n, splits)](
        p, q, keep_mask if keep_mask is not None else q, partial,
        T, N, rank, tokens_per_split,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        keep_mask.stride(0) if keep_mask is not None else 0, partial.stride(0), partial.stride(1),
        float(scale),
        HAS_KEEP=keep_mask is not None, BLOCK_T=config["BLOCK_T"], BLOCK_N=config["BLOCK_N"],
        BLOCK_R=rank_block(rank), UPCAST=interpreting(), num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return partial.sum(0)


def lora_linear_fwd(x, weight, weight_scale, weight_offset, lora_a, lora_b, scaling, bias, keep_mask, dropout_p):
    """Forward of the docstring's math: returns `(y [T, out] in x.dtype, S [T, r] fp32)`.

    `x` `[T, in]` contiguous; `keep_mask` bool `[T, in]` or None.
    """
    keep = None if keep_mask is None else keep_mask.view(torch.uint8)
    lora_s = lora_shrink(x, lora_a, 1.0 / (1.0 - dropout_p), keep)
    y = lora_gemm(x, weight, True, weight_scale, weight_offset, lora_s, lora_b.t(), scaling, bias, None, 1.0, x.dtype)
    return y, lora_s


def lora_linear_bwd(
    grad_y, x, lora_s, weight, weight_scale, weight_offset, lora_a, lora_b, scaling, keep_mask, dropout_p, compute_dx
):
    """Backward of the docstring's math: returns `(dx or None, dA, dB)`, dA/dB in lora_a's dtype."""
    keep = None if keep_mask is None else keep_mask.view(torch.uint8)
    keep_scale = 1.0 / (1.0 - dropout_p)
    grad_s = lora_shrink(grad_y, lora_b.t(), scaling)
    grad_b = lora_reduce_tokens(lora_s, grad_y, scaling).to(lora_b.dtype)
    grad_a = lora_reduce_tokens(grad_s, x, keep_scale, keep).t().contiguous().to(lora_a.dtype)
    grad_x = None
    if compute_dx:
        grad_x = lora_gemm(
            grad_y, weight, False, weight_scale, weight_offset, grad_s, lora_a, 1.0, None, keep, keep_scale, x.dtype
        )
    return grad_x, grad_a, grad_b
