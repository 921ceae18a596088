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


def multi_lora_linear_ref(
    x, weight, lora_a, lora_b, token_slots, scalings, ranks, bias=None, weight_scale=None, weight_offset=None
):
    """Plain-PyTorch `y` of the module docstring for `x` `[T, in]`; `token_slots`, `ranks` integer,
    `scalings` float. The LoRA branch runs in the dtype of `lora_a` (as peft does), the sum is
    returned in the dtype of `x`. Inputs are assumed valid.

    Batched, with no loop over tokens or adapters and no host sync, two ways chosen by shapes:
    up to one token per slot (decode), each token's adapter is gathered (`[T, r_max, in + out]`,
    no larger than the stack itself) and applied by a batched matmul; with more tokens than slots,
    every token goes through every slot's `A` in one matmul (`[T, S·r_max]`), which keeps its own
    slot's columns only, and one matmul through the stacked `B`s (S times the FLOPs of one adapter,
    but two large matmuls instead of a gather of `T` adapters).
    """
    base = base_linear_ref(x, weight, bias, weight_scale, weight_offset)
    num_tokens = x.shape[0]
    num_slots, r_max, _ = lora_a.shape
    live = token_slots >= 0
    slot = token_slots.clamp_min(0).long()
    in_rank = torch.arange(r_max, device=x.device) < ranks.to(x.device)[:, None]  # [S, r_max]
    token_scale = torch.where(live, scalings.to(lora_a.dtype)[slot], 0)  # [T]
    x_lora = x.to(lora_a.dtype)
    if num_tokens <= num_slots:
        keep = in_rank[slot] & live[:, None]  # [T, r_max]
        shrunk = torch.bmm(lora_a[slot], x_lora[:, :, None])[..., 0]  # [T, r_max]
        shrunk = torch.where(keep, shrunk * token_scale[:, None], 0)
        lora_b_tok = torch.where(keep[:, None, :], lora_b[slot], 0)  # [T, out, r_max]
        lora = torch.bmm(lora_b_tok, shrunk[:, :, None])[..., 0]
    else:
        shrunk = (x_lora @ lora_a.reshape(num_slots * r_max, -1).T).view(num_tokens, num_slots, r_max)
        own = (slot[:, None] == torch.arange(num_slots, device=x.device)) & live[:, None]  # [T, S]
        keep = own[:, :, None] & in_rank  # [T, S, r_max]
        shrunk = torch.where(keep, shrunk * token_scale[:, None, None], 0).view(num_tokens, -1)
        stacked_b = torch.where(in_rank[:, None, :], lora_b, 0).permute(1, 0, 2).reshape(lora_b.shape[1], -1)
        lora = shrunk @ stacked_b.T
    return (base + lora).to(x.dtype)
