"""The varlen layout of a batch: which flattened tokens form which sequence, once per forward.

A patched model's attention layers all receive the same batch description (`cu_seq_lens_*`,
`position_ids`, the 2-D padding mask), so the layout is derived once per forward and shared.

Where the sequences come from, in this order:
  1. `cu_seq_lens_q` / `cu_seq_lens_k` (flash-attention kwargs, e.g. from `PackedCollator`), over
     the flattened `batch * tokens` stream; a padding mask beside them is refused (its padding
     would silently join a document);
  2. otherwise each row of the batch, cut where `position_ids` restart (packed rows without
     cu_seq_lens, e.g. `DataCollatorWithFlattening`) and stripped of the padding the mask marks.
     Position resets are only read when queries and keys cover the same tokens (no cache prefix).

The padding mask is `[batch, mask_len]` bool, True for real tokens (see `fused_train_mask`):
  - `mask_len == len_k`: one entry per key;
  - `mask_len < len_k`: a static cache, whose key slots past `mask_len` are not filled yet;
the queries are always the mask's last `len_q` tokens.

Under `torch.compile` nothing here syncs with the host or breaks the graph: offsets are checked
with device-side asserts and rows are cut into a fixed number of (possibly empty) sequences.
"""

from typing import NamedTuple

import torch


class Layout(NamedTuple):
    """Varlen form of a batch: offsets of the sequences and which flattened rows are real tokens
    (None: all of them)."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    keep_q: torch.Tensor | None = None
    keep_k: torch.Tensor | None = None


class OncePerForward:
    """Remembers one value derived from a forward's kwargs. Every layer of one forward sees the
    same kwargs tensors, so the value is computed once per forward. The key holds each tensor with
    its version counter: a buffer reused with new contents (an in-place update bumps the counter)
    gets the value computed afresh. Inference tensors have no version counter; they are keyed by
    identity, and `clear()` (called as each patched model's forward starts) drops a value that a
    buffer updated in place under `torch.inference_mode` could leave stale.

    The key and the value are stored as one tuple, so a thread never pairs another's key with its
    value; under `torch.compile` nothing is cached (the value is traced per layer)."""

    def __init__(self):
        self._entry = None

    def get(self, key_parts, compute):
        if torch.compiler.is_compiling():
            return compute()
        key = tuple(_key_part(part) for part in key_parts)
        entry = self._entry
        if entry is not None and len(entry[0]) == len(key) and all(map(_same_key_part, entry[0], key)):
            return entry[1]
        value = compute()
        self._entry = (key, value)
        return value

    def clear(self):
        self._entry = None


def _key_part(part):
    if isinstance(part, torch.Tensor):
        return (part, None if part.is_inference() else part._version)
    return part


def _same_key_part(a, b):
    if isinstance(a, tuple) and isinstance(b, tuple):
        return a[0] is b[0] and a[1] == b[1]
    return a == b


_layouts = OncePerForward()
_left_paddings = OncePerForward()


def clear_per_forward_caches():
    _layouts.clear()
    _left_paddings.clear()


def varlen_layout(batch, len_q, len_k, attention_mask, position_ids, cu_q, cu_k, device) -> Layout:
    """The layout of a `[batch, len_q]` query / `[batch, len_k]` key batch (see the module docstring)."""

    def compute():
        if cu_q is not None:
            if attention_mask is not None:
                raise ValueError(
                    "cu_seq_lens_q/cu_seq_lens_k came with an attention_mask that marks padding (or a cache "
                    "whose keys it does not cover): the padding would join a document. Pass packed rows "
                    "without padding (fused_train.PackedCollator) or drop cu_seq_lens and keep the mask"
                )
            return _layout_from_cu_seqlens(batch, len_q, len_k, cu_q, cu_k)
        return _layout_from_rows(batch, len_q, len_k, attention_mask, position_ids, device)

    # The device is part of the key: a model split over GPUs (device_map="auto") runs one forward on several.
    return _layouts.get((batch, len_q, len_k, attention_mask, position_ids, cu_q, cu_k, device), compute)


def _layout_from_cu_seqlens(batch, len_q, len_k, cu_q, cu_k):
    cu_k = cu_q if cu_k is None else cu_k
    for name, cu, total in (("cu_seq_lens_q", cu_q, batch * len_q), ("cu_seq_lens_k", cu_k, batch * len_k)):
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {tuple(cu.shape)}")
        if torch.compiler.is_compiling():
            # No host sync in a traced forward: the check runs on the device and fails the step.
            torch._assert_async((cu[0] == 0) & (cu[-1] == total) & (cu[1:] >= cu[:-1]).all())
            continue
        values = cu.tolist()
        if values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(
                f"{name} must start at 0, be non-decreasing and end at batch * tokens = {total} "
                f"(it describes the flattened batch), got {values[:8]}{'...' if len(values) > 8 else ''}"
            )
    return Layout(cu_q.to(torch.int32), cu_k.to(torch.int32))


def _layout_from_rows(batch, len_q, len_k, attention_mask, position_ids, device):
    if attention_mask is None:
        if len_q != len_k or position_ids is None:
            # Every token is real and no positions say where documents restart: a sequence per row.
            return Layout(_row_offsets(batch, len_q, device), _row_offsets(batch, len_k, device))
        if torch.compiler.is_compiling():
            return _traced_layout_from_positions(batch, len_q, position_ids, device)
        valid_q = valid_k = torch.ones(batch, len_q, dtype=torch.bool, device=device)
    else:
        mask_len = attention_mask.shape[1]
        if mask_len < len_q:
            raise ValueError(
                f"attention_mask covers {mask_len} tokens, fewer than the {len_q} queries of this forward"
            )
        valid = attention_mask.to(device=device, dtype=torch.bool)
        valid_q = valid[:, mask_len - len_q :]
        # A static cache's key slots past the mask are not filled yet: they are not keys.
        valid_k = valid[:, -len_k:] if mask_len >= len_k else torch.nn.functional.pad(valid, (0, len_k - mask_len))
    keep_q = None if bool(valid_q.all()) else valid_q.flatten().nonzero().squeeze(1)
    if len_q != len_k:
        # After a cache prefix: one sequence per row, its queries the last of its keys.
        keep_k = None if bool(valid_k.all()) else valid_k.flatten().nonzero().squeeze(1)
        return Layout(_cu_from_lengths(valid_q.sum(1)), _cu_from_lengths(valid_k.sum(1)), keep_q, keep_k)
    # A sequence starts at the first real token of a row, after padding, and where positions restart.
    starts = valid_q & ~torch.nn.functional.pad(valid_q, (1, 0))[:, :-1]
    if position_ids is not None:
        positions = position_ids.expand(batch, -1)
        starts[:, 1:] |= valid_q[:, 1:] & (positions[:, 1:] != positions[:, :-1] + 1)
    segment = torch.cumsum(starts.flatten(), 0)[valid_q.flatten()] - 1
    cu = _cu_from_lengths(torch.bincount(segment))
    return Layout(cu, cu, keep_q, keep_q)


def _row_offsets(batch, length, device):
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)


def _traced_layout_from_positions(batch, length, position_ids, device):
    """Rows cut where positions restart, with shapes that do not depend on the data: one entry per
    token in `cu_seqlens` (`batch * length + 1` entries), the sequences past the last one empty."""
    positions = position_ids.to(device).expand(batch, -1)
    starts = torch.ones(batch, length, dtype=torch.bool, device=device)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    starts = starts.flatten()
    segment = torch.cumsum(starts, 0) - 1
    lengths = torch.zeros(batch * length, dtype=torch.int64, device=device).index_add_(
        0, segment, torch.ones_like(segment)
    )
    cu = _cu_from_lengths(lengths)
    return Layout(cu, cu)


def left_padding(attention_mask, kv_len):
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
