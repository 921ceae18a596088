"""Quantize-on-append for an int8 KV cache: the Triton kernel and its launcher.

The layout and the rounding are in `int8_kv_quantize_ref` (its module docstring), beside the
input checks and the plain-PyTorch reference, which need no Triton; this module re-exports them.
"""

# ---------------------------------------------------------------------------------------------
# Triton kernel: one program per (sequence, kv head, block of new tokens) quantizes the block's head
# vectors and writes them at positions start + t of the cache. The three are folded into the grid's
# first dimension (`quantize_grid`), token blocks fastest: the others allow only 65535 programs,
# which a 2.1M-token prefill's blocks of 32 would pass.
#
# Bit-exact with `quantize_kv_ref` on the GPU as in the interpreter: both divisions use
# `tl.math.div_rn` (IEEE round-to-nearest, like torch; Triton's plain fp32 `/` may be approximate
# on a GPU), and round-half-to-even is `(y + 1.5 * 2**23) - 1.5 * 2**23`: for |y| < 2**22 the sum
# lands where float32's spacing is 1, so the addition itself rounds y to an integer, half to even.
# libdevice's rint would do the same compiled, but the interpreter has no libdevice.
# Offsets are int64 but for the scales': one sequence's new keys (a long prefill, strided as
# transformers transposes them) or one head's cache can pass 2**31 elements.
# ---------------------------------------------------------------------------------------------


import torch
import triton
import triton.language as tl

from .int8_kv_quantize_ref import (  # noqa: F401
    KERNEL_DTYPES,
    MAX_HEAD_DIM,
    QUANT_MAX,
    check_quantize_kv_append_inputs,
    dequantize_kv_ref,
    quantize_kv_ref,
)
from .launch import interpreting, on_device_of_first_argument

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23
# Elements per program: enough work per program for a memory-bound copy, [32, 128] at head_dim
# 128; the interpreter takes 4 tokens so that short test appends cross several blocks.
_ELEMENTS_PER_PROGRAM = 4096
_INTERPRETER_BLOCK_T = 4
_NUM_WARPS = 4


@triton.jit
def quantize_rows(x):
    """`(data, scale)` of the rows of `x` `[BLOCK_T, BLOCK_D]` (zero past head_dim), as `quantize_kv_ref`."""
    x = x.to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(x), 1), 127.0)
    safe_scale = tl.where(scale > 0, scale, 1.0)
    y = tl.math.div_rn(x, safe_scale[:, None])
    rounded = (y + _ROUND_MAGIC) - _ROUND_MAGIC
    return tl.minimum(tl.maximum(rounded, -127.0), 127.0).to(tl.int8), scale


@triton.jit(do_not_specialize=["new_tokens", "start"])
def _quantize_kv_append_kernel(
    X, Data, Scale, new_tokens, start, num_kv_heads,
    stride_xb, stride_xh, stride_xt, stride_db, stride_dh, stride_dt, stride_sb, stride_sh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    token_blocks = tl.cdiv(new_tokens, BLOCK_T)
    seq_head = tl.program_id(0) // token_blocks
    seq = seq_head // num_kv_heads
    head = seq_head % num_kv_heads
    tokens = tl.program_id(0) % token_blocks * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (tokens[:, None] < new_tokens) & (offs_d[None, :] < HEAD_DIM)
    x_base = X + seq.to(tl.int64) * stride_xb + head.to(tl.int64) * stride_xh
    x = tl.load(x_base + tokens.to(tl.int64)[:, None] * stride_xt + offs_d[None, :], mask=mask, other=0.0)
    data, scale = quantize_rows(x)
    positions = start + tokens
    d_base = Data + seq.to(tl.int64) * stride_db + head.to(tl.int64) * stride_dh
    tl.store(d_base + positions.to(tl.int64)[:, None] * stride_dt + offs_d[None, :], data, mask=mask)
    s_base = Scale + seq.to(tl.int64) * stride_sb + head.to(tl.int64) * stride_sh
    tl.store(s_base + positions, scale, mask=tokens < new_tokens)


def quantize_grid(batch, num_kv_heads, new_tokens, block_t):
    """The launch grid: one program per (sequence, kv head, block of `block_t` new tokens), in dimension 0."""
    return (batch * num_kv_heads * triton.cdiv(new_tokens, block_t),)


@on_device_of_first_argument
def quantize_kv_append(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, start: int) -> None:
    """Quantize `x` `[batch, num_kv_heads, new_tokens, head_dim]` into positions
    `[start, start + new_tokens)` of `data` (int8) and `scale` (float32), in place; bit-exact with
    `quantize_kv_ref(x)`. Other positions are left untouched."""
    check_quantize_kv_append_inputs(x, data, scale, start)
    batch, num_kv_heads, new_tokens, head_dim = x.shape
    if x.numel() == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_t = _INTERPRETER_BLOCK_T if interpreting() else max(1, _ELEMENTS_PER_PROGRAM // block_d)
    _quantize_kv_append_kernel[quantize_grid(batch, num_kv_heads, new_tokens, block_t)](
        x, data, scale, new_tokens, start, num_kv_heads,
        x.stride(0), x.stride(1), x.stride(2), data.stride(0), data.stride(1), data.stride(2),
        scale.stride(0), scale.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=_NUM_WARPS,
    )
