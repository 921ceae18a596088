"""Attention of a few new query tokens over an int8 KV cache (decode, or short appended chunks).

Layout (transformers' cache layout): `q` is `[batch, num_heads, num_queries, head_dim]`; the cache
holds `k_data`/`v_data` int8 `[batch, num_kv_heads, capacity, head_dim]` and `k_scale`/`v_scale`
float32 `[batch, num_kv_heads, capacity]` (see `int8_kv_quantize_ref.py`); its first `kv_len` positions
are filled, and the queries are its last `num_queries` tokens. Optionally the most recent positions
are also held exactly: `k_recent`/`v_recent` `[batch, num_kv_heads, residual_length, head_dim]` (any
float dtype) hold position `j` at slot `j % residual_length`, and positions `exact_from <= j < kv_len`
(at most `residual_length` of them) are read from there instead of from the int8 data. Query `t` of
sequence `b` sits at position `p = kv_len - num_queries + t` and sees key `j` when

    key_start[b] <= j <= p     and, with a window,   j >= p - window_left

(`key_start` skips a left-padded batch's padding; None means 0). Scores are
`s = q·k * softmax_scale`, then `softcap * tanh(s / softcap)` when `softcap > 0`. A query that
sees no key outputs zeros. `num_heads` is a multiple of `num_kv_heads` (GQA).

This module holds the reference and the input checks, without Triton; the kernels are in
`int8_decode_attention.py`.
"""

import torch

from .int8_kv_quantize_ref import dequantize_kv_ref
from .launch import describe


def dequantize_cache_ref(data, scale, kv_len, dtype, recent=None, exact_from=None):
    """The first `kv_len` positions the cache stands for, `[batch, num_kv_heads, kv_len, head_dim]` in
    `dtype`: int8 `data * scale`, with positions from `exact_from` on taken from the `recent` ring."""
    values = dequantize_kv_ref(data[:, :, :kv_len], scale[:, :, :kv_len], dtype)
    if recent is not None and exact_from < kv_len:
        slots = torch.arange(exact_from, kv_len, device=data.device) % recent.shape[2]
        values[:, :, exact_from:] = recent[:, :, slots].to(dtype)
    return values


def int8_decode_attention_ref(
    q, k_data, k_scale, v_data, v_scale, kv_len, key_start=None, softmax_scale=None, window_left=-1, softcap=0.0,
    k_recent=None, v_recent=None, exact_from=None,
):  # fmt: skip
    """Plain PyTorch: dequantizes the filled cache and attends with an explicit mask, in float32
    (float64 for float64 `q`, so that tests can compare kernels with an exact reference)."""
    batch, num_heads, num_queries, head_dim = q.shape
    num_kv_heads = k_data.shape[1]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys = dequantize_cache_ref(k_data, k_scale, kv_len, compute_dtype, k_recent, exact_from)
    values = dequantize_cache_ref(v_data, v_scale, kv_len, compute_dtype, v_recent, exact_from)
    # Head h reads kv head h // group: the group's queries share one kv head's keys, without copies.
    q_groups = q.to(compute_dtype).view(batch, num_kv_heads, group, num_queries, head_dim)
    scores = torch.einsum("bkgqd,bkjd->bkgqj", q_groups, keys) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    positions = torch.arange(kv_len - num_queries, kv_len, device=q.device)[:, None]
    cols = torch.arange(kv_len, device=q.device)[None, :]
    visible = cols <= positions
    if window_left >= 0:
        visible = visible & (cols >= positions - window_left)
    visible = visible.expand(batch, 1, 1, num_queries, kv_len)
    if key_start is not None:
        visible = visible & (cols >= key_start.view(batch, 1, 1, 1, 1))
    scores = scores.masked_fill(~visible, float("-inf"))
    # A query that sees no key has a row of -inf: softmax gives NaN there, the output is zero.
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bkgqj,bkjd->bkgqd", probs, values)
    return out.reshape(batch, num_heads, num_queries, head_dim).to(q.dtype)


def check_int8_decode_attention_inputs(
    q, k_data, k_scale, v_data, v_scale, kv_len, key_start, window_left, softcap, k_recent=None, v_recent=None,
    exact_from=None,
):  # fmt: skip
    """Raise ValueError naming the argument when inputs break the layout in the module docstring."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or not q.dtype.is_floating_point:
        raise ValueError(
            f"q must be a floating-point tensor [batch, num_heads, num_queries, head_dim], got {describe(q)}"
        )
    for name, data in (("k_data", k_data), ("v_data", v_data)):
        if not isinstance(data, torch.Tensor) or data.dim() != 4 or data.dtype != torch.int8:
            raise ValueError(f"{name} must be an int8 tensor [batch, num_kv_heads, capacity, head_dim], "
                             f"got {describe(data)}")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(scale, torch.Tensor) or scale.dim() != 3 or scale.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 tensor [batch, num_kv_heads, capacity], got {describe(scale)}")
    if k_data.shape != v_data.shape:
        raise ValueError(
            f"k_data and v_data must have the same shape, got {tuple(k_data.shape)} and {tuple(v_data.shape)}"
        )
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale.shape != k_data.shape[:3]:
            raise ValueError(f"{name}'s shape {tuple(scale.shape)} must be k_data's without head_dim "
                             f"{tuple(k_data.shape[:3])}")
    batch, num_heads, num_queries, head_dim = q.shape
    _, num_kv_heads, capacity, _ = k_data.shape
    if k_data.shape[0] != batch:
        raise ValueError(f"k_data's batch ({k_data.shape[0]}) must equal q's ({batch})")
    if k_data.shape[3] != head_dim:
        raise ValueError(f"k_data's head_dim ({k_data.shape[3]}) must equal q's ({head_dim})")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads of q ({num_heads}) must be a multiple of num_kv_heads of k_data ({num_kv_heads})")
    tensors = {"q": q, "k_data": k_data, "k_scale": k_scale, "v_data": v_data, "v_scale": v_scale}
    if key_start is not None:
        if not isinstance(key_start, torch.Tensor) or key_start.dtype != torch.int32 or key_start.shape != (batch,):
            raise ValueError(f"key_start must be None or an int32 tensor [batch={batch}], got {describe(key_start)}")
        tensors["key_start"] = key_start
    if (k_recent is None) != (v_recent is None) or (k_recent is None) != (exact_from is None):
        raise ValueError("k_recent, v_recent and exact_from must be given together, or all be None")
    for name, recent in (("k_recent", k_recent), ("v_recent", v_recent)):
        if recent is None:
            continue
        if (not isinstance(recent, torch.Tensor) or recent.dim() != 4 or not recent.dtype.is_floating_point
                or recent.shape[:2] != k_data.shape[:2] or recent.shape[3] != head_dim or recent.shape[2] < 1):
            raise ValueError(f"{name} must be a float tensor [batch={batch}, num_kv_heads={num_kv_heads}, "
                             f"residual_length >= 1, head_dim={head_dim}], got {describe(recent)}")
        tensors[name] = recent
    if len({t.device for t in tensors.values()}) != 1:
        raise ValueError(f"{', '.join(tensors)} must be on one device, got {[str(t.device) for t in tensors.values()]}")
    if not isinstance(kv_len, (int, torch.SymInt)) or not 1 <= kv_len <= capacity:
        raise ValueError(f"kv_len must be an int between 1 and the cache capacity ({capacity}), got {kv_len!r}")
    if not 1 <= num_queries <= kv_len:
        raise ValueError(f"num_queries ({num_queries}) must be between 1 and kv_len ({kv_len}): the queries are "
                         f"the cache's last tokens")
    if window_left < -1:
        raise ValueError(f"window_left must be >= 0, or -1 for no window, got {window_left}")
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0, got {softcap}")
    if k_recent is None:
        return
    if k_recent.shape != v_recent.shape:
        raise ValueError(f"k_recent and v_recent must have the same shape, got {tuple(k_recent.shape)} and "
                         f"{tuple(v_recent.shape)}")
    residual_length = k_recent.shape[2]
    if not isinstance(exact_from, (int, torch.SymInt)) or not max(0, kv_len - residual_length) <= exact_from <= kv_len:
        raise ValueError(f"exact_from must be an int between kv_len - residual_length ({kv_len - residual_length}, "
                         f"at least 0) and kv_len ({kv_len}): the ring holds at most residual_length positions, "
                         f"got {exact_from!r}")
