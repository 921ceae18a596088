"""The int8 KV cache's kernels as torch custom ops, and the public functions that dispatch to them.

`fused_train::quantize_kv_append` writes into the cache in place (it declares `data` and `scale`
mutated); `fused_train::int8_decode_attention` returns a new tensor. Their fake implementations
only allocate, so `torch.compile` traces them without running them; the launchers validate their
inputs inside the ops (so the checks run once, also under `torch.compile`). Where Triton cannot
run (`triton_runs_on`), the public functions run the same checks, then the plain-PyTorch references.
"""

import torch

from fused_train.kernels import int8_decode_attention_ref as decode_ref
from fused_train.kernels import int8_kv_quantize_ref as quantize_ref
from fused_train.ops.dispatch import HAS_TRITON, triton_runs_on, warn_reference_path

if HAS_TRITON:
    from fused_train.kernels import int8_decode_attention as decode_kernel
    from fused_train.kernels import int8_kv_quantize as quantize_kernel


@torch.library.custom_op("fused_train::quantize_kv_append", mutates_args=("data", "scale"))
def quantize_kv_append_op(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, start: int) -> None:
    """Quantize `x` into positions `[start, start + new_tokens)` of `data` and `scale`, in place."""
    quantize_kernel.quantize_kv_append(x, data, scale, start)


@quantize_kv_append_op.register_fake
def _(x, data, scale, start):
    return None


@torch.library.custom_op("fused_train::int8_decode_attention", mutates_args=())
def int8_decode_attention_op(
    q: torch.Tensor,
    k_data: torch.Tensor,
    k_scale: torch.Tensor,
    v_data: torch.Tensor,
    v_scale: torch.Tensor,
    kv_len: int,
    key_start: torch.Tensor | None,
    softmax_scale: float | None,
    window_left: int,
    softcap: float,
    k_recent: torch.Tensor | None,
    v_recent: torch.Tensor | None,
    exact_from: int | None,
    num_splits: int | None,
) -> torch.Tensor:
    """Attention of `q` over the int8 cache's first `kv_len` positions: `out` like `q`."""
    return decode_kernel.int8_decode_attention(
        q, k_data, k_scale, v_data, v_scale, kv_len, key_start, softmax_scale, window_left, softcap,
        k_recent, v_recent, exact_from, num_splits,
    )  # fmt: skip


@int8_decode_attention_op.register_fake
def _(q, k_data, k_scale, v_data, v_scale, kv_len, key_start, softmax_scale, window_left, softcap, k_recent, v_recent,
      exact_from, num_splits):  # fmt: skip
    return torch.empty_like(q)


def quantize_kv_append(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, start: int) -> None:
    """Quantize new keys or values `x` `[batch, num_kv_heads, new_tokens, head_dim]` (float16,
    bfloat16 or float32) into positions `[start, start + new_tokens)` of the cache's `data` (int8
    `[batch, num_kv_heads, capacity, head_dim]`) and `scale` (float32 `[batch, num_kv_heads,
    capacity]`), in place, as `quantize_kv_ref` does (bit-exact). Raises ValueError on bad inputs.
    """
    # `data` leads: this op has no matmul, so float32 `x` needs no tf32 permission to take the kernel.
    if triton_runs_on(data, x, scale):
        quantize_kv_append_op(x, data, scale, start)  # its launcher checks the inputs
        return
    quantize_ref.check_quantize_kv_append_inputs(x, data, scale, start)
    new_data, new_scale = quantize_ref.quantize_kv_ref(x)
    data[:, :, start : start + x.shape[2]] = new_data
    scale[:, :, start : start + x.shape[2]] = new_scale


def int8_decode_attention(
    q: torch.Tensor,
    k_data: torch.Tensor,
    k_scale: torch.Tensor,
    v_data: torch.Tensor,
    v_scale: torch.Tensor,
    kv_len: int,
    key_start: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    window_left: int = -1,
    softcap: float = 0.0,
    k_recent: torch.Tensor | None = None,
    v_recent: torch.Tensor | None = None,
    exact_from: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of the cache's last `num_queries` tokens over its first `kv_len` positions.

    Args:
        q: `[batch, num_heads, num_queries, head_dim]`, float16, bfloat16 or float32 (float64 runs
            the reference).
        k_data, v_data: int8 `[batch, num_kv_heads, capacity, head_dim]`; `num_heads` a multiple of
            `num_kv_heads` (GQA/MQA).
        k_scale, v_scale: float32 `[batch, num_kv_heads, capacity]`, per-token scales.
        kv_len: filled positions (Python int); query `t` sits at `kv_len - num_queries + t`.
        key_start: int32 `[batch]`, each sequence's first real key (left padding), or None for 0.
        softmax_scale: defaults to `head_dim ** -0.5`.
        window_left: a query at position p sees keys from `p - window_left` on; -1: no window.
        softcap: when > 0, scores become `softcap * tanh(scores / softcap)`.
        k_recent, v_recent, exact_from: an exact ring of the most recent positions (all three or
            none): `[batch, num_kv_heads, residual_length, head_dim]` float tensors holding position
            `j` at slot `j % residual_length`; positions `exact_from <= j < kv_len` (at most
            `residual_length`) are read from them instead of from the int8 data.
        num_splits: splits of the keys in the kernel (None: a heuristic); the reference ignores it.

    Returns `out` like `q`; a query that sees no key gets zeros. The Triton kernel runs where
    `triton_runs_on` says so (float32 on a GPU only where tf32 matmuls are allowed), for head_dim up
    to 256; elsewhere the reference in `fused_train.kernels.int8_decode_attention_ref` runs (on CUDA
    tensors, with a one-time warning).
    """
    tensors = tuple(t for t in (k_data, k_scale, v_data, v_scale, key_start, k_recent, v_recent) if t is not None)
    if triton_runs_on(q, *tensors):
        if q.dtype in decode_kernel.KERNEL_DTYPES and q.shape[-1] <= decode_kernel.MAX_HEAD_DIM:
            scale = None if softmax_scale is None else float(softmax_scale)
            # Its launcher checks the inputs: once per call on the decode path, where this runs per layer.
            return int8_decode_attention_op(
                q, k_data, k_scale, v_data, v_scale, kv_len, key_start, scale, int(window_left), float(softcap),
                k_recent, v_recent, exact_from, num_splits,
            )  # fmt: skip
        warn_reference_path(q, f"int8_decode_attention {q.dtype}", (
            f"int8_decode_attention on {q.dtype} CUDA tensors of head_dim {q.shape[-1]} runs the PyTorch reference, "
            "which dequantizes the whole cache at every call: the kernel takes float16, bfloat16 and float32 up to "
            f"head_dim {decode_kernel.MAX_HEAD_DIM}."
        ))  # fmt: skip
    decode_ref.check_int8_decode_attention_inputs(
        q, k_data, k_scale, v_data, v_scale, kv_len, key_start, window_left, softcap, k_recent, v_recent, exact_from
    )
    return decode_ref.int8_decode_attention_ref(
        q, k_data, k_scale, v_data, v_scale, kv_len, key_start, softmax_scale, window_left, softcap,
        k_recent, v_recent, exact_from,
    )  # fmt: skip
