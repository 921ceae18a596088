"""Fused LoRA linear (its kernels and lora_gemm) vs the float64 reference: output and the gradients of
x, A, B and bias. The GEMM alone, at each of its ways: test_lora_gemm.py."""

import pytest
import torch

from fused_train.kernels.lora_ref import lora_linear_ref, quantize_int4
from fused_train.ops.lora import dropout_keep_mask, lora_linear
from tests.conftest import DEVICE
from tests.kernels.conftest import make_base_weight

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
def test_lora_linear_matches_reference(
    dtype, lora_dtype, tokens, in_features, out_features, rank, with_bias, dropout_p, bits
):
    _check_against_reference(dtype, lora_dtype, tokens, in_features, out_features, rank, with_bias, dropout_p, bits)


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
    lora_factors = {"lora_a": inputs["lora_a"], "lora_b": inputs["lora_b"]}
    same_dtype = _run(reference, _cast(inputs, dtype) | lora_factors, grad_y)
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
    atol = EXTRA_ERROR[torch.float32] * expected.abs().max().item()
    torch.testing.assert_close(y.double(), expected, atol=atol, rtol=0)
    assert torch.isfinite(lora_a.grad).all() and torch.isfinite(lora_b.grad).all()


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
        (dict(weight=torch.zeros(24, 32, dtype=torch.uint8), weight_scale=torch.ones(24),
              weight_offset=torch.ones(24, 1)), "weight_scale"),  # fmt: skip
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
