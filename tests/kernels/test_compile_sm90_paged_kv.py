"""Every shipped paged KV kernel config compiles for sm_90: wgmma where a dot has 64 rows, shared
memory, no spills, and 64-bit offsets into the pages (a pool passes 2**31 elements from 128k
pages of 16 tokens at 8 kv heads and head_dim 128) and into the new tokens of a write.

The compile runs in a subprocess, this file run as a script (tests/kernels/sm90.py says why).
Pointers and the strides of q, the pages and out carry the 16-divisibility Triton gives them at
launch for real shapes; the scales' and the page table's strides (multiples of the page size,
which may be 8, and of the table's width) and the lengths are compiled without it.

wgmma: plain decode runs 16 query rows (a GQA group of at most 16 heads times one query), below
the 64 rows wgmma needs, so it takes the older mma, as the contiguous int8 kernel does; chunks of
queries run BLOCK_M 64 with wgmma (tf32 for float32 q). The test asserts exactly that split.
The int8 write must be bit-exact with torch, as quantize-on-append is: its PTX divides with IEEE
rounding and keeps the rounding constant's two additions.
"""

import json

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tests.kernels.sm90 import SHARED_LIMIT, compile_for_sm90, compile_in_subprocess, triton_site_id, triton_sites

UNALIGNED = {"batch", "group", "blocks_per_seq", "window_left", "num_splits", "num_heads", "num_tokens",
             "stride_ksp", "stride_ksh", "stride_vsp", "stride_vsh", "stride_sp", "stride_sh", "stride_pt"}
# Offsets that stay small below int64 bases (q and out rows, a key's slot in its page, a head's
# scales, a row of the page table, a head of the new tokens) may be computed in 32 bits.
NARROW = {"stride_qt", "stride_qh", "stride_kt", "stride_vt", "stride_ksh", "stride_vsh", "stride_pt", "stride_ot",
          "stride_oh", "stride_knh", "stride_vnh", "stride_h", "stride_sh"}
KINDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8"}


def _split_variants():
    """(q dtype, pages dtype, head_dim, BLOCK_M, cu_seqlens_q, softcap, page_size, one split): each
    table entry at plain decode (16 rows, no cu_seqlens_q) and at chunks (its BLOCK_M, cu_seqlens_q),
    plus fp16, int8 pages under float32 q, softcap, head_dims below their block, page sizes 8 and 128
    and the one-split epilogue."""
    from fused_train.kernels import paged_decode_attention as attention

    bf16, fp16, fp32, int8 = torch.bfloat16, torch.float16, torch.float32, torch.int8
    representatives = {"int8": (bf16, int8), "16bit": (bf16, bf16), "fp32": (fp32, fp32)}
    variants = []
    for (kind, block_d), (_, block_m, _, _) in attention.CONFIGS.items():
        q_dtype, pages_dtype = representatives[kind]
        variants.append((q_dtype, pages_dtype, block_d, 16, False, False, 16, False))
        variants.append((q_dtype, pages_dtype, block_d, block_m, True, False, 16, False))
    variants += [(fp32, int8, 128, 16, False, False, 16, False), (fp16, int8, 80, 16, True, True, 8, True),
                 (fp16, fp16, 32, 64, True, False, 128, True), (bf16, int8, 128, 16, False, False, 16, True)]
    return variants


def _signature(fn, kinds):
    signature = {}
    for arg in (param.name for param in fn.params if not param.is_constexpr):
        if arg in kinds:
            signature[arg] = f"*{kinds[arg]}"
        elif arg in ("qk_scale", "scale_over_softcap", "softcap_log2"):
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    return signature


def _attrs(fn, signature):
    return {
        (fn.arg_names.index(arg),): [["tt.divisibility", 16]]
        for arg, kind in signature.items()
        if kind.startswith("*") or (kind == "i32" and arg not in UNALIGNED)
    }


def _compile(name, fn, kinds, constexprs, num_warps, num_stages):
    signature = _signature(fn, kinds)
    wide = [arg for arg in signature if arg.startswith("stride") and arg not in NARROW]
    kernel = compile_for_sm90(fn, signature, constexprs, _attrs(fn, signature), num_warps, num_stages, wide)
    return dict(name=name, **kernel)


def _quantize_ptx_is_exact(fn, kinds, constexprs, num_warps):
    """The int8 write divides with IEEE rounding and keeps both additions of the rounding constant
    (kernels/int8_kv_quantize.py says why); the same compile as `_compile`'s, from Triton's cache."""
    signature = _signature(fn, kinds)
    ptx = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=_attrs(fn, signature)),
        target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 1},
    ).asm["ptx"]
    magic, minus_magic = "0f4B400000", "0fCB400000"  # +-1.5 * 2**23 as float32 bits
    return ("div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx and magic in ptx
            and minus_magic in ptx)


def _compile_all():
    from fused_train.kernels import paged_decode_attention as attention
    from fused_train.kernels import paged_kv_write as write
    from fused_train.kernels.int8_decode_attention import MAX_SPLITS, block_d_at_least_16

    results = []
    for q_dtype, pages_dtype, head_dim, block_m, has_cu, softcap, page_size, one_split in _split_variants():
        q_kind, pages_kind = KINDS[q_dtype], KINDS[pages_dtype]
        has_scales = pages_dtype == torch.int8
        block_d = block_d_at_least_16(head_dim)
        block_n, _, num_warps, num_stages = attention.CONFIGS[attention.config_key(q_dtype, pages_dtype, head_dim)]
        kinds = dict(Q=q_kind, KPages=pages_kind, VPages=pages_kind, KScales="fp32" if has_scales else "i32",
                     VScales="fp32" if has_scales else "i32", PageTable="i32", KvLens="i32", CuSeqlensQ="i32",
                     PartOut="fp32", PartLse="fp32", Out=q_kind)
        constexprs = dict(HAS_SCALES=has_scales, HAS_CU=has_cu, SOFTCAP=softcap, PAGE_SIZE=page_size,
                          HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=False,
                          ONE_SPLIT=one_split)
        name = (f"split q {q_kind} pages {pages_kind} head_dim {head_dim} BLOCK_M {block_m} page_size {page_size}"
                f"{' cu_seqlens_q' if has_cu else ''}{' softcap' if softcap else ''}"
                f"{' one split' if one_split else ''}")
        result = _compile(name, attention._paged_decode_attention_split_kernel, kinds, constexprs, num_warps,
                          num_stages)
        result["expect_wgmma"] = block_m % 64 == 0
        results.append(result)
    result = _compile(f"combine bf16 head_dim 256 {MAX_SPLITS} splits",
                      attention._paged_decode_attention_combine_kernel,
                      dict(PartOut="fp32", PartLse="fp32", Out="bf16"),
                      dict(HEAD_DIM=256, BLOCK_D=256, BLOCK_S=MAX_SPLITS), attention.COMBINE_WARPS, 1)  # fmt: skip
    result["expect_wgmma"] = None  # a weighted sum over splits, no matmul
    results.append(result)
    for new, pages, quantize in (("bf16", "i8", True), ("fp16", "bf16", False)):
        kinds = dict(KNew=new, VNew=new, KPages=pages, VPages=pages, KScales="fp32" if quantize else "i64",
                     VScales="fp32" if quantize else "i64", Slots="i64")
        constexprs = dict(QUANTIZE=quantize, PAGE_SIZE=16, HEAD_DIM=128, BLOCK_D=128,
                          BLOCK_T=write._ELEMENTS_PER_PROGRAM // 128)
        result = _compile(f"write {new} into {pages} pages", write._write_kv_pages_kernel, kinds, constexprs,
                          write._NUM_WARPS, 1)
        result["expect_wgmma"] = None
        if quantize:
            result["exact"] = _quantize_ptx_is_exact(write._write_kv_pages_kernel, kinds, constexprs, write._NUM_WARPS)
        results.append(result)
    return results


@pytest.fixture(scope="module", params=triton_sites(), ids=triton_site_id)
def compiled(request):
    return compile_in_subprocess(__file__, timeout=900, triton_site=request.param)


def test_every_paged_kv_config_compiles_for_sm90(compiled):
    assert len(compiled) == len(_split_variants()) + 1 + 2
    for kernel in compiled:
        assert kernel["expect_wgmma"] is None or kernel["wgmma"] == kernel["expect_wgmma"], kernel
        assert kernel["shared"] <= SHARED_LIMIT, kernel
        assert kernel["REG"] <= 255 and kernel["STACK"] == 0 and kernel["LOCAL"] == 0, kernel
        assert kernel["narrow"] == [], kernel
        assert kernel.get("exact", True), kernel


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
