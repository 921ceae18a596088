"""Many LoRA adapters in one batch: the math and the plain-PyTorch reference.

Tokens `x` `[T, in]` each name one adapter slot, `token_slots[t]` in `[-1, S)` (-1: the base only).
Slot `s` holds `A_s = lora_a[s, :ranks[s]]` (`lora_a` `[S, r_max, in]`) and
`B_s = lora_b[s, :, :ranks[s]]` (`lora_b` `[S, out, r_max]`), scaled by `scalings[s]`:

    y[t] = x[t]·Wᵀ + bias + scalings[s]·(x[t]·A_sᵀ)·B_sᵀ        s = token_slots[t] >= 0
    y[t] = x[t]·Wᵀ + bias                                       s = -1

Rows of `lora_a` and columns of `lora_b` past `ranks[s]` are padding: they take no part (whatever
they hold), so adapters of different ranks share one stack zero-padded to `r_max`, and a slot of
rank 0 is an adapter that does not touch this layer. `W` is float, int8 or packed int4, as in
`lora_ref` (`quantize_int8`, `quantize_int4`).

This module needs no Triton; the kernels are in `multi_lora.py`.
"""

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .lora_ref import dequantize_int4


def base_linear_ref(x, weight, bias=None, weight_scale=None, weight_offset=None):
    """`x·Wᵀ + bias` in the dtype of `x`, `W` dequantized first when int8 or int4 (`lora_ref`)."""
    if weight.dtype == torch.uint8:
        weight = dequantize_int4(weight, weight_scale, weight_offset, x.shape[-1]).to(x.dtype)
    elif weight_scale is not None:
        weight = weight.to(x.dtype) * weight_scale.to(x.dtype)[:, None]
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


# Up to this many multiply-adds through the named slots' rows (`_through_every_slot`: every token
# through every slot the batch names), the reference runs that way, a few large ops; above, one
# segment per present slot: few large ops win while the wasted multiply-adds stay small (the
# CPU timings that set the bound: kernels/TUNING.md).
EVERY_SLOT_MAX_MACS = 2**25


def multi_lora_linear_ref(
    x, weight, lora_a, lora_b, token_slots, scalings, ranks, bias=None, weight_scale=None, weight_offset=None
):
    """Plain-PyTorch `y` of the module docstring for `x` `[T, in]`; `token_slots`, `ranks` integer,
    `scalings` float. The LoRA branch runs in the dtype of `lora_a` (as peft does), the sum is
    returned in the dtype of `x`. Inputs are assumed valid.

    No loop over tokens: small problems go through the adapters of every slot the batch names at
    once, larger ones through one segment of slot-sorted tokens per slot present
    (EVERY_SLOT_MAX_MACS says where).
    Both read values back (a host sync on a GPU, where the kernels run instead).
    """
    base = base_linear_ref(x, weight, bias, weight_scale, weight_offset)
    lora_x = x.to(lora_a.dtype)
    macs_per_row = x.shape[0] * (lora_a.shape[2] + lora_b.shape[1])
    if macs_per_row <= EVERY_SLOT_MAX_MACS:
        compact = compact_stacks(lora_a, lora_b, scalings, ranks)
        named = torch.isin(compact.rank_rows, token_slots.to(compact.rank_rows.device)).nonzero().squeeze(1)
        if macs_per_row * len(named) <= EVERY_SLOT_MAX_MACS:
            if len(named) < len(compact.rank_rows):
                # A decode step names a few of a pool's slots: copying their rows costs less than reading all.
                compact = CompactStacks(*(t.index_select(0, named) for t in compact))
            return (base + _through_every_slot(lora_x, compact, token_slots)).to(x.dtype)
    y = base.to(lora_a.dtype)  # the base output itself when the dtypes agree: segments add into it
    _add_present_slots(y, lora_x, lora_a, lora_b, token_slots, scalings.to(lora_a.dtype), ranks)
    return y.to(x.dtype)


class CompactStacks(NamedTuple):
    """Every slot's live rank rows side by side, padding gone: `lora_a` rows `[R, in]`, `lora_b`
    columns as rows `[R, out]`, and each row's slot `[R]` and scale `[R]` (R = sum of ranks)."""

    lora_a: torch.Tensor
    lora_b_t: torch.Tensor
    rank_rows: torch.Tensor
    row_scalings: torch.Tensor


# Stacks that stay the same tensors between calls (an adapter pool's, a patched peft model's) are
# compacted once per change: keyed by the four tensors' ids, checked against weak references (an id
# can be reused) and version counters. A version is bumped after its in-place write completes, so
# an entry built while a write ran carries the old version and is rebuilt on the next call.
# Inference tensors have no version counter; theirs are compacted on every call.
_compacted: dict[tuple[int, ...], tuple[tuple, tuple[int, ...], CompactStacks]] = {}


def compact_stacks(lora_a, lora_b, scalings, ranks) -> CompactStacks:
    """The `CompactStacks` of a slot stack, from the cache when its tensors are unchanged."""
    stacks = (lora_a, lora_b, scalings, ranks)
    if any(t.is_inference() for t in stacks):
        return _compact(*stacks)
    key = tuple(map(id, stacks))
    versions = tuple(t._version for t in stacks)
    cached = _compacted.get(key)
    if cached is not None and cached[1] == versions and all(ref() is t for ref, t in zip(cached[0], stacks)):
        return cached[2]
    for stale in [k for k, (refs, _, _) in list(_compacted.items()) if any(ref() is None for ref in refs)]:
        _compacted.pop(stale, None)  # another thread may have pruned it
    compact = _compact(*stacks)
    _compacted[key] = (tuple(map(weakref.ref, stacks)), versions, compact)
    return compact


def _compact(lora_a, lora_b, scalings, ranks) -> CompactStacks:
    num_slots, r_max, _ = lora_a.shape
    ranks = ranks.to(lora_a.device)
    in_rank = torch.arange(r_max, device=lora_a.device) < ranks[:, None]  # [S, r_max]
    rank_rows = torch.arange(num_slots, device=lora_a.device).repeat_interleave(ranks.long())
    return CompactStacks(
        lora_a[in_rank], lora_b.transpose(1, 2)[in_rank], rank_rows, scalings.to(lora_a.device, lora_a.dtype)[rank_rows]
    )


def _through_every_slot(x, compact, token_slots):
    """Every token through all rows of `compact`'s `A` (one matmul, `[T, R]`), its own slot's
    columns kept and scaled (-1 owns none), then one matmul through the `B`s."""
    shrunk = x @ compact.lora_a.T
    own = token_slots[:, None].to(compact.rank_rows.device) == compact.rank_rows
    return torch.where(own, shrunk * compact.row_scalings, 0) @ compact.lora_b_t


def _add_present_slots(y, x, lora_a, lora_b, token_slots, scalings, ranks):
    """Add each token's LoRA term into `y` in place: tokens grouped by slot (a stable sort), each
    present slot's segment through its own first `ranks[s]` rows of `A` and columns of `B`."""
    order = torch.argsort(token_slots, stable=True)
    present, counts = torch.unique_consecutive(token_slots[order], return_counts=True)
    rank_of = ranks.tolist()
    for slot, rows in zip(present.tolist(), order.split(counts.tolist())):
        rank = rank_of[slot] if slot >= 0 else 0
        if rank:
            y.index_add_(0, rows, (x[rows] @ lora_a[slot, :rank].T * scalings[slot]) @ lora_b[slot, :, :rank].T)
