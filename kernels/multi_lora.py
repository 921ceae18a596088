"""Multi-LoRA linear (one adapter slot per token): Triton kernels and their launcher.

The math and the stacked-adapter layout are in `multi_lora_ref` (its module docstring), beside
the plain-PyTorch reference; this module re-exports it. One call makes three Triton launches
(and a `torch.sort` on the segment path), however many distinct adapters its tokens take:

1. shrink: `S[t, :rank] = x[t]·A_sᵀ` into an fp32 `[T, r_max]` buffer, rank blocks of 16 up to
   `ranks[s]` (a slot's padding costs neither bytes nor FLOPs; tokens of slot -1 cost nothing).
2. base: `y = x·Wᵀ + bias` by `lora_gemm.lora_gemm`, the fused LoRA GEMM, with an empty LoRA seed:
   its float, int8 and int4 weights, its TMA kernel and its rule for ways (cuBLAS included) come
   with it. A per-token adapter cannot be that GEMM's seed: the seed is one `L·R` product.
3. expand: `y[t] += scalings[s]·S[t, :rank]·B_sᵀ`, in place (fp32 sum, one rounding to y's dtype).

Two paths, chosen on the host from `T` and `S` alone (`choose_path`), neither reading the slots
back:
- "per_token" (decode, BGMV-like): a program per (token, rank block) shrinks, a program per
  (token, column block) expands; products on the CUDA cores, the slot read in the kernel.
  Tokens that share an adapter read it again (from L2), so this path is for about one token per slot.
- "segments" (prefill, SGMV-like): the slots are sorted on the device (`torch.sort`, stable) and
  programs take tiles of `BLOCK_M` consecutive sorted tokens; a tile loops over the distinct slots
  its rows hold (one or two, in long segments), each a `tl.dot` over that slot's rows, so each
  adapter is read once per tile. No segment offsets are needed, and no program is idle.

One rounding rule on both paths, so that a token's output does not depend on the path its batch
takes: every product's operands are in the dtype of `x`, `A_s` and `B_s` rounded to it where the
stacks are wider, and `S` (fp32 in memory) enters the expand as `scalings[s]·S` rounded to it, as
vLLM's expand does; products and sums are fp32 (16-bit products are exact there), then one rounding
of `y + lora` to y's dtype. The segment path multiplies on the tensor cores (fp32 `x` as tf32 on
the GPU), the per-token path on the CUDA cores (fp32 `x` exactly). Row indices of `x`
and `y`, and the slot offsets into the stacks, are int64: `x`, `y` and `lora_b` (an lm_head's
128k outputs) can pass 2³¹ elements; offsets inside one slot and into `S` stay int32.

Backward (not implemented: serving needs none), given `dy`: `dS_t = scalings[s]·dy_t·B_s` (the
shrink with `B_s` as the stack, `[S, out, r]` read transposed), `dx = dy·W + dS·A_s` (the base dx
GEMM of `lora_gemm.lora_gemm`, then the expand with `A_s`); `dA_s = Σ_{t∈s} dS_tᵀ·x_t` and
`dB_s = scalings[s]·Σ_{t∈s} dy_tᵀ·S_t`, reductions over each slot's sorted segment (the
segment tiles of this module, accumulated per slot as `lora.lora_reduce_tokens` does per split),
masked to `ranks[s]`. It would save `x`, `S` and the sort order.
"""


import torch
import triton
import triton.language as tl

from .launch import interpreting, on_device_of_first_argument
from .lora_gemm import lora_gemm
from .multi_lora_ref import multi_lora_linear_ref  # noqa: F401

# Ranks are walked in blocks of this many: the smallest `tl.dot` the GPU takes, and the step
# at which padding is skipped (a rank-24 slot costs two blocks in an r_max = 64 stack, not four).
RANK_BLOCK = 16
# Above every slot id: what the minimum over a tile's slots gives when none is left.
NO_SLOT = tl.constexpr(2**30)


@triton.jit
def _rounded(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """`x` rounded to `dtype` (to nearest, ties to even): in `dtype`, or under UPCAST in float32,
    because Triton's interpreter casts float32 to bfloat16 by truncation: there the bits round (and
    the float32 result casts to bfloat16 exactly)."""
    if UPCAST:
        x = x.to(tl.float32)
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            return x.to(dtype).to(tl.float32)
    else:
        return x.to(dtype)


@triton.jit
def _shrink_per_token_kernel(
    x_ptr, a_ptr, slots_ptr, ranks_ptr, out_ptr,
    K, num_rank_blocks,
    stride_xt, stride_as, stride_ar, stride_ak, stride_ot,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """out[t, r0 : r0 + BLOCK_R] = x[t]·A_s[r0 : r0 + BLOCK_R]ᵀ for program (t, r0 / BLOCK_R),
    rows past `ranks[s]` neither read nor written; tokens of slot -1 write nothing."""
    pid = tl.program_id(0)
    t = pid // num_rank_blocks
    r0 = (pid % num_rank_blocks) * BLOCK_R
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    if r0 >= rank:
        return
    offs_r = r0 + tl.arange(0, BLOCK_R)
    in_rank = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + t.to(tl.int64) * stride_xt + offs_k
    a_ptrs = a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak
    # A matrix-vector product: products summed once at the end, on the CUDA cores.
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        in_k = offs_k < K - k * BLOCK_K
        xv = tl.load(x_ptrs, mask=in_k, other=0.0).to(tl.float32)
        av = tl.load(a_ptrs, mask=in_rank[:, None] & in_k[None, :], other=0.0)
        av = _rounded(av, x_ptr.dtype.element_ty, UPCAST).to(tl.float32)
        acc += av * xv[None, :]
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K * stride_ak
    tl.store(out_ptr + t * stride_ot + offs_r, tl.sum(acc, axis=1), mask=in_rank)


@triton.jit
def _expand_per_token_kernel(
    s_ptr, b_ptr, slots_ptr, ranks_ptr, scalings_ptr, y_ptr,
    N, num_col_blocks,
    stride_st, stride_bs, stride_bn, stride_br, stride_yt,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """y[t, cols] += scalings[s]·S[t, :rank]·B_s[cols, :rank]ᵀ for program (t, column block), the
    operands rounded as the module docstring says."""
    pid = tl.program_id(0)
    t = pid // num_col_blocks
    offs_n = (pid % num_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    if rank == 0:
        return
    in_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    b_ptrs = b_ptr + slot.to(tl.int64) * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br
    scale = tl.load(scalings_ptr + slot)
    dtype = y_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        in_rank = r0 + offs_r < rank
        sv = tl.load(s_ptr + t * stride_st + r0 + offs_r, mask=in_rank, other=0.0)
        sv = _rounded(sv * scale, dtype, UPCAST).to(tl.float32)
        bv = _rounded(tl.load(b_ptrs, mask=in_n[:, None] & in_rank[None, :], other=0.0), dtype, UPCAST).to(tl.float32)
        acc += bv * sv[None, :]
        b_ptrs += BLOCK_R * stride_br
    lora = tl.sum(acc, axis=1)
    y_ptrs = y_ptr + t.to(tl.int64) * stride_yt + offs_n
    y = tl.load(y_ptrs, mask=in_n, other=0.0).to(tl.float32)
    tl.store(y_ptrs, _rounded(y + lora, dtype, UPCAST).to(dtype), mask=in_n)


@triton.jit
def _tile_rows(sorted_slots_ptr, order_ptr, m0, T, BLOCK_M: tl.constexpr):
    """Sorted positions `m0 ..` of a tile: (in range, their slot (-1 past T), their token)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    in_t = offs_m < T
    row_slot = tl.load(sorted_slots_ptr + offs_m, mask=in_t, other=-1)
    # Rows past T stand for token 0, a valid row to load; nothing of theirs is stored.
    token = tl.load(order_ptr + offs_m, mask=in_t, other=0)
    return in_t, row_slot, token


@triton.jit
def _next_slot(row_slot, after):
    """The smallest slot of the tile above `after` (NO_SLOT when none): tiles visit each distinct
    slot they hold once, in increasing order, skipping ids no row holds."""
    return tl.min(tl.where(row_slot > after, row_slot, NO_SLOT), axis=0)


@triton.jit
def _shrink_segments_kernel(
    x_ptr, a_ptr, sorted_slots_ptr, order_ptr, ranks_ptr, out_ptr,
    T, K, num_rank_blocks,
    stride_xt, stride_as, stride_ar, stride_ak, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """out[tokens, r0 : r0 + BLOCK_R] = x[tokens]·A_sᵀ for the BLOCK_M slot-sorted tokens of a tile,
    one `tl.dot` pass over K per distinct slot of the tile whose rank passes r0.

    Programs are numbered rank block fastest, so those sharing a tile of `x` run side by side and
    read it from L2."""
    pid = tl.program_id(0)
    m0 = (pid // num_rank_blocks) * BLOCK_M
    r0 = (pid % num_rank_blocks) * BLOCK_R
    if UPCAST:
        compute_dtype = tl.float32
    else:
        compute_dtype = x_ptr.dtype.element_ty
    in_t, row_slot, token = _tile_rows(sorted_slots_ptr, order_ptr, m0, T, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    x_rows = x_ptr + token.to(tl.int64)[:, None] * stride_xt
    slot = _next_slot(row_slot, -1)
    while slot < NO_SLOT:
        rank = tl.load(ranks_ptr + slot)
        if r0 < rank:
            in_rank = offs_r < rank
            x_ptrs = x_rows + offs_k[None, :]
            a_ptrs = a_ptr + slot.to(tl.int64) * stride_as + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k in range(0, tl.cdiv(K, BLOCK_K)):
                in_k = offs_k < K - k * BLOCK_K
                xv = tl.load(x_ptrs, mask=in_k[None, :], other=0.0)
                av = tl.load(a_ptrs, mask=in_k[:, None] & in_rank[None, :], other=0.0)
                acc = tl.dot(xv.to(compute_dtype), _rounded(av, x_ptr.dtype.element_ty, UPCAST), acc)
                x_ptrs += BLOCK_K
                a_ptrs += BLOCK_K * stride_ak
            mine = in_t & (row_slot == slot)
            out_ptrs = out_ptr + token[:, None] * stride_ot + offs_r[None, :]
            tl.store(out_ptrs, acc, mask=mine[:, None] & in_rank[None, :])
        slot = _next_slot(row_slot, slot)


@triton.jit
def _expand_segments_kernel(
    s_ptr, b_ptr, sorted_slots_ptr, order_ptr, ranks_ptr, scalings_ptr, y_ptr,
    T, N, num_col_blocks,
    stride_st, stride_bs, stride_bn, stride_br, stride_yt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """y[tokens, cols] += Σ_slots scalings[s]·S[tokens of s, :rank]·B_s[cols, :rank]ᵀ over a tile of
    BLOCK_M slot-sorted tokens: one accumulator, each slot's rows seeded into it by their own
    `tl.dot`s (other rows' S read as 0), then one read-modify-write of the tile of `y`."""
    pid = tl.program_id(0)
    m0 = (pid // num_col_blocks) * BLOCK_M
    offs_n = (pid % num_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_t, row_slot, token = _tile_rows(sorted_slots_ptr, order_ptr, m0, T, BLOCK_M)
    slot = _next_slot(row_slot, -1)
    if slot == NO_SLOT:  # base-only tokens (slot -1) sort first: whole tiles of them are left alone
        return
    dtype = y_ptr.dtype.element_ty
    cols = offs_n % N  # columns past N wrap onto valid ones; only the store is masked
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    while slot < NO_SLOT:
        rank = tl.load(ranks_ptr + slot)
        scale = tl.load(scalings_ptr + slot)
        mine = in_t & (row_slot == slot)
        s_ptrs = s_ptr + token[:, None] * stride_st + offs_r[None, :]
        b_ptrs = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br + cols[None, :] * stride_bn
        for r0 in range(0, rank, BLOCK_R):
            in_rank = r0 + offs_r < rank
            sv = tl.load(s_ptrs, mask=mine[:, None] & in_rank[None, :], other=0.0)
            bv = tl.load(b_ptrs, mask=in_rank[:, None], other=0.0)
            acc = tl.dot(_rounded(sv * scale, dtype, UPCAST), _rounded(bv, dtype, UPCAST), acc)
            s_ptrs += BLOCK_R
            b_ptrs += BLOCK_R * stride_br
        slot = _next_slot(row_slot, slot)
    live = in_t & (row_slot >= 0)
    y_ptrs = y_ptr + token.to(tl.int64)[:, None] * stride_yt + offs_n[None, :]
    store_mask = live[:, None] & (offs_n[None, :] < N)
    y = tl.load(y_ptrs, mask=store_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, _rounded(y + acc, dtype, UPCAST).to(dtype), mask=store_mask)


# Configs, each compiled for sm_90 in tests/kernels/test_compile_sm90_multi_lora.py (timing status:
# kernels/TUNING.md).
# Per-token kernels are matrix-vector products, memory-bound: a [16, 256] tile of A per step
# (8 KB in bf16) and a [256, 16] tile of B; 4 warps, so many programs share each SM.
PER_TOKEN_SHRINK_CONFIG = dict(BLOCK_K=256, num_warps=4, num_stages=2)
PER_TOKEN_EXPAND_CONFIG = dict(BLOCK_N=256, num_warps=4, num_stages=2)
# Segment tiles: 64 rows (wgmma's smallest M, at 4 warps) for long segments; 16 rows (mma.sync)
# for few tokens, where 64-row tiles would leave most SMs idle and span more slots each.
# The shrink streams x at BLOCK_K 128 (a 64×128 bf16 tile, 16 KB a stage); the expand's K is the
# rank, at most 8 steps of 16, so it is not pipelined deeply.
SEGMENT_CONFIGS = {
    "wide": dict(
        shrink=dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3),
        expand=dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
    ),
    "narrow": dict(
        shrink=dict(BLOCK_M=16, BLOCK_K=128, num_warps=4, num_stages=3),
        expand=dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=2),
    ),
}
# Below this many tokens the narrow segment tiles run.
WIDE_TILES_MIN_TOKENS = 1024
# Up to this many tokens per slot (on average, if every slot were used) the per-token path runs:
# tokens rarely share an adapter there, and it spares the sort.
PER_TOKEN_MAX_TOKENS_PER_SLOT = 2


def choose_path(num_tokens, num_slots):
    """"per_token" or "segments", from shapes the host knows (no read of the slots)."""
    return "per_token" if num_tokens <= PER_TOKEN_MAX_TOKENS_PER_SLOT * num_slots else "segments"


def segment_config_name(num_tokens):
    return "wide" if num_tokens >= WIDE_TILES_MIN_TOKENS else "narrow"


@on_device_of_first_argument
def multi_lora_linear_fwd(
    x, weight, lora_a, lora_b, token_slots, scalings, ranks, bias=None, weight_scale=None, weight_offset=None,
    path=None,
):  # fmt: skip
    """`y` `[T, out]` in x's dtype for contiguous `x` `[T, in]` and `token_slots` int32 `[T]`; the
    other operands as `multi_lora_linear_ref` takes them (any strides for the stacks). Inputs
    are assumed valid. `path`: "per_token" or "segments"; None lets `choose_path` pick."""
    num_tokens, in_features = x.shape
    num_slots, r_max, _ = lora_a.shape
    out_features = weight.shape[0]
    if num_tokens == 0:
        return x.new_empty(0, out_features)
    path = path or choose_path(num_tokens, num_slots)
    ranks = ranks.contiguous()
    scalings = scalings.contiguous()
    num_rank_blocks = triton.cdiv(r_max, RANK_BLOCK)
    shrunk = torch.empty(num_tokens, r_max, device=x.device, dtype=torch.float32)
    a_strides = (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2))
    b_strides = (lora_b.stride(0), lora_b.stride(1), lora_b.stride(2))
    if path == "per_token":
        config = PER_TOKEN_SHRINK_CONFIG
        _shrink_per_token_kernel[(num_tokens * num_rank_blocks,)](
            x, lora_a, token_slots, ranks, shrunk, in_features, num_rank_blocks, x.stride(0), *a_strides,
            shrunk.stride(0), BLOCK_R=RANK_BLOCK, UPCAST=interpreting(), **config,
        )  # fmt: skip
    else:
        config = SEGMENT_CONFIGS[segment_config_name(num_tokens)]
        sorted_slots, order = torch.sort(token_slots, stable=True)
        shrink = config["shrink"]
        tiles = triton.cdiv(num_tokens, shrink["BLOCK_M"])
        _shrink_segments_kernel[(tiles * num_rank_blocks,)](
            x, lora_a, sorted_slots, order, ranks, shrunk, num_tokens, in_features, num_rank_blocks,
            x.stride(0), *a_strides, shrunk.stride(0), BLOCK_R=RANK_BLOCK, UPCAST=interpreting(), **shrink,
        )  # fmt: skip
    # The base GEMM's LoRA seed is empty (rank 0): views of real buffers, no allocation.
    y = lora_gemm(
        x, weight, True, weight_scale, weight_offset, shrunk[:, :0], lora_b[0, :, :0].t(), 0.0, bias, None, 1.0,
        x.dtype,
    )  # fmt: skip
    if path == "per_token":
        config = PER_TOKEN_EXPAND_CONFIG
        col_blocks = triton.cdiv(out_features, config["BLOCK_N"])
        _expand_per_token_kernel[(num_tokens * col_blocks,)](
            shrunk, lora_b, token_slots, ranks, scalings, y, out_features, col_blocks, shrunk.stride(0), *b_strides,
            y.stride(0), BLOCK_R=RANK_BLOCK, UPCAST=interpreting(), **config,
        )  # fmt: skip
    else:
        expand = config["expand"]
        col_blocks = triton.cdiv(out_features, expand["BLOCK_N"])
        tiles = triton.cdiv(num_tokens, expand["BLOCK_M"])
        _expand_segments_kernel[(tiles * col_blocks,)](
            shrunk, lora_b, sorted_slots, order, ranks, scalings, y, num_tokens, out_features, col_blocks,
            shrunk.stride(0), *b_strides, y.stride(0), BLOCK_R=RANK_BLOCK, UPCAST=interpreting(), **expand,
        )  # fmt: skip
    return y
