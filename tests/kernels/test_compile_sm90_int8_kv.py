"""Every shipped int8 KV cache kernel config compiles for sm_90: shared memory, no spills, and 64-bit
offsets into the cache and the new keys (one head's cache passes 2**31 elements at 16M positions).

The compile runs in a subprocess, this file run as a script (tests/kernels/sm90.py says why).
Pointers and the strides of q, the int8 tiles and out carry the 16-divisibility Triton gives them
at launch for real shapes (rows of head_dim 80 or 96 elements too); the scales' strides (multiples
of the capacity) and the lengths are compiled without it.

wgmma: the decode kernel's tl.dot has 16 query rows in plain decode (a GQA group of at most 8
heads times one query, padded) and wgmma needs a block M that is a multiple of 64, so BLOCK_M 16
takes the older mma; that is fine for a kernel bound by reading the cache, whose dots are small.
BLOCK_M 64 (chunks of queries, group * num_queries > 16) takes wgmma (tf32 for float32 q); the
test asserts exactly that split, so a change of lowering shows up.

The quantize kernel must be bit-exact with torch: its PTX must divide with IEEE rounding
(div.rn.f32, not div.full/div.approx) and keep both additions of the rounding constant
(kernels/int8_kv_quantize.py says why).
"""

import json

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tests.kernels.sm90 import (
    SHARED_LIMIT,
    compile_for_sm90,
    compile_in_subprocess,
    triton_site_id,
    triton_sites,
)

HEAD_DIMS_16BIT = (16, 32, 64, 80, 96, 128, 256)
HEAD_DIMS_FP32 = (16, 32, 64, 128, 256)
UNALIGNED = {"kv_len", "num_queries", "group", "num_kv_heads", "num_splits", "window_left", "new_tokens", "start",
             "stride_ksb", "stride_ksh", "stride_vsb", "stride_vsh", "stride_sb", "stride_sh", "exact_from",
             "residual_length"}


def _split_variants():
    """(dtype, head_dim, BLOCK_M, softcap, exact ring): every table entry at its two row blocks (16
    and the table's) with the exact ring Int8KVCache uses by default, plus softcap, fp16, and a
    cache without the ring."""
    from fused_train.kernels import int8_decode_attention as decode

    def block_ms(table, head_dim):
        return sorted({16, table[decode.block_d_at_least_16(head_dim)][1]})

    variants = [("bf16", d, m, False, True) for d in HEAD_DIMS_16BIT for m in block_ms(decode.CONFIGS, d)]
    variants += [("fp32", d, m, False, True) for d in HEAD_DIMS_FP32 for m in block_ms(decode.CONFIGS_FP32, d)]
    variants += [("bf16", 256, 16, True, True), ("fp16", 128, 16, False, True), ("fp16", 128, 64, False, True)]
    variants += [("bf16", 128, 16, False, False), ("bf16", 64, 64, False, False), ("fp32", 128, 16, False, False)]
    return variants


def _compile_all():
    from fused_train.kernels import int8_decode_attention as decode
    from fused_train.kernels import int8_kv_quantize as quantize

    def compile_one(name, fn, kinds, constexprs, num_warps, num_stages, narrow_args=()):
        """`kinds` maps pointer arguments to their element type; other arguments are i32 or, for
        scales, fp32. Every stride but `narrow_args` must multiply in 64 bits."""
        signature = {}
        for arg in (param.name for param in fn.params if not param.is_constexpr):
            if arg in kinds:
                signature[arg] = f"*{kinds[arg]}"
            elif "scale" in arg and not arg.startswith("stride") or "softcap" in arg:
                signature[arg] = "fp32"
            else:
                signature[arg] = "i32"
        attrs = {
            (fn.arg_names.index(arg),): [["tt.divisibility", 16]]
            for arg, kind in signature.items()
            if kind.startswith("*") or (kind == "i32" and arg not in UNALIGNED)
        }
        wide = [arg for arg in signature if arg.startswith("stride") and arg not in narrow_args]
        kernel = compile_for_sm90(fn, signature, constexprs, attrs, num_warps, num_stages, wide)
        return dict(name=name, **kernel)

    results = []
    for dtype, head_dim, block_m, softcap, has_recent in _split_variants():
        block_d = decode.block_d_at_least_16(head_dim)
        block_n, _, num_warps, num_stages = (decode.CONFIGS_FP32 if dtype == "fp32" else decode.CONFIGS)[block_d]
        kinds = dict(Q=dtype, K="i8", KScale="fp32", V="i8", VScale="fp32", KeyStart="i32", KRecent=dtype,
                     VRecent=dtype, PartOut="fp32", PartLse="fp32")
        constexprs = dict(HAS_KEY_START=True, HAS_RECENT=has_recent, SOFTCAP=softcap, HEAD_DIM=head_dim,
                          BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=False)
        name = (f"split {dtype} head_dim {head_dim} BLOCK_M {block_m}{' softcap' if softcap else ''}"
                f"{'' if has_recent else ' no ring'}")
        # Below their int64 (sequence, head) bases, q and the exact ring are small.
        result = compile_one(name, decode._int8_decode_attention_split_kernel, kinds, constexprs, num_warps,
                             num_stages, ("stride_qh", "stride_qt", "stride_krt", "stride_vrt"))
        result["expect_wgmma"] = block_m % 64 == 0
        results.append(result)
    for dtype, head_dim, block_s in (("bf16", 256, decode.MAX_SPLITS), ("fp32", 128, 1), ("fp16", 80, 4)):
        block_d = decode.block_d_at_least_16(head_dim)
        result = compile_one(
            f"combine {dtype} head_dim {head_dim} {block_s} splits", decode._int8_decode_attention_combine_kernel,
            dict(PartOut="fp32", PartLse="fp32", Out=dtype), dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=block_s),
            decode.COMBINE_WARPS, 1, ("stride_oh", "stride_ot"),
        )
        result["expect_wgmma"] = None  # a weighted sum over splits, no matmul
        results.append(result)
    for dtype, head_dim in (("bf16", 128), ("fp32", 256), ("fp16", 80)):
        block_d = quantize.triton.next_power_of_2(head_dim)
        result = compile_one(
            f"quantize {dtype} head_dim {head_dim}", quantize._quantize_kv_append_kernel,
            dict(X=dtype, Data="i8", Scale="fp32"),
            dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=quantize._ELEMENTS_PER_PROGRAM // block_d),
            quantize._NUM_WARPS, 1,
        )
        result["expect_wgmma"] = None
        results.append(result)
    return results, _quantize_ptx_is_exact(quantize._quantize_kv_append_kernel)


def _quantize_ptx_is_exact(fn):
    signature = {"X": "*bf16", "Data": "*i8", "Scale": "*fp32"}
    signature |= {arg: "i32" for arg in fn.arg_names[3:] if arg not in ("HEAD_DIM", "BLOCK_D", "BLOCK_T")}
    ptx = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_T=32)),
        target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 1},
    ).asm["ptx"]
    magic, minus_magic = "0f4B400000", "0fCB400000"  # +-1.5 * 2**23 as float32 bits
    return ("div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx and magic in ptx
            and minus_magic in ptx)


@pytest.fixture(scope="module", params=triton_sites(), ids=triton_site_id)
def compiled(request):
    return compile_in_subprocess(__file__, timeout=900, triton_site=request.param)


def test_every_int8_kv_config_compiles_for_sm90(compiled):
    kernels, _ = compiled
    assert len(kernels) == len(_split_variants()) + 3 + 3
    for kernel in kernels:
        assert kernel["expect_wgmma"] is None or kernel["wgmma"] == kernel["expect_wgmma"], kernel
        assert kernel["shared"] <= SHARED_LIMIT, kernel
        assert kernel["REG"] <= 255 and kernel["STACK"] == 0 and kernel["LOCAL"] == 0, kernel
        assert kernel["narrow"] == [], kernel


def test_quantize_divides_and_rounds_exactly_on_sm90(compiled):
    _, exact = compiled
    assert exact


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
