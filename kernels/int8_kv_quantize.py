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
