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


class SlotPlan(NamedTuple):
    """Which tokens take which slot, for one batch (`plan_slots`): every layer's call reuses it.

    `order` int64 `[T]`: the tokens grouped by slot, slot 0 first, the base tokens (-1) last, each
    group in token order. `ends` int32 `[S + 1]`: where each group ends in `order` (the base last).
    """

    order: torch.Tensor
    ends: torch.Tensor


def plan_slots(token_slots, num_slots) -> SlotPlan:
    """The `SlotPlan` of `token_slots` `[T]` (in `[-1, num_slots)`): a few small ops, no host sync."""
    group = torch.where(token_slots < 0, num_slots, token_slots).long()  # the base tokens' group last
    counts = torch.bincount(group, minlength=num_slots + 1)
    return SlotPlan(torch.argsort(group, stable=True), counts.cumsum(0).to(torch.int32))


def multi_lora_linear_ref(
    x, weight, lora_a, lora_b, token_slots, scalings, ranks, bias=None, weight_scale=None, weight_offset=None,
    slot_plan=None,
):  # fmt: skip
    """Plain-PyTorch `y` of the module docstring for `x` `[T, in]`; `token_slots`, `ranks` integer,
    `scalings` float; `slot_plan` the `plan_slots` of `token_slots`, made here when None. The LoRA
    branch runs in the dtype of `lora_a` (as peft does), the sum is returned in the dtype of `x`.
    Inputs are assumed valid.

    No loop over tokens or slots: the tokens gathered in slot order, two grouped matmuls (one group
    per slot: `A`, then `B`, of stacks zero-padded past each rank, `padded_stacks`), and one
    scatter-add into the base output.
    """
    if slot_plan is None:
        slot_plan = plan_slots(token_slots, lora_a.shape[0])
    padded = padded_stacks(lora_a, lora_b, scalings, ranks)
    grouped_x = x.to(lora_a.dtype).index_select(0, slot_plan.order)
    in_features = x.shape[1]
    if padded.lora_a_t.shape[1] != in_features:
        grouped_x = F.pad(grouped_x, (0, padded.lora_a_t.shape[1] - in_features))
    expanded = _grouped_lora(grouped_x, padded, slot_plan.ends)
    y = base_linear_ref(x, weight, bias, weight_scale, weight_offset).to(lora_a.dtype)
    y.index_add_(0, slot_plan.order, expanded[:, : weight.shape[0]])
    return y.to(x.dtype)


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_lora(grouped_x, padded, ends):
    """`(x_g·A_gᵀ)·B_gᵀ` for each group g of `grouped_x`'s rows (`ends`): two grouped matmuls where
    torch has them (`F.grouped_mm`, public from torch 2.10; float32 and half types only), else a loop
    over the groups (their ends read on the host): float64, and the older torch releases supported."""
    if hasattr(F, "grouped_mm") and grouped_x.dtype in _GROUPED_MM_DTYPES:
        return F.grouped_mm(F.grouped_mm(grouped_x, padded.lora_a_t, offs=ends), padded.lora_b_t, offs=ends)
    expanded = grouped_x.new_empty(grouped_x.shape[0], padded.lora_b_t.shape[2])
    start = 0
    for slot, end in enumerate(ends.tolist()):
        if end > start:
            torch.mm(grouped_x[start:end] @ padded.lora_a_t[slot], padded.lora_b_t[slot], out=expanded[start:end])
        start = end
    return expanded


class PaddedStacks(NamedTuple):
    """A slot stack as `F.grouped_mm` takes it: `lora_a_t` `[S + 1, in', r']` (each slot's `A`
    transposed) and `lora_b_t` `[S + 1, r', out']` (its `B` transposed, times its scale), zero past
    each slot's rank, and a last slot of zeros for the base tokens. `in'`, `r'` and `out'` are
    rounded up to 16 bytes of the dtype: grouped_mm refuses other strides. Both are transposed
    views of contiguous copies."""

    lora_a_t: torch.Tensor
    lora_b_t: torch.Tensor


# Stacks that stay the same tensors between calls (an adapter pool's, a patched peft model's) are
# padded once per change: keyed by the four tensors' ids, checked against weak references (an id
# can be reused) and version counters. A version is bumped after its in-place write completes, so
# an entry built while a write ran carries the old version and is rebuilt on the next call.
# Inference tensors have no version counter; theirs are padded on every call.
_padded: dict[tuple[int, ...], tuple[tuple, tuple[int, ...], PaddedStacks]] = {}


def padded_stacks(lora_a, lora_b, scalings, ranks) -> PaddedStacks:
    """The `PaddedStacks` of a slot stack, from the cache when its tensors are unchanged."""
    stacks = (lora_a, lora_b, scalings, ranks)
    if any(t.is_inference() for t in stacks):
        return _pad(*stacks)
    key = tuple(map(id, stacks))
    versions = tuple(t._version for t in stacks)
    cached = _padded.get(key)
    if cached is not None and cached[1] == versions and all(ref() is t for ref, t in zip(cached[0], stacks)):
        return cached[2]
    for stale in [k for k, (refs, _, _) in list(_padded.items()) if any(ref() is None for ref in refs)]:
        _padded.pop(stale, None)  # another thread may have pruned it
    padded = _pad(*stacks)
    _padded[key] = (tuple(map(weakref.ref, stacks)), versions, padded)
    return padded


def _pad(lora_a, lora_b, scalings, ranks) -> PaddedStacks:
    num_slots, r_max, in_features = lora_a.shape
    out_features = lora_b.shape[1]
    multiple = 16 // lora_a.element_size()
    in_p, r_p, out_p = (-(-n // multiple) * multiple for n in (in_features, r_max, out_features))
    past_rank = torch.arange(r_max, device=lora_a.device) >= ranks.to(lora_a.device)[:, None]  # [S, r_max]
    # Copies in the stacks' own layout (grouped_mm takes the transposes as strides), in place into
    # one zeroed buffer each: a pool refills its slots one adapter at a time, and every refill
    # re-pads every layer's stacks.
    padded_a = lora_a.new_zeros(num_slots + 1, r_p, in_p)
    padded_a[:num_slots, :r_max, :in_features].copy_(lora_a).masked_fill_(past_rank[:, :, None], 0)
    padded_b = lora_b.new_zeros(num_slots + 1, out_p, r_p)
    in_b = padded_b[:num_slots, :out_features, :r_max].copy_(lora_b)
    in_b.masked_fill_(past_rank[:, None, :], 0).mul_(scalings.to(lora_b.device, lora_b.dtype)[:, None, None])
    return PaddedStacks(padded_a.transpose(1, 2), padded_b.transpose(1, 2))
