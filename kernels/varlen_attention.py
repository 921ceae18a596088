"""Varlen (packed) attention: Triton kernels and their launchers.

The layout, the masks and the math are in `varlen_attention_ref` (its module docstring), beside the
input checks and the plain-PyTorch reference, which need no Triton; this module re-exports them.
"""

# ---------------------------------------------------------------------------------------------
# Triton kernels
#
# Forward, per (query block, head): online softmax over the key blocks the block can see,
#     m = max_j s_ij,  l = sum_j exp(s_ij - m),  out_i = sum_j exp(s_ij - m) v_j / l,  lse_i = m + log l,
# in base 2: scores are multiplied by log2(e) once (folded into the scale), then exp2.
# Backward, with p_ij = exp(s_ij - lse_i), dp_ij = do_i·v_j and delta_i = rowsum(o_i * do_i) - dlse_i:
#     ds_ij = p_ij (dp_ij - delta_i) * dsoftcap_ij,   dv_j = sum_i p_ij do_i,
#     dk_j = scale * sum_i ds_ij q_i,                 dq_i = scale * sum_j ds_ij k_j,
# where dsoftcap = 1 - tanh(scale q·k / softcap)^2 with a softcap, else 1. dK/dV run per key block
# (summing over the query heads of its GQA group) and dQ per query block: each output element is
# written by one program, so the backward needs no atomics and is deterministic.
#
# A query block loops over the key blocks [lo, hi) its rows can see; blocks outside the visible band
# (above the diagonal, left of the window) are never visited. Blocks that every row sees entirely,
# [mid_lo, mid_hi), skip the mask; the others (window's left edge, diagonal, sequence tail) apply
# it. The test is one block-uniform branch inside a single loop: three separate loops (masked,
# unmasked, masked) measured 60-80 more registers per thread and spilled at head_dim 128 on sm_90.
# The dK/dV pass does the same over the query blocks that see a key block.
#
# Programs map to (sequence, block) pairs without a host sync: sequence b owns the "virtual"
# blocks [cu_seqlens[b] // BLOCK + b, cu_seqlens[b+1] // BLOCK + b + 1), at least
# cdiv(len_b, BLOCK) of them, so a grid of total // BLOCK + batch programs covers every block and
# wastes at most one program per sequence; a program finds its sequence by binary search.
#
# Indices (rows within a sequence, heads) are int32; each is widened to int64 before it meets a
# stride, since a packed batch, one long document's keys and the lse `[num_heads, total_q]` can
# each exceed 2**31 elements. Widened once per tile row, the multiply stays a single wide
# multiply-add. tests/kernels/test_compile_sm90_varlen_attention.py checks every stride for it.
# ---------------------------------------------------------------------------------------------


import torch
import triton
import triton.language as tl

from .jit_helpers import LOG2E, UNBOUNDED, tanh
from .launch import interpreting, on_device_of_first_argument
from .varlen_attention_ref import check_varlen_inputs, varlen_attention_ref, visible_keys_mask  # noqa: F401

LN2 = tl.constexpr(0.6931471805599453)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Launch configs, keyed by BLOCK_D (head_dim rounded up to a power of two, at least 32):
# (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages). BLOCK_M and, in the dK/dV pass, the key
# block are multiples of 64 so every tl.dot maps to Hopper's wgmma. Chosen from sm_90 compiles on
# CPU as the largest tiles without register spills: the fp32 accumulators (two of them in dK/dV)
# press on registers from head_dim 128. Checked by tests/kernels/test_compile_sm90_varlen_attention.py
# (wgmma, shared memory, no spills) under triton 3.9 and 3.6 (what spilled, and the timing status:
# kernels/TUNING.md).
FWD_CONFIGS = {
    32: (128, 64, 4, 3),
    64: (128, 64, 4, 3),
    128: (128, 64, 8, 3),
    256: (64, 64, 8, 2),
}
# dK/dV pass: (BLOCK_M query rows per step, BLOCK_N keys resident, num_warps, num_stages, D_SPLIT).
BWD_DKDV_CONFIGS = {
    32: (32, 128, 8, 3, 1),
    64: (32, 128, 8, 3, 1),
    128: (32, 64, 8, 2, 1),
    256: (16, 64, 8, 2, 2),
}
# dQ pass: (BLOCK_M query rows resident, BLOCK_N keys per step, num_warps, num_stages).
BWD_DQ_CONFIGS = {
    32: (128, 32, 4, 3),
    64: (128, 64, 8, 3),
    128: (128, 64, 8, 2),
    256: (64, 32, 8, 2),
}
# float32 operands (tf32 wgmma) take twice the shared memory and registers: smaller tiles. At
# head_dim > 128 no float32 dK/dV config avoids spills; the reference serves those inputs.
FP32_MAX_HEAD_DIM = 128
FWD_CONFIGS_FP32 = {block_d: (64, 32, 4, 2) for block_d in (32, 64, 128)}
BWD_DKDV_CONFIGS_FP32 = {32: (16, 64, 4, 2, 1), 64: (16, 64, 4, 2, 1), 128: (16, 64, 8, 2, 2)}
BWD_DQ_CONFIGS_FP32 = {block_d: (64, 32, 4, 2) for block_d in (32, 64, 128)}
# The interpreter runs one config; small blocks make the short test sequences cross several
# blocks, so masked and unmasked blocks and tails are all exercised.
INTERPRETER_CONFIG = (32, 16, 4, 1)
INTERPRETER_DKDV_CONFIG = (16, 32, 4, 1, 1)
_DELTA_BLOCK_T = 64


def block_d_at_least_32(head_dim):
    """head_dim padded to a power of two, at least 32 (smaller head dims share that config)."""
    return max(32, triton.next_power_of_2(head_dim))


@triton.jit
def _sequence_of_block(cu_seqlens, block, batch, BLOCK: tl.constexpr):
    """Largest b with cu_seqlens[b] // BLOCK + b <= block (see the virtual blocks above)."""
    lo = batch * 0
    hi = batch - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        owns = tl.load(cu_seqlens + mid) // BLOCK + mid <= block
        lo = tl.where(owns, mid, lo)
        hi = tl.where(owns, hi, mid - 1)
    return lo


@triton.jit
def _sequence_span(cu_seqlens, seq):
    """Sequence seq's first row (int64: it offsets pointers) and length."""
    start = tl.load(cu_seqlens + seq)
    length = tl.load(cu_seqlens + seq + 1) - start
    return start.to(tl.int64), length


@triton.jit
def _block_in_sequence(cu_seqlens, block, batch, BLOCK: tl.constexpr):
    """The sequence that owns virtual block `block`, its first row and length, and the block's first
    row within it: at or past the length for a sequence's spare block, whose program must return."""
    seq = _sequence_of_block(cu_seqlens, block, batch, BLOCK)
    start = tl.load(cu_seqlens + seq)
    first = (block - (start // BLOCK + seq)) * BLOCK
    length = tl.load(cu_seqlens + seq + 1) - start
    return seq, start.to(tl.int64), length, first


@triton.jit
def _query_block(cu_seqlens_q, cu_seqlens_k, batch, BLOCK_M: tl.constexpr):
    """The forward's and dQ's program: its head, and its query block's sequence (first query row and
    length, the block's first row in it: at or past the length for a spare block, whose program must
    return; first key row and length). Last query blocks first: under a causal mask they see the most keys."""
    block = tl.num_programs(0) - 1 - tl.program_id(0)
    seq, q_start, len_q, first_row = _block_in_sequence(cu_seqlens_q, block, batch, BLOCK_M)
    k_start, len_k = _sequence_span(cu_seqlens_k, seq)
    return tl.program_id(1).to(tl.int64), q_start, len_q, first_row, k_start, len_k


@triton.jit
def _load_tile(ptrs, rows, num_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    if HEAD_DIM == BLOCK_D:
        tile = tl.load(ptrs, mask=rows[:, None] < num_rows, other=0.0)
    else:
        tile = tl.load(ptrs, mask=(rows[:, None] < num_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        # The interpreter computes bf16 arithmetic wrongly; it upcasts right after every load.
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _load_rows(base, rows, stride, num_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               UPCAST: tl.constexpr):
    """Rows `rows` of the [num_rows, HEAD_DIM] matrix at `base` with row stride `stride`, zeros past its end."""
    return _load_tile(base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :], rows, num_rows, offs_d, HEAD_DIM,
                      BLOCK_D, UPCAST)


@triton.jit
def _scores_log2(qk, qk_scale, scale_over_softcap, softcap_log2, SOFTCAP: tl.constexpr):
    """Scores times log2(e), and tanh(scale q·k / softcap) for the softcap's derivative."""
    if SOFTCAP:
        capped = tanh(qk * scale_over_softcap)
        return capped * softcap_log2, capped
    else:
        return qk * qk_scale, qk


@triton.jit
def _key_range(first_row, len_q, len_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) that the query block from first_row sees, and [mid_lo, mid_hi), the key blocks
    that every one of its rows sees entirely. lo, mid_lo, mid_hi are multiples of BLOCK_N or equal hi."""
    diag = len_k - len_q
    last_row = tl.minimum(first_row + BLOCK_M, len_q) - 1
    lo = tl.maximum(first_row + diag - window_left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(last_row + diag + window_right + 1, len_k)
    # Right of the last row's left edge, left of the first row's right edge.
    full_lo = tl.cdiv(tl.maximum(last_row + diag - window_left, 0), BLOCK_N) * BLOCK_N
    full_hi = tl.maximum(tl.minimum(first_row + diag + window_right + 1, len_k), 0) // BLOCK_N * BLOCK_N
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    mid_hi = tl.maximum(tl.minimum(full_hi, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _key_edges(rows, len_q, len_k, window_left, window_right):
    """Row i sees keys left_edge[i] <= j <= right_edge[i]; clamping to the last key folds in j < len_k."""
    diag = len_k - len_q
    return rows + diag - window_left, tl.minimum(rows + diag + window_right, len_k - 1)


@triton.jit
def _in_band(index, first, last):
    """Mask [len(first), len(index)]: first[i] <= index[j] <= last[i]."""
    return (index[None, :] >= first[:, None]) & (index[None, :] <= last[:, None])


@triton.jit
def _dscores(p, dp, delta, capped, SOFTCAP: tl.constexpr):
    """ds = p (dp - delta) * dsoftcap (see above); `delta` comes broadcast to p's layout."""
    ds = p * (dp - delta)
    if SOFTCAP:
        ds = ds * (1.0 - capped * capped)
    return ds


@triton.jit(do_not_specialize=["batch", "group", "stride_lse_h", "window_left", "window_right"])
def _varlen_attention_fwd_kernel(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k, batch, group,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lse_h,
    qk_scale, scale_over_softcap, softcap_log2, window_left, window_right,
    SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    head, q_start, len_q, first_row, k_start, len_k = _query_block(cu_seqlens_q, cu_seqlens_k, batch, BLOCK_M)
    if first_row >= len_q:
        return

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = first_row + tl.arange(0, BLOCK_M)
    kv_head = head // group
    q = _load_tile(Q + (q_start + rows[:, None]) * stride_qt + head * stride_qh + offs_d[None, :],
                   rows, len_q, offs_d, HEAD_DIM, BLOCK_D, UPCAST)
    k_base = K + k_start * stride_kt + kv_head * stride_kh
    v_base = V + k_start * stride_vt + kv_head * stride_vh
    left_edge, right_edge = _key_edges(rows, len_q, len_k, window_left, window_right)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _key_range(first_row, len_q, len_k, window_left, window_right, BLOCK_M, BLOCK_N)
    # One loop with a block-uniform branch: separate masked and unmasked loops cost registers (spills).
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, stride_kt, len_k, offs_d, HEAD_DIM, BLOCK_D, UPCAST)
        v = _load_rows(v_base, cols, stride_vt, len_k, offs_d, HEAD_DIM, BLOCK_D, UPCAST)
        s, _ = _scores_log2(tl.dot(q, tl.trans(k)), qk_scale, scale_over_softcap, softcap_log2, SOFTCAP)
        if (start_n < mid_lo) | (start_n >= mid_hi):
            s = tl.where(_in_band(cols, left_edge, right_edge), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    # Rows that saw no key: zeros and lse = -inf.
    saw_none = l_i == 0.0
    l_safe = tl.where(saw_none, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(saw_none, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    row_ok = rows < len_q
    tl.store(Out + (q_start + rows[:, None]) * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + head * stride_lse_h + q_start + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["total_q", "stride_delta_h"])
def _varlen_attention_bwd_delta_kernel(
    Out, dOut, dLse, Delta, total_q, stride_ot, stride_oh, stride_dot, stride_doh, stride_delta_h,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta[h, t] = sum_d out[t, h, d] * dout[t, h, d] - dlse[h, t]."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < total_q) & (offs_d[None, :] < HEAD_DIM)
    rows64 = rows.to(tl.int64)
    o = tl.load(Out + rows64[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(dOut + rows64[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dLse + head * stride_delta_h + rows, mask=rows < total_q, other=0.0)
    tl.store(Delta + head * stride_delta_h + rows, delta, mask=rows < total_q)


@triton.jit(do_not_specialize=["batch", "group", "stride_lse_h", "window_left", "window_right"])
def _varlen_attention_bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, dK, dV, cu_seqlens_q, cu_seqlens_k, batch, group,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h,
    softmax_scale, qk_scale, scale_over_softcap, softcap_log2, window_left, window_right,
    SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, D_SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):
    """Per key block: dK, dV summed over the query heads of its GQA group. Tiles are transposed
    ([keys, queries]) so the key block is the M side of every tl.dot.

    With D_SPLIT = 2, each program owns half of dK/dV's columns (the scores still need all of
    head_dim): at head_dim 256 two full [BLOCK_N, 256] fp32 accumulators would spill registers."""
    block = tl.program_id(0)
    kv_head = (tl.program_id(1) // D_SPLIT).to(tl.int64)
    part = tl.program_id(1) % D_SPLIT
    seq, k_start, len_k, first_col = _block_in_sequence(cu_seqlens_k, block, batch, BLOCK_N)
    if first_col >= len_k:
        return
    q_start, len_q = _sequence_span(cu_seqlens_q, seq)
    diag = len_k - len_q
    last_col = tl.minimum(first_col + BLOCK_N, len_k) - 1

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_part = part * (BLOCK_D // D_SPLIT) + tl.arange(0, BLOCK_D // D_SPLIT)
    cols = first_col + tl.arange(0, BLOCK_N)
    k = _load_tile(K + (k_start + cols[:, None]) * stride_kt + kv_head * stride_kh + offs_d[None, :],
                   cols, len_k, offs_d, HEAD_DIM, BLOCK_D, UPCAST)
    v = _load_tile(V + (k_start + cols[:, None]) * stride_vt + kv_head * stride_vh + offs_d[None, :],
                   cols, len_k, offs_d, HEAD_DIM, BLOCK_D, UPCAST)

    # Row i sees key j when i + diag - window_left <= j <= i + diag + window_right, so key j is seen by
    # rows first_row_of_col[j] <= i <= last_row_of_col[j]; keys past the sequence by none.
    first_row_of_col = tl.where(cols < len_k, cols - diag - window_right, UNBOUNDED)
    last_row_of_col = tl.minimum(cols - diag + window_left, len_q - 1)
    # Rows [q_lo, q_hi) see some key of this block; rows [mid_lo, mid_hi) see all of a full block.
    q_lo = tl.maximum(first_col - diag - window_right, 0) // BLOCK_M * BLOCK_M
    q_hi = tl.minimum(last_col - diag + window_left + 1, len_q)
    full_lo = tl.cdiv(tl.maximum(first_col + BLOCK_N - 1 - diag - window_right, 0), BLOCK_M) * BLOCK_M
    full_hi = tl.maximum(tl.minimum(first_col - diag + window_left + 1, len_q), 0) // BLOCK_M * BLOCK_M
    full_hi = tl.where(first_col + BLOCK_N > len_k, 0, full_hi)
    mid_lo = tl.minimum(tl.maximum(full_lo, q_lo), q_hi)
    mid_hi = tl.maximum(tl.minimum(full_hi, q_hi), mid_lo)

    dk = tl.zeros([BLOCK_N, BLOCK_D // D_SPLIT], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D // D_SPLIT], dtype=tl.float32)
    for head in range(kv_head * group, kv_head * group + group):
        q_base = Q + q_start * stride_qt + head * stride_qh
        do_base = dOut + q_start * stride_dot + head * stride_doh
        lse_base = Lse + head * stride_lse_h + q_start
        delta_base = Delta + head * stride_lse_h + q_start
        for start_m in range(q_lo, q_hi, BLOCK_M):
            rows = start_m + offs_m
            q = _load_rows(q_base, rows, stride_qt, len_q, offs_d, HEAD_DIM, BLOCK_D, UPCAST)
            do = _load_rows(do_base, rows, stride_dot, len_q, offs_d, HEAD_DIM, BLOCK_D, UPCAST)
            if D_SPLIT == 1:
                q_part = q
                do_part = do
            else:
                q_part = _load_rows(q_base, rows, stride_qt, len_q, offs_part, HEAD_DIM, BLOCK_D, UPCAST)
                do_part = _load_rows(do_base, rows, stride_dot, len_q, offs_part, HEAD_DIM, BLOCK_D, UPCAST)
            lse_log2 = tl.load(lse_base + rows, mask=rows < len_q, other=0.0) * LOG2E
            delta = tl.load(delta_base + rows, mask=rows < len_q, other=0.0)
            s_t, capped_t = _scores_log2(tl.dot(k, tl.trans(q)), qk_scale, scale_over_softcap, softcap_log2,
                                         SOFTCAP)
            p_t = tl.exp2(s_t - lse_log2[None, :])
            if (start_m < mid_lo) | (start_m >= mid_hi):
                # Rows that see no key have lse = -inf, so p_t is inf there before this where.
                p_t = tl.where(_in_band(rows, first_row_of_col, last_row_of_col), p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do_part, dv)
            ds_t = _dscores(p_t, tl.dot(v, tl.trans(do)), delta[None, :], capped_t, SOFTCAP)
            dk = tl.dot(ds_t.to(q.dtype), q_part, dk)

    col_ok = (cols[:, None] < len_k) & (offs_part[None, :] < HEAD_DIM)
    tl.store(dK + (k_start + cols[:, None]) * stride_dkt + kv_head * stride_dkh + offs_part[None, :],
             (dk * softmax_scale).to(dK.dtype.element_ty), mask=col_ok)
    tl.store(dV + (k_start + cols[:, None]) * stride_dvt + kv_head * stride_dvh + offs_part[None, :],
             dv.to(dV.dtype.element_ty), mask=col_ok)


@triton.jit(do_not_specialize=["batch", "group", "stride_lse_h", "window_left", "window_right"])
def _varlen_attention_bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, dQ, cu_seqlens_q, cu_seqlens_k, batch, group,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lse_h,
    softmax_scale, qk_scale, scale_over_softcap, softcap_log2, window_left, window_right,
    SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    """Per query block: dQ, over the same key range as the forward."""
    head, q_start, len_q, first_row, k_start, len_k = _query_block(cu_seqlens_q, cu_seqlens_k, batch, BLOCK_M)
    if first_row >= len_q:
        return

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    kv_head = head // group
    q = _load_tile(Q + (q_start + rows[:, None]) * stride_qt + head * stride_qh + offs_d[None, :],
                   rows, len_q, offs_d, HEAD_DIM, BLOCK_D, UPCAST)
    do = _load_tile(dOut + (q_start + rows[:, None]) * stride_dot + head * stride_doh + offs_d[None, :],
                    rows, len_q, offs_d, HEAD_DIM, BLOCK_D, UPCAST)
    lse_log2 = tl.load(Lse + head * stride_lse_h + q_start + rows, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(Delta + head * stride_lse_h + q_start + rows, mask=row_ok, other=0.0)
    k_base = K + k_start * stride_kt + kv_head * stride_kh
    v_base = V + k_start * stride_vt + kv_head * stride_vh
    left_edge, right_edge = _key_edges(rows, len_q, len_k, window_left, window_right)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _key_range(first_row, len_q, len_k, window_left, window_right, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, stride_kt, len_k, offs_d, HEAD_DIM, BLOCK_D, UPCAST)
        v = _load_rows(v_base, cols, stride_vt, len_k, offs_d, HEAD_DIM, BLOCK_D, UPCAST)
        s, capped = _scores_log2(tl.dot(q, tl.trans(k)), qk_scale, scale_over_softcap, softcap_log2, SOFTCAP)
        p = tl.exp2(s - lse_log2[:, None])
        if (start_n < mid_lo) | (start_n >= mid_hi):
            # Rows that see no key have lse = -inf, so p is inf there before this where.
            p = tl.where(_in_band(cols, left_edge, right_edge), p, 0.0)
        ds = _dscores(p, tl.dot(do, tl.trans(v)), delta[:, None], capped, SOFTCAP)
        dq = tl.dot(ds.to(k.dtype), k, dq)
    tl.store(dQ + (q_start + rows[:, None]) * stride_dqt + head * stride_dqh + offs_d[None, :],
             (dq * softmax_scale).to(dQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


def check_kernel_inputs(q, k, v):
    """Raise ValueError for inputs the Triton kernels do not take (on top of `check_varlen_inputs`)."""
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32 for the Triton kernel, got {q.dtype}")
    max_head_dim = FP32_MAX_HEAD_DIM if q.dtype == torch.float32 else MAX_HEAD_DIM
    if not 1 <= q.shape[2] <= max_head_dim:
        raise ValueError(f"head_dim must be between 1 and {max_head_dim} for the Triton kernel with {q.dtype}, "
                         f"got {q.shape[2]}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride 1), got strides {t.stride()}")


def _kernel_scalars(head_dim, causal, softmax_scale, window_size, softcap):
    """The kernels' scalar arguments: log2-domain scales and the window with causal folded in."""
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    left, right = (int(w) for w in window_size)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return dict(
        qk_scale=scale * LOG2E.value,
        scale_over_softcap=scale / softcap if softcap > 0 else 1.0,
        softcap_log2=softcap * LOG2E.value,
        window_left=UNBOUNDED.value if left < 0 else left,
        window_right=UNBOUNDED.value if right < 0 else right,
        SOFTCAP=softcap > 0,
    ), scale


def kernel_supports(q):
    """Whether the Triton kernels take `q`'s dtype and head_dim (see FP32_MAX_HEAD_DIM)."""
    return q.dtype in KERNEL_DTYPES and not (q.dtype == torch.float32 and q.shape[-1] > FP32_MAX_HEAD_DIM)


def _config(tables, q, config, interpreter_config):
    """The given config, else the interpreter's, else the GPU table's entry for q's dtype and head_dim."""
    if config is not None:
        return config
    if interpreting():
        return interpreter_config
    table_16bit, table_fp32 = tables
    return (table_fp32 if q.dtype == torch.float32 else table_16bit)[block_d_at_least_32(q.shape[2])]


@on_device_of_first_argument
def varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, softmax_scale=None,
                         window_size=(-1, -1), softcap=0.0, config=None, check_cu_seqlens_values=True):
    """Triton forward: `(out, lse)`, `out` like `q`, `lse` `[num_heads, total_q]` float32 (natural log).

    `config` is `(BLOCK_M, BLOCK_N, num_warps, num_stages)`; by default `FWD_CONFIGS[BLOCK_D]` on a GPU
    and `INTERPRETER_CONFIG` in the interpreter.
    """
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, window_size, softcap, check_cu_seqlens_values)
    check_kernel_inputs(q, k, v)
    total_q, num_heads, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    scalars, _ = _kernel_scalars(head_dim, causal, softmax_scale, window_size, softcap)
    block_m, block_n, num_warps, num_stages = _config((FWD_CONFIGS, FWD_CONFIGS_FP32), q, config, INTERPRETER_CONFIG)
    out = torch.empty_like(q)
    lse = torch.empty((num_heads, total_q), dtype=torch.float32, device=q.device)
    grid = (total_q // block_m + batch, num_heads)
    _varlen_attention_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, batch, num_heads // k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), **scalars, HEAD_DIM=head_dim, BLOCK_D=block_d_at_least_32(head_dim), BLOCK_M=block_m,
        BLOCK_N=block_n, UPCAST=interpreting(), num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


@on_device_of_first_argument
def varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal=False, softmax_scale=None,
                         window_size=(-1, -1), softcap=0.0, dlse=None, dkdv_config=None, dq_config=None):
    """Triton backward: `(dq, dk, dv)` from the forward's `out` and `lse`, and `dout` (and `dlse`, the
    gradient of the returned lse, when it is used). dK/dV are summed over each GQA group's query heads."""
    if dout.shape != out.shape or dout.stride(2) != 1:
        raise ValueError(f"dout must have out's shape {tuple(out.shape)} and stride 1 in head_dim, got "
                         f"shape {tuple(dout.shape)}, strides {dout.stride()}")
    total_q, num_heads, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    block_d = block_d_at_least_32(head_dim)
    scalars, scale = _kernel_scalars(head_dim, causal, softmax_scale, window_size, softcap)
    upcast = interpreting()

    if dlse is not None and (dlse.shape != lse.shape or dlse.stride() != lse.stride()):
        raise ValueError(f"dlse must be a contiguous tensor of lse's shape {tuple(lse.shape)}, got "
                         f"shape {tuple(dlse.shape)}, strides {dlse.stride()}")

    delta = torch.empty_like(lse)
    _varlen_attention_bwd_delta_kernel[(triton.cdiv(total_q, _DELTA_BLOCK_T), num_heads)](
        out, dout, lse if dlse is None else dlse, delta, total_q, out.stride(0), out.stride(1),
        dout.stride(0), dout.stride(1), delta.stride(0), HAS_DLSE=dlse is not None, HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_T=_DELTA_BLOCK_T,
    )

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    group = num_heads // k.shape[1]
    inputs = (q, k, v, dout, lse, delta)
    input_strides = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0), dout.stride(1),
    )
    block_m, block_n, num_warps, num_stages, d_split = _config(
        (BWD_DKDV_CONFIGS, BWD_DKDV_CONFIGS_FP32), q, dkdv_config, INTERPRETER_DKDV_CONFIG
    )
    _varlen_attention_bwd_dkdv_kernel[(k.shape[0] // block_n + batch, k.shape[1] * d_split)](
        *inputs, dk, dv, cu_seqlens_q, cu_seqlens_k, batch, group, *input_strides,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), scale, **scalars,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, D_SPLIT=d_split, UPCAST=upcast,
        num_warps=num_warps, num_stages=num_stages,
    )
    block_m, block_n, num_warps, num_stages = _config(
        (BWD_DQ_CONFIGS, BWD_DQ_CONFIGS_FP32), q, dq_config, INTERPRETER_CONFIG
    )
    _varlen_attention_bwd_dq_kernel[(total_q // block_m + batch, num_heads)](
        *inputs, dq, cu_seqlens_q, cu_seqlens_k, batch, group, *input_strides,
        dq.stride(0), dq.stride(1), lse.stride(0), scale, **scalars,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=upcast,
        num_warps=num_warps, num_stages=num_stages,
    )
    return dq, dk, dv
