"""Writes of new keys and values into a paged KV cache: the Triton kernel and its launcher.

The layout is in `paged_kv_write_ref` (its module docstring), beside the input checks and the
plain-PyTorch reference, which need no Triton; this module re-exports them.
"""

# ---------------------------------------------------------------------------------------------
# Triton kernel: one launch for K and V. Grid (block of tokens, kv head, 0 for K / 1 for V); each
# program loads its tokens' head vectors, quantizes them (int8 pages: `quantize_rows`, bit-exact
# with `quantize_kv_ref`, see kernels/int8_kv_quantize.py) or casts them (float pages), and stores
# them at their slots: page = slot // page_size, offset = slot % page_size. Offsets into the pages
# are int64 (a pool passes 2**31 elements); slots are int64 already. Offsets into the new tokens
# are int64 too: a long prefill's keys at many heads can pass 2**31 elements.
# ---------------------------------------------------------------------------------------------


import triton
import triton.language as tl

from .int8_kv_quantize import quantize_rows
from .launch import interpreting, on_device_of_first_argument
from .paged_kv_write_ref import check_write_kv_pages_inputs, write_kv_pages_ref  # noqa: F401

# Elements per program, as for quantize-on-append: [32, 128] at head_dim 128; the interpreter
# takes 4 tokens so that short test writes cross several blocks.
_ELEMENTS_PER_PROGRAM = 4096
_INTERPRETER_BLOCK_T = 4
_NUM_WARPS = 4


@triton.jit
def _write_block(New, Pages, Scales, tokens, token_ok, pages, offsets, head, stride_nt, stride_nh, stride_p,
                 stride_h, stride_t, stride_sp, stride_sh, QUANTIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    mask = token_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    x = tl.load(New + tokens.to(tl.int64)[:, None] * stride_nt + head * stride_nh + offs_d[None, :], mask=mask,
                other=0.0)
    dest = Pages + (pages * stride_p + head * stride_h + offsets * stride_t)[:, None] + offs_d[None, :]
    if QUANTIZE:
        data, scale = quantize_rows(x)
        tl.store(dest, data, mask=mask)
        tl.store(Scales + pages * stride_sp + head * stride_sh + offsets, scale, mask=token_ok)
    else:
        tl.store(dest, x.to(Pages.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _write_kv_pages_kernel(
    KNew, VNew, KPages, VPages, KScales, VScales, Slots, num_tokens,
    stride_knt, stride_knh, stride_vnt, stride_vnh, stride_p, stride_h, stride_t, stride_sp, stride_sh,
    QUANTIZE: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    token_ok = tokens < num_tokens
    slots = tl.load(Slots + tokens, mask=token_ok, other=0)
    pages = slots // PAGE_SIZE
    offsets = slots % PAGE_SIZE
    # K and V pools share one shape and layout (checked), hence one set of page strides.
    if tl.program_id(2) == 0:
        _write_block(KNew, KPages, KScales, tokens, token_ok, pages, offsets, head, stride_knt, stride_knh, stride_p,
                     stride_h, stride_t, stride_sp, stride_sh, QUANTIZE, HEAD_DIM, BLOCK_D)
    else:
        _write_block(VNew, VPages, VScales, tokens, token_ok, pages, offsets, head, stride_vnt, stride_vnh, stride_p,
                     stride_h, stride_t, stride_sp, stride_sh, QUANTIZE, HEAD_DIM, BLOCK_D)


@on_device_of_first_argument
def write_kv_pages(k_new, v_new, k_pages, v_pages, slots, k_scales=None, v_scales=None):
    """Write `k_new`/`v_new` `[num_tokens, num_kv_heads, head_dim]` at `slots` of the pages, in
    place: int8 pages bit-exact with `quantize_kv_ref`, float pages cast. Other slots are untouched."""
    check_write_kv_pages_inputs(k_new, v_new, k_pages, v_pages, slots, k_scales, v_scales)
    num_tokens, num_kv_heads, head_dim = k_new.shape
    if num_tokens == 0:
        return
    quantize = k_scales is not None
    block_d = triton.next_power_of_2(head_dim)
    block_t = _INTERPRETER_BLOCK_T if interpreting() else max(1, _ELEMENTS_PER_PROGRAM // block_d)
    scales = (k_scales, v_scales) if quantize else (slots, slots)  # unread placeholders
    _write_kv_pages_kernel[(triton.cdiv(num_tokens, block_t), num_kv_heads, 2)](
        k_new, v_new, k_pages, v_pages, *scales, slots, num_tokens,
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        k_scales.stride(0) if quantize else 0, k_scales.stride(1) if quantize else 0,
        QUANTIZE=quantize, PAGE_SIZE=k_pages.shape[2], HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t,
        num_warps=_NUM_WARPS,
    )
