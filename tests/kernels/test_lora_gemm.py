"""The fused LoRA GEMM (`lora_gemm`) vs its reference at each way it can run; the rule that picks
the way; the int4 format."""

import time

import pytest
import torch

from fused_train.kernels import lora_gemm as gemm_kernels
from fused_train.kernels.lora_gemm_ref import INT4_GROUP_SIZE, dequantize_int4, lora_gemm_ref, quantize_int4
from tests.conftest import DEVICE
from tests.kernels.conftest import make_base_weight

# Where `_lora_gemm_tma_kernel` can run: the interpreter, or an NVIDIA GPU from Hopper on.
TMA_HERE = gemm_kernels.TensorDescriptor is not None and (
    DEVICE == "cpu" or (torch.version.hip is None and torch.cuda.get_device_capability()[0] >= 9)
)

# Beyond twice the error of PyTorch in the same dtype, this much of the largest reference value:
# the seed's dot takes its inputs in the compute dtype; fp32 runs as tf32 on the GPU.
EXTRA_ERROR = {torch.float32: 2e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}

ALL_WAYS = [("tma", "large"), ("tma", "medium"), ("pointer", "large"), ("pointer", "medium"), ("cublas", "large")]


def _gemm_inputs(dtype, lora_dtype, M, K, N, rank, forward, bits):
    """lora_gemm's operands as the fused LoRA layer passes them: forward `a = x`, `Wk = Wᵀ`, the
    seed `s·S·Bᵀ` (+ bias); dx `a = dy`, `Wk = W`, the seed `(dS·A) ⊙ m/(1-p)`."""
    torch.manual_seed(0)
    out_features, in_features = (N, K) if forward else (K, N)
    weight, quantized = make_base_weight(out_features, in_features, dtype, bits)
    right = torch.randn(N, rank, device=DEVICE).to(lora_dtype).t() if forward else torch.randn(rank, N, device=DEVICE)
    return dict(
        a=torch.randn(M, K, device=DEVICE, dtype=dtype), w=weight, w_is_transposed=forward,
        weight_scale=quantized.get("weight_scale"), weight_offset=quantized.get("weight_offset"),
        lora_left=torch.randn(M, rank, device=DEVICE), lora_right=right.to(lora_dtype), lora_scale=0.75,
        bias=torch.randn(N, device=DEVICE, dtype=dtype) if forward else None,
        keep_mask=None if forward else (torch.rand(M, N, device=DEVICE) > 0.1).view(torch.uint8),
        keep_scale=1.0 if forward else 1 / 0.9, out_dtype=dtype,
    )  # fmt: skip


def _check_against_reference(inputs, way=None):
    ours = gemm_kernels.lora_gemm(*inputs.values(), way=way)  # in the signature's order
    dtype = inputs["out_dtype"]
    float_names = ("a", "lora_left", "lora_right", "bias")
    exact_w = inputs["w"] if inputs["w"].dtype in (torch.int8, torch.uint8) else inputs["w"].double()
    exact = lora_gemm_ref(**inputs | {k: inputs[k].double() for k in float_names if inputs[k] is not None}
                          | {"w": exact_w, "out_dtype": torch.float64})  # fmt: skip
    same_dtype = lora_gemm_ref(**inputs)
    assert ours.dtype == dtype and ours.shape == exact.shape
    error = (ours.double() - exact).abs().max().item()
    torch_error = (same_dtype.double() - exact).abs().max().item()
    allowed = 2 * torch_error + EXTRA_ERROR[dtype] * exact.abs().max().item()
    assert error <= allowed, f"error {error:.3g} > allowed {allowed:.3g}"


@pytest.mark.parametrize("way", ALL_WAYS, ids=[" ".join(way) for way in ALL_WAYS])
@pytest.mark.parametrize(
    "dtype, lora_dtype, M, K, N, rank, forward",
    [
        # Tails in every dimension: M 37 and 130 past a 128-row tile, N 136 past a 128-column tile
        # (forward) and K 72 past a 64-wide K tile (dx), which TMA must read as zeros; N 192 is two
        # column tiles of dx.
        (torch.bfloat16, torch.float32, 37, 64, 136, 8, True),
        (torch.float16, torch.float16, 130, 72, 192, 16, False),
    ],
)
def test_every_gemm_way_matches_reference(way, dtype, lora_dtype, M, K, N, rank, forward):
    """Each way `gemm_ways` can list for a 16-bit float GEMM on an NVIDIA GPU, forced on small shapes."""
    if way[0] == "tma" and not TMA_HERE:
        pytest.skip("TMA needs a Hopper-or-newer GPU and a Triton with tensor descriptors")
    inputs = _gemm_inputs(dtype, lora_dtype, M, K, N, rank, forward, None)
    out = torch.empty(M, N, device=DEVICE, dtype=dtype)
    assert gemm_kernels.tma_applies(inputs["a"], inputs["w"], out) == TMA_HERE
    _check_against_reference(inputs, way)


@pytest.mark.parametrize(
    "dtype, bits, M, K, N, rank, forward",
    [(torch.bfloat16, 8, 37, 95, 130, 16, True), (torch.float32, 4, 37, 130, 95, 8, False)],
)
def test_quantized_weights_match_reference(dtype, bits, M, K, N, rank, forward):
    _check_against_reference(_gemm_inputs(dtype, torch.float32, M, K, N, rank, forward, bits))


def test_gemm_way_is_a_rule_of_shape_dtypes_and_device(monkeypatch):
    """Every process (each DDP rank, each run) computes a GEMM the same way: the way is read from the
    shape, the dtypes and the device, never timed; so no clock may be read."""

    def clock(*args, **kwargs):
        raise AssertionError("the way was timed")

    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setattr(torch.cuda, "Event", clock)
    monkeypatch.setattr(torch.cuda, "synchronize", clock)
    bf16, fp16 = torch.bfloat16, torch.float16

    def first(M, N, K, dtype=bf16, w_dtype=bf16, tma=True, nvidia_gpu=True):
        return gemm_kernels.gemm_ways(M, N, K, dtype, w_dtype, tma, nvidia_gpu)[0]

    assert 8192 * 4096 * 4096 >= gemm_kernels.CUBLAS_MIN_WORK > 1024 * 1024 * 1024
    assert first(8192, 4096, 4096) == first(8192, 4096, 4096, tma=False) == ("cublas", "large")
    assert first(8192, 4096, 4096, fp16, fp16) == ("cublas", "large")
    assert first(8192, 4095, 4096) == ("cublas", "medium")  # 128×256 tiles need 16-divisible sizes
    assert first(1024, 1024, 1024) == ("tma", "medium") and first(1024, 1024, 1024, tma=False) == ("pointer", "medium")
    assert first(16384, 8192, 16) == ("tma", "large")  # a full wave of 128×256 tiles, little work
    # Quantized or float32 weights, ROCm and the interpreter: one way, the Triton kernel's.
    assert gemm_kernels.gemm_ways(8192, 4096, 4096, bf16, torch.int8, False, True) == [("pointer", "medium")]
    assert gemm_kernels.gemm_ways(8192, 4096, 4096, bf16, torch.uint8, False, True) == [("pointer", "medium")]
    assert gemm_kernels.gemm_ways(8192, 4096, 4096, torch.float32, torch.float32, False, True) == [
        ("pointer", "medium_fp32")
    ]
    assert gemm_kernels.gemm_ways(8192, 4096, 4096, bf16, bf16, True, False) == [("tma", "large")]
    # The alternatives, for bench_lora to time: every Triton way and cuBLAS, each once.
    ways = gemm_kernels.gemm_ways(8192, 4096, 4096, bf16, bf16, True, True)
    assert sorted(ways) == sorted(ALL_WAYS) and len(set(ways)) == len(ways)


@pytest.mark.skipif(DEVICE == "cpu", reason="the cuBLAS way is chosen on an NVIDIA GPU only")
def test_large_gemm_on_the_gpu_runs_cublas():
    inputs = _gemm_inputs(torch.bfloat16, torch.float32, 1024, 2048, 2048, 16, True, None)
    out = torch.empty(1024, 2048, device=DEVICE, dtype=torch.bfloat16)
    assert gemm_kernels.gemm_ways_of(inputs["a"], inputs["w"], out)[0] == ("cublas", "large")
    _check_against_reference(inputs)


def test_tma_applies_only_to_aligned_16_bit_operands():
    def applies(dtype, rows, cols, offset=0):
        t = torch.empty(rows * cols + offset, device=DEVICE, dtype=dtype)[offset:].view(rows, cols)
        return gemm_kernels.tma_applies(t, t, t)

    assert applies(torch.bfloat16, 4, 64) == applies(torch.float16, 4, 8) == TMA_HERE
    assert not applies(torch.bfloat16, 4, 60)  # rows of 120 bytes: TMA needs 16-byte multiples
    assert not applies(torch.bfloat16, 4, 64, offset=1)  # start not 16-byte aligned
    assert not applies(torch.bfloat16, 0, 64)  # a descriptor has no empty dimension
    assert not applies(torch.float32, 4, 64)
    assert not applies(torch.int8, 4, 64)


@pytest.mark.parametrize("in_features", [64, 95, 200])
def test_int4_quantization_within_half_a_step(in_features):
    """Every weight is within half its group's step; levels on the grid come back exactly."""
    torch.manual_seed(0)
    weight = torch.randn(7, in_features, device=DEVICE)
    weight[0] = 0.25  # a constant row: zero range, rebuilt exactly
    packed, scale, offset = quantize_int4(weight)
    groups = -(-in_features // INT4_GROUP_SIZE)
    assert packed.dtype == torch.uint8 and packed.shape == (7, groups * INT4_GROUP_SIZE // 2)
    assert scale.shape == offset.shape == (7, groups)
    restored = dequantize_int4(packed, scale, offset, in_features)
    step = scale.repeat_interleave(INT4_GROUP_SIZE, 1)[:, :in_features]
    assert ((restored - weight).abs() <= step / 2 * (1 + 1e-5)).all()
    assert (restored[0] == 0.25).all()
    torch.testing.assert_close(dequantize_int4(*quantize_int4(restored), in_features), restored, rtol=0, atol=1e-6)
    # Both ends of each group are levels: its min (q = 0) and, up to rounding, its max (q = 15).
    def per_group(t, fill, reduce):
        padded = torch.nn.functional.pad(t, (0, groups * INT4_GROUP_SIZE - in_features), value=fill)
        return reduce(padded.view(7, groups, INT4_GROUP_SIZE), -1)

    torch.testing.assert_close(offset, per_group(weight, float("inf"), torch.amin))
    torch.testing.assert_close(
        per_group(restored, float("-inf"), torch.amax), per_group(weight, float("-inf"), torch.amax)
    )
