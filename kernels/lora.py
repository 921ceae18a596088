"""Fused LoRA linear layer: Triton kernels and their launchers.

The math (forward and backward) and the weight formats are in `lora_ref` (its module docstring),
beside the plain-PyTorch reference and the quantizers, which need no Triton; this module
re-exports them.

Kernels, four in all:
- `_lora_gemm_kernel`: one accumulator for `out = lora_left · lora_right (⊙ mask) + a · Wk + bias`.
  The rank-r term is a single extra `tl.dot` that seeds the accumulator before the main K loop, so
  the LoRA product never exists as a full-size tensor; the mask multiplies only that seed. Forward:
  `a = x`, `Wk = Wᵀ`, seed `s·S·Bᵀ`. Backward dx: `a = dy`, `Wk = W`, seed `(dS·A) ⊙ m/(1-p)`.
- `_lora_gemm_tma_kernel`: the same GEMM for a 16-bit float `W` on Hopper, its `a` and `W` tiles
  loaded by TMA (`_tma_applies` says when); `_lora_gemm_kernel` does every other case. On the GPU,
  a large GEMM with a 16-bit float `W` may also run as the seed written by `_lora_gemm_kernel`
  with an empty K loop, then cuBLAS adding `a · Wk` onto it in place: the fastest of these ways,
  timed at the first call of each shape, runs (`_choose_gemm_way`).
- `_lora_shrink_kernel`: `out = scale · (a ⊙ m) · Mᵀ` with `M` `[r, K]`; gives `S` and `dS`.
- `_lora_reduce_tokens_kernel`: `out = scale · (q ⊙ m)ᵀ · P`, a reduction over tokens split into
  chunks whose fp32 partial sums are added by the launcher (deterministic, no atomics); gives
  `dB` and `dAᵀ`.

Matmul inputs are cast to the compute dtype, the dtype of `x` (bf16/fp16 MMA, fp32 as tf32 on the
GPU); accumulators are fp32; `S` and `dS` are kept in fp32. The rank is padded to 16 inside the
kernels (masked loads), the smallest `tl.dot` the GPU accepts. Row indices are widened to int64
before they meet the row stride of `x`, `dy`, the output, the dropout mask or `W`: each of these
can pass 2³¹ elements (16.7k tokens through a 128k-vocabulary `lm_head`); offsets into the rank-r
operands and the int4 scales stay int32.
"""

from collections import namedtuple

import torch
import triton
import triton.language as tl

from .launch import interpreting, on_device_of_first_argument
from .lora_ref import (  # noqa: F401
    INT4_GROUP_SIZE,
    MAX_RANK,
    dequantize_int4,
    lora_linear_ref,
    quantize_int4,
    quantize_int8,
)

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton releases before host-side tensor descriptors: the pointer kernel only
    TensorDescriptor = None

@triton.jit
def _int4_tile(
    w_ptr, scale_ptr, offset_ptr, k_start, k_left, n_start, cols, N,
    stride_wk, stride_wn, stride_scale,
    W_TRANSPOSED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_SIZE: tl.constexpr,
):  # fmt: skip
    """fp32 tile `Wk[k_start : k_start + BLOCK_K, n_start : n_start + BLOCK_N]` of a packed int4 `W`.

    `W`'s rows hold its input channels two per byte (`quantize_int4`). Forward (`Wk = Wᵀ`) the
    packed axis is k: the tile is read as W's rows `[BLOCK_N, BLOCK_K / 2]`, unpacked along them
    and transposed. Backward (`Wk = W`) it is n: read as `[BLOCK_K, BLOCK_N / 2]` and unpacked.
    """
    if W_TRANSPOSED:
        # One group per tile, so one scale per column. Tiles past K read padding channels (0).
        tl.static_assert(GROUP_SIZE % BLOCK_K == 0)
        halves = k_start // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wn + halves[None, :] * stride_wk)
        group = k_start // GROUP_SIZE
        scale = tl.load(scale_ptr + cols * stride_scale + group).to(tl.float32)
        offset = tl.load(offset_ptr + cols * stride_scale + group).to(tl.float32)
        q = tl.interleave(packed & 15, packed >> 4).to(tl.float32)
        w = tl.trans(q * scale[:, None] + offset[:, None])
    else:
        # Whole groups per tile: scales are loaded per group ([BLOCK_K, groups], not per element,
        # which the pipeline would buffer at BLOCK_K × BLOCK_N × 4 bytes per stage) and broadcast.
        tl.static_assert(BLOCK_N % GROUP_SIZE == 0)
        offs_k = tl.arange(0, BLOCK_K)
        rows = k_start + offs_k
        in_k = offs_k[:, None] < k_left
        # Columns past N wrap inside W's packed width and groups (their results are never stored).
        groups = tl.cdiv(N, GROUP_SIZE)
        halves = (n_start // 2 + tl.arange(0, BLOCK_N // 2)) % (groups * (GROUP_SIZE // 2))
        packed = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_wk + halves[None, :] * stride_wn, mask=in_k,
                         other=0)
        tile_groups = (n_start // GROUP_SIZE + tl.arange(0, BLOCK_N // GROUP_SIZE)) % groups
        scale_ptrs = rows[:, None] * stride_scale + tile_groups[None, :]
        scale = tl.load(scale_ptr + scale_ptrs, mask=in_k, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + scale_ptrs, mask=in_k, other=0.0).to(tl.float32)
        q = tl.interleave(packed & 15, packed >> 4).to(tl.float32)
        q = tl.reshape(q, (BLOCK_K, BLOCK_N // GROUP_SIZE, GROUP_SIZE))
        w = tl.reshape(q * scale[:, :, None] + offset[:, :, None], (BLOCK_K, BLOCK_N))
    return w


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row-block, column-block) of output tile number `tile`, in grouped order: GROUP_M
    row-blocks share each column-block of Wk while it sits in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile % num_pid_in_group) % group_size_m
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _lora_seed(
    lora_left_ptr, lora_right_ptr, keep_ptr, rows, cols, rank,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_keep_m,
    lora_scale, keep_scale,
    HAS_KEEP: tl.constexpr, BLOCK_R: tl.constexpr, compute_dtype: tl.constexpr,
):  # fmt: skip
    """The accumulator's start, `(lora_scale · L[rows] · R[:, cols]) ⊙ keep · keep_scale` in fp32:
    the rank-r term as one extra `tl.dot`, so `[a | lora_scale·L] · [Wk ; R]` is one accumulator."""
    offs_r = tl.arange(0, BLOCK_R)
    lora_left = tl.load(
        lora_left_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
        mask=offs_r[None, :] < rank, other=0.0,
    )  # fmt: skip
    lora_right = tl.load(
        lora_right_ptr + offs_r[:, None] * stride_rr + cols[None, :] * stride_rn,
        mask=offs_r[:, None] < rank, other=0.0,
    )  # fmt: skip
    acc = tl.dot((lora_left.to(tl.float32) * lora_scale).to(compute_dtype), lora_right.to(compute_dtype))
    if HAS_KEEP:
        # Dropout acts on the LoRA input only, so in dx its mask multiplies only the LoRA term.
        keep = tl.load(keep_ptr + rows.to(tl.int64)[:, None] * stride_keep_m + cols[None, :])
        acc = tl.where(keep != 0, acc * keep_scale, 0.0)
    return acc


@triton.jit
def _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, cols, M, N, stride_om, HAS_BIAS: tl.constexpr):
    """`acc` (+ bias) into `out[offs_m, offs_n]`, in out's dtype; rows and columns past M, N are
    not written."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _lora_gemm_kernel(
    a_ptr, w_ptr, w_scale_ptr, w_offset_ptr, lora_left_ptr, lora_right_ptr, bias_ptr, keep_ptr, out_ptr,
    M, N, K, rank,
    stride_am, stride_ak, stride_wk, stride_wn, stride_scale,
    stride_lm, stride_lr, stride_rr, stride_rn,
    stride_keep_m, stride_om,
    lora_scale, keep_scale,
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, W_INT8: tl.constexpr, W_INT4: tl.constexpr,
    W_TRANSPOSED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, INT4_GROUP: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """out[M, N] = (lora_scale · L·R) ⊙ keep · keep_scale + a·Wk + bias, one fp32 accumulator.

    `a` `[M, K]`, `Wk[k, n]` (strides given, so `Wᵀ` needs no copy), `L` `[M, rank]`,
    `R` `[rank, N]`, `keep` `[M, N]`. `W_TRANSPOSED`: `Wk = Wᵀ` (forward) rather than `W` (dx).
    An int8 `W` is scaled per output channel of `W`: per column of `Wk` forward, per row for dx.
    An int4 `W` (packed, strides in bytes) is dequantized tile by tile by `_int4_tile`.
    Every shape, stride and weight format; `_lora_gemm_tma_kernel` runs instead for aligned 16-bit
    float weights on Hopper (`_tma_applies`).
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows and columns past the edge wrap onto valid ones, so loads need no row/column mask;
    # only the store is masked.
    rows = offs_m % M
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    if UPCAST:
        compute_dtype = tl.float32
    else:
        compute_dtype = a_ptr.dtype.element_ty

    acc = _lora_seed(
        lora_left_ptr, lora_right_ptr, keep_ptr, rows, cols, rank,
        stride_lm, stride_lr, stride_rr, stride_rn, stride_keep_m, lora_scale, keep_scale,
        HAS_KEEP, BLOCK_R, compute_dtype,
    )  # fmt: skip
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    if not W_INT4:  # int4 tiles index W themselves (_int4_tile)
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wn
    if W_INT8 and W_TRANSPOSED:
        col_scale = tl.load(w_scale_ptr + cols).to(tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        if W_INT4:
            w = _int4_tile(
                w_ptr, w_scale_ptr, w_offset_ptr, k * BLOCK_K, k_left, pid_n * BLOCK_N, cols, N,
                stride_wk, stride_wn, stride_scale, W_TRANSPOSED, BLOCK_K, BLOCK_N, INT4_GROUP,
            )  # fmt: skip
        else:
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
            w_ptrs += BLOCK_K * stride_wk
        if W_INT8:
            if W_TRANSPOSED:
                w = w.to(tl.float32) * col_scale[None, :]
            else:
                row_scale = tl.load(w_scale_ptr + k * BLOCK_K + offs_k, mask=offs_k < k_left, other=0.0)
                w = w.to(tl.float32) * row_scale.to(tl.float32)[:, None]
        acc = tl.dot(a.to(compute_dtype), w.to(compute_dtype), acc)
        a_ptrs += BLOCK_K * stride_ak

    _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, cols, M, N, stride_om, HAS_BIAS)


@triton.jit
def _lora_gemm_tma_kernel(
    a_desc, w_desc, lora_left_ptr, lora_right_ptr, bias_ptr, keep_ptr, out_ptr,
    M, N, K, rank,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_keep_m, stride_om,
    lora_scale, keep_scale,
    HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, W_TRANSPOSED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """`_lora_gemm_kernel`'s math for a 16-bit float `W`, its tiles read through TMA descriptors.

    Hopper's tensor memory accelerator copies each tile of `a` and `W` to shared memory by itself
    (out-of-bounds elements read as zero), so the warps spend no instructions on addresses or
    masks. `a_desc`: `a` `[M, K]`; `w_desc`: `W` `[N, K]` when `W_TRANSPOSED` (forward), else
    `[K, N]` (dx). The output is stored through pointers: a TMA store would stage the whole tile
    in shared memory, which the 128×256 config has no room for beside its pipeline.
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % N
    if UPCAST:
        compute_dtype = tl.float32
    else:
        compute_dtype = a_desc.dtype

    acc = _lora_seed(
        lora_left_ptr, lora_right_ptr, keep_ptr, rows, cols, rank,
        stride_lm, stride_lr, stride_rr, stride_rn, stride_keep_m, lora_scale, keep_scale,
        HAS_KEEP, BLOCK_R, compute_dtype,
    )  # fmt: skip
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        if W_TRANSPOSED:
            w = tl.trans(w_desc.load([pid_n * BLOCK_N, k * BLOCK_K]))
        else:
            w = w_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
        acc = tl.dot(a.to(compute_dtype), w.to(compute_dtype), acc)

    _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, cols, M, N, stride_om, HAS_BIAS)


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
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m % M
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    if UPCAST:
        compute_dtype = tl.float32
    else:
        compute_dtype = a_ptr.dtype.element_ty

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
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % N
    offs_r = tl.arange(0, BLOCK_R)
    offs_t = tl.arange(0, BLOCK_T)
    if UPCAST:
        compute_dtype = tl.float32
    else:
        compute_dtype = q_ptr.dtype.element_ty

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
# Main GEMM: the tiles of Triton's Hopper matmul tutorial (wgmma needs BLOCK_M % 64 == 0 and
# 4k warps). 128×256 for large problems; 128×128 when the grid would not fill the GPU, and for an
# int8 or int4 W, whose in-register dequantization does not fit beside a 128×256 accumulator, and
# for fp32 (tf32), whose tiles take twice the shared memory per element (hence also BLOCK_K 32;
# every BLOCK_K divides INT4_GROUP_SIZE, so a forward int4 tile has one scale per column).
GEMM_CONFIGS = {
    "large": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "medium": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    "medium_fp32": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
}
# Shrink and token reductions are memory-bound (rank columns only): many small programs keep every
# SM streaming. The reduction's [rank, n] dot is below wgmma's 64 rows for rank < 64 (mma.sync).
# Measured on an H200 at 8k tokens × 4096, r=16 (bf16): shrink 28.6 µs with 32×128 tiles (64×128:
# 46.6 µs), reduction 33.5 µs with 4 warps (8 warps, 3 stages: 81 µs). Those fast configs spill
# once a dropout mask is loaded too, or above rank 64 (the shrink above rank 32 under triton 3.6,
# the GPU machine's); there the "careful" configs run, whose smaller tiles or extra warps keep
# everything in registers (the reduction's 32-token steps since its token offsets are int64: at 64,
# float32 rank 128 with a mask spilled under triton 3.9).
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


def gemm_config_name(M, N, K, dtype, w_quantized):
    """Which of GEMM_CONFIGS the launcher uses for an [M, N] output over K, untimed (`_gemm_ways`)."""
    # 128×256 needs a full wave of tiles (132 SMs), 16-divisible sizes (else the loads are not
    # vectorized and the tile spills) and a 16-bit float W; fp32 (tf32) always spills there.
    if dtype == torch.float32:
        return "medium_fp32"
    large = triton.cdiv(M, 128) * triton.cdiv(N, 256) >= 132 and N % 16 == 0 and K % 16 == 0 and not w_quantized
    return "large" if large else "medium"


def _output(shape, device, dtype):
    """An output buffer; NaN-filled (poisoned) under the interpreter, where the tests run, so an
    element a kernel forgets to write fails them. Compiled runs skip the fill: it would cost a full
    write of the output (~25 µs for 8k×4096 bf16 on an H200)."""
    if interpreting():
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def _block_r(rank):
    return max(16, triton.next_power_of_2(rank))


def _sm_count(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _tma_applies(a, w, out):
    """Whether `_lora_gemm_tma_kernel` can run: a 16-bit float `W`, Triton's host-side descriptors,
    a Hopper-or-newer GPU (or the interpreter, where the tests run it), and what a descriptor
    requires of every operand: no empty dimension, unit inner stride, 16-byte aligned start and
    row stride."""
    if TensorDescriptor is None or w.dtype not in (torch.float16, torch.bfloat16):
        return False
    # TMA is NVIDIA's, from Hopper (sm_90) on; ROCm builds of torch also call their GPUs "cuda".
    if a.device.type == "cuda" and (torch.version.hip or torch.cuda.get_device_capability(a.device)[0] < 9):
        return False
    return all(
        t.numel() > 0 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
        for t in (a, w, out)
    )


# On the GPU a large GEMM can run several ways: either Triton kernel (TMA where `_tma_applies`)
# at either 16-bit config, or "cublas": the seed (+ bias) written by the pointer kernel with an
# empty K loop, then cuBLAS accumulating `a·Wk` onto it in place (`addmm_`, beta = 1), which keeps
# the fusion's point (no full-size LoRA tensor) with the vendor's GEMM. Which is fastest depends on
# the GPU, the shape and the Triton release, and none could be measured where this was written: at
# a shape's first call `_choose_gemm_way` times each and keeps the fastest. Below this much work
# (M·N·K) a GEMM takes a few µs and the first way runs untimed.
TUNE_MIN_WORK = 2**32
# What a GEMM's timed choice holds for: "fwd" or "dx", M rounded up to a power of 2 (so packed
# batches of one length share a choice), N, K, the padded rank, the dtypes, bias and dropout mask.
GemmKey = namedtuple("GemmKey", "kind m_bucket n k block_r a_dtype w_dtype lora_dtype has_bias has_keep device")
# GemmKey -> {way: ms} as timed; the chosen way is the fastest. Read by bench/bench_lora.py to
# report what each way measured.
GEMM_TIMINGS = {}
_CHOSEN_GEMM_WAYS = {}


def _gemm_ways(a, w, out):
    """The ways `lora_gemm` may run, the first the one it runs untimed: the TMA kernel where it
    applies, else the pointer kernel, at `gemm_config_name`'s config. Large 16-bit float GEMMs on
    an NVIDIA GPU get every alternative too, unless deterministic algorithms are asked for."""
    M, K = a.shape
    N = out.shape[1]
    tma = _tma_applies(a, w, out)
    w_quantized = w.dtype in (torch.int8, torch.uint8)
    first = ("tma" if tma else "pointer", gemm_config_name(M, N, K, a.dtype, w_quantized))
    if a.device.type != "cuda" or torch.version.hip or w.dtype not in (torch.float16, torch.bfloat16):
        return [first]
    # Timing could pick another way in the next run, changing the low bits of the results, which
    # torch.use_deterministic_algorithms(True) asks not to happen.
    if M * N * K < TUNE_MIN_WORK or torch.are_deterministic_algorithms_enabled():
        return [first]
    configs = ("large", "medium") if N % 16 == 0 and K % 16 == 0 else ("medium",)
    kernels = ("tma", "pointer") if tma else ("pointer",)
    ways = [first] + [(kernel, config) for kernel in kernels for config in configs if (kernel, config) != first]
    # The cublas way's config is that of its seed-writing launch.
    return ways + [("cublas", configs[0])]


def _time_ms(launch, repeats=5, rounds=3):
    """Device ms of one `launch()`: the best of `rounds` rounds of `repeats` launches, after one
    launch that compiles it. No L2 flush: every way is timed alike, and only their order matters."""
    launch()
    best = float("inf")
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            launch()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / repeats)
    return best


def _choose_gemm_way(key, ways, launch):
    """The way to run GEMM `key`: the only one; the one chosen before; or, timed now, the fastest.
    During CUDA-graph capture nothing can be timed or synchronized, so an unseen key gets the first."""
    if len(ways) == 1:
        return ways[0]
    if key not in _CHOSEN_GEMM_WAYS:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return ways[0]
        timings = {way: _time_ms(lambda: launch(way)) for way in ways}
        GEMM_TIMINGS[key] = timings
        _CHOSEN_GEMM_WAYS[key] = min(timings, key=timings.get)
    return _CHOSEN_GEMM_WAYS[key]


@on_device_of_first_argument
def lora_gemm(
    a, w, w_is_transposed, weight_scale, weight_offset, lora_left, lora_right, lora_scale, bias, keep_mask, keep_scale,
    out_dtype,
):  # fmt: skip
    """out = (lora_scale · lora_left · lora_right) ⊙ keep_mask · keep_scale + a · Wk + bias.

    `Wk = Wᵀ` when `w_is_transposed` (forward, `W` is `[N, K]`), else `Wk = W` (`[K, N]`). `w` is
    `W` as stored: float; int8 with `weight_scale` `[out]`; or uint8-packed int4 with
    `weight_scale` and `weight_offset` `[out, groups]` (`quantize_int4`).
    `lora_left` `[M, r]`, `lora_right` `[r, N]` (any strides). Inputs are assumed valid.
    Runs the way `_gemm_ways` and `_choose_gemm_way` pick (see TUNE_MIN_WORK).
    """
    M, K = a.shape
    N = lora_right.shape[1]
    rank = lora_left.shape[1]
    out = _output((M, N), a.device, out_dtype)
    operands = dict(
        a=a, w=w, w_is_transposed=w_is_transposed,
        weight_scale=None if weight_scale is None else weight_scale.contiguous(),
        weight_offset=None if weight_offset is None else weight_offset.contiguous(),
        lora_left=lora_left, lora_right=lora_right, lora_scale=float(lora_scale),
        bias=None if bias is None else bias.contiguous(), keep_mask=keep_mask, keep_scale=float(keep_scale), out=out,
    )  # fmt: skip
    ways = _gemm_ways(a, w, out)
    key = GemmKey(
        "fwd" if w_is_transposed else "dx", triton.next_power_of_2(M), N, K, _block_r(rank), a.dtype, w.dtype,
        lora_left.dtype, bias is not None, keep_mask is not None, a.device,
    )  # fmt: skip
    way = _choose_gemm_way(key, ways, lambda way: _launch_gemm(way, **operands))
    _launch_gemm(way, **operands)
    return out


def _launch_gemm(
    way, a, w, w_is_transposed, weight_scale, weight_offset, lora_left, lora_right, lora_scale, bias, keep_mask,
    keep_scale, out,
):  # fmt: skip
    """Write `lora_gemm`'s `out` the way `way` = (kernel, config name) says."""
    kernel, config_name = way
    if kernel == "cublas":
        _launch_gemm(
            ("pointer", config_name), a[:, :0], w, w_is_transposed, weight_scale, weight_offset, lora_left, lora_right,
            lora_scale, bias, keep_mask, keep_scale, out,
        )  # fmt: skip
        out.addmm_(a, w.t() if w_is_transposed else w)
        return
    M, K = a.shape
    N = out.shape[1]
    rank = lora_left.shape[1]
    config = GEMM_CONFIGS[config_name]
    meta = {k: v for k, v in config.items() if k.startswith(("BLOCK", "GROUP"))}
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    common = dict(
        HAS_BIAS=bias is not None, HAS_KEEP=keep_mask is not None, W_TRANSPOSED=w_is_transposed,
        BLOCK_R=_block_r(rank), UPCAST=interpreting(), num_warps=config["num_warps"], num_stages=config["num_stages"],
        **meta,
    )  # fmt: skip
    pointer_operands = (
        lora_left, lora_right, bias if bias is not None else a, keep_mask if keep_mask is not None else a,
    )  # fmt: skip
    pointer_strides = (
        lora_left.stride(0), lora_left.stride(1), lora_right.stride(0), lora_right.stride(1),
        keep_mask.stride(0) if keep_mask is not None else 0,
    )  # fmt: skip
    if kernel == "tma":
        _lora_gemm_tma_kernel[(tiles,)](
            TensorDescriptor.from_tensor(a, [block_m, block_k]),
            TensorDescriptor.from_tensor(w, [block_n, block_k] if w_is_transposed else [block_k, block_n]),
            *pointer_operands, out, M, N, K, rank, *pointer_strides, out.stride(0), lora_scale, keep_scale,
            **common,
        )  # fmt: skip
        return
    w_int8 = w.dtype == torch.int8
    w_int4 = w.dtype == torch.uint8
    stride_wk, stride_wn = (w.stride(1), w.stride(0)) if w_is_transposed else (w.stride(0), w.stride(1))
    _lora_gemm_kernel[(tiles,)](
        a, w, weight_scale if weight_scale is not None else w, weight_offset if w_int4 else w, *pointer_operands, out,
        M, N, K, rank,
        a.stride(0), a.stride(1), stride_wk, stride_wn, weight_scale.stride(0) if w_int4 else 0,
        *pointer_strides, out.stride(0),
        lora_scale, keep_scale,
        W_INT8=w_int8, W_INT4=w_int4, INT4_GROUP=INT4_GROUP_SIZE, **common,
    )  # fmt: skip


@on_device_of_first_argument
def lora_shrink(a, m, scale, keep_mask=None):
    """fp32 `[M, r]` = scale · (a ⊙ keep_mask) · mᵀ for `a` `[M, K]`, `m` `[r, K]` (any strides)."""
    M, K = a.shape
    rank = m.shape[0]
    out = _output((M, rank), a.device, torch.float32)
    config = shrink_config(rank, keep_mask is not None)
    grid = (triton.cdiv(M, config["BLOCK_M"]),)
    _lora_shrink_kernel[grid](
        a, m, keep_mask if keep_mask is not None else a, out,
        M, K, rank,
        a.stride(0), a.stride(1), m.stride(0), m.stride(1),
        keep_mask.stride(0) if keep_mask is not None else 0, out.stride(0),
        float(scale),
        HAS_KEEP=keep_mask is not None, BLOCK_M=config["BLOCK_M"], BLOCK_K=config["BLOCK_K"],
        BLOCK_R=_block_r(rank), UPCAST=interpreting(), num_warps=config["num_warps"], num_stages=config["num_stages"],
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
    partial = _output((splits, N, rank), q.device, torch.float32)
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
        BLOCK_R=_block_r(rank), UPCAST=interpreting(), num_warps=config["num_warps"], num_stages=config["num_stages"],
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
