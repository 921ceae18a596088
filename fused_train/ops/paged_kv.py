"""The paged KV cache's kernels as torch custom ops, and the public functions that dispatch to them.

`fused_train::write_kv_pages` writes new keys and values into the pages in place (it declares the
pages and scales mutated); `fused_train::paged_decode_attention` returns a new tensor. Their fake
implementations only allocate, so `torch.compile` traces them without running them; the
launchers validate their inputs inside the ops. Where Triton cannot run (`triton_runs_on`), the
public functions run the same checks, then the plain-PyTorch references. The layout is in
`fused_train.kernels.paged_decode_attention_ref` (its module docstring).
"""

import torch

from fused_train.kernels import paged_decode_attention_ref as attention_ref
from fused_train.kernels import paged_kv_write_ref as write_ref
from fused_train.ops.dispatch import HAS_TRITON, triton_runs_on, warn_reference_path

if HAS_TRITON:
    from fused_train.kernels import paged_decode_attention as attention_kernel
    from fused_train.kernels import paged_kv_write as write_kernel


@torch.library.custom_op(
    "fused_train::write_kv_pages", mutates_args=("k_pages", "v_pages", "k_scales", "v_scales")
)  # fmt: skip
def write_kv_pages_op(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    slots: torch.Tensor,
    k_scales: torch.Tensor | None,
    v_scales: torch.Tensor | None,
) -> None:
    """Write `k_new` and `v_new` at `slots` of the pages (and scales), in place."""
    write_kernel.write_kv_pages(k_new, v_new, k_pages, v_pages, slots, k_scales, v_scales)


@write_kv_pages_op.register_fake
def _(k_new, v_new, k_pages, v_pages, slots, k_scales, v_scales):
    return None


@torch.library.custom_op("fused_train::paged_decode_attention", mutates_args=())
def paged_decode_attention_op(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    k_scales: torch.Tensor | None,
    v_scales: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    softmax_scale: float | None,
    window_left: int,
    softcap: float,
) -> torch.Tensor:
    """Attention of `q` over each sequence's pages: `out` like `q`."""
    return attention_kernel.paged_decode_attention(
        q, k_pages, v_pages, page_table, kv_lens, k_scales, v_scales, cu_seqlens_q, softmax_scale, window_left, softcap
    )


@paged_decode_attention_op.register_fake
def _(q, k_pages, v_pages, page_table, kv_lens, k_scales, v_scales, cu_seqlens_q, softmax_scale, window_left, softcap):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def write_kv_pages(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    slots: torch.Tensor,
    *,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    check_inputs: bool = True,
    slot_pages: torch.Tensor | None = None,
    slot_offsets: torch.Tensor | None = None,
) -> None:
    """Write new keys and values into their slots of a paged KV cache, in place.

    Args:
        k_new, v_new: `[num_tokens, num_kv_heads, head_dim]`, float16, bfloat16 or float32 (only
            head_dim need be contiguous).
        k_pages, v_pages: contiguous `[num_pages, num_kv_heads, page_size, head_dim]`, int8 (with
            the scales) or a float dtype (the tokens are cast to it); page_size a power of two >= 8.
        slots: int64 `[num_tokens]`, distinct, `page * page_size + offset` for each token.
        k_scales, v_scales: float32 `[num_pages, num_kv_heads, page_size]` for int8 pages, else None.
        check_inputs: False skips the reference path's checks, for a caller that built the inputs
            valid once for many layers (the serving runner; the kernel's launcher checks shapes).
        slot_pages, slot_offsets: the reference path's `slots // page_size` and `slots % page_size`,
            computed once for many layers; None computes them per call. The kernel needs neither.

    Int8 pages get `quantize_kv_ref`'s data and scales bit for bit; slots not written keep their
    contents. Raises ValueError on bad inputs (the slots' range and distinctness on CPU tensors
    only: on a GPU that check would wait for it). The Triton kernel runs where `triton_runs_on`
    says so, the reference in `fused_train.kernels.paged_kv_write_ref` elsewhere.
    """
    tensors = tuple(t for t in (k_new, v_new, slots, k_scales, v_scales) if isinstance(t, torch.Tensor))
    # The pages lead: this op has no matmul, so float32 tokens need no tf32 permission to take the kernel.
    if isinstance(k_pages, torch.Tensor) and triton_runs_on(k_pages, *tensors):
        write_kv_pages_op(k_new, v_new, k_pages, v_pages, slots, k_scales, v_scales)  # its launcher checks the inputs
        return
    if check_inputs:
        write_ref.check_write_kv_pages_inputs(k_new, v_new, k_pages, v_pages, slots, k_scales, v_scales)
    write_ref.write_kv_pages_ref(k_new, v_new, k_pages, v_pages, slots, k_scales, v_scales, slot_pages, slot_offsets)


def paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    *,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    window_left: int = -1,
    softcap: float = 0.0,
    check_inputs: bool = True,
    plan: attention_ref.PagedAttentionPlan | None = None,
) -> torch.Tensor:
    """Attention of a step's queries over each sequence's pages (decode, or chunks of a prefill).

    Args:
        q: `[total_q, num_heads, head_dim]`, float16, bfloat16 or float32 (float64 runs the
            reference); only head_dim need be contiguous.
        k_pages, v_pages: `[num_pages, num_kv_heads, page_size, head_dim]`, int8 (with the scales)
            or q's dtype; page_size a power of two >= 8; `num_heads` a multiple of `num_kv_heads`.
        page_table: int32 `[batch, max_pages_per_seq]`: token `j` of sequence `b` is in page
            `page_table[b, j // page_size]` at offset `j % page_size`; entries past a sequence's
            last page are never read.
        kv_lens: int32 `[batch]`, each sequence's tokens in its pages, this step's included; 0 for
            an empty sequence (a padded batch slot), whose queries get zeros.
        k_scales, v_scales: float32 `[num_pages, num_kv_heads, page_size]` for int8 pages, else None.
        cu_seqlens_q: int32 `[batch + 1]`: sequence `b`'s queries are `q[cu[b]:cu[b+1]]`, its
            last `n_b` tokens (0 allowed); None means one query per sequence (`total_q == batch`).
        softmax_scale: defaults to `head_dim ** -0.5`.
        window_left: a query at position p sees keys from `p - window_left` on; -1: no window.
        softcap: when > 0, scores become `softcap * tanh(scores / softcap)`.
        check_inputs: False skips the reference path's checks, for a caller that built the inputs
            valid once for many layers (the serving runner; the kernel's launcher checks shapes).
        plan: the reference path's `paged_attention_plan` of `page_table`, `kv_lens` and
            `cu_seqlens_q`, built once for many layers; None builds it per call. The kernel needs none.

    Returns `out` like `q` (contiguous), causal: a query at position p sees keys up to p. Raises
    ValueError on bad inputs; the values of `cu_seqlens_q`, `kv_lens` and `page_table` are read
    back on CPU tensors only (on a GPU that check would wait for it at every layer). The Triton
    kernel runs where `triton_runs_on` says so (float32 on a GPU only where tf32 matmuls are
    allowed), for head_dim up to 256; elsewhere the reference in
    `fused_train.kernels.paged_decode_attention_ref` runs (on CUDA tensors, with a one-time warning).
    """
    tensors = tuple(t for t in (k_pages, v_pages, page_table, kv_lens, k_scales, v_scales, cu_seqlens_q)
                    if isinstance(t, torch.Tensor))  # fmt: skip
    if isinstance(q, torch.Tensor) and triton_runs_on(q, *tensors):
        if q.dtype in attention_kernel.KERNEL_DTYPES and q.dim() == 3 and q.shape[-1] <= attention_kernel.MAX_HEAD_DIM:
            scale = None if softmax_scale is None else float(softmax_scale)
            return paged_decode_attention_op(
                q, k_pages, v_pages, page_table, kv_lens, k_scales, v_scales, cu_seqlens_q, scale, int(window_left),
                float(softcap),
            )  # fmt: skip
        warn_reference_path(q, f"paged_decode_attention {q.dtype}", (
            f"paged_decode_attention on {q.dtype} CUDA tensors of head_dim {q.shape[-1]} runs the PyTorch reference, "
            "which gathers every sequence's pages at every call: the kernel takes float16, bfloat16 and float32 up "
            f"to head_dim {attention_kernel.MAX_HEAD_DIM}."
        ))  # fmt: skip
    if check_inputs:
        attention_ref.check_paged_decode_attention_inputs(
            q, k_pages, v_pages, page_table, kv_lens, k_scales, v_scales, cu_seqlens_q, softmax_scale, window_left,
            softcap,
        )  # fmt: skip
    return attention_ref.paged_decode_attention_ref(
        q, k_pages, v_pages, page_table, kv_lens, k_scales, v_scales, cu_seqlens_q, softmax_scale, window_left, softcap,
        plan,
    )  # fmt: skip
