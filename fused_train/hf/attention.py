"""The `"fused_train"` attention implementation for transformers' `AttentionInterface`.

transformers hands every attention layer `[batch, heads, tokens, head_dim]` tensors plus the
model's kwargs. This module turns them into varlen form, one sequence per document
(`fused_train.hf.varlen_layout` says where documents come from), and calls
`fused_train.ops.varlen_attention.varlen_attention`. `use_cache=True` in train mode stays correct: an empty
cache adds no prefix, and the documents still come from the position ids rather than from a mask
built for one sequence.

Keys and values may also arrive as `Int8KV` (from `fused_train.Int8KVCache` after the prompt):
then the new queries attend to the int8 cache directly with the int8 decode kernel. Or as
`PagedKV` (from the serving engine's `StepCache`): one step of many requests, flattened into one
row; its prefills (or chunks of them) attend with the varlen kernel to their fresh keys, after the
keys of their tokens already in pages (a cached prefix, earlier chunks) gathered from there; its
decodes attend to their pages with the paged decode kernel.

What the attention cannot honour is refused, never dropped: attention dropout, 4-D masks, masks
that deviate from causal or sliding-window attention (bidirectional spans), and any kwarg that
carries meaning this attention does not implement (attention sinks, ...).
"""

from dataclasses import dataclass

import torch

from fused_train.ops.varlen_attention import varlen_attention
from fused_train.kernels.int8_decode_attention_ref import dequantize_cache_ref
from fused_train.kernels.int8_kv_quantize_ref import dequantize_kv_ref
from fused_train.kernels.paged_decode_attention_ref import PagedAttentionPlan
from fused_train.ops.int8_kv import int8_decode_attention
from fused_train.hf.varlen_layout import left_padding, varlen_layout
from fused_train.ops.paged_kv import paged_decode_attention

ATTENTION_NAME = "fused_train"

# Kwargs the attention layers of transformers models pass that change nothing in the math, or
# that are read here: transformers' TransformersKwargs and FlashAttentionKwargs, cache plumbing,
# and what peers' collators add (TRL's seq_idx). Any other kwarg with a value is refused.
_UNDERSTOOD_KWARGS = frozenset({
    "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal", "seq_idx",
    "num_items_in_batch", "output_attentions", "output_hidden_states", "output_router_logits", "use_cache",
    "cache_position", "past_key_value", "past_key_values", "cache", "deterministic", "target_dtype", "layer_idx",
})


def fused_train_mask(
    batch_size, kv_length, attention_mask=None, q_length=None, q_offset=0, cache_position=None, use_vmap=False,
    **kwargs,
):
    """The mask for `AttentionMaskInterface`: the 2-D padding mask of the tokens seen so far
    (`[batch, tokens]`, True for real tokens), or None when every key is a real token.

    Keys past the mask's length are key slots of a static cache not filled yet, so a static cache
    without padding gets an all-True mask too. transformers 5 passes `q_length`/`q_offset`, 4.x a
    `cache_position`; `use_vmap` is set where a model builds its mask from extra mask functions
    (bidirectional spans of image tokens and the like), which the varlen kernel cannot honour.
    """
    if use_vmap:
        raise ValueError(
            "this model builds its attention mask from extra mask functions (e.g. bidirectional spans of "
            "image tokens): fused_train attention runs causal or sliding-window attention only; use "
            "attn_implementation='sdpa' for it"
        )
    if attention_mask is not None:
        attention_mask = attention_mask[:, -kv_length:].bool()
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            return None
        return attention_mask
    if cache_position is not None:
        seen, device = int(cache_position[-1]) + 1, cache_position.device
    else:
        # A static cache's offset is a tensor; other caches' an int (no host sync then).
        seen, device = int(q_offset) + (kv_length if q_length is None else q_length), kwargs.get("device")
    if seen < kv_length:
        # A static cache: only its first `seen` key slots hold keys.
        return torch.ones(batch_size, seen, dtype=torch.bool, device=device)
    return None


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


@dataclass(frozen=True)
class PagedAttentionMetadata:
    """Where one serving step's tokens are: the step is one row of `num_prefill_tokens` tokens of
    prefilling sequences (`cu_seqlens_prefill` int32, their longest `max_prefill_len`), then one
    token per decoding sequence. `slots` int64 `[tokens]` is each token's place in the pages
    (`page * page_size + offset`); `page_table` int32 `[decodes, max_pages]` and `kv_lens` int32
    `[decodes]` (this step's token included) say where each decoding sequence's keys are.

    A prefill whose sequence has tokens in pages already (its context: a cached prefix, its earlier
    chunks) attends to them before its fresh keys: `cu_seqlens_prefill_k` int32 counts each
    prefill's context + fresh keys (its longest `max_prefill_len_k`), `context_slots` int64 holds
    the slots of every prefill's context tokens, prefill after prefill, and `prefill_key_order`
    int64 `[keys]` lays out the prefills' keys from `cat([context keys, fresh keys])`, each
    prefill's context then its fresh ones. All three None when no prefill has context.

    The runner builds it valid, once per step, and the layers trust it (no input checks per layer).
    For the reference path, also once per step: `decode_plan`, the decodes' `paged_attention_plan`,
    and `slot_pages`/`slot_offsets`, `slots // page_size` and `slots % page_size` (None: not built)."""

    slots: torch.Tensor
    num_prefill_tokens: int
    cu_seqlens_prefill: torch.Tensor
    max_prefill_len: int
    page_table: torch.Tensor
    kv_lens: torch.Tensor
    cu_seqlens_prefill_k: torch.Tensor | None = None
    max_prefill_len_k: int = 0
    context_slots: torch.Tensor | None = None
    prefill_key_order: torch.Tensor | None = None
    decode_plan: PagedAttentionPlan | None = None
    slot_pages: torch.Tensor | None = None
    slot_offsets: torch.Tensor | None = None


@dataclass(frozen=True)
class PagedKV:
    """Keys or values of one layer in a serving step: this step's own (`fresh`, `[tokens,
    num_kv_heads, head_dim]`, already written into `pages`), and the layer's `pages` (int8 with
    `scales`, or float with None) that hold every cached token, placed by `metadata`."""

    fresh: torch.Tensor
    pages: torch.Tensor
    scales: torch.Tensor | None
    metadata: PagedAttentionMetadata


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
    _check_kwargs(module, kwargs)
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # As SDPA does under autocast: rotary embeddings leave q and k in float32, v is already cast.
        dtype = torch.get_autocast_dtype(device_type)
        query = query.to(dtype)
        if not isinstance(key, (Int8KV, PagedKV)):
            key, value = key.to(dtype), value.to(dtype)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"fused_train attention expects a 2-D padding mask or None, got attention_mask of shape "
            f"{tuple(attention_mask.shape)}; custom 4-D masks need attn_implementation='sdpa' or 'eager'"
        )
    is_causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if isinstance(key, PagedKV):
        if not is_causal or attention_mask is not None:
            raise ValueError("a paged serving step runs causal attention without a padding mask")
        return _paged_attention(query, key, value, scaling, sliding_window, softcap), None
    if isinstance(key, Int8KV):
        left_pad = left_padding(attention_mask, key.length) if is_causal else None
        if left_pad is not None:
            return _int8_cache_attention(query, key, value, left_pad[0], scaling, sliding_window, softcap), None
        # Not a left-padded causal batch: attend to the dequantized cache the general way.
        key, value = key.dequantize().to(query.dtype), value.dequantize().to(query.dtype)
    batch, num_heads, len_q, head_dim = query.shape
    len_k = key.shape[2]
    q = query.transpose(1, 2).reshape(batch * len_q, num_heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * len_k, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * len_k, value.shape[1], head_dim)

    layout = varlen_layout(
        batch, len_q, len_k, attention_mask, kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q"),
        kwargs.get("cu_seq_lens_k"), query.device,
    )
    if layout.keep_q is not None:
        q = q[layout.keep_q]
    if layout.keep_k is not None:
        k, v = k[layout.keep_k], v[layout.keep_k]
    # The layout's offsets were built or checked once for this batch: no host sync per layer. The
    # kernel reads the lengths from them; the max lengths, flash-attn's grid hints, are upper bounds.
    out = varlen_attention(
        q,
        k,
        v,
        layout.cu_seqlens_q,
        layout.cu_seqlens_k,
        batch * len_q,
        batch * len_k,
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


def _check_kwargs(module, kwargs):
    for name, value in kwargs.items():
        if value is not None and name not in _UNDERSTOOD_KWARGS:
            raise ValueError(
                f"{type(module).__name__} passed {name}= to its attention, which fused_train attention does not "
                f"implement (e.g. s_aux: attention sinks): its result would silently differ from the model's; "
                f"use attn_implementation='sdpa' or 'eager' for this model"
            )


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




def _paged_attention(query, key, value, scaling, sliding_window, softcap):
    """One serving step (`PagedAttentionMetadata`): prefills over their context and fresh keys, then decodes over
    their pages."""
    if torch.is_grad_enabled() and query.requires_grad:
        raise ValueError("the paged KV cache is for inference: run the step under torch.no_grad()")
    metadata = key.metadata
    q = query[0].transpose(0, 1)  # [1, heads, tokens, head_dim] -> [tokens, heads, head_dim]
    prefill = metadata.num_prefill_tokens
    window_left = sliding_window - 1 if sliding_window else -1
    outs = []
    if prefill:
        k, v = key.fresh[:prefill], value.fresh[:prefill]
        cu_k, max_k = metadata.cu_seqlens_prefill, metadata.max_prefill_len
        if metadata.context_slots is not None:
            k, v = _after_context(key, k, metadata), _after_context(value, v, metadata)
            cu_k, max_k = metadata.cu_seqlens_prefill_k, metadata.max_prefill_len_k
        # Causal with more keys than queries aligns bottom-right: query i of a prefill sees its
        # context and its fresh keys up to i.
        outs.append(varlen_attention(
            q[:prefill], k, v, metadata.cu_seqlens_prefill, cu_k, metadata.max_prefill_len, max_k,
            check_cu_seqlens=False, causal=True, softmax_scale=scaling, window_size=(window_left, -1),
            softcap=softcap or 0.0,
        ))  # fmt: skip
    if q.shape[0] > prefill:
        outs.append(paged_decode_attention(
            q[prefill:] if prefill else q, key.pages, value.pages, metadata.page_table, metadata.kv_lens,
            k_scales=key.scales, v_scales=value.scales, softmax_scale=scaling, window_left=window_left,
            softcap=softcap or 0.0, check_inputs=False, plan=metadata.decode_plan,
        ))  # fmt: skip
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.unsqueeze(0)


def _after_context(kv: PagedKV, fresh: torch.Tensor, metadata: PagedAttentionMetadata) -> torch.Tensor:
    """The prefills' keys (or values) `[keys, num_kv_heads, head_dim]`: each prefill's context,
    gathered from the pages (dequantized from int8) for every prefill at once, then its `fresh` ones."""
    page_size = kv.pages.shape[2]
    pages, offsets = metadata.context_slots // page_size, metadata.context_slots % page_size
    context = kv.pages[pages, :, offsets]  # [context tokens, num_kv_heads, head_dim]
    if kv.scales is not None:
        context = dequantize_kv_ref(context, kv.scales[pages, :, offsets], fresh.dtype)
    return torch.cat([context.to(fresh.dtype), fresh]).index_select(0, metadata.prefill_key_order)
