"""Every shipped config of the LoRA shrink and token-reduction kernels compiles for sm_90: shared memory,
no spills, and 64-bit offsets along the token-sized operands' rows (the GEMM's: test_compile_sm90_lora_gemm.py).

The compile runs in a subprocess, this file run as a script (tests/kernels/sm90.py says why).
Variants are compiled with the 16-divisibility Triton gives real 7B-class shapes (hidden sizes and
strides multiples of 16).
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


def _compile_all():
    from fused_train.kernels import lora

    results = []

    def compile_one(name, fn, signature, constexprs, config, aligned, needs_wgmma, wide_args):
        constexprs = constexprs | {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        unaligned = {"rank", "M", "T", "lora_scale", "keep_scale", "scale"}
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, (arg, kind) in enumerate(signature.items())
            if aligned and kind != "constexpr" and not kind.startswith("tensordesc") and arg not in unaligned
        }
        usage = compile_for_sm90(fn, signature, constexprs, attrs, config["num_warps"], config["num_stages"], wide_args)
        results.append(dict(name=name, aligned=aligned, needs_wgmma=needs_wgmma, **usage))

    shrink_args = "a_ptr m_ptr keep_ptr out_ptr M K rank stride_am stride_ak stride_mr stride_mk stride_keep_m stride_om scale".split()
    reduce_args = (
        "p_ptr q_ptr keep_ptr out_ptr T N rank tokens_per_split stride_pt stride_pr stride_qt stride_qn "
        "stride_keep_t stride_os stride_on scale"
    ).split()
    for dtype in ("bf16", "fp32"):
        for block_r in (16, 32, 64, 128):
            for has_keep in (False, True):
                variant = f"{dtype} r{block_r}{' keep' if has_keep else ''}"
                kinds = [f"*{dtype}", "*fp32", "*u8", "*fp32"] + ["i32"] * 9 + ["fp32"]
                signature = dict(zip(shrink_args, kinds)) | {"stride_ak": "constexpr"}
                constexprs = dict(stride_ak=1, HAS_KEEP=has_keep, BLOCK_R=block_r, UPCAST=False)
                config = lora.shrink_config(block_r, has_keep)
                compile_one(f"shrink {variant}", lora._lora_shrink_kernel, signature, constexprs, config, True, False,
                            ["stride_am", "stride_keep_m"])
                kinds = ["*fp32", f"*{dtype}", "*u8", "*fp32"] + ["i32"] * 11 + ["fp32"]
                signature = dict(zip(reduce_args, kinds)) | {"stride_qn": "constexpr"}
                constexprs = dict(stride_qn=1, HAS_KEEP=has_keep, BLOCK_R=block_r, UPCAST=False)
                config = lora.reduce_config(block_r, has_keep)
                compile_one(f"reduce {variant}", lora._lora_reduce_tokens_kernel, signature, constexprs, config, True,
                            False, ["stride_qt", "stride_keep_t"])
    return results


@pytest.fixture(scope="module", params=triton_sites(), ids=triton_site_id)
def compiled(request):
    return compile_in_subprocess(__file__, timeout=600, triton_site=request.param)


def test_every_lora_config_compiles_for_sm90(compiled):
    assert len(compiled) == 32
    for kernel in compiled:
        assert kernel["shared"] <= SHARED_LIMIT, kernel
        if kernel["needs_wgmma"]:
            assert kernel["wgmma"], kernel
        assert kernel["tma_loads"] == kernel["name"].startswith("tma "), kernel
        assert kernel["narrow"] == [], kernel
        # Tails are rare in real layers; there only correctness (and the limits above) is required.
        if kernel["aligned"]:
            assert kernel["REG"] <= 255 and kernel["STACK"] == 0 and kernel["LOCAL"] == 0, kernel


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
