"""Fused linear cross-entropy: Triton kernels and their launchers.

The math (loss and gradients) is in `linear_cross_entropy_ref` (its module docstring), beside the
definition and the chunked CPU path, which need no Triton.

Design: recompute, not gradient-in-forward. The forward keeps, per token, only the largest logit
`m` and `log Σ exp(z' - m)` (8 bytes); the backward recomputes the logits tile by tile on chip and
turns them into dz. The alternative (Liger's) computes dx and dW in the forward, one matmul fewer,
but it must know the upstream gradient then, so it is only right for a scalar loss
(`reduction="none"` needs a per-token gradient that arrives later), it holds a full-size fp32 dW
from the forward to the backward (what gradient accumulation and FSDP2, which reshards W between
the two, do not want), and it pays for the backward in evaluation too. Recompute costs a fourth
`T·V·H` matmul; no logits `[T, V]` ever exist, in either pass.

Kernels:
- `_lce_fwd_kernel`: grid (token blocks, vocab splits). Each program walks its split's vocab tiles,
  each tile a K-loop over H, keeping an online max / sum of exponentials, the target's logit and
  the sum of logits (label smoothing) per token; the launcher merges the splits (`[splits, T]`, small).
  Splits keep the GPU full when there are few token blocks.
- The backward, deterministic (no atomics: each output element is summed by one program in a fixed
  order, so two runs give the same bits), one vocab chunk (`DLOGITS_CHUNK_COLUMNS`) at a time:
  `_lce_dlogits_kernel` (grid token blocks × the chunk's vocab blocks) recomputes each logit tile,
  forms dz in fp32 and writes it, rounded to the matmul dtype, into `dz [T, chunk]`, with its fp32
  column sums per token block for dbias (summed over the blocks in one order by the launcher);
  then `_matmul_kernel` computes that chunk's rows of dW, `dzᵀ · x` over every token (written once,
  in W's dtype: no fp32 `[V, H]` buffer, which was 2.1 GB at 4096 × 128256), and adds `dz · W[chunk]`
  into dx's fp32 sum (rounded once to x's dtype at the last chunk; written at once when one chunk
  covers the vocabulary). Why materialize dz at all: dx `[T, H]` per token block and dW `[V, H]` per
  vocab block are too large to accumulate in registers over the whole other axis (2 MB per block at
  H 4096), and splitting H instead recomputes the logits once per H block. A dz chunk costs
  twice x's memory at H 4096 and a write and two reads of `T·V` elements in all, small next to the
  matmuls (Liger materializes logits chunk by chunk likewise; Cut Cross-Entropy adds its tiles into
  shared dx and dW under locks or atomics, as this backward did before).

Matmul inputs are the input dtype (bf16/fp16 MMA, fp32 as tf32 on the GPU), accumulators fp32; the
target's `p - 1` is formed in fp32 before `dz` is rounded to the matmul dtype. Row and column
offsets are int64 before they meet a stride.
"""


import torch
import triton
import triton.language as tl

from .launch import interpreting, on_device_of_first_argument
from .linear_cross_entropy_ref import per_token_loss

# Register use per config (triton 3.9 / 3.6, sm_90): tests/kernels/test_compile_sm90_linear_cross_entropy.py.
# The forward's 128×128 logit tiles: 128 rows for wgmma (a multiple of 64) and a tile it holds in
# registers with 8 warps (up to 254 of 255 registers per thread without spilling); fp32 (tf32) halves
# BLOCK_H so the pipelined operand tiles fit in shared memory.
FWD_CONFIGS = {
    "16bit": dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    "fp32": dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=3),
}
# The backward's dz tiles are half as wide as the forward's: at 128 the 16-bit kernel with a bias,
# softcap and a vocabulary not 16-divisible used 254 of 255 registers, at 64 it uses 128.
DLOGITS_CONFIGS = {
    "16bit": dict(BLOCK_T=128, BLOCK_V=64, BLOCK_H=64, num_warps=8, num_stages=3),
    "fp32": dict(BLOCK_T=128, BLOCK_V=64, BLOCK_H=32, num_warps=8, num_stages=3),
}
# The dx and dW GEMMs: 128×128 output tiles (128×256 spilled when adding into dx's fp32 sum);
# fp32 (tf32) halves BLOCK_K to stay in shared memory with 3 stages. At most 186 / 222 registers.
MATMUL_CONFIGS = {
    "16bit": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    "fp32": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
}
# The backward's dz `[T, chunk]` covers this many vocab columns at a time (twice x's size at H 4096):
# dW's rows of the chunk are then one GEMM over all tokens, and dx's fp32 sum is read and written
# once per chunk (16 passes of `T·H` fp32 at V 128k, a few % of the GEMMs' time).
DLOGITS_CHUNK_COLUMNS = 8192
# The forward splits the vocabulary until about this many programs run (two per SM of an H100/H200).
_TARGET_PROGRAMS = 264


def config_name(dtype):
    return "fp32" if dtype == torch.float32 else "16bit"


@triton.jit
def _logit_tile(
    x_ptr, w_ptr, bias_ptr, rows, cols, H, stride_xt, stride_wv, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """`(z', z'/c)` of tile `x[rows] · W[cols]ᵀ + bias[cols]` in fp32, softcapped (`z'/c` is 0 without)."""
    offs_h = tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xt + offs_h[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wv + offs_h[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for h in range(0, tl.cdiv(H, BLOCK_H)):
        in_h = offs_h[None, :] < H - h * BLOCK_H
        x = tl.load(x_ptrs, mask=in_h, other=0.0)
        w = tl.load(w_ptrs, mask=in_h, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    capped = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    if HAS_SOFTCAP:
        # tanh(u) = 1 - 2 / (exp(2u) + 1): exact at both ends (exp overflows to inf -> 1).
        capped = 1.0 - 2.0 / (tl.exp(2.0 * acc / softcap) + 1.0)
        acc = capped * softcap
    return acc, capped


@triton.jit
def _lce_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, labels_ptr, part_ptr,
    T, V, H, tiles_per_split, stride_xt, stride_wv, stride_part,
    softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Per token of the block, over this split's vocab tiles: running max `m`, `Σ exp(z' - m)`, the
    target's `z'` (0 when the target is elsewhere or ignored) and `Σ z'`, into `part[4, splits, T]`."""
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    # Rows past T wrap onto valid ones, so loads need no row mask; only the store is masked.
    rows = offs_t % T
    labels = tl.load(labels_ptr + rows)
    running_max = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_T,), dtype=tl.float32)
    target = tl.zeros((BLOCK_T,), dtype=tl.float32)
    sum_logits = tl.zeros((BLOCK_T,), dtype=tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first, last):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        logits, _ = _logit_tile(
            x_ptr, w_ptr, bias_ptr, rows, offs_v % V, H, stride_xt, stride_wv, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_T, BLOCK_V, BLOCK_H, UPCAST,
        )  # fmt: skip
        in_v = offs_v[None, :] < V
        target += tl.sum(tl.where(offs_v[None, :] == labels[:, None], logits, 0.0), 1)
        sum_logits += tl.sum(tl.where(in_v, logits, 0.0), 1)
        # Every tile holds at least one real column, so the new max is finite.
        logits = tl.where(in_v, logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, 1))
        sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
        running_max = new_max
    out = part_ptr + split.to(tl.int64) * T + offs_t
    in_t = offs_t < T
    tl.store(out, running_max, mask=in_t)
    tl.store(out + stride_part, sum_exp, mask=in_t)
    tl.store(out + 2 * stride_part, target, mask=in_t)
    tl.store(out + 3 * stride_part, sum_logits, mask=in_t)


@triton.jit
def _lce_dlogits_kernel(
    x_ptr, w_ptr, bias_ptr, labels_ptr, stats_ptr, grad_ptr, dz_ptr, db_part_ptr,
    T, V, H, first_col, stride_xt, stride_wv, stride_dzt, stride_db_part,
    ignore_index, softcap, smoothing, z_loss,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """dz of one `[BLOCK_T, BLOCK_V]` tile of the vocab chunk starting at `first_col`, into
    `dz[T, chunk]` in the input dtype (0 past V), and its column sums in fp32 into row `pid_t` of
    `db_part[token blocks, V]`."""
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_v = first_col + offs_c
    rows = offs_t % T
    logits, capped = _logit_tile(
        x_ptr, w_ptr, bias_ptr, rows, offs_v % V, H, stride_xt, stride_wv, softcap,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_T, BLOCK_V, BLOCK_H, UPCAST,
    )  # fmt: skip
    labels = tl.load(labels_ptr + rows)
    row_max = tl.load(stats_ptr + rows)
    log_sum = tl.load(stats_ptr + T + rows)
    lse = row_max + log_sum
    # Wrapped rows and ignored tokens get a zero factor, so they add nothing to dbias.
    scale = tl.where((offs_t < T) & (labels != ignore_index), tl.load(grad_ptr + rows), 0.0)
    # exp((z' - m) - log_sum), not exp(z' - lse): lse's rounding (~1e-6 at 15) would swamp 1 - p.
    prob = tl.exp((logits - row_max[:, None]) - log_sum[:, None])
    grad = prob * ((1.0 + 2.0 * z_loss * lse) * scale)[:, None] - (smoothing / V) * scale[:, None]
    grad -= tl.where(offs_v[None, :] == labels[:, None], (1.0 - smoothing) * scale[:, None], 0.0)
    if HAS_SOFTCAP:
        grad *= 1.0 - capped * capped
    grad = tl.where(offs_v[None, :] < V, grad, 0.0)
    if COMPUTE_DB:
        tl.store(db_part_ptr + pid_t.to(tl.int64) * stride_db_part + offs_v, tl.sum(grad, 0), mask=offs_v < V)
    dz_ptrs = dz_ptr + offs_t.to(tl.int64)[:, None] * stride_dzt + offs_c[None, :]
    tl.store(dz_ptrs, grad.to(dz_ptr.dtype.element_ty), mask=offs_t[:, None] < T)


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, acc_ptr, out_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_acc, stride_out,
    LOAD_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """`out = a · b (+ acc)` for one `[BLOCK_M, BLOCK_N]` tile, `a` `[M, K]` and `b` `[K, N]` by their
    strides, accumulated in fp32 in a fixed order; `acc` and `out` are row-major `[M, N]` (fp32 and
    any dtype) and may be one tensor, since each program reads its own tile before it writes it."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past M and N wrap onto valid ones (loads need no mask but along K).
    a_ptrs = a_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_am + offs_k.to(tl.int64)[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k.to(tl.int64)[:, None] * stride_bk + (offs_n % N).to(tl.int64)[None, :] * stride_bn
    # tl.cast, not .to: a unit stride arrives as a constexpr int.
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    b_step = tl.cast(stride_bk, tl.int64) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_K, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_K, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += a_step
        b_ptrs += b_step
    in_tile = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows64 = offs_m.to(tl.int64)[:, None]
    if LOAD_ACC:
        acc += tl.load(acc_ptr + rows64 * stride_acc + offs_n[None, :], mask=in_tile)
    tl.store(out_ptr + rows64 * stride_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=in_tile)


def _meta(config):
    return {k: v for k, v in config.items() if k.startswith("BLOCK")} | dict(
        num_warps=config["num_warps"], num_stages=config["num_stages"]
    )


def _upcast(x):
    return interpreting() and x.dtype != torch.float32


@on_device_of_first_argument
def linear_cross_entropy_fwd(x, weight, bias, labels, ignore_index, label_smoothing, softcap, z_loss):
    """`(loss, stats)`: fp32 `[T]` and `[2, T]` (each token's largest logit and `log Σ exp(z' - max)`):
    `x` `[T, H]` and `weight` `[V, H]` contiguous, of one dtype; `bias` `[V]` or None; `labels` int64 `[T]`
    in `[0, V)` or `ignore_index`; `softcap` None or > 0."""
    num_tokens, hidden = x.shape
    vocab_size = weight.shape[0]
    if num_tokens == 0:
        return x.new_zeros(0, dtype=torch.float32), x.new_zeros(2, 0, dtype=torch.float32)
    config = FWD_CONFIGS[config_name(x.dtype)]
    token_blocks = triton.cdiv(num_tokens, config["BLOCK_T"])
    vocab_tiles = triton.cdiv(vocab_size, config["BLOCK_V"])
    tiles_per_split = triton.cdiv(vocab_tiles, min(vocab_tiles, triton.cdiv(_TARGET_PROGRAMS, token_blocks)))
    splits = triton.cdiv(vocab_tiles, tiles_per_split)
    part = torch.empty(4, splits, num_tokens, dtype=torch.float32, device=x.device)
    _lce_fwd_kernel[(token_blocks, splits)](
        x, weight, bias if bias is not None else x, labels, part,
        num_tokens, vocab_size, hidden, tiles_per_split, x.stride(0), weight.stride(0), part.stride(0),
        softcap or 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, UPCAST=_upcast(x), **_meta(config),
    )  # fmt: skip
    split_max, sum_exp, target, sum_logits = part
    row_max = split_max.amax(0)
    log_sum = torch.log((sum_exp * torch.exp(split_max - row_max)).sum(0))
    stats = torch.stack((row_max, log_sum))
    return per_token_loss(row_max, log_sum, target.sum(0), sum_logits.sum(0), labels, ignore_index, label_smoothing,
                          z_loss, vocab_size), stats  # fmt: skip


@on_device_of_first_argument
def linear_cross_entropy_bwd(
    grad_loss, x, weight, bias, labels, stats, ignore_index, label_smoothing, softcap, z_loss, compute_dx, compute_dw,
    compute_db,
):  # fmt: skip
    """`(dx, dW, dbias)` in the dtypes of `x`, `weight`, `bias` (None where not asked for), for the
    per-token gradient `grad_loss` fp32 `[T]` and the forward's `stats`; bit-identical from run to run."""
    num_tokens, hidden = x.shape
    vocab_size = weight.shape[0]
    grad_x = torch.empty_like(x) if compute_dx else None
    grad_w = torch.empty_like(weight) if compute_dw else None
    grad_b = None
    if num_tokens == 0:
        return grad_x, grad_w.zero_() if compute_dw else None, bias.new_zeros(vocab_size) if compute_db else None
    dz_config = DLOGITS_CONFIGS[config_name(x.dtype)]
    mm_config = MATMUL_CONFIGS[config_name(x.dtype)]
    block_t, block_v = dz_config["BLOCK_T"], dz_config["BLOCK_V"]
    chunk = min(triton.cdiv(DLOGITS_CHUNK_COLUMNS, block_v), triton.cdiv(vocab_size, block_v)) * block_v
    chunks = triton.cdiv(vocab_size, chunk)
    # dz of one vocab chunk in the matmul dtype, and dx's fp32 sum over the chunks where there are several.
    grad_logits = torch.empty(num_tokens, chunk, dtype=x.dtype, device=x.device)
    grad_x32 = None
    if compute_dx and chunks > 1:
        grad_x32 = grad_x if x.dtype == torch.float32 else torch.empty_like(x, dtype=torch.float32)
    db_part = None
    if compute_db:
        db_part = torch.empty(triton.cdiv(num_tokens, block_t), vocab_size, dtype=torch.float32, device=x.device)
    upcast = _upcast(x)
    for index, first_col in enumerate(range(0, vocab_size, chunk)):
        width = min(chunk, vocab_size - first_col)
        _lce_dlogits_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(width, block_v))](
            x, weight, bias if bias is not None else x, labels, stats, grad_loss, grad_logits,
            db_part if compute_db else stats,
            num_tokens, vocab_size, hidden, first_col, x.stride(0), weight.stride(0), grad_logits.stride(0),
            vocab_size, ignore_index, softcap or 1.0, label_smoothing, z_loss,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, COMPUTE_DB=compute_db, UPCAST=upcast,
            **_meta(dz_config),
        )  # fmt: skip
        dz = grad_logits[:, :width]
        if compute_dw:
            # dW[chunk] = dzᵀ · x over every token at once: each row of dW is written once.
            _matmul(dz.T, x, None, grad_w[first_col : first_col + width], mm_config, upcast)
        if compute_dx:
            # dx = Σ_chunks dz · W[chunk], summed in fp32 chunk after chunk, rounded once at the last.
            last = index == chunks - 1
            out = grad_x if last else grad_x32
            _matmul(dz, weight[first_col : first_col + width], grad_x32 if index > 0 else None, out, mm_config, upcast)
    if compute_db:
        # The token blocks' fp32 column sums, added in one fixed order.
        grad_b = db_part.sum(0).to(bias.dtype)
    return grad_x, grad_w, grad_b


def _matmul(a, b, acc, out, config, upcast):
    """`out = a · b (+ acc)` with `_matmul_kernel`; `acc` fp32 or None, `out` row-major."""
    (rows, depth), cols = a.shape, b.shape[1]
    grid = (triton.cdiv(rows, config["BLOCK_M"]), triton.cdiv(cols, config["BLOCK_N"]))
    _matmul_kernel[grid](
        a, b, out if acc is None else acc, out, rows, cols, depth, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0) if acc is None else acc.stride(0), out.stride(0),
        LOAD_ACC=acc is not None, UPCAST=upcast, **_meta(config),
    )  # fmt: skip
