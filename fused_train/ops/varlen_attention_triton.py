"""Varlen attention as torch custom ops (`fused_train::varlen_attention_fwd` / `_bwd`) with autograd.

The forward op returns `(out, lse)`; its backward calls the backward op with the gradients of both
(the lse's gradient `dlse` enters as `delta_i = rowsum(o_i * do_i) - dlse_i`, since
`d lse_i / d s_ij = p_ij`). The fake implementations only allocate, so `torch.compile` traces the ops
without running them. With real tensors each op runs the Triton kernel where it can
(`kernel_runs_on`) and the plain-PyTorch reference elsewhere (a CPU without Triton's interpreter,
float64, ...), so that under `torch.compile` attention is one opaque op on every device: the
reference's per-sequence loop reads the offsets on the host, which would break the graph in every
layer if dynamo traced it. The kernels' launchers and the reference path validate their inputs.
"""

import torch

from fused_train.ops.dispatch import HAS_TRITON, triton_runs_on
from fused_train.kernels.varlen_attention_ref import check_varlen_inputs, varlen_attention_bwd_ref, varlen_attention_ref

if HAS_TRITON:
    from fused_train.kernels.varlen_attention import kernel_supports, varlen_attention_bwd, varlen_attention_fwd


def kernel_runs_on(q: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels run on these inputs: Triton runs there (`triton_runs_on`) and the
    kernels take `q`'s dtype and head_dim."""
    return triton_runs_on(q, *tensors) and kernel_supports(q)


@torch.library.custom_op("fused_train::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    softmax_scale: float | None,
    window_left: int,
    window_right: int,
    softcap: float,
    check_cu_seqlens_values: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(out, lse)`: `out` like `q`, `lse` `[num_heads, total_q]` float32."""
    window_size = (window_left, window_right)
    if kernel_runs_on(q, k, v, cu_seqlens_q, cu_seqlens_k):
        return varlen_attention_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, window_size, softcap,
            check_cu_seqlens_values=check_cu_seqlens_values,
        )
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, window_size, softcap, check_cu_seqlens_values)
    return varlen_attention_ref(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, window_size, softcap, return_lse=True
    )


@varlen_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, window_left, window_right, softcap,
      check_cu_seqlens_values):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fused_train::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd_op(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    causal: bool,
    softmax_scale: float | None,
    window_left: int,
    window_right: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(dq, dk, dv)` given `dout` and, when the lse was used, `dlse`."""
    if not kernel_runs_on(q, k, v, cu_seqlens_q, cu_seqlens_k):
        return varlen_attention_bwd_ref(
            dout, dlse, q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale,
            (window_left, window_right), softcap,
        )
    return varlen_attention_bwd(
        dout.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens_q,
        cu_seqlens_k,
        causal,
        softmax_scale,
        (window_left, window_right),
        softcap,
        dlse=None if dlse is None else dlse.contiguous(),
    )


@varlen_attention_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, window_left, window_right,
      softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_NON_TENSOR_ARGS = ("causal", "softmax_scale", "window_left", "window_right", "softcap")


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *scalars, _check_cu_seqlens_values = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.scalars = dict(zip(_NON_TENSOR_ARGS, scalars))
    # An unused lse gets dlse=None rather than a tensor of zeros, and the backward skips it.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = varlen_attention_bwd_op(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, **ctx.scalars)
    # One gradient per input of the forward op; integer offsets and Python scalars get none.
    return dq, dk, dv, None, None, None, None, None, None, None, None


varlen_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def varlen_attention_op(
    q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, window_size, softcap, check_cu_seqlens_values=True
):
    """`(out, lse)` through the custom ops, differentiable in `q`, `k`, `v` (and through `lse`)."""
    if len(window_size) != 2:
        raise ValueError(f"window_size must be (left, right) with -1 meaning unbounded, got {window_size}")
    scale = None if softmax_scale is None else float(softmax_scale)
    return varlen_attention_fwd_op(
        q, k, v, cu_seqlens_q, cu_seqlens_k, bool(causal), scale, int(window_size[0]), int(window_size[1]),
        float(softcap), bool(check_cu_seqlens_values),
    )
