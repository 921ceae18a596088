"""Public varlen attention: flash-attn's varlen signature, dispatched to the kernel or the reference."""

import torch

from fused_train.kernels.varlen_attention import check_varlen_inputs, varlen_attention_ref


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """Attention over packed sequences, with the conventions of flash-attn's `flash_attn_varlen_func`.

    Args:
        q: `[total_q, num_heads, head_dim]`.
        k, v: `[total_k, num_kv_heads, head_dim]`; `num_heads` a multiple of `num_kv_heads` (GQA/MQA).
        cu_seqlens_q, cu_seqlens_k: int32 `[batch + 1]`, cumulative sequence starts, first 0, last total.
        max_seqlen_q, max_seqlen_k: the longest sequence in each (Python ints).
        causal: mask aligned bottom-right when a sequence has more keys than queries.
        softmax_scale: defaults to `head_dim ** -0.5`.
        window_size: `(left, right)` keys visible around the diagonal, -1 meaning unbounded.
        softcap: when > 0, scores become `softcap * tanh(scores / softcap)`.
        return_lse: also return the log-sum-exp, `[num_heads, total_q]` float32.

    Returns `out` (shape and dtype of `q`), or `(out, lse)`.
    """
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, window_size, softcap)
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
