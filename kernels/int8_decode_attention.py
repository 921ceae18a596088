"""Attention of a few new query tokens over an int8 KV cache (decode, or short appended chunks).

Layout (transformers' cache layout): `q` is `[batch, num_heads, num_queries, head_dim]`; the cache
holds `k_data`/`v_data` int8 `[batch, num_kv_heads, capacity, head_dim]` and `k_scale`/`v_scale`
float32 `[batch, num_kv_heads, capacity]` (see `int8_kv_quantize.py`); its first `kv_len` positions
are filled, and the queries are its last `num_queries` tokens. Query `t` of sequence `b` sits at
position `p = kv_len - num_queries + t` and sees key `j` when

    key_start[b] <= j <= p     and, with a window,   j >= p - window_left

(`key_start` skips a left-padded batch's padding; None means 0). Scores are
`s = q·k * softmax_scale`, then `softcap * tanh(s / softcap)` when `softcap > 0`. A query that
sees no key outputs zeros. `num_heads` is a multiple of `num_kv_heads` (GQA).
"""

import torch

from .int8_kv_quantize import dequantize_kv_ref


def int8_decode_attention_ref(
    q, k_data, k_scale, v_data, v_scale, kv_len, key_start=None, softmax_scale=None, window_left=-1, softcap=0.0
):
    """Plain PyTorch: dequantizes the filled cache and attends with an explicit mask, in float32."""
    batch, num_heads, num_queries, head_dim = q.shape
    group = num_heads // k_data.shape[1]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    keys = dequantize_kv_ref(k_data[:, :, :kv_len], k_scale[:, :, :kv_len], torch.float32)
    values = dequantize_kv_ref(v_data[:, :, :kv_len], v_scale[:, :, :kv_len], torch.float32)
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), keys) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    positions = torch.arange(kv_len - num_queries, kv_len, device=q.device)[:, None]
    cols = torch.arange(kv_len, device=q.device)[None, :]
    visible = cols <= positions
    if window_left >= 0:
        visible = visible & (cols >= positions - window_left)
    visible = visible[None, None].expand(batch, 1, num_queries, kv_len)
    if key_start is not None:
        visible = visible & (cols[None, None] >= key_start.view(batch, 1, 1, 1))
    scores = scores.masked_fill(~visible, float("-inf"))
    # A query that sees no key has a row of -inf: softmax gives NaN there, the output is zero.
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, values).to(q.dtype)
