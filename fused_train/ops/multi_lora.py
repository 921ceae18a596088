"""Public multi-LoRA linear: many adapters in one batch, one adapter slot per token.

`multi_lora_linear` computes, for each token `t` with slot `s = token_slots[t]`,
`y[t] = x[t]·Wᵀ + bias + scalings[s]·(x[t]·A_sᵀ)·B_sᵀ` (the base alone where `s = -1`); the
layout of the stacked adapters is in `fused_train.kernels.multi_lora_ref`. Forward only: it serves.
"""

import torch

from fused_train.kernels.lora_ref import MAX_RANK
from fused_train.kernels.multi_lora_ref import SlotPlan, multi_lora_linear_ref, plan_slots
from fused_train.ops.checks import FLOAT_DTYPES, assert_on_device, check_int4_weight, describe, values_readable
from fused_train.ops.dispatch import HAS_TRITON, triton_runs_on

if HAS_TRITON:
    from fused_train.kernels.multi_lora import multi_lora_linear_fwd


@torch.library.custom_op("fused_train::multi_lora_linear", mutates_args=())
def multi_lora_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor,
    bias: torch.Tensor | None,
    weight_scale: torch.Tensor | None,
    weight_offset: torch.Tensor | None,
    slot_order: torch.Tensor | None = None,
    slot_ends: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y` `[T, out]` for 2-D `x` `[T, in]` and 1-D `token_slots` `[T]`, inputs already checked: the
    Triton kernels where `triton_runs_on` allows, else the reference (given `token_slots`'
    `SlotPlan` as `slot_order` and `slot_ends`, it reuses it)."""
    tensors = [t for t in (x, weight, lora_a, lora_b, token_slots, scalings, ranks, bias, weight_scale, weight_offset)
               if t is not None]  # fmt: skip
    if triton_runs_on(*tensors):
        return multi_lora_linear_fwd(
            x.contiguous(), weight, lora_a, lora_b, token_slots.contiguous(), scalings, ranks, bias, weight_scale,
            weight_offset,
        )  # fmt: skip
    slot_plan = None if slot_order is None else SlotPlan(slot_order, slot_ends)
    return multi_lora_linear_ref(
        x, weight, lora_a, lora_b, token_slots, scalings, ranks, bias, weight_scale, weight_offset, slot_plan
    )


@multi_lora_linear_op.register_fake
def _(x, weight, lora_a, lora_b, token_slots, scalings, ranks, bias, weight_scale, weight_offset, slot_order=None,
      slot_ends=None):  # fmt: skip
    return x.new_empty(x.shape[0], weight.shape[0])


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    weight_offset: torch.Tensor | None = None,
    *,
    check_values: bool = True,
    slot_plan: SlotPlan | None = None,
) -> torch.Tensor:
    """A linear layer whose tokens each take their own LoRA adapter out of a stack of `S` slots.

    `y[t] = x[t]·Wᵀ + bias + scalings[s]·(x[t]·A_sᵀ)·B_sᵀ` with `s = token_slots[t]`, `A_s` the first
    `ranks[s]` rows of `lora_a[s]` and `B_s` the first `ranks[s]` columns of `lora_b[s]`; a token
    of slot -1 gets `x[t]·Wᵀ + bias` only.

    Args:
        x: `[..., in]`, float16, bfloat16 or float32.
        weight: frozen base `W`, as for `fused_train.lora_linear`: `[out, in]` in the dtype of `x`;
            int8 `[out, in]` with `weight_scale` `[out]`; or packed int4 with `weight_scale` and
            `weight_offset` (`fused_train.kernels.lora_ref.quantize_int4` makes all three).
        lora_a: `[S, r_max, in]`, 1 <= r_max <= 128; `lora_b`: `[S, out, r_max]`; one float dtype,
            that of `x` or float32. Entries past a slot's rank are never used (zero-pad them).
        token_slots: int32 `x.shape[:-1]` (or flattened `[T]`): each token's slot in `[-1, S)`,
            -1 for the base model only. Tokens need not be grouped by slot.
        scalings: float32 `[S]`, each slot's LoRA scale (peft: `lora_alpha / r`).
        ranks: int32 `[S]`, each slot's rank in `[0, r_max]` (0: the adapter leaves this layer
            alone); None means `r_max` for every slot.
        bias: `[out]` in the dtype of `x` or float32, or None.
        weight_scale, weight_offset: of a quantized `weight`, as for `fused_train.lora_linear`.
        check_values: check the ranges of `token_slots` and `ranks`: on a CPU by reading them back
            (ValueError), on a GPU on the device without a host sync (a device-side assert), a few
            small launches that a hot loop with slots checked once per batch skips by passing
            False (the adapter pool does); shapes, dtypes and devices are always checked.
        slot_plan: `plan_slots(token_slots.reshape(-1), S)`, for a batch whose layers all take the
            same `token_slots`: made once, it spares each call the reference's grouping of tokens by
            slot (the Triton kernels need none). Its shapes are always checked, and with
            `check_values` its values against `token_slots` (a plan of other slots gives wrong outputs).

    Returns `y` `[..., out]` in the dtype of `x`. No autograd: with grad mode on, no input may
    require a gradient. The Triton kernels run where `fused_train.ops.dispatch.triton_runs_on` allows,
    the PyTorch reference otherwise; either way one call makes a number of launches that does not
    depend on how many distinct adapters the batch holds.
    """
    if ranks is None and isinstance(lora_a, torch.Tensor) and lora_a.dim() == 3:
        ranks = torch.full((lora_a.shape[0],), lora_a.shape[1], dtype=torch.int32, device=lora_a.device)
    _check_inputs(x, weight, lora_a, lora_b, token_slots, scalings, ranks, bias, weight_scale, weight_offset)
    x2d = x.reshape(-1, x.shape[-1])
    slots = token_slots.reshape(-1)
    if slot_plan is not None:
        _check_plan(slot_plan, slots, lora_a.shape[0])
    if check_values and not torch.compiler.is_compiling():
        _check_values(token_slots, ranks, lora_a.shape[0], lora_a.shape[1])
        if slot_plan is not None:
            _check_plan_values(slot_plan, slots, lora_a.shape[0])
    order, ends = (None, None) if slot_plan is None else slot_plan
    y = multi_lora_linear_op(
        x2d, weight, lora_a, lora_b, slots, scalings, ranks, bias, weight_scale, weight_offset, order, ends
    )
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _check_inputs(x, weight, lora_a, lora_b, token_slots, scalings, ranks, bias, weight_scale, weight_offset):
    """Raise ValueError naming the argument when shapes, dtypes or devices break the contract."""
    named = (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("token_slots", token_slots),
             ("scalings", scalings), ("ranks", ranks))  # fmt: skip
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("weight_scale", weight_scale), ("weight_offset", weight_offset)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if x.dim() < 1 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a float16/bfloat16/float32 tensor [..., in], got {describe(x)}")
    in_features = x.shape[-1]
    num_tokens = x.shape[:-1].numel()
    _check_weight(x, weight, weight_scale, weight_offset)
    out_features = weight.shape[0]
    a_shape_ok = lora_a.dim() == 3 and lora_a.shape[0] >= 1 and lora_a.shape[2] == in_features
    if not a_shape_ok or not 1 <= lora_a.shape[1] <= MAX_RANK:
        raise ValueError(
            f"lora_a must be [slots >= 1, r_max, in={in_features}] with 1 <= r_max <= {MAX_RANK}, "
            f"got {describe(lora_a)}"
        )
    num_slots, r_max = lora_a.shape[:2]
    if lora_b.shape != (num_slots, out_features, r_max):
        raise ValueError(
            f"lora_b must be [slots={num_slots}, out={out_features}, r_max={r_max}] (slots and r_max from lora_a), "
            f"got {describe(lora_b)}"
        )
    if lora_a.dtype not in (x.dtype, torch.float32) or lora_b.dtype != lora_a.dtype:
        raise ValueError(
            f"lora_a and lora_b must share one dtype, that of x ({x.dtype}) or float32, "
            f"got {lora_a.dtype} and {lora_b.dtype}"
        )
    if token_slots.dtype != torch.int32 or token_slots.shape not in (x.shape[:-1], (num_tokens,)):
        raise ValueError(
            f"token_slots must be int32 of x's leading shape {tuple(x.shape[:-1])} or [{num_tokens}], "
            f"got {describe(token_slots)}"
        )
    if scalings.dtype != torch.float32 or scalings.shape != (num_slots,):
        raise ValueError(f"scalings must be float32 [slots={num_slots}], got {describe(scalings)}")
    if ranks.dtype != torch.int32 or ranks.shape != (num_slots,):
        raise ValueError(f"ranks must be int32 [slots={num_slots}], got {describe(ranks)}")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype not in (x.dtype, torch.float32)):
        raise ValueError(f"bias must be [out={out_features}] in {x.dtype} or float32, got {describe(bias)}")
    if torch.is_grad_enabled():
        for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
            if t is not None and t.requires_grad:
                raise ValueError(
                    f"{name} requires grad: multi_lora_linear is forward only (serving); call it under "
                    "torch.no_grad() or torch.inference_mode(), or pass detached tensors"
                )
    tensors = dict(named) | {"bias": bias, "weight_scale": weight_scale, "weight_offset": weight_offset}
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) != 1:
        raise ValueError(
            f"{', '.join(name for name, t in tensors.items() if t is not None)} must be on one device, "
            f"got {sorted(map(str, devices))}"
        )


def _check_plan(slot_plan, slots, num_slots):
    """Raise ValueError when `slot_plan` is not a `SlotPlan` of `slots`' shape for `num_slots` slots."""
    if not isinstance(slot_plan, SlotPlan):
        raise ValueError(f"slot_plan must be a SlotPlan (plan_slots makes one) or None, got {type(slot_plan).__name__}")
    order, ends = slot_plan
    if order.dtype != torch.int64 or order.shape != slots.shape or order.device != slots.device:
        raise ValueError(f"slot_plan.order must be int64 [{len(slots)}] on {slots.device}, got {describe(order)}")
    if ends.dtype != torch.int32 or ends.shape != (num_slots + 1,) or ends.device != slots.device:
        raise ValueError(f"slot_plan.ends must be int32 [slots + 1 = {num_slots + 1}] on {slots.device}, "
                         f"got {describe(ends)}")  # fmt: skip


def _check_plan_values(slot_plan, slots, num_slots):
    """Raise ValueError when `slot_plan` is not `plan_slots(slots, num_slots)` (on a GPU the same
    asserted on the device, as `_check_values` does)."""
    expected = plan_slots(slots, num_slots)
    same = (slot_plan.order == expected.order).all() & (slot_plan.ends == expected.ends).all()
    message = "slot_plan is not plan_slots(token_slots.reshape(-1), slots): it groups other slots"
    if not values_readable(slots):
        assert_on_device(same, message)
    elif not same:
        raise ValueError(message)


def _check_weight(x, weight, weight_scale, weight_offset):
    in_features = x.shape[-1]
    if weight.dtype == torch.uint8:
        check_int4_weight(weight, weight_scale, weight_offset, in_features)
        return
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ValueError(f"weight must be [out, in={in_features}], got {describe(weight)}")
    if weight.dtype == torch.int8:
        if weight_scale is None:
            raise ValueError("weight_scale must be given for an int8 weight")
        if weight_scale.shape != (weight.shape[0],) or weight_scale.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"weight_scale must be a float tensor [out={weight.shape[0]}], got {describe(weight_scale)}"
            )
    elif weight.dtype != x.dtype:
        raise ValueError(
            f"weight must have the dtype of x ({x.dtype}), be int8, or be uint8-packed int4, got {weight.dtype}"
        )
    elif weight_scale is not None:
        raise ValueError(f"weight_scale is only for an int8 or int4 weight, got a {weight.dtype} weight")
    if weight_offset is not None:
        raise ValueError(f"weight_offset is only for an int4 (uint8-packed) weight, got a {weight.dtype} weight")


def _check_values(token_slots, ranks, num_slots, r_max):
    """Raise ValueError when a slot id is outside [-1, S) or a rank outside [0, r_max]: one read back
    on a CPU; elsewhere the same ranges asserted on the device (`assert_on_device`), no host sync."""
    if not values_readable(token_slots):
        ranks_message = f"ranks must be in [0, r_max={r_max}] (lora_a's second dimension)"
        assert_on_device(((ranks >= 0) & (ranks <= r_max)).all(), ranks_message)
        slots_message = f"token_slots must be in [-1, {num_slots}) (-1: base only; {num_slots} slots in lora_a)"
        assert_on_device(((token_slots >= -1) & (token_slots < num_slots)).all(), slots_message)
        return
    bounds = [ranks.min(), ranks.max()]
    if token_slots.numel():
        bounds += [token_slots.min(), token_slots.max()]
    low_rank, high_rank, *slot_bounds = torch.stack(bounds).tolist()
    if low_rank < 0 or high_rank > r_max:
        raise ValueError(f"ranks must be in [0, r_max={r_max}] (lora_a's second dimension), got {ranks.tolist()}")
    if slot_bounds and (slot_bounds[0] < -1 or slot_bounds[1] >= num_slots):
        raise ValueError(
            f"token_slots must be in [-1, {num_slots}) (-1: base only; {num_slots} slots in lora_a), got values from "
            f"{slot_bounds[0]} to {slot_bounds[1]}"
        )
