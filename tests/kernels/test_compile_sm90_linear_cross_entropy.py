"""Every shipped linear cross-entropy kernel config compiles for sm_90: wgmma for its three dots,
shared memory, no spills, and 64-bit offsets along the rows of x, W, dx and dW.

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

FWD_ARGS = "x_ptr w_ptr bias_ptr labels_ptr part_ptr T V H tiles_per_split stride_xt stride_wv stride_part softcap".split()
BWD_ARGS = (
    "x_ptr w_ptr bias_ptr labels_ptr stats_ptr grad_ptr dx_ptr dw_ptr db_ptr T V H stride_xt stride_wv stride_dxt "
    "stride_dwv ignore_index softcap smoothing z_loss"
).split()
UNALIGNED = {"T", "tiles_per_split", "ignore_index", "softcap", "smoothing", "z_loss"}


def _variants():
    """(pass, dtype, bias and softcap, (dx, dW, dbias) for the backward, vocabulary 16-divisible)."""
    return [
        ("fwd", "bf16", True, None, True),
        ("fwd", "fp16", False, None, True),
        ("fwd", "fp32", True, None, True),
        ("fwd", "bf16", True, None, False),
        ("bwd", "bf16", False, (True, False, False), True),  # LoRA: lm_head frozen
        ("bwd", "bf16", True, (True, True, True), True),
        ("bwd", "fp16", False, (True, True, False), True),
        ("bwd", "fp32", True, (True, True, True), True),
        ("bwd", "bf16", True, (True, True, True), False),
    ]


def _compile_all():
    from fused_train.kernels import linear_cross_entropy as lce

    results = []
    for kind, dtype, extras, computes, aligned in _variants():
        if kind == "fwd":
            fn, args, config = lce._lce_fwd_kernel, FWD_ARGS, lce.FWD_CONFIGS
            kinds = [f"*{dtype}"] * 3 + ["*i64", "*fp32"] + ["i32"] * 7 + ["fp32"]
            wide = ["stride_xt", "stride_wv"]
            flags = {}
        else:
            fn, args, config = lce._lce_bwd_kernel, BWD_ARGS, lce.BWD_CONFIGS
            kinds = [f"*{dtype}"] * 3 + ["*i64"] + ["*fp32"] * 5 + ["i32"] * 8 + ["fp32"] * 3
            wide = ["stride_xt", "stride_wv", "stride_dxt", "stride_dwv"]
            flags = dict(zip(("COMPUTE_DX", "COMPUTE_DW", "COMPUTE_DB"), computes))
            flags["COMPUTE_DB"] = flags["COMPUTE_DB"] and extras
        config = config["fp32" if dtype == "fp32" else "16bit"]
        signature = dict(zip(args, kinds))
        constexprs = flags | {k: v for k, v in config.items() if k.startswith("BLOCK")}
        constexprs |= dict(HAS_BIAS=extras, HAS_SOFTCAP=extras, UPCAST=False)
        unaligned = UNALIGNED if aligned else UNALIGNED | {"V"}
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(signature) if arg not in unaligned}
        usage = compile_for_sm90(fn, signature, constexprs, attrs, config["num_warps"], config["num_stages"], wide)
        name = f"{kind} {dtype}{' bias softcap' if extras else ''}{f' {computes}' if computes else ''}"
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
        assert kernel["REG"] <= 255 and kernel["STACK"] == 0 and kernel["LOCAL"] == 0, kernel


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
