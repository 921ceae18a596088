"""Every shipped varlen attention config compiles for sm_90: wgmma, shared memory, no spills, and
every stride multiplies in 64 bits (packed batches and long documents pass 2**31 elements).

The compile runs in a subprocess, this file run as a script (tests/kernels/sm90.py says why).
Pointers and strides carry the 16-divisibility Triton gives them at launch for real shapes
(head_dim 80 and 96 rows too: their strides are multiples of 16 elements).
"""

import json

import pytest

from tests.kernels.sm90 import (
    SHARED_LIMIT,
    compile_for_sm90,
    compile_in_subprocess,
    triton_site_id,
    triton_sites,
)

HEAD_DIMS_16BIT = (32, 64, 80, 96, 128, 256)
HEAD_DIMS_FP32 = (32, 64, 128)
KERNELS = ("fwd", "dkdv", "dq")


def _variants():
    """(dtype, head_dim, softcap) for every config in the tables, plus softcap (Gemma 2: head_dim 256) and fp16."""
    variants = [("bf16", head_dim, False) for head_dim in HEAD_DIMS_16BIT]
    variants += [("fp32", head_dim, False) for head_dim in HEAD_DIMS_FP32]
    variants += [("bf16", 128, True), ("bf16", 256, True), ("fp16", 128, False)]
    return variants


def _compile_all():
    from fused_train.kernels import varlen_attention as va

    kernels = {
        "fwd": (va._varlen_attention_fwd_kernel, (va.FWD_CONFIGS, va.FWD_CONFIGS_FP32)),
        "dkdv": (va._varlen_attention_bwd_dkdv_kernel, (va.BWD_DKDV_CONFIGS, va.BWD_DKDV_CONFIGS_FP32)),
        "dq": (va._varlen_attention_bwd_dq_kernel, (va.BWD_DQ_CONFIGS, va.BWD_DQ_CONFIGS_FP32)),
    }
    # Runtime integers that Triton does not specialize (do_not_specialize), or that vary.
    unaligned = {"batch", "group", "stride_lse_h", "window_left", "window_right", "total_q", "stride_delta_h"}

    def signature_of(fn, dtype):
        signature = {}
        for name in (param.name for param in fn.params if not param.is_constexpr):
            if name in ("Lse", "Delta", "dLse"):
                signature[name] = "*fp32"
            elif name.startswith("cu_seqlens"):
                signature[name] = "*i32"
            elif name[0].isupper() or name[:2] in ("dK", "dV", "dQ", "dO"):
                signature[name] = f"*{dtype}"
            elif "scale" in name or "softcap" in name:
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        return signature

    def compile_one(name, fn, dtype, constexprs, num_warps, num_stages):
        signature = signature_of(fn, dtype)
        attrs = {
            (fn.arg_names.index(arg),): [["tt.divisibility", 16]]
            for arg, kind in signature.items()
            if kind.startswith("*") or (kind == "i32" and arg not in unaligned)
        }
        strides = [arg for arg in signature if arg.startswith("stride")]
        return dict(name=name, **compile_for_sm90(fn, signature, constexprs, attrs, num_warps, num_stages, strides))

    results = []
    for dtype, head_dim, softcap in _variants():
        block_d = va.block_d_at_least_32(head_dim)
        for kind in KERNELS:
            fn, (table_16bit, table_fp32) = kernels[kind]
            config = (table_fp32 if dtype == "fp32" else table_16bit)[block_d]
            block_m, block_n, num_warps, num_stages = config[:4]
            constexprs = dict(SOFTCAP=softcap, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                              UPCAST=False)
            if kind == "dkdv":
                constexprs["D_SPLIT"] = config[4]
            name = f"{kind} {dtype} head_dim {head_dim}{' softcap' if softcap else ''}"
            results.append(compile_one(name, fn, dtype, constexprs, num_warps, num_stages))
    delta = compile_one("delta bf16 head_dim 128", va._varlen_attention_bwd_delta_kernel, "bf16",
                        dict(HAS_DLSE=True, HEAD_DIM=128, BLOCK_D=128, BLOCK_T=va._DELTA_BLOCK_T), 4, 1)
    delta["wgmma"] = None  # a row reduction, no matmul
    results.append(delta)
    return results


@pytest.fixture(scope="module", params=triton_sites(), ids=triton_site_id)
def compiled(request):
    return compile_in_subprocess(__file__, timeout=900, triton_site=request.param)


def test_every_varlen_attention_config_compiles_for_sm90(compiled):
    assert len(compiled) == len(_variants()) * len(KERNELS) + 1
    for kernel in compiled:
        assert kernel["wgmma"] in (True, None), kernel
        assert kernel["shared"] <= SHARED_LIMIT, kernel
        assert kernel["REG"] <= 255 and kernel["STACK"] == 0 and kernel["LOCAL"] == 0, kernel
        assert kernel["narrow"] == [], kernel


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
