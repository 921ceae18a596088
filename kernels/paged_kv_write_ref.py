"""Writes of new keys and values into a paged KV cache (the layout of `paged_decode_attention_ref`).

`k_new`/`v_new` `[num_tokens, num_kv_heads, head_dim]` go to `slots` int64 `[num_tokens]`, distinct,
`slot = page * page_size + offset`: token `i`'s head vectors land in `k_pages[page, :, offset]`.
Int8 pages (with `k_scales`/`v_scales`) store them quantized exactly as `quantize_kv_ref` does
(int8 data and one float32 scale per token and kv head); float pages store them cast to the
pages' dtype. Slots not in `slots` are left untouched.

This module holds the reference and the input checks, without Triton; the kernel is in
`paged_kv_write.py`.
"""

import torch

from .int8_kv_quantize_ref import KERNEL_DTYPES, MAX_HEAD_DIM, quantize_kv_ref
from .launch import describe
from .paged_decode_attention_ref import MIN_PAGE_SIZE, cast_to


def write_kv_pages_ref(k_new, v_new, k_pages, v_pages, slots, k_scales=None, v_scales=None, slot_pages=None,
                       slot_offsets=None):  # fmt: skip
    """Plain PyTorch: index writes of the (quantized) tokens, in place. `slot_pages` and
    `slot_offsets`: `slots // page_size` and `slots % page_size`, for a caller that writes many
    layers at one step's slots (None: computed here)."""
    if slot_pages is None:
        page_size = k_pages.shape[2]
        slot_pages, slot_offsets = slots // page_size, slots % page_size
    if k_scales is None:
        k_pages[slot_pages, :, slot_offsets] = cast_to(k_new, k_pages.dtype)
        v_pages[slot_pages, :, slot_offsets] = cast_to(v_new, v_pages.dtype)
        return
    # Keys and values quantized in one call (each head vector has its own scale): half the torch calls.
    data, scale = quantize_kv_ref(torch.stack([k_new, v_new]))
    k_pages[slot_pages, :, slot_offsets], v_pages[slot_pages, :, slot_offsets] = data
    k_scales[slot_pages, :, slot_offsets], v_scales[slot_pages, :, slot_offsets] = scale


def check_write_kv_pages_inputs(k_new, v_new, k_pages, v_pages, slots, k_scales, v_scales):
    """Raise ValueError naming the argument when inputs break the layout in the module docstring.

    The slots' range and distinctness are checked on CPU tensors only: reading CUDA tensors back
    would make the host wait for the GPU at every layer of every step."""
    for name, new in (("k_new", k_new), ("v_new", v_new)):
        if not isinstance(new, torch.Tensor) or new.dim() != 3 or new.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{name} must be a float16, bfloat16 or float32 tensor [num_tokens, num_kv_heads, "
                             f"head_dim], got {describe(new)}")
    if k_new.shape != v_new.shape:
        raise ValueError(f"k_new and v_new must have one shape, got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
    num_tokens, num_kv_heads, head_dim = k_new.shape
    for name, pages in (("k_pages", k_pages), ("v_pages", v_pages)):
        if (not isinstance(pages, torch.Tensor) or pages.dim() != 4
                or not (pages.dtype == torch.int8 or pages.dtype.is_floating_point)):
            raise ValueError(f"{name} must be an int8 or float tensor [num_pages, num_kv_heads, page_size, head_dim], "
                             f"got {describe(pages)}")
        if not pages.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {pages.stride()}")
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages must have one shape and dtype, got {describe(k_pages)} and "
                         f"{describe(v_pages)}")
    num_pages, pool_heads, page_size, pool_head_dim = k_pages.shape
    if (pool_heads, pool_head_dim) != (num_kv_heads, head_dim):
        raise ValueError(f"k_pages' num_kv_heads and head_dim {(pool_heads, pool_head_dim)} must equal k_new's "
                         f"{(num_kv_heads, head_dim)}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    if page_size < MIN_PAGE_SIZE or page_size & (page_size - 1):
        raise ValueError(f"page_size (k_pages.shape[2]) must be a power of two >= {MIN_PAGE_SIZE}, got {page_size}")
    for name, new in (("k_new", k_new), ("v_new", v_new)):
        if new.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride 1), got strides {new.stride()}")
    tensors = {"k_new": k_new, "v_new": v_new, "k_pages": k_pages, "v_pages": v_pages}
    if k_pages.dtype == torch.int8:
        for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
            if (not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32
                    or scales.shape != k_pages.shape[:3] or not scales.is_contiguous()):
                raise ValueError(f"{name} must be a contiguous float32 tensor {list(k_pages.shape[:3])} (int8 pages "
                                 f"without head_dim), got {describe(scales)}")
            tensors[name] = scales
    elif k_scales is not None or v_scales is not None:
        raise ValueError(f"k_scales and v_scales must be None for {k_pages.dtype} pages (they are for int8 pages)")
    if not isinstance(slots, torch.Tensor) or slots.dtype != torch.int64 or slots.shape != (num_tokens,):
        raise ValueError(f"slots must be an int64 tensor [num_tokens={num_tokens}], got {describe(slots)}")
    tensors["slots"] = slots
    if len({t.device for t in tensors.values()}) != 1:
        raise ValueError(f"{', '.join(tensors)} must be on one device, got {[str(t.device) for t in tensors.values()]}")
    if slots.device.type == "cpu" and num_tokens:
        capacity = num_pages * page_size
        if slots.min() < 0 or slots.max() >= capacity:
            raise ValueError(f"slots must be in [0, num_pages * page_size = {capacity}), got values from "
                             f"{int(slots.min())} to {int(slots.max())}")
        if slots.unique().numel() != num_tokens:
            raise ValueError("slots must be distinct: two tokens written to one slot leave either")
