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


# Up to this many multiply-adds through every slot's adapter (`_through_every_slot`), the reference
# runs that way, a few large ops; above, one segment per present slot. Measured on one CPU core
# (torch 2.13): at 8.4M they tie (256 tokens, 8 slots, r 16, 128×128: 0.46 vs 0.43 ms); at 0.5M the
# former is 1.6x faster (32 tokens, 64×64: 0.17 vs 0.27 ms, each segment costing ~28 µs); at 67M 5x
# slower (32 tokens, 32 slots, r 64, 512×512: 8.6 vs 1.7 ms).
EVERY_SLOT_MAX_MACS = 2**23


def multi_lora_linear_ref(
    x, weight, lora_a, lora_b, token_slots, scalings, ranks, bias=None, weight_scale=None, weight_offset=None
):
    """Plain-PyTorch `y` of the module docstring for `x` `[T, in]`; `token_slots`, `ranks` integer,
    `scalings` float. The LoRA branch runs in the dtype of `lora_a` (as peft does), the sum is
    returned in the dtype of `x`. Inputs are assumed valid.

    No loop over tokens: small problems go through every slot's adapter at once, larger ones
    through one segment of slot-sorted tokens per slot present (EVERY_SLOT_MAX_MACS says where);
    the latter reads the segment lengths back, a host sync on a GPU (where the kernels run instead).
    """
    base = base_linear_ref(x, weight, bias, weight_scale, weight_offset)
    num_slots, r_max, in_features = lora_a.shape
    macs = x.shape[0] * num_slots * r_max * (in_features + lora_b.shape[1])
    through = _through_every_slot if macs <= EVERY_SLOT_MAX_MACS else _through_present_slots
    lora = through(x.to(lora_a.dtype), lora_a, lora_b, token_slots, scalings.to(lora_a.dtype), ranks.to(x.device))
    return (base + lora).to(x.dtype)


def _through_every_slot(x, lora_a, lora_b, token_slots, scalings, ranks):
    """Every token through every slot's `A` (one matmul, `[T, S·r_max]`), its own slot's columns
    kept (the rest, and the padding, zeroed), then one matmul through the stacked `B`s."""
    num_tokens = x.shape[0]
    num_slots, r_max, _ = lora_a.shape
    live = token_slots >= 0
    slot = token_slots.clamp_min(0).long()
    in_rank = torch.arange(r_max, device=x.device) < ranks[:, None]  # [S, r_max]
    own = (slot[:, None] == torch.arange(num_slots, device=x.device)) & live[:, None]  # [T, S]
    shrunk = (x @ lora_a.reshape(num_slots * r_max, -1).T).view(num_tokens, num_slots, r_max)
    shrunk = torch.where(own[:, :, None] & in_rank, shrunk * scalings[slot][:, None, None], 0)
    stacked_b = torch.where(in_rank[:, None, :], lora_b, 0).permute(1, 0, 2).reshape(lora_b.shape[1], -1)
    return shrunk.view(num_tokens, num_slots * r_max) @ stacked_b.T


def _through_present_slots(x, lora_a, lora_b, token_slots, scalings, ranks):
    """Tokens sorted by slot (stable); each present slot's segment through its own first
    `ranks[s]` rows of `A` and columns of `B`; the results put back in token order."""
    order = torch.argsort(token_slots, stable=True)
    present, counts = torch.unique_consecutive(token_slots[order], return_counts=True)
    rank_of = ranks.tolist()
    segments = []
    for slot, segment in zip(present.tolist(), x[order].split(counts.tolist())):
        if slot < 0:
            segments.append(segment.new_zeros(segment.shape[0], lora_b.shape[1]))
        else:
            rank = rank_of[slot]
            segments.append((segment @ lora_a[slot, :rank].T * scalings[slot]) @ lora_b[slot, :, :rank].T)
    lora = torch.empty(x.shape[0], lora_b.shape[1], device=x.device, dtype=x.dtype)
    lora[order] = torch.cat(segments)
    return lora
