"""Public varlen attention: flash-attn's varlen signature, dispatched to the kernel or the reference."""

import torch

from fused_train.ops.varlen_attention_triton import varlen_attention_op
from fused_train.ops.dispatch import HAS_TRITON, triton_runs_on, warn_reference_path
from fused_train.kernels.varlen_attention_ref import check_varlen_inputs, varlen_attention_ref

if HAS_TRITON:
    from fused_train.kernels.varlen_attention import FP32_MAX_HEAD_DIM, MAX_HEAD_DIM, kernel_supports


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    check_cu_seqlens: bool = True,
):
    """Attention over packed sequences, with the conventions of flash-attn's `flash_attn_varlen_func`.

    Args:
        q: `[total_q, num_heads, head_dim]`.
        k, v: `[total_k, num_kv_heads, head_dim]`; `num_heads` a multiple of `num_kv_heads` (GQA/MQA).
        cu_seqlens_q, cu_seqlens_k: int32 `[batch + 1]`, cumulative sequence starts, first 0, last total.
        max_seqlen_q, max_seqlen_k: the longest sequence in each (Python ints). Accepted for
            flash-attn compatibility; the kernel reads lengths from `cu_seqlens_*` (no recompiles).
        causal: causal mask, aligned bottom-right when a sequence has more keys than queries. False by
            default, as in flash-attn: a causal LM must pass `causal=True`.
        softmax_scale: defaults to `head_dim ** -0.5`.
        window_size: `(left, right)` keys visible around the diagonal, -1 meaning unbounded.
        softcap: when > 0, scores become `softcap * tanh(scores / softcap)`.
        return_lse: also return the log-sum-exp, `[num_heads, total_q]` float32.
        check_cu_seqlens: check the values of `cu_seqlens_*` (start 0, non-decreasing, last =
            total): on a CPU by reading them back (ValueError), on a GPU on the device without a
            host sync (a device-side assert). Pass False in a hot loop for offsets checked once per
            batch (patched models do); shapes, dtypes and devices are always checked.

    Returns `out` (shape and dtype of `q`), or `(out, lse)`.

    The Triton kernel runs where `triton_runs_on` says so, for float16/bfloat16 with head_dim up to
    256 (larger raises ValueError) and float32 up to 128 (its matmuls run as tf32 on the GPU);
    float64, float32 beyond head_dim 128 and other devices use the PyTorch reference (on a CPU in
    few SDPA calls, `fused_train.ops.varlen_attention_cpu`). Under `torch.compile` either runs inside the custom
    op (`fused_train.ops.varlen_attention_triton`), one opaque node in the graph; the op validates the inputs, so
    the checks also run under `torch.compile`.
    """
    triton = triton_runs_on(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if triton and q.dim() == 3 and q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM}, got {q.shape[2]}")
    kernel = triton and kernel_supports(q)
    if triton and not kernel:
        warn_reference_path(q, f"varlen_attention {q.dtype}", (
            f"varlen_attention on {q.dtype} CUDA tensors of head_dim {q.shape[-1]} runs the PyTorch reference, one "
            f"attention per document: the kernel takes float16 and bfloat16 up to head_dim {MAX_HEAD_DIM}, float32 "
            f"up to {FP32_MAX_HEAD_DIM}. Pass bfloat16 or float16 inputs to run it."
        ))  # fmt: skip
    # Under torch.compile the reference runs inside the custom op too, opaque to dynamo (its
    # per-sequence loop would break the graph in every layer).
    if kernel or torch.compiler.is_compiling():
        out, lse = varlen_attention_op(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, window_size, softcap, check_cu_seqlens
        )
        return (out, lse) if return_lse else out
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, window_size, softcap, check_cu_seqlens)
    if q.device.type == "cpu" and softcap == 0 and not return_lse:
        from fused_train.ops.varlen_attention_cpu import varlen_attention_cpu

        # Few SDPA calls per row, chosen by measured cost, instead of one per sequence.
        return varlen_attention_cpu(
            q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, softmax_scale=softmax_scale, window_size=window_size
        )
    return varlen_attention_ref(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        causal=causal,
        softmax_scale=softmax_scale,
        window_size=tuple(window_size),
        softcap=softcap,
        return_lse=return_lse,
    )
