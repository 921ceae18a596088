"""Fused LoRA kernels vs the float64 reference: output and the gradients of x, A, B and bias."""

import pytest
import torch

from fused_train.kernels import lora as lora_kernels
from fused_train.kernels.lora import INT4_GROUP_SIZE, dequantize_int4, lora_linear_ref, quantize_int4
from fused_train.ops.lora import dropout_keep_mask, lora_linear
from tests.conftest import DEVICE
from tests.kernels.conftest import make_base_weight

# Where `_lora_gemm_tma_kernel` can run: the interpreter, or an NVIDIA GPU from Hopper on.
TMA_HERE = lora_kernels.TensorDescriptor is not None and (
    DEVICE == "cpu" or (torch.version.hip is None and torch.cuda.get_device_capability()[0] >= 9)
)

# Beyond twice the error of PyTorch in the same dtype, this much of the largest reference value:
# bf16/fp16 store the output once more than the reference does; fp32 runs as tf32 on the GPU.
EXTRA_ERROR = {torch.float32: 2e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _make_inputs(tokens, in_features, out_features, rank, dtype, lora_dtype, with_bias, bits):
    """`bits`: None for a float weight in `dtype`, else 8 or 4 (quantized)."""
    weight, quantized = make_base_weight(out_features, in_features, dtype, bits)
    return quantized | dict(
        x=torch.randn(tokens, in_features, device=DEVICE, dtype=dtype, requires_grad=True),
        weight=weight,
        lora_a=(torch.randn(rank, in_features, device=DEVICE) / in_features**0.5).to(lora_dtype).requires_grad_(),
        lora_b=torch.randn(out_features, rank, device=DEVICE).to(lora_dtype).requires_grad_(),
        bias=torch.randn(out_features, device=DEVICE, dtype=dtype, requires_grad=True) if with_bias else None,
    )


def _run(fn, inputs, grad_y):
    """Output and gradients of every input that requires grad, through `fn(**inputs)`."""
    y = fn(**inputs)
    trainable = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    grads = torch.autograd.grad(y, list(trainable.values()), grad_y.to(y.dtype))
    return {"y": y.detach(), **{f"d{k}": g for k, g in zip(trainable, grads)}}


def _cast(inputs, dtype):
    """The inputs as fresh leaves in `dtype` (a quantized weight and its scales kept as they are)."""
    out = {}
    for name, t in inputs.items():
        if t is None or name.startswith("weight_") or t.dtype in (torch.int8, torch.uint8):
            out[name] = t
        else:
            out[name] = t.detach().to(dtype).requires_grad_(t.requires_grad)
    return out


@pytest.mark.parametrize(
    "dtype, lora_dtype, tokens, in_features, out_features, rank, with_bias, dropout_p, bits",
    [
        (torch.float32, torch.float32, 37, 95, 130, 8, True, 0.0, None),
        (torch.float16, torch.float16, 37, 95, 130, 1, False, 0.1, None),
        (torch.bfloat16, torch.float32, 37, 130, 95, 64, True, 0.1, None),
        (torch.bfloat16, torch.bfloat16, 37, 95, 130, 16, True, 0.0, 8),
        (torch.float32, torch.float32, 37, 95, 130, 8, False, 0.1, 8),
        (torch.bfloat16, torch.float32, 5, 4095, 130, 8, True, 0.0, None),
        (torch.float16, torch.float16, 5, 95, 4095, 8, False, 0.1, None),
        # int4: in 95 and 130 end in a padded group; 130 > 128 also splits dx's columns in two tiles.
        (torch.bfloat16, torch.float32, 37, 95, 130, 8, True, 0.1, 4),
        (torch.float32, torch.float32, 37, 130, 95, 16, False, 0.0, 4),
        (torch.float16, torch.float16, 21, 192, 64, 1, True, 0.0, 4),
    ],
)
def test_lora_linear_matches_reference(dtype, lora_dtype, tokens, in_features, out_features, rank, with_bias, dropout_p, bits):
    _check_against_reference(dtype, lora_dtype, tokens, in_features, out_features, rank, with_bias, dropout_p, bits)


GEMM_WAYS = [("tma", "large"), ("tma", "medium"), ("pointer", "large"), ("pointer", "medium"), ("cublas", "large")]


@pytest.mark.parametrize("way", GEMM_WAYS, ids=[" ".join(way) for way in GEMM_WAYS])
@pytest.mark.parametrize(
    "dtype, lora_dtype, tokens, in_features, out_features, rank, with_bias, dropout_p",
    [
        # Tails in every dimension: tokens past a 128-row tile, out 136 / 72 past a 128-column
        # tile (forward) and past a 64-wide K tile (dx), which TMA must read as zeros; in 192 is two
        # column tiles of dx.
        (torch.bfloat16, torch.float32, 37, 64, 136, 8, True, 0.1),
        (torch.float16, torch.float16, 130, 192, 72, 16, False, 0.0),
    ],
)
def test_every_gemm_way_matches_reference(
    monkeypatch, way, dtype, lora_dtype, tokens, in_features, out_features, rank, with_bias, dropout_p
):
    """Each way the GPU may time and pick for a large 16-bit GEMM, forced on small shapes."""
    if way[0] == "tma" and not TMA_HERE:
        pytest.skip("TMA needs a Hopper-or-newer GPU and a Triton with tensor descriptors")
    shapes = ((tokens, in_features), (out_features, in_features), (tokens, out_features))
    assert lora_kernels._tma_applies(*(torch.empty(shape, device=DEVICE, dtype=dtype) for shape in shapes)) == TMA_HERE
    monkeypatch.setattr(lora_kernels, "_choose_gemm_way", lambda key, ways, launch: way)
    _check_against_reference(dtype, lora_dtype, tokens, in_features, out_features, rank, with_bias, dropout_p, None)


def test_gemm_way_is_timed_once_per_shape_and_the_fastest_kept(monkeypatch):
    ways = [("tma", "large"), ("pointer", "medium"), ("cublas", "large")]
    measured = {("tma", "large"): 2.0, ("pointer", "medium"): 1.5, ("cublas", "large"): 1.75}
    timed, launched = [], []
    monkeypatch.setattr(lora_kernels, "_time_ms", lambda launch: timed.append(launch()) or measured[timed[-1]])
    monkeypatch.setattr(lora_kernels, "_CHOSEN_GEMM_WAYS", {})
    monkeypatch.setattr(lora_kernels, "GEMM_TIMINGS", {})

    def launch(way):
        launched.append(way)
        return way

    assert lora_kernels._choose_gemm_way("shape", ways, launch) == ("pointer", "medium")
    assert timed == ways and lora_kernels.GEMM_TIMINGS == {"shape": measured}
    assert lora_kernels._choose_gemm_way("shape", ways, launch) == ("pointer", "medium")
    assert lora_kernels._choose_gemm_way("other", ways[:1], launch) == ("tma", "large")
    assert timed == ways and launched == ways  # neither the known shape nor a lone way is timed again


@pytest.mark.skipif(DEVICE == "cpu", reason="ways are timed on a GPU only; the interpreter runs the first")
def test_large_gemm_on_the_gpu_times_every_way(monkeypatch):
    monkeypatch.setattr(lora_kernels, "_CHOSEN_GEMM_WAYS", {})
    monkeypatch.setattr(lora_kernels, "GEMM_TIMINGS", {})
    tokens, features, rank = 1024, 2048, 16
    assert tokens * features * features >= lora_kernels.TUNE_MIN_WORK
    _check_against_reference(torch.bfloat16, torch.float32, tokens, features, features, rank, True, 0.1, None)
    kinds = {key.kind: set(timings) for key, timings in lora_kernels.GEMM_TIMINGS.items()}
    expected = {("pointer", "large"), ("pointer", "medium"), ("cublas", "large")}
    if TMA_HERE:
        expected |= {("tma", "large"), ("tma", "medium")}
    assert kinds == {"fwd": expected, "dx": expected}
    # Deterministic algorithms: always the first way, untimed (timing could choose differently per run).
    monkeypatch.setattr(lora_kernels, "_CHOSEN_GEMM_WAYS", {})
    monkeypatch.setattr(lora_kernels, "GEMM_TIMINGS", {})
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    _check_against_reference(torch.bfloat16, torch.float32, tokens, features, features, rank, True, 0.1, None)
    assert lora_kernels.GEMM_TIMINGS == {}


def test_tma_applies_only_to_aligned_16_bit_operands():
    def applies(dtype, rows, cols, offset=0):
        t = torch.empty(rows * cols + offset, device=DEVICE, dtype=dtype)[offset:].view(rows, cols)
        return lora_kernels._tma_applies(t, t, t)

    assert applies(torch.bfloat16, 4, 64) == applies(torch.float16, 4, 8) == TMA_HERE
    assert not applies(torch.bfloat16, 4, 60)  # rows of 120 bytes: TMA needs 16-byte multiples
    assert not applies(torch.bfloat16, 4, 64, offset=1)  # start not 16-byte aligned
    assert not applies(torch.bfloat16, 0, 64)  # a descriptor has no empty dimension
    assert not applies(torch.float32, 4, 64)
    assert not applies(torch.int8, 4, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_linear_handles_no_tokens(dtype):
    x = torch.randn(0, 64, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = torch.randn(128, 64, device=DEVICE, dtype=dtype)
    lora_a = torch.randn(8, 64, device=DEVICE, requires_grad=True)
    lora_b = torch.randn(128, 8, device=DEVICE, requires_grad=True)
    y = lora_linear(x, weight, lora_a, lora_b, 1.0)
    assert y.shape == (0, 128)
    y.sum().backward()
    assert x.grad.shape == (0, 64)
    assert torch.equal(lora_a.grad, torch.zeros_like(lora_a)) and torch.equal(lora_b.grad, torch.zeros_like(lora_b))


def _check_against_reference(dtype, lora_dtype, tokens, in_features, out_features, rank, with_bias, dropout_p, bits):
    """lora_linear's output and gradients against the float64 reference, within twice PyTorch's own
    error in `dtype` plus EXTRA_ERROR."""
    torch.manual_seed(0)
    inputs = _make_inputs(tokens, in_features, out_features, rank, dtype, lora_dtype, with_bias, bits)
    grad_y = torch.randn(tokens, out_features, device=DEVICE)
    scaling = 0.75

    torch.manual_seed(1)
    ours = _run(lambda **kw: lora_linear(scaling=scaling, dropout_p=dropout_p, **kw), inputs, grad_y)
    torch.manual_seed(1)
    keep_mask = dropout_keep_mask(inputs["x"], dropout_p) if dropout_p > 0 else None

    def reference(**kw):
        return lora_linear_ref(scaling=scaling, keep_mask=keep_mask, dropout_p=dropout_p, **kw)

    exact = _run(reference, _cast(inputs, torch.float64), grad_y)
    same_dtype = _run(reference, _cast(inputs, dtype) | {"lora_a": inputs["lora_a"], "lora_b": inputs["lora_b"]}, grad_y)
    for name, expected in exact.items():
        assert ours[name].dtype == (inputs[name[1:]].dtype if name != "y" else dtype), name
        error = (ours[name].double() - expected).abs().max().item()
        torch_error = (same_dtype[name].double() - expected).abs().max().item()
        allowed = 2 * torch_error + EXTRA_ERROR[dtype] * expected.abs().max().item()
        assert error <= allowed, f"{name}: error {error:.3g} > allowed {allowed:.3g}"


def test_lora_linear_keeps_leading_dims():
    torch.manual_seed(0)
    x = torch.randn(2, 19, 48, device=DEVICE)
    weight = torch.randn(40, 48, device=DEVICE) / 48**0.5
    lora_a = (torch.randn(4, 48, device=DEVICE) / 48**0.5).requires_grad_()
    lora_b = torch.randn(40, 4, device=DEVICE, requires_grad=True)
    y = lora_linear(x, weight, lora_a, lora_b, 2.0)
    assert y.shape == (2, 19, 40)
    y.sum().backward()
    expected = lora_linear_ref(x.double(), weight.double(), lora_a.double(), lora_b.double(), 2.0)
    torch.testing.assert_close(y.double(), expected, atol=EXTRA_ERROR[torch.float32] * expected.abs().max().item(), rtol=0)
    assert torch.isfinite(lora_a.grad).all() and torch.isfinite(lora_b.grad).all()


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
    torch.testing.assert_close(per_group(restored, float("-inf"), torch.amax), per_group(weight, float("-inf"), torch.amax))


def _good_args():
    return dict(
        x=torch.randn(6, 32, device=DEVICE),
        weight=torch.randn(24, 32, device=DEVICE),
        lora_a=torch.randn(4, 32, device=DEVICE),
        lora_b=torch.randn(24, 4, device=DEVICE),
        scaling=1.0,
    )


@pytest.mark.parametrize(
    "change, argument",
    [
        (dict(weight=torch.randn(24, 31)), "weight"),
        (dict(weight=torch.randn(24, 32, dtype=torch.float64)), "weight"),
        (dict(lora_b=torch.randn(24, 5)), "lora_b"),
        (dict(lora_a=torch.randn(4, 33)), "lora_a"),
        (dict(lora_a=torch.randn(4, 32, dtype=torch.float16)), "lora_a"),
        (dict(weight=torch.zeros(24, 32, dtype=torch.int8)), "weight_scale"),
        (dict(weight=torch.zeros(24, 16, dtype=torch.uint8)), "weight"),  # int4: in=32 is one padded group, 32 bytes
        (dict(weight=torch.zeros(24, 32, dtype=torch.uint8), weight_scale=torch.ones(24, 1)), "weight_offset"),
        (dict(weight=torch.zeros(24, 32, dtype=torch.uint8), weight_scale=torch.ones(24), weight_offset=torch.ones(24, 1)), "weight_scale"),
        (dict(weight_offset=torch.ones(24, 1)), "weight_offset"),
        (dict(bias=torch.randn(23)), "bias"),
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(x=torch.ones(6, 32, dtype=torch.int32)), "x"),
    ],
)
def test_lora_linear_rejects_bad_input(change, argument):
    args = _good_args() | {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()}
    with pytest.raises(ValueError, match=argument):
        lora_linear(**args)


def test_lora_linear_rejects_trainable_weight():
    args = _good_args()
    args["weight"].requires_grad_()
    with pytest.raises(ValueError, match="weight"):
        lora_linear(**args)


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_custom_ops_pass_opcheck(bits, requires_grad):
    """Both ops; with inputs that require grad, opcheck also checks the forward op's registered autograd."""
    torch.manual_seed(0)
    x = torch.randn(9, 40, device=DEVICE)
    weight = torch.randn(24, 40, device=DEVICE)
    weight, weight_scale, weight_offset = quantize_int4(weight) if bits == 4 else (weight, None, None)
    lora_a = torch.randn(4, 40, device=DEVICE)
    lora_b = torch.randn(24, 4, device=DEVICE)
    bias = torch.randn(24, device=DEVICE)
    keep_mask = dropout_keep_mask(x, 0.25)
    args = (x, weight, weight_scale, weight_offset, lora_a, lora_b, 0.5, bias, keep_mask, 0.25)
    for t in (x, lora_a, lora_b, bias):
        t.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.fused_train.lora_linear_fwd.default, args)
    x, lora_a, lora_b = (t.detach() for t in (x, lora_a, lora_b))
    args = (x, weight, weight_scale, weight_offset, lora_a, lora_b, 0.5, bias.detach(), keep_mask, 0.25)
    _, lora_s = torch.ops.fused_train.lora_linear_fwd(*args)
    grad_y = torch.randn(9, 24, device=DEVICE)
    args = (grad_y, x, lora_s, weight, weight_scale, weight_offset, lora_a, lora_b, 0.5, keep_mask, 0.25, True)
    torch.library.opcheck(torch.ops.fused_train.lora_linear_bwd.default, args)


def test_lora_linear_compiles_fullgraph():
    torch.manual_seed(0)
    x = torch.randn(9, 40, device=DEVICE, requires_grad=True)
    weight = torch.randn(24, 40, device=DEVICE)
    lora_a = torch.randn(4, 40, device=DEVICE, requires_grad=True)
    lora_b = torch.randn(24, 4, device=DEVICE, requires_grad=True)
    compiled = torch.compile(lambda *a: lora_linear(*a, 0.5), fullgraph=True, backend="aot_eager")
    compiled(x, weight, lora_a, lora_b).sum().backward()
    expected = lora_linear(x, weight, lora_a, lora_b, 0.5)
    torch.testing.assert_close(compiled(x, weight, lora_a, lora_b), expected)
