"""Quantize-on-append for an int8 KV cache: one symmetric scale per (sequence, kv head, token).

Layout (transformers' cache layout): new keys or values `x` are `[batch, num_kv_heads, new_tokens,
head_dim]`; the cache holds `data` int8 `[batch, num_kv_heads, capacity, head_dim]` and `scale` float32
`[batch, num_kv_heads, capacity]`. Each head vector of one token is stored as

    scale = max_d |x_d| / 127,   data_d = round_half_even(x_d / scale)   (data = 0 where scale = 0)

so `data * scale` gives `x` back within `scale / 2` per element. Why this granularity: a token's
key or value vector is written once and never changes, so its scale can be set when it is
appended, without revisiting older tokens (a per-channel scale would have to be fixed before the
tokens that set it arrive, or requantize the cache); and outlier channels hurt only their own
token's vector. Its cost is one float32 per head_dim int8 values: 4 / 128 = 3% at head_dim 128.
A float16 scale would save half of that (1.5% of the cache) but not hold every bfloat16 vector:
it overflows for max |x| above 127 · 65504 ≈ 8.3e6 and loses precision, then becomes 0, for max
|x| below 127 · 6.1e-5 ≈ 0.0078 (subnormal), as small as attention-sink tokens' values often are.
"""

import torch

QUANT_MAX = 127


def quantize_kv_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(data, scale)` of `x` `[..., head_dim]`: int8 like `x`, float32 `x.shape[:-1]` (see module docstring)."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / QUANT_MAX
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    data = torch.round(x / safe_scale[..., None]).clamp_(-QUANT_MAX, QUANT_MAX).to(torch.int8)
    return data, scale


def dequantize_kv_ref(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`data * scale` in `dtype`: the values a quantized cache stands for."""
    return (data.float() * scale[..., None]).to(dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernel: one program per (sequence, kv head, block of new tokens) quantizes the block's head
# vectors and writes them at positions start + t of the cache.
#
# Bit-exact with `quantize_kv_ref` on the GPU as in the interpreter: both divisions use
# `tl.math.div_rn` (IEEE round-to-nearest, like torch; Triton's plain fp32 `/` may be approximate
# on a GPU), and round-half-to-even is `(y + 1.5 * 2**23) - 1.5 * 2**23`: for |y| < 2**22 the sum
# lands where float32's spacing is 1, so the addition itself rounds y to an integer, half to even.
# libdevice's rint would do the same compiled, but the interpreter has no libdevice.
# Offsets are int64 but for the scales': one sequence's new keys (a long prefill, strided as
# transformers transposes them) or one head's cache can pass 2**31 elements.
# ---------------------------------------------------------------------------------------------

import os

import triton
import triton.language as tl

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# Elements per program: enough work per program for a memory-bound copy, [32, 128] at head_dim
# 128; the interpreter takes 4 tokens so that short test appends cross several blocks.
_ELEMENTS_PER_PROGRAM = 4096
_INTERPRETER_BLOCK_T = 4
_NUM_WARPS = 4


@triton.jit(do_not_specialize=["new_tokens", "start"])
def _quantize_kv_append_kernel(
    X, Data, Scale, new_tokens, start, num_kv_heads,
    stride_xb, stride_xh, stride_xt, stride_db, stride_dh, stride_dt, stride_sb, stride_sh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    seq = tl.program_id(0) // num_kv_heads
    head = tl.program_id(0) % num_kv_heads
    tokens = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (tokens[:, None] < new_tokens) & (offs_d[None, :] < HEAD_DIM)
    x_base = X + seq.to(tl.int64) * stride_xb + head.to(tl.int64) * stride_xh
    x = tl.load(x_base + tokens.to(tl.int64)[:, None] * stride_xt + offs_d[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(x), 1), 127.0)
    safe_scale = tl.where(scale > 0, scale, 1.0)
    y = tl.math.div_rn(x, safe_scale[:, None])
    rounded = (y + _ROUND_MAGIC) - _ROUND_MAGIC
    data = tl.minimum(tl.maximum(rounded, -127.0), 127.0).to(tl.int8)
    positions = start + tokens
    d_base = Data + seq.to(tl.int64) * stride_db + head.to(tl.int64) * stride_dh
    tl.store(d_base + positions.to(tl.int64)[:, None] * stride_dt + offs_d[None, :], data, mask=mask)
    s_base = Scale + seq.to(tl.int64) * stride_sb + head.to(tl.int64) * stride_sh
    tl.store(s_base + positions, scale, mask=tokens < new_tokens)


def _describe(t):
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return type(t).__name__


def check_quantize_kv_append_inputs(x, data, scale, start):
    """Raise ValueError naming the argument when `quantize_kv_append`'s inputs break the layout above."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"x must be a float16, bfloat16 or float32 tensor [batch, num_kv_heads, new_tokens, "
                         f"head_dim], got {_describe(x)}")
    if not isinstance(data, torch.Tensor) or data.dim() != 4 or data.dtype != torch.int8:
        raise ValueError(f"data must be an int8 tensor [batch, num_kv_heads, capacity, head_dim], got {_describe(data)}")
    if not isinstance(scale, torch.Tensor) or scale.dim() != 3 or scale.dtype != torch.float32:
        raise ValueError(f"scale must be a float32 tensor [batch, num_kv_heads, capacity], got {_describe(scale)}")
    if len({x.device, data.device, scale.device}) != 1:
        raise ValueError(f"x, data, scale must be on one device, got {x.device}, {data.device}, {scale.device}")
    batch, num_kv_heads, new_tokens, head_dim = x.shape
    if data.shape[3] != head_dim:
        raise ValueError(f"data's head_dim ({data.shape[3]}) must equal x's ({head_dim})")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    if data.shape[:2] != (batch, num_kv_heads):
        raise ValueError(f"data's batch and num_kv_heads {tuple(data.shape[:2])} must equal x's {(batch, num_kv_heads)}")
    if scale.shape != data.shape[:3]:
        raise ValueError(f"scale's shape {tuple(scale.shape)} must be data's without head_dim {tuple(data.shape[:3])}")
    if not data.is_contiguous() or not scale.is_contiguous():
        raise ValueError(f"data and scale must be contiguous, got strides {data.stride()} and {scale.stride()}")
    if x.stride(3) != 1:
        raise ValueError(f"x must be contiguous in head_dim (stride 1), got strides {x.stride()}")
    if not isinstance(start, (int, torch.SymInt)) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    if start + new_tokens > data.shape[2]:
        raise ValueError(f"start + new_tokens ({start} + {new_tokens}) exceeds the cache capacity ({data.shape[2]})")


def quantize_kv_append(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, start: int) -> None:
    """Quantize `x` `[batch, num_kv_heads, new_tokens, head_dim]` into positions
    `[start, start + new_tokens)` of `data` (int8) and `scale` (float32), in place; bit-exact with
    `quantize_kv_ref(x)`. Other positions are left untouched."""
    check_quantize_kv_append_inputs(x, data, scale, start)
    batch, num_kv_heads, new_tokens, head_dim = x.shape
    if x.numel() == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    block_t = _INTERPRETER_BLOCK_T if interpreting else max(1, _ELEMENTS_PER_PROGRAM // block_d)
    _quantize_kv_append_kernel[(batch * num_kv_heads, triton.cdiv(new_tokens, block_t))](
        x, data, scale, new_tokens, start, num_kv_heads,
        x.stride(0), x.stride(1), x.stride(2), data.stride(0), data.stride(1), data.stride(2),
        scale.stride(0), scale.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=_NUM_WARPS,
    )
