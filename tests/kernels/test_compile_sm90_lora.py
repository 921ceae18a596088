"""Every shipped config of the LoRA shrink and token-reduction kernels compiles for sm_90: shared memory,
no spills, and 64-bit offsets along the token-sized operands' rows (the GEMM's: test_compile_sm90_lora_gemm.py).

The compile runs in a subprocess, this file run as a script (tests/kernels/sm90.py says why).
Variants are compiled with the 16-divisibility Triton gives real 7B-class shapes (hidden sizes and
strides multiples of 16).
"""

import json

import pytest

from tests.kernels.sm90 import (
    assert_lora_variant_fits,
    compile_in_subprocess,
    compile_lora_variant,
    triton_site_id,
    triton_sites,
)


def _compile_all():
    from fused_train.kernels import lora

    results = []

    def compile_one(*variant):
        results.append(compile_lora_variant(*variant))

    shrink_args = (
        "a_ptr m_ptr keep_ptr out_ptr M K rank stride_am stride_ak stride_mr stride_mk stride_keep_m stride_om scale"
    ).split()
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
        assert_lora_variant_fits(kernel)


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
