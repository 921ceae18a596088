"""Every shipped multi-LoRA kernel config compiles for sm_90: wgmma for the 64-row segment tiles,
shared memory, no spills, and 64-bit offsets along the rows of x and y and across the stacks' slots.

The compile runs in a subprocess, this file run as a script (tests/kernels/sm90.py says why).
Pointers and strides carry the 16-divisibility Triton gives real shapes (hidden sizes multiples
of 16); the stacks' inner stride is 1, which Triton specializes as a constant at launch.
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

# (x dtype, adapter dtype): adapters in the dtype of x, or float32 as peft keeps them.
DTYPES = [("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32"), ("fp32", "fp32")]
KERNELS_PER_DTYPE = 2 + 2 * 2  # per-token shrink and expand; segment shrink and expand at 2 configs


def _compile_all():
    from fused_train.kernels import multi_lora

    results = []

    def compile_one(name, fn, args, kinds, constexprs, config, needs_wgmma, wide_args):
        signature = dict(zip(args, kinds)) | {arg: "constexpr" for arg in constexprs}
        constexprs = constexprs | {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        # Every pointer and stride is 16-divisible at real shapes, the counts (tokens, blocks) are not.
        unaligned = {"T", "num_rank_blocks", "num_col_blocks"}
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, (arg, kind) in enumerate(signature.items())
            if kind != "constexpr" and arg not in unaligned
        }
        usage = compile_for_sm90(fn, signature, constexprs, attrs, config["num_warps"], config["num_stages"], wide_args)
        results.append(dict(name=name, needs_wgmma=needs_wgmma, **usage))

    block_r = dict(BLOCK_R=multi_lora.RANK_BLOCK)
    for x_dtype, lora_dtype in DTYPES:
        variant = f"{x_dtype} x, {lora_dtype} adapters"
        args = (
            "x_ptr a_ptr slots_ptr ranks_ptr out_ptr K num_rank_blocks "
            "stride_xt stride_as stride_ar stride_ak stride_ot"
        )
        kinds = [f"*{x_dtype}", f"*{lora_dtype}", "*i32", "*i32", "*fp32"] + ["i32"] * 7
        compile_one(f"per-token shrink {variant}", multi_lora._shrink_per_token_kernel, args.split(), kinds,
                    dict(stride_ak=1, UPCAST=False, **block_r), multi_lora.PER_TOKEN_SHRINK_CONFIG, False,
                    ["stride_xt", "stride_as"])  # fmt: skip
        args = (
            "s_ptr b_ptr slots_ptr ranks_ptr scalings_ptr y_ptr N num_col_blocks "
            "stride_st stride_bs stride_bn stride_br stride_yt"
        )
        kinds = ["*fp32", f"*{lora_dtype}", "*i32", "*i32", "*fp32", f"*{x_dtype}"] + ["i32"] * 7
        compile_one(f"per-token expand {variant}", multi_lora._expand_per_token_kernel, args.split(), kinds,
                    dict(stride_br=1, UPCAST=False, **block_r), multi_lora.PER_TOKEN_EXPAND_CONFIG, False,
                    ["stride_bs", "stride_yt"])  # fmt: skip
        for config_name, config in multi_lora.SEGMENT_CONFIGS.items():
            wide_tiles = config["shrink"]["BLOCK_M"] >= 64
            args = (
                "x_ptr a_ptr sorted_slots_ptr order_ptr ranks_ptr out_ptr T K num_rank_blocks "
                "stride_xt stride_as stride_ar stride_ak stride_ot"
            )
            kinds = [f"*{x_dtype}", f"*{lora_dtype}", "*i32", "*i64", "*i32", "*fp32"] + ["i32"] * 8
            compile_one(f"segment shrink {config_name} {variant}", multi_lora._shrink_segments_kernel, args.split(),
                        kinds, dict(stride_ak=1, UPCAST=False, **block_r), config["shrink"], wide_tiles,
                        ["stride_xt", "stride_as"])  # fmt: skip
            args = (
                "s_ptr b_ptr sorted_slots_ptr order_ptr ranks_ptr scalings_ptr y_ptr T N num_col_blocks "
                "stride_st stride_bs stride_bn stride_br stride_yt"
            )
            kinds = ["*fp32", f"*{lora_dtype}", "*i32", "*i64", "*i32", "*fp32", f"*{x_dtype}"] + ["i32"] * 8
            compile_one(f"segment expand {config_name} {variant}", multi_lora._expand_segments_kernel, args.split(),
                        kinds, dict(stride_br=1, UPCAST=False, **block_r), config["expand"], wide_tiles,
                        ["stride_bs", "stride_yt"])  # fmt: skip
    return results


@pytest.fixture(scope="module", params=triton_sites(), ids=triton_site_id)
def compiled(request):
    return compile_in_subprocess(__file__, timeout=600, triton_site=request.param)


def test_every_multi_lora_config_compiles_for_sm90(compiled):
    assert len(compiled) == len(DTYPES) * KERNELS_PER_DTYPE
    for kernel in compiled:
        assert kernel["shared"] <= SHARED_LIMIT, kernel
        if kernel["needs_wgmma"]:
            assert kernel["wgmma"], kernel
        assert kernel["narrow"] == [], kernel
        assert kernel["REG"] <= 255 and kernel["STACK"] == 0 and kernel["LOCAL"] == 0, kernel


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
