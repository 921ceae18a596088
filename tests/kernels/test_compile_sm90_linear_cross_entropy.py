"""Every shipped linear cross-entropy kernel config compiles for sm_90: wgmma for every dot, shared
memory, no spills with a margin, and 64-bit offsets along the rows of x, W, dz, dx and dW.

The compile runs in a subprocess, this file run as a script (tests/kernels/sm90.py says why).
Pointers, hidden sizes and strides carry the 16-divisibility real shapes give (hidden 4096); the
vocabulary is compiled with it (32000, 128256) and without (32003: a tokenizer's added tokens), and
every variant must stay within the limits, without spills.
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

FWD_ARGS = (
    "x_ptr w_ptr bias_ptr labels_ptr part_ptr T V H tiles_per_split stride_xt stride_wv stride_part softcap"
).split()
DLOGITS_ARGS = (
    "x_ptr w_ptr bias_ptr labels_ptr stats_ptr grad_ptr dz_ptr db_part_ptr T V H first_col stride_xt stride_wv "
    "stride_dzt stride_db_part ignore_index softcap smoothing z_loss"
).split()
MATMUL_ARGS = "a_ptr b_ptr acc_ptr out_ptr M N K stride_am stride_ak stride_bk stride_bn stride_acc stride_out".split()
# Never 16-divisible in general (T, M and K count tokens or a chunk's last columns), or scalars.
UNALIGNED = {"T", "M", "K", "tiles_per_split", "ignore_index", "softcap", "smoothing", "z_loss"}

# Of the 255 registers a thread may hold: a margin for another Triton's allocation (3.6 on the GPU machine).
REGISTER_BUDGET = 240
# How the backward launches `_matmul_kernel` (`_matmul_signature`).
MATMUL_WAYS = ("dW", "dx", "dx sum", "dx last")


def _variants():
    """(kernel, dtype, variant, vocabulary 16-divisible): the forward and dlogits kernels with bias
    and softcap or without (and dbias with them), the GEMMs as the backward launches them."""
    return [
        ("fwd", "bf16", True, True),
        ("fwd", "fp16", False, True),
        ("fwd", "fp32", True, True),
        ("fwd", "bf16", True, False),
        ("dlogits", "bf16", False, True),  # LoRA: lm_head frozen, no bias
        ("dlogits", "bf16", True, True),
        ("dlogits", "fp16", False, True),
        ("dlogits", "fp32", True, True),
        ("dlogits", "bf16", True, False),
        *[("matmul", dtype, way, True) for dtype in ("bf16", "fp16", "fp32") for way in MATMUL_WAYS],
    ]


def _matmul_signature(dtype, way):
    """dW: `dzᵀ · x` (dz read across its rows); dx: `dz · W`, at once ("dx"), into the fp32 sum
    over the vocab chunks ("dx sum"), or the sum's last chunk, rounded to the input dtype ("dx last")."""
    out = "fp32" if way == "dx sum" else dtype
    kinds = [f"*{dtype}", f"*{dtype}", "*fp32" if way.startswith("dx ") else f"*{out}", f"*{out}"] + ["i32"] * 9
    signature = dict(zip(MATMUL_ARGS, kinds))
    unit_strides = ("stride_am", "stride_bn") if way == "dW" else ("stride_ak", "stride_bn")
    signature |= {stride: "constexpr" for stride in unit_strides}
    return signature, {stride: 1 for stride in unit_strides} | dict(LOAD_ACC=way.startswith("dx "))


def _compile_all():
    from fused_train.kernels import linear_cross_entropy as lce

    results = []
    for kind, dtype, variant, aligned in _variants():
        config_name = "fp32" if dtype == "fp32" else "16bit"
        if kind == "fwd":
            fn, config = lce._lce_fwd_kernel, lce.FWD_CONFIGS[config_name]
            kinds = [f"*{dtype}"] * 3 + ["*i64", "*fp32"] + ["i32"] * 7 + ["fp32"]
            signature = dict(zip(FWD_ARGS, kinds))
            constexprs = dict(HAS_BIAS=variant, HAS_SOFTCAP=variant)
            wide = ["stride_xt", "stride_wv"]
        elif kind == "dlogits":
            fn, config = lce._lce_dlogits_kernel, lce.DLOGITS_CONFIGS[config_name]
            kinds = [f"*{dtype}"] * 3 + ["*i64", "*fp32", "*fp32", f"*{dtype}", "*fp32"] + ["i32"] * 9 + ["fp32"] * 3
            signature = dict(zip(DLOGITS_ARGS, kinds))
            constexprs = dict(HAS_BIAS=variant, HAS_SOFTCAP=variant, COMPUTE_DB=variant)
            wide = ["stride_xt", "stride_wv", "stride_dzt", "stride_db_part"]
        else:
            fn, config = lce._matmul_kernel, lce.MATMUL_CONFIGS[config_name]
            signature, constexprs = _matmul_signature(dtype, variant)
            wide = [arg for arg in ("stride_am", "stride_ak", "stride_bk", "stride_acc", "stride_out")
                    if arg in signature and signature[arg] == "i32"]  # fmt: skip
        constexprs |= {k: v for k, v in config.items() if k.startswith("BLOCK")} | dict(UPCAST=False)
        # Without a 16-divisible vocabulary, V and dbias's row stride (V) are not.
        unaligned = UNALIGNED if aligned else UNALIGNED | {"V", "stride_db_part"}
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, (arg, type_) in enumerate(signature.items())
            if arg not in unaligned and type_ != "constexpr"
        }
        usage = compile_for_sm90(fn, signature, constexprs, attrs, config["num_warps"], config["num_stages"], wide)
        extras = variant if kind != "matmul" else False
        name = f"{kind} {dtype}{' bias softcap' if extras else ''}{f' {variant}' if kind == 'matmul' else ''}"
        results.append(dict(name=name, aligned=aligned, **usage))
    return results


@pytest.fixture(scope="module", params=triton_sites(), ids=triton_site_id)
def compiled(request):
    return compile_in_subprocess(__file__, timeout=600, triton_site=request.param)


def test_every_linear_cross_entropy_config_compiles_for_sm90(compiled):
    assert len(compiled) == len(_variants())
    for kernel in compiled:
        assert kernel["shared"] <= SHARED_LIMIT, kernel
        assert kernel["wgmma"], kernel
        assert kernel["narrow"] == [], kernel
        assert kernel["STACK"] == 0 and kernel["LOCAL"] == 0, kernel
        # The forward (unchanged) uses up to 254 registers without spilling; the backward keeps a margin.
        assert kernel["REG"] <= (255 if kernel["name"].startswith("fwd") else REGISTER_BUDGET), kernel


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
