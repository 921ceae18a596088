"""Every shipped config of the fused LoRA GEMM (both kernels) compiles for sm_90: wgmma, TMA loads
where meant, shared memory, no spills, and 64-bit offsets along the token-sized operands' rows and W's rows.

The compile runs in a subprocess, this file run as a script (tests/kernels/sm90.py says why).
Variants are compiled with the 16-divisibility Triton gives real 7B-class shapes (hidden sizes and
strides multiples of 16); unaligned variants check that tails (in/out 4095) still compile. Every
(dtype, weight format, pass, config) that `gemm_ways` can give is here, at the largest rank where
the rank's registers matter; the cuBLAS way's seed is the pointer kernel at its config.
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


def _gemm_variants():
    """(name, dtype, weight dtype ("i4" = packed int4), config name, backward dx (HAS_KEEP, W = Wk), BLOCK_R,
    aligned)."""
    return [
        ("fwd bf16", "bf16", "bf16", "large", False, 16, True),
        ("fwd bf16 r128", "bf16", "bf16", "large", False, 128, True),
        ("fwd fp16 large", "fp16", "fp16", "large", False, 16, True),
        ("dx bf16 r128", "bf16", "bf16", "large", True, 128, True),
        ("fwd fp16", "fp16", "fp16", "medium", False, 16, True),
        ("dx bf16 medium r128", "bf16", "bf16", "medium", True, 128, True),
        ("fwd bf16 int8", "bf16", "i8", "medium", False, 16, True),
        ("dx bf16 int8 r128", "bf16", "i8", "medium", True, 128, True),
        ("fwd fp32", "fp32", "fp32", "medium_fp32", False, 16, True),
        ("dx fp32 medium r128", "fp32", "fp32", "medium_fp32", True, 128, True),
        ("fwd fp32 int8", "fp32", "i8", "medium_fp32", False, 16, True),
        ("dx fp32 int8 r128", "fp32", "i8", "medium_fp32", True, 128, True),
        ("fwd bf16 int4", "bf16", "i4", "medium", False, 16, True),
        ("dx bf16 int4 r128", "bf16", "i4", "medium", True, 128, True),
        ("fwd fp32 int4", "fp32", "i4", "medium_fp32", False, 16, True),
        ("dx fp32 int4 r128", "fp32", "i4", "medium_fp32", True, 128, True),
        ("dx bf16 int4 unaligned", "bf16", "i4", "medium", True, 16, False),
        ("fwd bf16 unaligned", "bf16", "bf16", "medium", False, 16, False),
    ]


def _tma_variants():
    """(name, dtype, config name, backward dx (HAS_KEEP, W = Wk), BLOCK_R) of the TMA kernel."""
    return [
        ("fwd bf16", "bf16", "large", False, 16),
        ("fwd bf16 r128", "bf16", "large", False, 128),
        ("dx bf16", "bf16", "large", True, 16),
        ("dx bf16 r128", "bf16", "large", True, 128),
        ("fwd fp16 medium", "fp16", "medium", False, 16),
        ("dx fp16 large", "fp16", "large", True, 16),
        ("dx bf16 medium r128", "bf16", "medium", True, 128),
    ]


def _compile_all():
    from fused_train.kernels import lora_gemm

    results = []

    def compile_one(*variant):
        results.append(compile_lora_variant(*variant))

    gemm_args = (
        "a_ptr w_ptr w_scale_ptr w_offset_ptr lora_left_ptr lora_right_ptr bias_ptr keep_ptr out_ptr M N K rank "
        "stride_am stride_ak stride_wk stride_wn stride_scale stride_lm stride_lr stride_rr stride_rn stride_keep_m "
        "stride_om lora_scale keep_scale"
    ).split()
    for name, dtype, w_dtype, config_name, backward, block_r, aligned in _gemm_variants():
        w_kind = "*u8" if w_dtype == "i4" else f"*{w_dtype}"
        kinds = [f"*{dtype}", w_kind, "*fp32", "*fp32", "*fp32", "*fp32", "*fp32", "*u8", f"*{dtype}"]
        signature = dict(zip(gemm_args, kinds + ["i32"] * 15 + ["fp32", "fp32"]))
        unit_stride = "stride_wn" if backward else "stride_wk"
        signature["stride_ak"] = signature[unit_stride] = "constexpr"
        constexprs = dict(
            stride_ak=1,
            **{unit_stride: 1},
            HAS_BIAS=not backward,
            HAS_KEEP=backward,
            W_INT8=w_dtype == "i8",
            W_INT4=w_dtype == "i4",
            W_TRANSPOSED=not backward,
            BLOCK_R=block_r,
            INT4_GROUP=lora_gemm.INT4_GROUP_SIZE,
            UPCAST=False,
        )
        # Row strides of a (x or dy), the dropout mask, out and W. dx steps through W's rows by pointer
        # increments of BLOCK_K rows (64-bit adds to the pointers) but for int4 tiles, which index them.
        w_rows = "stride_wk" if backward else "stride_wn"
        wide = ["stride_am", "stride_keep_m", "stride_om"] + ([] if backward and w_dtype != "i4" else [w_rows])
        compile_one(name, lora_gemm._lora_gemm_kernel, signature, constexprs, lora_gemm.GEMM_CONFIGS[config_name],
                    aligned, True, wide)  # fmt: skip

    # The TMA kernel: 16-bit float W only; TMA itself handles tails, so every variant is aligned.
    tma_args = (
        "a_desc w_desc lora_left_ptr lora_right_ptr bias_ptr keep_ptr out_ptr M N K rank "
        "stride_lm stride_lr stride_rr stride_rn stride_keep_m stride_om lora_scale keep_scale"
    ).split()
    for name, dtype, config_name, backward, block_r in _tma_variants():
        config = lora_gemm.GEMM_CONFIGS[config_name]
        block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
        w_block = (block_k, block_n) if backward else (block_n, block_k)
        kinds = [f"tensordesc<{dtype}[{block_m}, {block_k}]>", f"tensordesc<{dtype}[{w_block[0]}, {w_block[1]}]>"]
        kinds += ["*fp32", "*fp32", "*fp32", "*u8", f"*{dtype}"] + ["i32"] * 10 + ["fp32", "fp32"]
        signature = dict(zip(tma_args, kinds)) | {"stride_lr": "constexpr"}
        constexprs = dict(
            stride_lr=1, HAS_BIAS=not backward, HAS_KEEP=backward, W_TRANSPOSED=not backward, BLOCK_R=block_r,
            UPCAST=False,
        )  # fmt: skip
        compile_one(f"tma {name}", lora_gemm._lora_gemm_tma_kernel, signature, constexprs, config, True, True,
                    ["stride_keep_m", "stride_om"])

    return results


@pytest.fixture(scope="module", params=triton_sites(), ids=triton_site_id)
def compiled(request):
    return compile_in_subprocess(__file__, timeout=600, triton_site=request.param)


def test_every_lora_gemm_config_compiles_for_sm90(compiled):
    assert len(compiled) == len(_gemm_variants()) + len(_tma_variants())
    for kernel in compiled:
        assert_lora_variant_fits(kernel)


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
