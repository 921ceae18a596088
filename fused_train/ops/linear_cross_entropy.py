"""Public fused linear cross-entropy: custom ops over the kernels, their autograd, input checks, dispatch.

`linear_cross_entropy(hidden, weight, labels)` is `F.cross_entropy(hidden · weightᵀ + bias, labels)`
(with softcap, label smoothing and z-loss when asked) without a `[tokens, vocab]` logits tensor
(the math is in `fused_train.kernels.linear_cross_entropy_ref`). The ops compute per-token losses;
the reduction is plain PyTorch on `[tokens]` outside them, so autograd hands the backward one
gradient per token and `mean`, `sum`, `none` and HF's `num_items_in_batch` are right alike. The
forward saves two floats per token (the largest logit and the log-sum-exp below it); the backward
recomputes the logits. Triton kernels run where `fused_train.ops.dispatch.triton_runs_on` allows,
elsewhere the reference's chunked path: neither holds more than a chunk of logits.
"""

import torch

from fused_train.kernels.linear_cross_entropy_ref import (
    REDUCTIONS,
    linear_cross_entropy_bwd_ref,
    linear_cross_entropy_fwd_ref,
    reduce_loss,
)
from fused_train.ops.checks import FLOAT_DTYPES, assert_on_device, is_dtensor, values_readable
from fused_train.ops.dispatch import HAS_TRITON, triton_runs_on

if HAS_TRITON:
    from fused_train.kernels.linear_cross_entropy import linear_cross_entropy_bwd, linear_cross_entropy_fwd


def _kernels_run(x, weight, bias, labels):
    return triton_runs_on(x, *[t for t in (weight, bias, labels) if t is not None]) and x.dtype in FLOAT_DTYPES


@torch.library.custom_op("fused_train::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(loss, stats)`: fp32 `[T]` and `[2, T]` (largest logit, `log Σ exp(z' - max)`; float64 for
    float64 inputs); `softcap` 0 means none."""
    fwd = linear_cross_entropy_fwd if _kernels_run(x, weight, bias, labels) else linear_cross_entropy_fwd_ref
    return fwd(x, weight, bias, labels, ignore_index, label_smoothing, softcap or None, z_loss)


@linear_cross_entropy_fwd_op.register_fake
def _(x, weight, bias, labels, ignore_index, label_smoothing, softcap, z_loss):
    accum = torch.promote_types(x.dtype, torch.float32)
    return x.new_empty(x.shape[0], dtype=accum), x.new_empty(2, x.shape[0], dtype=accum)


@torch.library.custom_op("fused_train::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd_op(
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    stats: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    z_loss: float,
    compute_dx: bool,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dx, dW, dbias)` in the dtypes of `x`, `weight`, `bias`; an empty tensor for each not asked for."""
    bwd = linear_cross_entropy_bwd if _kernels_run(x, weight, bias, labels) else linear_cross_entropy_bwd_ref
    grads = bwd(
        grad_loss.to(stats.dtype).contiguous(), x, weight, bias, labels, stats, ignore_index, label_smoothing,
        softcap or None, z_loss, compute_dx, compute_dw, compute_db,
    )  # fmt: skip
    grad_x, grad_w, grad_b = (x.new_empty(0) if grad is None else grad for grad in grads)
    return grad_x, grad_w, grad_b


@linear_cross_entropy_bwd_op.register_fake
def _(grad_loss, x, weight, bias, labels, stats, ignore_index, label_smoothing, softcap, z_loss, compute_dx, compute_dw,
      compute_db):  # fmt: skip
    grad_x = torch.empty_like(x) if compute_dx else x.new_empty(0)
    grad_w = torch.empty_like(weight) if compute_dw else x.new_empty(0)
    grad_b = torch.empty_like(bias) if compute_db else x.new_empty(0)
    return grad_x, grad_w, grad_b


def _setup_context(ctx, inputs, output):
    x, weight, bias, labels, *options = inputs
    ctx.save_for_backward(x, weight, bias, labels, output[1])
    ctx.options = options
    # The stats are saved for the backward, never differentiated: their gradient stays None, not zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_stats):
    x, weight, bias, labels, stats = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_w, grad_b = linear_cross_entropy_bwd_op(
        grad_loss, x, weight, bias, labels, stats, *ctx.options, *needs[:3]
    )
    return (
        grad_x if needs[0] else None, grad_w if needs[1] else None, grad_b if needs[2] else None,
        None, None, None, None, None,
    )  # fmt: skip


linear_cross_entropy_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of `softmax(hidden · weightᵀ + bias)` against `labels`, never forming the logits.

    Args:
        hidden: `[..., H]`, float16, bfloat16, float32 (or float64: reference path only).
        weight: `[V, H]` in the dtype of `hidden` (under autocast both are cast to autocast's dtype,
            as `F.linear` would be); gradients flow to it when it requires them (fp32 accumulation).
        labels: integer `[...]`, the shape of `hidden` without its last dimension, already aligned
            with `hidden` (no shift inside): `labels[t]` is the target of `hidden[t]`, each in
            `[0, V)` or `ignore_index`.
        bias: `[V]` in the dtype of `hidden`, or None.
        reduction: "mean" (over the tokens not ignored; NaN when there are none, as
            `F.cross_entropy`), "sum", or "none" (a loss per token, 0 where ignored, shaped as `labels`).
        label_smoothing: ε in [0, 1], as `F.cross_entropy`.
        softcap: Gemma 2's final logit softcapping `c`: logits become `c · tanh(logits / c)`; None for none.
        z_loss: weight λ >= 0 of `λ · logsumexp(logits)²`, added to each targeted token's loss.
        num_items_in_batch: with reduction "mean", the divisor instead of the number of targeted
            tokens (Hugging Face's gradient-accumulation semantics: sum / num_items_in_batch).

    Returns the loss in float32 (float64 for float64 inputs), whatever the input dtype.
    """
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        hidden, weight, bias = (_autocast(t, hidden.device.type) for t in (hidden, weight, bias))
    _check_inputs(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap, z_loss,
                  num_items_in_batch)  # fmt: skip
    x = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat_labels = labels.reshape(-1).long().contiguous()
    loss, _ = linear_cross_entropy_fwd_op(
        x, weight.contiguous(), bias, flat_labels, int(ignore_index), float(label_smoothing), float(softcap or 0.0),
        float(z_loss),
    )  # fmt: skip
    loss = reduce_loss(loss, flat_labels, ignore_index, reduction, num_items_in_batch)
    return loss.reshape(labels.shape) if reduction == "none" else loss


def _autocast(t, device_type):
    """`t` in autocast's dtype, as `F.linear` casts its float operands under autocast."""
    if isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES:
        return t.to(torch.get_autocast_dtype(device_type))
    return t


def _check_inputs(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, softcap, z_loss,
                  num_items_in_batch):  # fmt: skip
    """Raise ValueError naming the argument when the inputs break `linear_cross_entropy`'s contract."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if is_dtensor(weight):
        raise ValueError(
            "weight is a DTensor (e.g. an FSDP2-sharded lm_head.weight): linear_cross_entropy needs the full "
            "weight; gather it first (FSDP2: keep lm_head unsharded, or call it inside the lm_head module's unshard)"
        )
    floats = (*FLOAT_DTYPES, torch.float64)
    if hidden.dim() < 1 or hidden.dtype not in floats:
        raise ValueError(f"hidden must be a float tensor [..., H], got {hidden.dtype} {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}] with V >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    vocab_size = weight.shape[0]
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or bias.shape != (vocab_size,) or bias.dtype != hidden.dtype
    ):
        raise ValueError(f"bias must be a [V={vocab_size}] tensor in {hidden.dtype}, got {bias!r:.80}")
    if labels.shape != hidden.shape[:-1] or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be integer {tuple(hidden.shape[:-1])} (hidden's shape without H), got "
            f"{labels.dtype} {tuple(labels.shape)}"
        )
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"hidden, weight, labels and bias must be on one device, got {sorted(map(str, devices))}")
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if not z_loss >= 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(
            f"num_items_in_batch replaces the mean's divisor: it needs reduction='mean', got {reduction!r}"
        )
    # A target outside [0, V) would read another row's memory in the kernels. On a GPU the check
    # stays on the device (a device-side assert): reading it back would sync every training step.
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if not values_readable(labels):
        assert_on_device(bad.any().logical_not(), f"labels must be in [0, V={vocab_size}) or ignore_index")
    elif not torch.compiler.is_compiling() and bool(bad.any()):
        raise ValueError(
            f"labels must be in [0, V={vocab_size}) or ignore_index={ignore_index}, got {labels[bad][0].item()}"
        )
