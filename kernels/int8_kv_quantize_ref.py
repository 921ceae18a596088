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

This module holds the reference and the input checks, without Triton; the kernel is in
`int8_kv_quantize.py`.
"""

import torch

from .launch import describe

QUANT_MAX = 127
# What `quantize_kv_append` takes, on either path.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


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


def check_quantize_kv_append_inputs(x, data, scale, start):
    """Raise ValueError naming the argument when `quantize_kv_append`'s inputs break the layout above."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"x must be a float16, bfloat16 or float32 tensor [batch, num_kv_heads, new_tokens, "
                         f"head_dim], got {describe(x)}")
    if not isinstance(data, torch.Tensor) or data.dim() != 4 or data.dtype != torch.int8:
        raise ValueError(f"data must be an int8 tensor [batch, num_kv_heads, capacity, head_dim], got {describe(data)}")
    if not isinstance(scale, torch.Tensor) or scale.dim() != 3 or scale.dtype != torch.float32:
        raise ValueError(f"scale must be a float32 tensor [batch, num_kv_heads, capacity], got {describe(scale)}")
    if len({x.device, data.device, scale.device}) != 1:
        raise ValueError(f"x, data, scale must be on one device, got {x.device}, {data.device}, {scale.device}")
    batch, num_kv_heads, new_tokens, head_dim = x.shape
    if data.shape[3] != head_dim:
        raise ValueError(f"data's head_dim ({data.shape[3]}) must equal x's ({head_dim})")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    if data.shape[:2] != (batch, num_kv_heads):
        raise ValueError(
            f"data's batch and num_kv_heads {tuple(data.shape[:2])} must equal x's {(batch, num_kv_heads)}"
        )
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
