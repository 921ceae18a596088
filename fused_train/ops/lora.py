"""Public fused LoRA linear: custom ops over the Triton kernels, their autograd, input checks, dispatch.

`lora_linear` computes `y = x·Wᵀ + bias + scaling · (dropout(x)·Aᵀ)·Bᵀ` (the math and its
gradients are written out in `fused_train.kernels.lora_ref`). The dropout mask is drawn here with
`torch.bernoulli` from torch's generator, so `torch.manual_seed` and activation checkpointing
(which replays the RNG state) reproduce it; on CPU it is the same mask `nn.Dropout` would draw.
The backward keeps `x`, the bool mask and the fp32 `[tokens, r]` product `S`; it never computes dW.
"""

import torch

from fused_train.kernels.lora_ref import MAX_RANK, lora_linear_ref
from fused_train.ops.checks import FLOAT_DTYPES, check_int4_weight
from fused_train.ops.dispatch import HAS_TRITON, triton_runs_on

if HAS_TRITON:
    from fused_train.kernels.lora import lora_linear_bwd, lora_linear_fwd


@torch.library.custom_op("fused_train::lora_linear_fwd", mutates_args=())
def lora_linear_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    weight_offset: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
    keep_mask: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(y, S)` for 2-D contiguous `x` `[T, in]`; `S` `[T, r]` fp32 is what the backward needs."""
    return lora_linear_fwd(x, weight, weight_scale, weight_offset, lora_a, lora_b, scaling, bias, keep_mask, dropout_p)


@lora_linear_fwd_op.register_fake
def _(x, weight, weight_scale, weight_offset, lora_a, lora_b, scaling, bias, keep_mask, dropout_p):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0], dtype=torch.float32)


@torch.library.custom_op("fused_train::lora_linear_bwd", mutates_args=())
def lora_linear_bwd_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    lora_s: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor | None,
    weight_offset: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    keep_mask: torch.Tensor | None,
    dropout_p: float,
    compute_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dx, dA, dB)`; `dx` is an empty tensor when `compute_dx` is false (x needs no gradient)."""
    grad_x, grad_a, grad_b = lora_linear_bwd(
        grad_y.contiguous(), x, lora_s, weight, weight_scale, weight_offset, lora_a, lora_b, scaling, keep_mask,
        dropout_p, compute_dx,
    )  # fmt: skip
    return (grad_x if compute_dx else x.new_empty(0)), grad_a, grad_b


@lora_linear_bwd_op.register_fake
def _(
    grad_y, x, lora_s, weight, weight_scale, weight_offset, lora_a, lora_b, scaling, keep_mask, dropout_p, compute_dx
):
    grad_x = torch.empty_like(x) if compute_dx else x.new_empty(0)
    return grad_x, torch.empty_like(lora_a), torch.empty_like(lora_b)


def _setup_context(ctx, inputs, output):
    x, weight, weight_scale, weight_offset, lora_a, lora_b, scaling, bias, keep_mask, dropout_p = inputs
    ctx.save_for_backward(x, output[1], weight, weight_scale, weight_offset, lora_a, lora_b, keep_mask)
    ctx.scaling = scaling
    ctx.dropout_p = dropout_p
    # S is saved for the backward, never differentiated: its gradient stays None, not zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_s):
    x, lora_s, weight, weight_scale, weight_offset, lora_a, lora_b, keep_mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_a, grad_b = lora_linear_bwd_op(
        grad_y, x, lora_s, weight, weight_scale, weight_offset, lora_a, lora_b, ctx.scaling, keep_mask,
        ctx.dropout_p, needs[0],
    )  # fmt: skip
    # dbias = Σ_tokens dy; a plain reduction that only LoRA-bias training asks for.
    grad_bias = grad_y.sum(0) if needs[7] else None
    return (grad_x if needs[0] else None), None, None, None, grad_a, grad_b, None, grad_bias, None, None


lora_linear_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def dropout_keep_mask(x: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Bool keep-mask of `x`'s shape, each element kept with probability `1 - dropout_p`."""
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - dropout_p)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    weight_scale: torch.Tensor | None = None,
    weight_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """LoRA linear layer in one fused pass: `y = x·Wᵀ + bias + scaling · (dropout(x)·Aᵀ)·Bᵀ`.

    Args:
        x: `[..., in]`, float16, bfloat16 or float32.
        weight: frozen `W`: `[out, in]` in the dtype of `x`; or int8 `[out, in]` with
            `weight_scale`; or int4 packed two per byte, uint8 `[out, ceil(in / 64) · 32]`, with
            `weight_scale` and `weight_offset` (`fused_train.kernels.lora_ref.quantize_int4` makes all three).
        lora_a: `A` `[r, in]`, 1 <= r <= 128; `lora_b`: `B` `[out, r]`; both of one float dtype
            (that of `x`, or float32 as peft keeps adapters); gradients flow to both.
        scaling: the LoRA scale `s` (peft: `lora_alpha / r`).
        bias: `[out]` (dtype of `x` or float32) or None; may require grad.
        dropout_p: probability of zeroing an element of the LoRA branch's input (the base matmul
            sees the undropped `x`); pass 0 in eval mode.
        weight_scale: scale of a quantized `weight`: int8, float `[out]`
            (`W[o, :] = weight[o, :] · weight_scale[o]`); int4, float `[out, ceil(in / 64)]`
            (`W[o, i] = q[o, i] · weight_scale[o, i // 64] + weight_offset[o, i // 64]`).
        weight_offset: int4 only: float `[out, ceil(in / 64)]`, the value of the level q = 0.

    Returns `y` `[..., out]` in the dtype of `x`. No gradient for `weight`: it must not require one.
    Runs the Triton kernels where `fused_train.ops.dispatch.triton_runs_on` allows, else the reference.
    """
    _check_inputs(x, weight, lora_a, lora_b, bias, dropout_p, weight_scale, weight_offset)
    x2d = x.reshape(-1, x.shape[-1])
    keep_mask = dropout_keep_mask(x2d, dropout_p) if dropout_p > 0 else None
    tensors = [t for t in (x2d, weight, lora_a, lora_b, bias, weight_scale, weight_offset) if t is not None]
    if triton_runs_on(*tensors):
        y, _ = lora_linear_fwd_op(
            x2d.contiguous(), weight, weight_scale, weight_offset, lora_a, lora_b, float(scaling), bias, keep_mask,
            float(dropout_p),
        )  # fmt: skip
    else:
        y = lora_linear_ref(
            x2d, weight, lora_a, lora_b, scaling, bias, keep_mask, dropout_p, weight_scale, weight_offset
        )
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _check_inputs(x, weight, lora_a, lora_b, bias, dropout_p, weight_scale, weight_offset):
    """Raise ValueError naming the argument when the inputs break `lora_linear`'s contract."""
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if x.dim() < 1 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a float16/bfloat16/float32 tensor [..., in], got {x.dtype} {tuple(x.shape)}")
    in_features = x.shape[-1]
    if weight.dtype == torch.uint8:
        check_int4_weight(weight, weight_scale, weight_offset, in_features)
    elif weight.dim() != 2 or weight.shape[1] != in_features:
        raise ValueError(f"weight must be [out, in={in_features}], got {tuple(weight.shape)}")
    elif weight.dtype == torch.int8:
        if weight_scale is None:
            raise ValueError("weight_scale must be given for an int8 weight")
        if weight_scale.shape != (weight.shape[0],) or weight_scale.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"weight_scale must be a float tensor [out={weight.shape[0]}], "
                f"got {weight_scale.dtype} {tuple(weight_scale.shape)}"
            )
    elif weight.dtype != x.dtype:
        raise ValueError(
            f"weight must have the dtype of x ({x.dtype}), be int8, or be uint8-packed int4, got {weight.dtype}"
        )
    elif weight_scale is not None:
        raise ValueError(f"weight_scale is only for an int8 or int4 weight, got a {weight.dtype} weight")
    if weight_offset is not None and weight.dtype != torch.uint8:
        raise ValueError(f"weight_offset is only for an int4 (uint8-packed) weight, got a {weight.dtype} weight")
    out_features = weight.shape[0]
    if weight.requires_grad:
        raise ValueError("weight must be frozen (requires_grad=False): lora_linear computes no weight gradient")
    if lora_a.dim() != 2 or lora_a.shape[1] != in_features or not 1 <= lora_a.shape[0] <= MAX_RANK:
        raise ValueError(f"lora_a must be [r, in={in_features}] with 1 <= r <= {MAX_RANK}, got {tuple(lora_a.shape)}")
    rank = lora_a.shape[0]
    if lora_b.dim() != 2 or lora_b.shape != (out_features, rank):
        raise ValueError(f"lora_b must be [out={out_features}, r={rank}] (r from lora_a), got {tuple(lora_b.shape)}")
    if lora_a.dtype not in (x.dtype, torch.float32) or lora_b.dtype != lora_a.dtype:
        raise ValueError(
            f"lora_a and lora_b must share one dtype, that of x ({x.dtype}) or float32, "
            f"got {lora_a.dtype} and {lora_b.dtype}"
        )
    if bias is not None and (bias.shape != (out_features,) or bias.dtype not in (x.dtype, torch.float32)):
        raise ValueError(
            f"bias must be [out={out_features}] in {x.dtype} or float32, got {bias.dtype} {tuple(bias.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    devices = {t.device for t in (x, weight, lora_a, lora_b, bias, weight_scale, weight_offset) if t is not None}
    if len(devices) != 1:
        raise ValueError(
            "x, weight, lora_a, lora_b, bias, weight_scale, weight_offset must be on one device, "
            f"got {sorted(map(str, devices))}"
        )
