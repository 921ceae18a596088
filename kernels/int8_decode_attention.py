"""Attention of a few new query tokens over an int8 KV cache: Triton kernels and their launcher.

The layout and the visibility rule are in `int8_decode_attention_ref` (its module docstring),
beside the input checks and the plain-PyTorch reference, which need no Triton; this module
re-exports them.
"""

# ---------------------------------------------------------------------------------------------
# Triton kernels: flash-decoding over the int8 cache.
#
# Split pass, one program per (sequence and kv head, block of query rows, split of the keys): its
# rows are the GQA group's query heads times the queries, row r = g * num_queries + t for head
# kv_head * group + g and query t, so every K/V tile it loads serves the whole group. The rows are
# padded to at least 16 for tl.dot. The keys a program could need, from max(key_start, first
# query's window edge) to kv_len, are cut into num_splits contiguous ranges of whole blocks; each
# split runs an online softmax over its range in base 2 and writes its normalized partial output
# and log2-sum-exp in float32. The int8 tiles are never dequantized: with per-token scales,
#     s_j = (q · k_int8_j) * k_scale_j,     out = sum_j p_j v_scale_j v_int8_j / sum_j p_j,
# so k_scale multiplies the scores' columns and v_scale the probabilities' columns before P·V;
# int8 values are exact in fp16/bf16, so the tiles only change type for tl.dot. The probabilities
# are multiplied by 128 * v_scale (undone at the end, exactly): p * v_scale alone is 127 times
# smaller than the values it stands for and would lose fp16 precision to underflow sooner.
# With an exact ring (HAS_RECENT), a split's keys from exact_from on come from the ring's slots,
# through the same online-softmax step with scales of 1.
# Combine pass, one program per output row: merges the splits by their log-sum-exp,
#     out = sum_s 2^(lse_s - M) out_s / sum_s 2^(lse_s - M),   M = max_s lse_s,
# and writes out in q's dtype; a row whose every split saw no key gets zeros.
# Offsets into the cache are int64, each (sequence, kv head) base and the key index within it: a
# single head's int8 data passes 2**31 elements from 16M positions at head_dim 128. Offsets into
# q, the exact ring, the scales and the split workspace stay int32 below their int64 bases.
# ---------------------------------------------------------------------------------------------


import torch
import triton
import triton.language as tl

from .int8_decode_attention_ref import (  # noqa: F401
    check_int8_decode_attention_inputs,
    dequantize_cache_ref,
    int8_decode_attention_ref,
)
from .jit_helpers import LOG2E, UNBOUNDED, tanh
from .launch import interpreting, on_device_of_first_argument

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# The probabilities' factor of 128 (see above).
P_SCALE = tl.constexpr(128.0)
# Keys per step over the exact ring: the smallest tl.dot block.
_RING_BLOCK = tl.constexpr(16)

# Split-pass configs keyed by BLOCK_D (head_dim rounded up to a power of two, at least 16):
# (BLOCK_N keys per step, BLOCK_M query rows when they exceed 16, num_warps, num_stages). Plain
# decode (group * num_queries <= 16 rows) runs 16 rows; chunks of queries run BLOCK_M-row blocks,
# each reading the cache once. Decode is bound by reading the cache, so the configs aim at long
# contiguous int8 tile loads kept in flight: [BLOCK_N, head_dim] tiles of 8-16 KiB per K and V,
# 3-4 stages of cp.async pipelining. Checked by tests/kernels/test_compile_sm90_int8_kv.py
# (shared memory, no spills, under triton 3.9 and 3.6). At head_dim 256 the exact ring's loop
# leaves room for 32 keys per block at 64 query rows; head_dim 64 takes 8 warps, since 4 spilled
# (timing status: kernels/TUNING.md).
CONFIGS = {
    16: (128, 64, 4, 4),
    32: (128, 64, 4, 4),
    64: (128, 64, 8, 4),
    128: (64, 64, 4, 4),
    256: (32, 64, 8, 3),
}
# float32 q: tiles are converted to float32 for tf32 dots, twice the registers and shared memory;
# at head_dim 256 a [64, 256] float32 q and accumulator spill whatever the key block, so 16 rows.
CONFIGS_FP32 = {
    16: (64, 64, 4, 2),  # 3 stages: ptxas puts 8 bytes on the stack beside the exact ring's loop
    32: (64, 64, 4, 3),
    64: (64, 64, 4, 3),
    128: (32, 64, 4, 3),
    256: (32, 16, 8, 2),
}
# The interpreter: 16 keys per block so that short test caches cross several blocks and splits.
INTERPRETER_CONFIG = (16, 64, 4, 1)
# Splits (`choose_num_splits`): enough programs for a few per SM (a memory-bound kernel needs
# several resident to keep loads in flight), each over at least 4 key blocks so that the pipeline
# fills, and at most MAX_SPLITS: the combine pass holds all of a row's splits in one
# [BLOCK_S, BLOCK_D] float32 tile (checked for spills by tests/kernels/test_compile_sm90_int8_kv.py).
_PROGRAMS_PER_SM = 4
_MIN_BLOCKS_PER_SPLIT = 4
MAX_SPLITS = 64
DEFAULT_SMS = 132  # H100/H200: the SM count split choices assume off CUDA (the interpreter)
COMBINE_WARPS = 4


def block_d_at_least_16(head_dim):
    """head_dim padded to a power of two, at least 16 (the smallest tl.dot reduction)."""
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def attend_block(q, k, k_scale, v_ptrs, v_mask, v_scale, cols, col_ok, left_edge, position, m_i, l_i, acc,
                  qk_scale, scale_over_softcap, softcap_log2, SOFTCAP: tl.constexpr):
    """One online-softmax step over the key block `cols` (those with col_ok): int8 tiles with their
    scales, or exact ones with scales of 1. V loads after the scores, which keeps fewer registers live."""
    qk = tl.dot(q, tl.trans(k.to(q.dtype))) * k_scale[None, :]
    if SOFTCAP:
        s = tanh(qk * scale_over_softcap) * softcap_log2
    else:
        s = qk * qk_scale
    visible = (cols[None, :] >= left_edge[:, None]) & (cols[None, :] <= position[:, None]) & col_ok[None, :]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=v_mask, other=0)
    acc = tl.dot((p * (v_scale * P_SCALE)[None, :]).to(q.dtype), v.to(q.dtype), acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["kv_len", "num_queries", "group", "window_left", "exact_from", "residual_length"])
def _int8_decode_attention_split_kernel(
    Q, K, KScale, V, VScale, KeyStart, KRecent, VRecent, PartOut, PartLse,
    kv_len, num_queries, group, num_kv_heads, exact_from, residual_length,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_ksb, stride_ksh,
    stride_vb, stride_vh, stride_vt, stride_vsb, stride_vsh,
    stride_krb, stride_krh, stride_krt, stride_vrb, stride_vrh, stride_vrt,
    qk_scale, scale_over_softcap, softcap_log2, window_left,
    HAS_KEY_START: tl.constexpr, HAS_RECENT: tl.constexpr, SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    seq_head = tl.program_id(0)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    seq = seq_head // num_kv_heads
    kv_head = seq_head % num_kv_heads
    num_rows = group * num_queries
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    query = rows % num_queries
    head = kv_head * group + rows // num_queries
    position = kv_len - num_queries + query
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + seq.to(tl.int64) * stride_qb + head[:, None] * stride_qh + query[:, None] * stride_qt
                + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        # The interpreter computes bf16 arithmetic wrongly; it works in float32 throughout.
        q = q.to(tl.float32)
    if HAS_KEY_START:
        first_key = tl.load(KeyStart + seq)
    else:
        first_key = 0
    # Row i sees keys left_edge[i] <= j <= position[i]; the block sees keys from lo on.
    left_edge = tl.maximum(position - window_left, first_key)
    lo = tl.maximum(tl.maximum(kv_len - num_queries - window_left, first_key), 0) // BLOCK_N * BLOCK_N
    blocks_per_split = tl.cdiv(tl.cdiv(tl.maximum(kv_len - lo, 0), BLOCK_N), num_splits)
    start = lo + split * blocks_per_split * BLOCK_N
    end = tl.minimum(start + blocks_per_split * BLOCK_N, kv_len)
    # Positions from exact_from on are read from the exact ring (HAS_RECENT), not the int8 data.
    int8_end = tl.minimum(end, exact_from)

    k_base = K + seq.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + seq.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    k_scale_base = KScale + seq.to(tl.int64) * stride_ksb + kv_head.to(tl.int64) * stride_ksh
    v_scale_base = VScale + seq.to(tl.int64) * stride_vsb + kv_head.to(tl.int64) * stride_vsh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(start, int8_end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < int8_end
        # Mask rows only where head_dim fills the block, so the int8 rows load as whole vectors.
        if HEAD_DIM == BLOCK_D:
            tile_ok = col_ok[:, None]
        else:
            tile_ok = col_ok[:, None] & d_ok[None, :]
        # Scales of unwritten or padding positions may hold anything (NaN); 0 * NaN would poison
        # the sums, so they load as 0 and those columns are masked.
        scale_ok = col_ok & (cols >= first_key)
        cols_64 = cols.to(tl.int64)
        k = tl.load(k_base + cols_64[:, None] * stride_kt + offs_d[None, :], mask=tile_ok, other=0)
        k_scale = tl.load(k_scale_base + cols, mask=scale_ok, other=0.0)
        v_scale = tl.load(v_scale_base + cols, mask=scale_ok, other=0.0)
        m_i, l_i, acc = attend_block(q, k, k_scale, v_base + cols_64[:, None] * stride_vt + offs_d[None, :], tile_ok,
                                      v_scale, cols, col_ok, left_edge, position, m_i, l_i, acc, qk_scale,
                                      scale_over_softcap, softcap_log2, SOFTCAP)
    if HAS_RECENT:
        kr_base = KRecent + seq.to(tl.int64) * stride_krb + kv_head.to(tl.int64) * stride_krh
        vr_base = VRecent + seq.to(tl.int64) * stride_vrb + kv_head.to(tl.int64) * stride_vrh
        offs_r = tl.arange(0, _RING_BLOCK)
        # At most residual_length keys, in small blocks without a software pipeline: the ring must
        # not cost the int8 loop registers or shared memory.
        for start_r in tl.range(tl.maximum(start, exact_from), end, _RING_BLOCK, num_stages=1):
            cols = start_r + offs_r
            col_ok = cols < end
            tile_ok = col_ok[:, None] & d_ok[None, :]
            # Valid columns span at most residual_length positions: one wrap at most.
            slots = start_r % residual_length + offs_r
            slots = tl.where(slots >= residual_length, slots - residual_length, slots)
            k = tl.load(kr_base + slots[:, None] * stride_krt + offs_d[None, :], mask=tile_ok, other=0.0)
            ones = tl.where(col_ok & (cols >= first_key), 1.0, 0.0)
            m_i, l_i, acc = attend_block(q, k, ones, vr_base + slots[:, None] * stride_vrt + offs_d[None, :], tile_ok,
                                          ones, cols, col_ok, left_edge, position, m_i, l_i, acc, qk_scale,
                                          scale_over_softcap, softcap_log2, SOFTCAP)

    saw_none = l_i == 0.0
    l_safe = tl.where(saw_none, 1.0, l_i)
    out = acc / (l_safe * P_SCALE)[:, None]
    lse = tl.where(saw_none, float("-inf"), m_i + tl.log2(l_safe))
    part = (seq_head.to(tl.int64) * num_splits + split) * num_rows + rows
    tl.store(PartOut + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(PartLse + part, lse, mask=row_ok)


@triton.jit(do_not_specialize=["num_queries", "group"])
def _int8_decode_attention_combine_kernel(
    PartOut, PartLse, Out, num_splits, num_queries, group, num_kv_heads, stride_ob, stride_oh, stride_ot,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    num_rows = group * num_queries
    seq_head = tl.program_id(0) // num_rows
    row = tl.program_id(0) % num_rows
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    split_ok = splits < num_splits
    part = (seq_head.to(tl.int64) * num_splits + splits) * num_rows + row
    lse = tl.load(PartLse + part, mask=split_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    # Splits that saw no key have lse = -inf and weight 0; so does every split of a row that saw none.
    weight = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    part_out = tl.load(PartOut + part[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=split_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * part_out, 0) / tl.where(total == 0.0, 1.0, total)
    seq = seq_head // num_kv_heads
    head = (seq_head % num_kv_heads) * group + row // num_queries
    out_ptrs = Out + seq.to(tl.int64) * stride_ob + head * stride_oh + (row % num_queries) * stride_ot + offs_d
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


def sm_count(device):
    """The device's number of SMs; DEFAULT_SMS off CUDA."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else DEFAULT_SMS


def choose_num_splits(programs, kv_len, block_n, sms):
    """Splits of up to `kv_len` keys for a grid of `programs` per split on `sms` SMs: enough for
    _PROGRAMS_PER_SM programs per SM, as the context allows (_MIN_BLOCKS_PER_SPLIT blocks of
    `block_n` keys each), at most MAX_SPLITS; 1 when the programs fill the GPU already."""
    wanted = triton.cdiv(_PROGRAMS_PER_SM * sms, max(programs, 1))
    return max(1, min(wanted, MAX_SPLITS, triton.cdiv(kv_len, block_n) // _MIN_BLOCKS_PER_SPLIT))


@on_device_of_first_argument
def int8_decode_attention(
    q, k_data, k_scale, v_data, v_scale, kv_len, key_start=None, softmax_scale=None, window_left=-1, softcap=0.0,
    k_recent=None, v_recent=None, exact_from=None, num_splits=None, config=None,
):
    """Triton flash-decoding over the int8 cache: `out` like `q` (see the module docstring).

    `num_splits` overrides the split heuristic; `config` `(BLOCK_N, BLOCK_M, num_warps, num_stages)`
    the table's entry for q's dtype and head_dim (the interpreter's by default without a GPU).
    """
    check_int8_decode_attention_inputs(
        q, k_data, k_scale, v_data, v_scale, kv_len, key_start, window_left, softcap, k_recent, v_recent, exact_from
    )
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32 for the Triton kernel, got {q.dtype}")
    batch, num_heads, num_queries, head_dim = q.shape
    num_kv_heads = k_data.shape[1]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM} for the Triton kernel, got {head_dim}")
    has_recent = k_recent is not None
    named = {"q": q, "k_data": k_data, "k_scale": k_scale, "v_data": v_data, "v_scale": v_scale}
    if has_recent:
        named |= {"k_recent": k_recent, "v_recent": v_recent}
    for name, t in named.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got strides {t.stride()}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or a positive int, got {num_splits!r}")

    block_d = block_d_at_least_16(head_dim)
    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    block_n, max_block_m, num_warps, num_stages = config or (
        CONFIGS_FP32 if q.dtype == torch.float32 else CONFIGS
    )[block_d]
    group = num_heads // num_kv_heads
    num_rows = group * num_queries
    block_m = 16 if num_rows <= 16 else max_block_m
    row_blocks = triton.cdiv(num_rows, block_m)
    if num_splits is None:
        num_splits = choose_num_splits(batch * num_kv_heads * row_blocks, kv_len, block_n, sm_count(q.device))
    part_out = torch.empty((batch * num_kv_heads, num_splits, num_rows, head_dim), dtype=torch.float32,
                           device=q.device)
    part_lse = torch.empty((batch * num_kv_heads, num_splits, num_rows), dtype=torch.float32, device=q.device)
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    k_recent, v_recent = (k_recent, v_recent) if has_recent else (k_data, v_data)
    _int8_decode_attention_split_kernel[(batch * num_kv_heads, row_blocks, num_splits)](
        q, k_data, k_scale, v_data, v_scale, k_scale if key_start is None else key_start, k_recent, v_recent,
        part_out, part_lse, kv_len, num_queries, group, num_kv_heads,
        exact_from if has_recent else kv_len, k_recent.shape[2],
        q.stride(0), q.stride(1), q.stride(2), k_data.stride(0), k_data.stride(1), k_data.stride(2),
        k_scale.stride(0), k_scale.stride(1), v_data.stride(0), v_data.stride(1), v_data.stride(2),
        v_scale.stride(0), v_scale.stride(1), k_recent.stride(0), k_recent.stride(1), k_recent.stride(2),
        v_recent.stride(0), v_recent.stride(1), v_recent.stride(2),
        scale * LOG2E.value, scale / softcap if softcap > 0 else 1.0, softcap * LOG2E.value,
        UNBOUNDED.value if window_left < 0 else window_left,
        HAS_KEY_START=key_start is not None, HAS_RECENT=has_recent, SOFTCAP=softcap > 0, HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=interpreting(), num_warps=num_warps,
        num_stages=num_stages,
    )
    out = torch.empty_like(q)
    _int8_decode_attention_combine_kernel[(batch * num_kv_heads * num_rows,)](
        part_out, part_lse, out, num_splits, num_queries, group, num_kv_heads, out.stride(0), out.stride(1),
        out.stride(2), HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
        num_warps=COMBINE_WARPS,
    )
    return out
