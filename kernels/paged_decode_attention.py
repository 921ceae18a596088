"""Attention of a step's queries over a paged KV cache: Triton kernels and their launcher.

The layout and the visibility rule are in `paged_decode_attention_ref` (its module docstring),
beside the input checks and the plain-PyTorch reference, which need no Triton; this module
re-exports them.
"""

# ---------------------------------------------------------------------------------------------
# Triton kernels: flash-decoding through the page table, as `int8_decode_attention` does over a
# contiguous cache (its comment block has the int8 arithmetic: scales folded into the scores'
# and the probabilities' columns, never a dequantized tile).
#
# Split pass, grid (block of query rows, kv head, split of the keys). A program's rows are
# queries of one sequence times the kv head's GQA group, query-major: row r is query r // group,
# head kv_head * group + r % group, so one block's queries are consecutive and its key range
# (up to its last query's position, from its first one's window edge) is tight; every K/V tile it
# loads serves all its rows. Rows are padded to at least 16 for tl.dot.
# Which sequence a block belongs to needs no host work: without cu_seqlens_q every sequence has
# `blocks_per_seq` blocks; with it, sequence b owns grid indices from cu[b] * group // BLOCK_M + b
# to cu[b + 1] * group // BLOCK_M + b (inclusive), at least the cdiv(n_b * group, BLOCK_M) blocks
# it needs, found by a binary search over the batch (vLLM's unified attention maps programs so);
# the grid is total_q * group // BLOCK_M + batch blocks, and the extra ones return at once.
# Keys are read through the page table per key: a block of BLOCK_N keys may span several pages
# (BLOCK_N > page_size) or sit inside one; each key's row of head_dim values is contiguous, which
# is what a coalesced load needs. Keys past kv_len (the last page's unwritten slots, whose scales
# may hold NaN) are masked, so junk page-table entries past a sequence's last page are never read.
# num_splits comes from shapes only (the page table's width bounds kv_len; reading kv_lens would
# wait for the GPU): each sequence divides its own key range into num_splits runs of whole blocks,
# and a split with no key writes lse = -inf. With one split the program writes `out` itself;
# otherwise the combine pass, one program per (query, head), merges the splits by their lse.
# Offsets into the pages are int64 (a pool passes 2**31 elements from 128k pages of 16 tokens at
# 8 kv heads and head_dim 128); those into q, the page table and the split workspace stay int32
# below int64 bases where they can grow.
# ---------------------------------------------------------------------------------------------

import torch
import triton
import triton.language as tl

from .int8_decode_attention import (
    COMBINE_WARPS,
    P_SCALE,
    attend_block,
    block_d_at_least_16,
    choose_num_splits,
    sm_count,
)
from .jit_helpers import LOG2E, UNBOUNDED
from .launch import interpreting, on_device_of_first_argument
from .paged_decode_attention_ref import check_paged_decode_attention_inputs, paged_decode_attention_ref  # noqa: F401

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Split-pass configs keyed by (kind, BLOCK_D) (`config_key`: int8 pages under 16-bit q, 16-bit
# pages, or float32 q; BLOCK_D below 64 takes the 64 entry): (BLOCK_N keys per step, BLOCK_M query
# rows when sequences average more than 16, num_warps, num_stages). Decode is bound by reading the
# pages, so the configs aim at [BLOCK_N, head_dim] K and V tiles of 8-16 KiB kept in flight. The
# page-table load that each tile's addresses wait for takes pipeline stages of its own, hence the
# extra stage. Float pages hold twice the bytes per key at 16 bits, 4 times at 32. Checked by
# tests/kernels/test_compile_sm90_paged_kv.py (shared memory, no spills, under triton 3.9 and 3.6;
# timing status: kernels/TUNING.md).
CONFIGS = {
    ("int8", 64): (128, 64, 4, 5),
    ("int8", 128): (64, 64, 4, 5),
    ("int8", 256): (32, 64, 8, 5),
    ("16bit", 64): (64, 64, 4, 5),
    ("16bit", 128): (32, 64, 4, 5),
    ("16bit", 256): (32, 64, 8, 3),
    ("fp32", 64): (32, 64, 4, 4),
    ("fp32", 128): (32, 64, 4, 3),
    ("fp32", 256): (16, 16, 8, 3),
}
# The interpreter: 16 keys per block so that short test caches cross several blocks, splits and
# (at page size 8) pages within a block.
INTERPRETER_CONFIG = (16, 64, 4, 1)


def config_key(q_dtype, pages_dtype, head_dim):
    """The CONFIGS key of a launch: int8 pages take q's 16-bit dtype for their dots; float32 q
    converts every tile to float32 (tf32 dots)."""
    if q_dtype == torch.float32:
        kind = "fp32"
    else:
        kind = "int8" if pages_dtype == torch.int8 else "16bit"
    return kind, max(64, block_d_at_least_16(head_dim))


@triton.jit
def _find_sequence(CuSeqlensQ, block, batch, group, BLOCK_M: tl.constexpr):
    """The sequence b whose grid indices [cu[b] * group // BLOCK_M + b, ...] hold `block`: the
    last b with cu[b] * group // BLOCK_M + b <= block (increasing in b, so unique)."""
    lo = 0
    hi = batch
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(CuSeqlensQ + mid) * group // BLOCK_M + mid <= block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["batch", "group", "blocks_per_seq", "window_left"])
def _paged_decode_attention_split_kernel(
    Q, KPages, VPages, KScales, VScales, PageTable, KvLens, CuSeqlensQ, PartOut, PartLse, Out,
    batch, group, blocks_per_seq,
    stride_qt, stride_qh, stride_kp, stride_kh, stride_kt, stride_vp, stride_vh, stride_vt,
    stride_ksp, stride_ksh, stride_vsp, stride_vsh, stride_pt, stride_ot, stride_oh,
    qk_scale, scale_over_softcap, softcap_log2, window_left,
    HAS_SCALES: tl.constexpr, HAS_CU: tl.constexpr, SOFTCAP: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, ONE_SPLIT: tl.constexpr,
):
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    num_heads = tl.num_programs(1) * group
    if HAS_CU:
        seq = _find_sequence(CuSeqlensQ, block, batch, group, BLOCK_M)
        q_start = tl.load(CuSeqlensQ + seq)
        num_queries = tl.load(CuSeqlensQ + seq + 1) - q_start
        block_in_seq = block - (q_start * group // BLOCK_M + seq)
    else:
        seq = block // blocks_per_seq
        q_start = seq
        num_queries = 1
        block_in_seq = block % blocks_per_seq
    num_rows = group * num_queries
    row_start = block_in_seq * BLOCK_M
    if row_start >= num_rows:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    query = rows // group
    head = kv_head * group + rows % group
    kv_len = tl.load(KvLens + seq)
    position = kv_len - num_queries + query
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM

    q_rows = q_start + query
    q = tl.load(Q + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        # The interpreter computes bf16 arithmetic wrongly; it works in float32 throughout.
        q = q.to(tl.float32)
    # Row i sees keys left_edge[i] <= j <= position[i]; the block sees keys lo <= j < hi.
    left_edge = position - window_left
    first_position = kv_len - num_queries + row_start // group
    last_position = kv_len - num_queries + (tl.minimum(row_start + BLOCK_M, num_rows) - 1) // group
    lo = tl.maximum(first_position - window_left, 0) // BLOCK_N * BLOCK_N
    hi = last_position + 1
    blocks_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)
    start = lo + split * blocks_per_split * BLOCK_N
    end = tl.minimum(start + blocks_per_split * BLOCK_N, hi)

    table = PageTable + seq * stride_pt
    k_head = KPages + kv_head.to(tl.int64) * stride_kh
    v_head = VPages + kv_head.to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < end
        # Mask rows only where head_dim fills the block, so that they load as whole vectors.
        if HEAD_DIM == BLOCK_D:
            tile_ok = col_ok[:, None]
        else:
            tile_ok = col_ok[:, None] & d_ok[None, :]
        pages = tl.load(table + cols // PAGE_SIZE, mask=col_ok, other=0).to(tl.int64)
        slot = cols % PAGE_SIZE
        k = tl.load(k_head + (pages * stride_kp + slot * stride_kt)[:, None] + offs_d[None, :], mask=tile_ok, other=0)
        v_ptrs = v_head + (pages * stride_vp + slot * stride_vt)[:, None] + offs_d[None, :]
        if HAS_SCALES:
            k_scale = tl.load(KScales + pages * stride_ksp + kv_head * stride_ksh + slot, mask=col_ok, other=0.0)
            v_scale = tl.load(VScales + pages * stride_vsp + kv_head * stride_vsh + slot, mask=col_ok, other=0.0)
        else:
            k_scale = tl.where(col_ok, 1.0, 0.0)
            v_scale = k_scale
        m_i, l_i, acc = attend_block(q, k, k_scale, v_ptrs, tile_ok, v_scale, cols, col_ok, left_edge, position,
                                      m_i, l_i, acc, qk_scale, scale_over_softcap, softcap_log2, SOFTCAP)

    saw_none = l_i == 0.0
    l_safe = tl.where(saw_none, 1.0, l_i)
    out = acc / (l_safe * P_SCALE)[:, None]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if ONE_SPLIT:
        # A row that saw no key (kv_lens 0) has acc = 0: its out is zeros.
        out_ptrs = Out + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=out_mask)
    else:
        lse = tl.where(saw_none, float("-inf"), m_i + tl.log2(l_safe))
        part = (q_rows.to(tl.int64) * num_heads + head) * num_splits + split
        tl.store(PartOut + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=out_mask)
        tl.store(PartLse + part, lse, mask=row_ok)


@triton.jit
def _paged_decode_attention_combine_kernel(
    PartOut, PartLse, Out, num_splits, num_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per (query, head): out = sum_s 2^(lse_s - M) out_s / sum_s 2^(lse_s - M)."""
    row = tl.program_id(0)
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    split_ok = splits < num_splits
    part = row.to(tl.int64) * num_splits + splits
    lse = tl.load(PartLse + part, mask=split_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    # Splits that saw no key have lse = -inf and weight 0; so does every split of a row that saw
    # none (a sequence with kv_lens 0, as CUDA-graph padding makes), which gets zeros.
    weight = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    part_out = tl.load(PartOut + part[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=split_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * part_out, 0) / tl.where(total == 0.0, 1.0, total)
    out_ptrs = Out + (row // num_heads) * stride_ot + (row % num_heads) * stride_oh + offs_d
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


@on_device_of_first_argument
def paged_decode_attention(
    q, k_pages, v_pages, page_table, kv_lens, k_scales=None, v_scales=None, cu_seqlens_q=None, softmax_scale=None,
    window_left=-1, softcap=0.0, num_splits=None, config=None,
):  # fmt: skip
    """Triton flash-decoding through the page table: `out` like `q` (see the module docstring).

    `num_splits` overrides the split heuristic; `config` `(BLOCK_N, BLOCK_M, num_warps, num_stages)`
    the table's entry (the interpreter's by default without a GPU).
    """
    check_paged_decode_attention_inputs(
        q, k_pages, v_pages, page_table, kv_lens, k_scales, v_scales, cu_seqlens_q, softmax_scale, window_left, softcap
    )
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32 for the Triton kernel, got {q.dtype}")
    total_q, num_heads, head_dim = q.shape
    num_pages, num_kv_heads, page_size, _ = k_pages.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM} for the Triton kernel, got {head_dim}")
    has_scales = k_scales is not None
    named = {"q": q, "k_pages": k_pages, "v_pages": v_pages, "page_table": page_table}
    if has_scales:
        named |= {"k_scales": k_scales, "v_scales": v_scales}
    for name, t in named.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got strides {t.stride()}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or a positive int, got {num_splits!r}")
    batch, max_pages_per_seq = page_table.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if total_q == 0:
        return out

    block_d = block_d_at_least_16(head_dim)
    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    block_n, max_block_m, num_warps, num_stages = config or CONFIGS[config_key(q.dtype, k_pages.dtype, head_dim)]
    group = num_heads // num_kv_heads
    # 16 rows while sequences average at most 16 (decode); chunks of queries take the larger block.
    block_m = 16 if group * total_q <= 16 * batch else max_block_m
    blocks_per_seq = triton.cdiv(group, block_m)
    grid_blocks = batch * blocks_per_seq if cu_seqlens_q is None else total_q * group // block_m + batch
    if num_splits is None:
        num_splits = choose_num_splits(grid_blocks * num_kv_heads, max_pages_per_seq * page_size, block_n,
                                       sm_count(q.device))
    one_split = num_splits == 1
    workspace = () if one_split else (num_splits, total_q, num_heads)
    part_out = torch.empty((*workspace, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty(workspace, dtype=torch.float32, device=q.device)
    scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
    scales = (k_scales, v_scales) if has_scales else (page_table, page_table)  # unread placeholders
    _paged_decode_attention_split_kernel[(grid_blocks, num_kv_heads, num_splits)](
        q, k_pages, v_pages, *scales, page_table, kv_lens, kv_lens if cu_seqlens_q is None else cu_seqlens_q,
        part_out, part_lse, out, batch, group, blocks_per_seq,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2),
        scales[0].stride(0), scales[0].stride(1), scales[1].stride(0), scales[1].stride(1), page_table.stride(0),
        out.stride(0), out.stride(1),
        scale * LOG2E.value, scale / softcap if softcap > 0 else 1.0, softcap * LOG2E.value,
        UNBOUNDED.value if window_left < 0 else window_left,
        HAS_SCALES=has_scales, HAS_CU=cu_seqlens_q is not None, SOFTCAP=softcap > 0, PAGE_SIZE=page_size,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=interpreting(),
        ONE_SPLIT=one_split, num_warps=num_warps, num_stages=num_stages,
    )
    if not one_split:
        _paged_decode_attention_combine_kernel[(total_q * num_heads,)](
            part_out, part_lse, out, num_splits, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=COMBINE_WARPS,
        )
    return out
