"""Fused LoRA linear layer: its math, the weight formats and the plain-PyTorch reference.

Forward, with `x` `[T, in]`, frozen `W` `[out, in]`, `A` `[r, in]`, `B` `[out, r]`, scaling `s`,
dropout keep-mask `m` (`p` the drop probability; `m = 1`, `p = 0` without dropout):

    x_d = x ⊙ m / (1 - p)
    S   = x_d · Aᵀ                                   [T, r], saved for the backward
    y   = x · Wᵀ + bias + s · S · Bᵀ

`W` is float, int8 or packed int4: the formats of `lora_gemm_ref` (which holds their quantizers,
re-exported here), the GEMM both passes run on. Backward, given `dy` `[T, out]`:

    dS  = s · dy · B                                 [T, r]
    dB  = s · dyᵀ · S                                [out, r]
    dA  = dSᵀ · x_d                                  [r, in]
    dx  = dy · W + (dS · A) ⊙ m / (1 - p)            [T, in]
    dW  is never computed (W is frozen).

This module needs no Triton; the kernels are in `lora.py` and `lora_gemm.py`.
"""

import torch.nn.functional as F

from .lora_gemm_ref import (  # noqa: F401 (the weight formats, importable here before)
    INT4_GROUP_SIZE,
    dequantize,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
)

# The largest LoRA rank the kernels are compiled and checked for (sm_90, no spills).
MAX_RANK = 128


def lora_linear_ref(
    x, weight, lora_a, lora_b, scaling, bias=None, keep_mask=None, dropout_p=0.0, weight_scale=None, weight_offset=None
):
    """Plain-PyTorch `y = x·Wᵀ + bias + scaling · ((x ⊙ keep_mask / (1-dropout_p)) · Aᵀ) · Bᵀ`.

    `keep_mask` (bool, shape of `x`) is the dropout mask; None means no dropout. An int8 `weight`
    is dequantized with `weight_scale` `[out]`, an int4 one (uint8, packed) with `weight_scale` and
    `weight_offset` `[out, groups]`. The LoRA branch runs in the dtype of `lora_a`, like peft does,
    and the sum is returned in the dtype of `x`.
    """
    weight = dequantize(weight, weight_scale, weight_offset, x.shape[-1], x.dtype)
    base = F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    dropped = x if keep_mask is None else x * keep_mask / (1.0 - dropout_p)
    lora = F.linear(F.linear(dropped.to(lora_a.dtype), lora_a), lora_b) * scaling
    return (base + lora).to(x.dtype)
