"""Fused linear cross-entropy: Triton kernels and their launchers.

The math (loss and gradients) is in `linear_cross_entropy_ref` (its module docstring), beside the
definition and the chunked CPU path, which need no Triton.

Design: recompute, not gradient-in-forward. The forward keeps, per token, only the largest logit
`m` and `log Σ exp(z' - m)` (8 bytes); the backward recomputes each `[BLOCK_T, BLOCK_V]` logit tile on chip and turns it into
its dx and dW contributions at once. The alternative (Liger's) computes dx and dW in the forward,
one matmul fewer, but it must know the upstream gradient then, so it is only right for a scalar
loss (`reduction="none"` needs a per-token gradient that arrives later), it holds a full-size fp32
dW from the forward to the backward (what gradient accumulation and FSDP2, which reshards W between
the two, do not want), and it pays for the backward in evaluation too. Recompute costs a fourth
`T·V·H` matmul; nothing of size `[T, V]` ever exists, in either pass.

Kernels:
- `_lce_fwd_kernel`: grid (token blocks, vocab splits). Each program walks its split's vocab tiles,
  each tile a K-loop over H, keeping an online max / sum of exponentials, the target's logit and
  the sum of logits (label smoothing) per token; the launcher merges the splits (`[splits, T]`, small).
  Splits keep the GPU full when there are few token blocks.
- `_lce_bwd_kernel`: grid (token blocks × vocab blocks). Each program recomputes its logit tile,
  forms `dz` in fp32, then, H block by H block, adds `dz · W` into dx and `dzᵀ · x` into dW with fp32
  atomics (as Cut Cross-Entropy does): many programs touch a row of dx (every vocab block) and of
  dW (every token block), and the accumulators stay fp32 until the launcher casts them (bf16
  accumulation of dW across chunks is what diverged for Liger's users). Atomic order makes the
  float sums nondeterministic in their last bits on the GPU.

Matmul inputs are the input dtype (bf16/fp16 MMA, fp32 as tf32 on the GPU), accumulators fp32; the
target's `p - 1` is formed in fp32 before `dz` is rounded to the matmul dtype. Row and column
offsets are int64 before they meet a stride.
"""


import torch
import triton
import triton.language as tl

from .launch import interpreting, on_device_of_first_argument
from .linear_cross_entropy_ref import per_token_loss

# 128×128 logit tiles: 128 rows for wgmma (a multiple of 64, also for the `dzᵀ · x` dot whose rows
# are vocab), and a tile both passes can hold in registers with 8 warps (the 16-bit backward uses
# 248-254 of 255 registers per thread, tests/kernels/test_compile_sm90_linear_cross_entropy.py).
# fp32 (tf32) halves BLOCK_H so the pipelined operand tiles fit in shared memory, and its backward
# halves BLOCK_V too: at 128 it spilled under triton 3.6.
FWD_CONFIGS = {
    "16bit": dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    "fp32": dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=3),
}
BWD_CONFIGS = {
    "16bit": dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=2),
    "fp32": dict(BLOCK_T=128, BLOCK_V=64, BLOCK_H=32, num_warps=8, num_stages=2),
}
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
def _lce_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, labels_ptr, stats_ptr, grad_ptr, dx_ptr, dw_ptr, db_ptr,
    T, V, H, stride_xt, stride_wv, stride_dxt, stride_dwv,
    ignore_index, softcap, smoothing, z_loss,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """dz of one `[BLOCK_T, BLOCK_V]` tile, added into fp32 dx `[T, H]`, dW `[V, H]`, dbias `[V]`."""
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rows = offs_t % T
    cols = offs_v % V
    logits, capped = _logit_tile(
        x_ptr, w_ptr, bias_ptr, rows, cols, H, stride_xt, stride_wv, softcap,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_T, BLOCK_V, BLOCK_H, UPCAST,
    )  # fmt: skip
    labels = tl.load(labels_ptr + rows)
    row_max = tl.load(stats_ptr + rows)
    log_sum = tl.load(stats_ptr + T + rows)
    lse = row_max + log_sum
    # Wrapped rows and ignored tokens get a zero factor, so they add nothing anywhere.
    scale = tl.where((offs_t < T) & (labels != ignore_index), tl.load(grad_ptr + rows), 0.0)
    # exp((z' - m) - log_sum), not exp(z' - lse): lse's rounding (~1e-6 at 15) would swamp 1 - p.
    prob = tl.exp((logits - row_max[:, None]) - log_sum[:, None])
    grad = prob * ((1.0 + 2.0 * z_loss * lse) * scale)[:, None] - (smoothing / V) * scale[:, None]
    grad -= tl.where(offs_v[None, :] == labels[:, None], (1.0 - smoothing) * scale[:, None], 0.0)
    if HAS_SOFTCAP:
        grad *= 1.0 - capped * capped
    grad = tl.where(offs_v[None, :] < V, grad, 0.0)
    if COMPUTE_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(grad, 0), mask=offs_v < V)
    if UPCAST:
        grad_mm = grad
    else:
        grad_mm = grad.to(x_ptr.dtype.element_ty)
    offs_h = tl.arange(0, BLOCK_H)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for h in range(0, tl.cdiv(H, BLOCK_H)):
        col_h = h * BLOCK_H + offs_h
        in_h = col_h[None, :] < H
        if COMPUTE_DX:
            w = tl.load(w_ptr + cols64[:, None] * stride_wv + col_h[None, :], mask=in_h, other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            part = tl.dot(grad_mm, w)
            tl.atomic_add(dx_ptr + rows64[:, None] * stride_dxt + col_h[None, :], part,
                          mask=(offs_t[:, None] < T) & in_h)
        if COMPUTE_DW:
            x = tl.load(x_ptr + rows64[:, None] * stride_xt + col_h[None, :], mask=in_h, other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
            part = tl.dot(tl.trans(grad_mm), x)
            tl.atomic_add(dw_ptr + cols64[:, None] * stride_dwv + col_h[None, :], part,
                          mask=(offs_v[:, None] < V) & in_h)


def _meta(config):
    return {k: v for k, v in config.items() if k.startswith("BLOCK")} | dict(
        num_warps=config["num_warps"], num_stages=config["num_stages"]
    )


def _upcast(x):
    return interpreting() and x.dtype != torch.float32


@on_device_of_first_argument
def linear_cross_entropy_fwd(x, weight, bias, labels, ignore_index, label_smoothing, softcap, z_loss):
    """`(loss, stats)`: fp32 `[T]` and `[2, T]` (each token's largest logit and `log Σ exp(z' - max)`): `x` `[T, H]` and `weight` `[V, H]` contiguous, of one dtype;
    `bias` `[V]` or None; `labels` int64 `[T]` in `[0, V)` or `ignore_index`; `softcap` None or > 0."""
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
    per-token gradient `grad_loss` fp32 `[T]` and the forward's `stats`."""
    num_tokens, hidden = x.shape
    vocab_size = weight.shape[0]
    # fp32 accumulators the atomics add into; zeros, since every program adds only its share.
    grad_x = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device) if compute_dx else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if compute_dw else None
    grad_b = torch.zeros(vocab_size, dtype=torch.float32, device=x.device) if compute_db else None
    if num_tokens > 0 and (compute_dx or compute_dw or compute_db):
        config = BWD_CONFIGS[config_name(x.dtype)]
        grid = (triton.cdiv(num_tokens, config["BLOCK_T"]), triton.cdiv(vocab_size, config["BLOCK_V"]))
        _lce_bwd_kernel[grid](
            x, weight, bias if bias is not None else x, labels, stats, grad_loss,
            grad_x if compute_dx else x, grad_w if compute_dw else x, grad_b if compute_db else x,
            num_tokens, vocab_size, hidden, x.stride(0), weight.stride(0), hidden, hidden,
            ignore_index, softcap or 1.0, label_smoothing, z_loss,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            COMPUTE_DX=compute_dx, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, UPCAST=_upcast(x), **_meta(config),
        )  # fmt: skip
    return (
        grad_x.to(x.dtype) if compute_dx else None,
        grad_w.to(weight.dtype) if compute_dw else None,
        grad_b.to(bias.dtype) if compute_db else None,
    )
