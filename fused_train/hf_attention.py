"""The `"fused_train"` attention implementation for transformers' `AttentionInterface`.

transformers hands every attention layer `[batch, heads, tokens, head_dim]` tensors plus the
model's kwargs. This module turns them into varlen form, one sequence per document, and calls
`fused_train.attention.varlen_attention`. Document boundaries come, in this order, from:
  1. `cu_seq_lens_q` / `cu_seq_lens_k` (flash-attention kwargs, e.g. from `PackedCollator`),
     over the flattened `batch * tokens` stream;
  2. otherwise, each row of the batch, cut where `position_ids` restart (packed rows without
     cu_seq_lens, e.g. `DataCollatorWithFlattening`) and stripped of the padding that the 2-D
     attention mask marks (ordinary left- or right-padded batches, generation with a KV cache).
Position resets are only read when queries and keys cover the same tokens (no cache prefix).
This is why `use_cache=True` in train mode stays correct: an empty cache adds no prefix, and the
documents still come from the position ids rather than from a mask built for one sequence.

Keys and values may also arrive as `Int8KV` (from `fused_train.Int8KVCache` after the prompt):
then the new queries attend to the int8 cache directly with the int8 decode kernel.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers.masking_utils import flash_attention_mask

from fused_train.attention import varlen_attention
from fused_train.kernels.int8_decode_attention import dequantize_cache_ref
from fused_train.kv_cache_ops import int8_decode_attention

ATTENTION_NAME = "fused_train"

# The mask interface of flash attention fits varlen exactly: None when nothing is padded,
# otherwise the 2-D padding mask sliced to the keys' length (which we unpad below).
fused_train_mask = flash_attention_mask


@dataclass(frozen=True)
class Int8KV:
    """Keys or values of one layer as `Int8KVCache` holds them: the first `length` positions of
    `data` (int8 `[batch, num_kv_heads, capacity, head_dim]`) times `scale` (float32
    `[batch, num_kv_heads, capacity]`), standing for a tensor of `dtype`; positions from
    `exact_from` on are read exactly from the ring `recent` (slot = position % its length) instead."""

    data: torch.Tensor
    scale: torch.Tensor
    length: int
    dtype: torch.dtype
    recent: torch.Tensor | None
    exact_from: int

    def dequantize(self) -> torch.Tensor:
        """The full-precision `[batch, num_kv_heads, length, head_dim]` tensor (a copy)."""
        return dequantize_cache_ref(self.data, self.scale, self.length, self.dtype, self.recent, self.exact_from)


def fused_train_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
):
    if dropout > 0.0:
        raise ValueError(
            f"fused_train attention has no attention dropout, got dropout={dropout} in {type(module).__name__}; "
            "set config.attention_dropout = 0.0"
        )
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # As SDPA does under autocast: rotary embeddings leave q and k in float32, v is already cast.
        dtype = torch.get_autocast_dtype(device_type)
        query = query.to(dtype)
        if not isinstance(key, Int8KV):
            key, value = key.to(dtype), value.to(dtype)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"fused_train attention expects a 2-D padding mask or None, got attention_mask of shape "
            f"{tuple(attention_mask.shape)}; custom 4-D masks need attn_implementation='sdpa' or 'eager'"
        )
    is_causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if isinstance(key, Int8KV):
        left_padding = _left_padding(attention_mask, key.length) if is_causal else None
        if left_padding is not None:
            return _int8_cache_attention(query, key, value, left_padding[0], scaling, sliding_window, softcap), None
        # Not a left-padded causal batch: attend to the dequantized cache the general way.
        key, value = key.dequantize().to(query.dtype), value.dequantize().to(query.dtype)
    batch, num_heads, len_q, head_dim = query.shape
    len_k = key.shape[2]
    q = query.transpose(1, 2).reshape(batch * len_q, num_heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * len_k, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * len_k, value.shape[1], head_dim)

    layout = _varlen_layout(batch, len_q, len_k, attention_mask, kwargs)
    if layout.keep_q is not None:
        q = q[layout.keep_q]
    if layout.keep_k is not None:
        k, v = k[layout.keep_k], v[layout.keep_k]
    # The layout's offsets were built or checked once for this batch: no host sync per layer.
    out = varlen_attention(
        q,
        k,
        v,
        layout.cu_seqlens_q,
        layout.cu_seqlens_k,
        layout.max_seqlen_q,
        layout.max_seqlen_k,
        check_cu_seqlens=False,
        causal=is_causal,
        softmax_scale=scaling,
        # transformers' sliding window of w lets a query see itself and the w - 1 keys before it.
        window_size=(sliding_window - 1, -1) if sliding_window else (-1, -1),
        softcap=softcap or 0.0,
    )
    if layout.keep_q is not None:
        # Padding positions get zeros: their outputs are never used by a loss or the next token.
        out = out.new_zeros(batch * len_q, num_heads, head_dim).index_copy(0, layout.keep_q, out)
    return out.view(batch, len_q, num_heads, head_dim), None


def _int8_cache_attention(query, key, value, key_start, scaling, sliding_window, softcap):
    """The new queries over Int8KVCache's int8 keys and values, read as int8 by the decode kernel."""
    if torch.is_grad_enabled() and query.requires_grad:
        raise ValueError("Int8KVCache is for inference: run generation under torch.no_grad()")
    out = int8_decode_attention(
        query, key.data, key.scale, value.data, value.scale, key.length, key_start,
        softmax_scale=scaling,
        window_left=sliding_window - 1 if sliding_window else -1,
        softcap=softcap or 0.0,
        k_recent=key.recent,
        v_recent=value.recent,
        exact_from=None if key.recent is None else key.exact_from,
    )
    return out.transpose(1, 2)


class _Layout(NamedTuple):
    """Varlen form of a batch: offsets of the sequences, their longest lengths, and which flattened
    rows are real tokens (None: all of them)."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    keep_q: torch.Tensor | None = None
    keep_k: torch.Tensor | None = None


def _max_length(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


class _OncePerForward:
    """Remembers one value derived from a forward's kwargs. Every layer of one forward sees the
    same kwargs tensors, so the value is computed once per forward. The key holds each tensor with
    its version counter: a buffer reused with new contents (an in-place update bumps the counter)
    gets the value computed afresh."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key_parts, compute):
        key = tuple((part, part._version) if isinstance(part, torch.Tensor) else part for part in key_parts)
        if self.key is None or not all(map(_same_key_part, self.key, key)):
            self.key, self.value = key, compute()
        return self.value


def _same_key_part(a, b):
    if isinstance(a, tuple) and isinstance(b, tuple):
        return a[0] is b[0] and a[1] == b[1]
    return a == b


_layouts = _OncePerForward()


def _varlen_layout(batch, len_q, len_k, attention_mask, kwargs) -> _Layout:
    position_ids = kwargs.get("position_ids")
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")

    def compute():
        if cu_q is not None:
            return _layout_from_cu_seqlens(batch, len_q, len_k, cu_q, cu_k)
        return _layout_from_rows(batch, len_q, len_k, attention_mask, position_ids)

    return _layouts.get((batch, len_q, len_k, attention_mask, position_ids, cu_q, cu_k), compute)


def _layout_from_cu_seqlens(batch, len_q, len_k, cu_q, cu_k):
    cu_k = cu_q if cu_k is None else cu_k
    for name, cu, total in (("cu_seq_lens_q", cu_q, batch * len_q), ("cu_seq_lens_k", cu_k, batch * len_k)):
        values = cu.tolist() if cu.dim() == 1 else []
        if len(values) < 2 or values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(
                f"{name} must be 1-D, start at 0, be non-decreasing and end at batch * tokens = {total} "
                f"(it describes the flattened batch), got {values[:8]}{'...' if len(values) > 8 else ''}"
            )
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    return _Layout(cu_q, cu_k, _max_length(cu_q), _max_length(cu_k))


def _layout_from_rows(batch, len_q, len_k, attention_mask, position_ids):
    if attention_mask is None:
        device = position_ids.device if position_ids is not None else None
        valid_k = torch.ones(batch, len_k, dtype=torch.bool, device=device)
    else:
        valid_k = attention_mask[:, -len_k:].bool()
    valid_q = valid_k[:, -len_q:]
    keep_q = None if bool(valid_q.all()) else valid_q.flatten().nonzero().squeeze(1)
    if len_q != len_k:
        # Decoding after a cache prefix: one sequence per row, its queries the last of its keys.
        keep_k = None if bool(valid_k.all()) else valid_k.flatten().nonzero().squeeze(1)
        cu_q, cu_k = _cu_from_lengths(valid_q.sum(1)), _cu_from_lengths(valid_k.sum(1))
        return _Layout(cu_q, cu_k, _max_length(cu_q), _max_length(cu_k), keep_q, keep_k)
    # A sequence starts at the first real token of a row, after padding, and where positions restart.
    starts = valid_q & ~torch.nn.functional.pad(valid_q, (1, 0))[:, :-1]
    if position_ids is not None:
        positions = position_ids.expand(batch, -1)
        starts[:, 1:] |= valid_q[:, 1:] & (positions[:, 1:] != positions[:, :-1] + 1)
    segment = torch.cumsum(starts.flatten(), 0)[valid_q.flatten()] - 1
    cu = _cu_from_lengths(torch.bincount(segment))
    max_length = _max_length(cu)
    return _Layout(cu, cu, max_length, max_length, keep_q, keep_q)


_left_paddings = _OncePerForward()


def _left_padding(attention_mask, kv_len):
    """`(key_start,)` for a batch whose rows are padded on the left only (key_start int32 `[batch]`
    or None without a mask), or None for any other padding. Once per forward, like the layout."""

    def compute():
        if attention_mask is None:
            return (None,)
        valid = attention_mask[:, -kv_len:].bool()
        key_start = (~valid).sum(1)
        left_padded = torch.arange(kv_len, device=valid.device)[None, :] >= key_start[:, None]
        return (key_start.to(torch.int32),) if bool((valid == left_padded).all()) else None

    return _left_paddings.get((kv_len, attention_mask), compute)


def _cu_from_lengths(lengths):
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu
