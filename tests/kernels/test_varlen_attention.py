"""Triton varlen attention vs the float64 reference: outputs, lse and dq/dk/dv, on fresh random inputs.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py), so shapes stay small.
"""

import pytest
import torch

from fused_train.ops.varlen_attention import varlen_attention
from fused_train.ops.varlen_attention_triton import (
    varlen_attention_bwd_op,
    varlen_attention_fwd_op,
    varlen_attention_op,
)
from fused_train.kernels.varlen_attention import (
    BWD_DKDV_CONFIGS,
    BWD_DKDV_CONFIGS_FP32,
    BWD_DQ_CONFIGS,
    BWD_DQ_CONFIGS_FP32,
    FWD_CONFIGS,
    FWD_CONFIGS_FP32,
    block_d_at_least_32,
    varlen_attention_bwd,
    varlen_attention_fwd,
    varlen_attention_ref,
)
from fused_train.kernels import varlen_attention_ref as varlen_attention_ref_module
from fused_train.kernels.varlen_attention_ref import check_varlen_inputs
from tests.conftest import DEVICE

ON_GPU = DEVICE == "cuda"
# Max error relative to the reference's largest magnitude. fp32 matmuls run as tf32 on the GPU
# (10-bit mantissa) and exactly in the interpreter; gradients accumulate over more terms.
TOLERANCE = {
    torch.float32: 1e-2 if ON_GPU else 2e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def _cu_seqlens(lengths):
    return torch.tensor([0] + [sum(lengths[: i + 1]) for i in range(len(lengths))], dtype=torch.int32, device=DEVICE)


def _inputs(lengths_q, lengths_k, num_heads, num_kv_heads, head_dim, dtype, generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(DEVICE, dtype)

    q = randn(sum(lengths_q), num_heads, head_dim)
    k = randn(sum(lengths_k), num_kv_heads, head_dim)
    v = randn(sum(lengths_k), num_kv_heads, head_dim)
    return q, k, v, _cu_seqlens(lengths_q), _cu_seqlens(lengths_k)


def _assert_close(name, actual, expected, dtype):
    assert actual.dtype == dtype or name == "lse", f"{name}: dtype {actual.dtype}"
    assert torch.isfinite(actual).all() or name == "lse", f"{name}: non-finite values"
    actual, expected = actual.double(), expected.double()
    if name == "lse":
        # Rows that see no key have lse = -inf in both.
        assert torch.equal(torch.isinf(actual), torch.isinf(expected)), "lse: -inf rows differ"
        actual, expected = actual.nan_to_num(neginf=0.0), expected.nan_to_num(neginf=0.0)
    scale = expected.abs().max().item() or 1.0
    error = (actual - expected).abs().max().item() / scale
    assert error <= TOLERANCE[dtype], f"{name}: relative max error {error:.2e} > {TOLERANCE[dtype]:.0e}"


CASES = {
    # name: (lengths_q, lengths_k (None: same), num_heads, num_kv_heads, head_dim, kwargs)
    "lengths_1_and_off_block": ([1, 37, 0, 100, 64, 5], None, 2, 2, 32, dict(causal=True)),
    "many_tiny_documents": ([1, 3, 8, 2, 5, 1, 7, 4, 6, 2, 1, 8, 3, 5] * 2, None, 2, 1, 32, dict(causal=True)),
    "one_document_fills_row": ([320], None, 2, 1, 32, dict(causal=True)),
    "q_shorter_and_longer_than_k": ([20, 50, 7, 30], [60, 40, 7, 45], 2, 1, 32, dict(causal=True)),
    "non_causal": ([37, 100, 1], [37, 80, 9], 2, 2, 32, dict(causal=False)),
    "sliding_window_causal": ([150, 40], None, 2, 1, 32, dict(causal=True, window_size=(24, -1))),
    "window_both_sides": ([60, 33], [90, 20], 2, 1, 32, dict(causal=False, window_size=(7, 5))),
    "softcap": ([90, 45], None, 2, 1, 32, dict(causal=True, softcap=5.0, softmax_scale=0.3)),
    "gqa_4_to_1": ([70, 50], None, 8, 2, 32, dict(causal=True)),
    "mqa": ([70, 50], None, 4, 1, 32, dict(causal=True)),
    "head_dim_80": ([100, 27], None, 4, 2, 80, dict(causal=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, poisoned_outputs):
    # Every other case also puts the lse in the loss (its gradient enters the backward's delta).
    use_lse = list(CASES).index(case) % 2 == 1
    lengths_q, lengths_k, num_heads, num_kv_heads, head_dim, kwargs = CASES[case]
    _check_against_reference(lengths_q, lengths_k or lengths_q, num_heads, num_kv_heads, head_dim, torch.float32,
                             kwargs, use_lse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_matches_reference(dtype, poisoned_outputs):
    _check_against_reference([45, 70], [45, 70], 2, 1, 64, dtype, dict(causal=True), use_lse=False)


def _check_against_reference(lengths_q, lengths_k, num_heads, num_kv_heads, head_dim, dtype, kwargs, use_lse):
    generator = torch.Generator().manual_seed(hash((tuple(lengths_q), num_heads, head_dim)) % 2**31)
    q, k, v, cu_seqlens_q, cu_seqlens_k = _inputs(lengths_q, lengths_k, num_heads, num_kv_heads, head_dim, dtype,
                                                  generator)
    dout = torch.randn(q.shape, generator=generator).to(DEVICE, dtype)
    dlse = torch.randn(num_heads, q.shape[0], generator=generator).to(DEVICE)

    def loss_and_grads(q, k, v, attention):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out, lse = attention(q, k, v, cu_seqlens_q, cu_seqlens_k, return_lse=True, **kwargs)
        loss = (out.double() * dout.double()).sum()
        if use_lse:
            loss = loss + (lse.double().nan_to_num(neginf=0.0) * dlse.double()).sum()
        loss.backward()
        return out, lse, q.grad, k.grad, v.grad

    results = loss_and_grads(q, k, v, lambda *args, **kw: varlen_attention(*args, max(lengths_q), max(lengths_k), **kw))
    expected = loss_and_grads(q.double(), k.double(), v.double(), varlen_attention_ref)
    for name, actual, reference in zip(("out", "lse", "dq", "dk", "dv"), results, expected):
        _assert_close(name, actual, reference, dtype)


SHIPPED_CONFIGS = [
    # (dtype, head_dim, lengths): the GPU tables (float32 has its own) at several BLOCK_D.
    (torch.float32, 32, [200, 70, 1]),
    (torch.float16, 64, [260, 3]),
    (torch.bfloat16, 80, [150, 60]),
    (torch.bfloat16, 256, [130, 5]),
]


@pytest.mark.parametrize("dtype,head_dim,lengths", SHIPPED_CONFIGS, ids=[f"{t}_{d}" for t, d, _ in SHIPPED_CONFIGS])
def test_shipped_gpu_configs_match_reference(dtype, head_dim, lengths, poisoned_outputs):
    """The launchers with the GPU block sizes (the interpreter otherwise uses small blocks), incl.
    head_dim 256's dK/dV split over two programs."""
    block_d = block_d_at_least_32(head_dim)
    fp32 = dtype == torch.float32
    generator = torch.Generator().manual_seed(head_dim)
    q, k, v, cu_seqlens_q, cu_seqlens_k = _inputs(lengths, lengths, 2, 1, head_dim, dtype, generator)
    dout = torch.randn(q.shape, generator=generator).to(DEVICE, dtype)
    out, lse = varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True,
                                    config=(FWD_CONFIGS_FP32 if fp32 else FWD_CONFIGS)[block_d])
    grads = varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal=True,
                                 dkdv_config=(BWD_DKDV_CONFIGS_FP32 if fp32 else BWD_DKDV_CONFIGS)[block_d],
                                 dq_config=(BWD_DQ_CONFIGS_FP32 if fp32 else BWD_DQ_CONFIGS)[block_d])
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, return_lse=True)
    ref_out.backward(dout.double())
    for name, actual, expected in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads),
                                      (ref_out, ref_lse, q.grad, k.grad, v.grad)):
        _assert_close(name, actual, expected, dtype)


def test_backward_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    q, k, v, cu_seqlens_q, cu_seqlens_k = _inputs([50, 30], [50, 30], 4, 1, 32, torch.float32, generator)
    dout = torch.randn(q.shape, generator=generator).to(DEVICE)
    out, lse = varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True)
    first = varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal=True)
    second = varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _valid_args():
    generator = torch.Generator().manual_seed(0)
    q, k, v, cu_q, cu_k = _inputs([5, 11], [5, 11], 4, 2, 32, torch.float32, generator)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=11, max_seqlen_k=11)


BAD_INPUTS = {
    "cu_seqlens_not_int32": (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), "cu_seqlens_q"),
    "cu_seqlens_not_monotone": (
        lambda a: a.update(cu_seqlens_k=torch.tensor([0, 12, 16], dtype=torch.int32, device=DEVICE)[[0, 2, 1]]),
        "cu_seqlens_k",
    ),
    "cu_seqlens_last_not_total": (
        lambda a: a.update(cu_seqlens_q=torch.tensor([0, 5, 15], dtype=torch.int32, device=DEVICE)),
        "cu_seqlens_q",
    ),
    "heads_not_divisible": (lambda a: a.update(q=a["q"][:, :3]), "num_heads"),
    "head_dim_unsupported": (
        lambda a: a.update(**{n: torch.zeros(16, h, 512, device=DEVICE) for n, h in (("q", 4), ("k", 2), ("v", 2))}),
        "head_dim",
    ),
    "mixed_dtypes": (lambda a: a.update(k=a["k"].half()), "dtype"),
    "mixed_devices": (lambda a: a.update(v=a["v"].to("meta")), "device"),
}


# The offsets' values: read back (ValueError) on CPU tensors only. On a GPU they are asserted on the
# device, whose failure would end the test session's CUDA context, so these cases run on CPU tensors.
VALUE_CASES = ("cu_seqlens_not_monotone", "cu_seqlens_last_not_total")


def _on_cpu(args):
    return {name: t.cpu() if isinstance(t, torch.Tensor) else t for name, t in args.items()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_argument(case):
    break_args, name = BAD_INPUTS[case]
    args = _valid_args()
    break_args(args)
    with pytest.raises(ValueError, match=name):
        varlen_attention(**(_on_cpu(args) if case in VALUE_CASES else args))


def test_offset_checks_read_nothing_back_off_the_cpu():
    """Off a CPU the offsets are asserted on the device, no read back (which would sync a GPU in every
    layer): meta tensors, whose values cannot be read, pass the checks."""
    args = {name: t.to("meta") if isinstance(t, torch.Tensor) else t for name, t in _valid_args().items()}
    check_varlen_inputs(args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"], (-1, -1), 0.0)


@pytest.mark.parametrize("case", VALUE_CASES)
def test_device_offset_checks_name_the_argument(monkeypatch, case):
    """The device path's assert, on CPU tensors, where `torch._assert_async` raises at once."""
    monkeypatch.setattr(varlen_attention_ref_module, "values_readable", lambda tensor: False)
    break_args, name = BAD_INPUTS[case]
    args = _valid_args()
    break_args(args)
    with pytest.raises(RuntimeError, match=name):
        varlen_attention(**_on_cpu(args))

def _small_op_args(requires_grad):
    generator = torch.Generator().manual_seed(1)
    q, k, v, cu_q, cu_k = _inputs([9, 20], [9, 20], 2, 1, 16, torch.float32, generator)
    q, k, v = (t.requires_grad_(requires_grad) for t in (q, k, v))
    return q, k, v, cu_q, cu_k


def test_forward_op_passes_opcheck():
    q, k, v, cu_q, cu_k = _small_op_args(requires_grad=True)
    torch.library.opcheck(varlen_attention_fwd_op, (q, k, v, cu_q, cu_k, True, None, -1, -1, 0.0, True))


def test_backward_op_passes_opcheck():
    q, k, v, cu_q, cu_k = _small_op_args(requires_grad=False)
    out, lse = varlen_attention_fwd_op(q, k, v, cu_q, cu_k, True, None, 4, -1, 0.0, True)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(varlen_attention_bwd_op, (dout, dlse, q, k, v, out, lse, cu_q, cu_k, True, None, 4, -1, 0.0))


@pytest.mark.parametrize(
    "case", ["lengths_1_and_off_block", "q_shorter_and_longer_than_k", "window_both_sides", "softcap", "gqa_4_to_1"]
)
def test_op_runs_the_reference_where_the_kernel_cannot(case):
    """float64, which the kernel does not take: the op's forward and its explicit backward
    (`varlen_attention_bwd_ref`, no autograd inside a custom op) against autograd through the
    reference, with the lse in the loss."""
    lengths_q, lengths_k, num_heads, num_kv_heads, head_dim, kwargs = CASES[case]
    generator = torch.Generator().manual_seed(5)
    q, k, v, cu_q, cu_k = _inputs(
        lengths_q, lengths_k or lengths_q, num_heads, num_kv_heads, head_dim, torch.float64, generator
    )
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = varlen_attention_op(
        q, k, v, cu_q, cu_k, kwargs["causal"], kwargs.get("softmax_scale"), kwargs.get("window_size", (-1, -1)),
        kwargs.get("softcap", 0.0),
    )
    expected_out, expected_lse = varlen_attention_ref(q, k, v, cu_q, cu_k, return_lse=True, **kwargs)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)

    def gradients(out, lse):
        # Rows that see no key have lse -inf: where() keeps them out of the loss and its gradient.
        lse = torch.where(torch.isinf(lse), 0.0, lse)
        return torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))

    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=0)
    for name, actual, expected in zip("qkv", gradients(out, lse), gradients(expected_out, expected_lse)):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10, msg=f"d{name}")


def test_reference_in_the_ops_passes_opcheck():
    generator = torch.Generator().manual_seed(1)
    q, k, v, cu_q, cu_k = _inputs([9, 0, 20], [9, 3, 20], 2, 1, 16, torch.float64, generator)
    torch.library.opcheck(
        varlen_attention_fwd_op, (q.requires_grad_(), k, v, cu_q, cu_k, True, None, -1, -1, 2.0, True)
    )
    out, lse = varlen_attention_fwd_op(q.detach(), k, v, cu_q, cu_k, True, None, 4, -1, 0.0, True)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(
        varlen_attention_bwd_op, (dout, dlse, q.detach(), k, v, out, lse, cu_q, cu_k, True, None, 4, -1, 0.0)
    )


def test_torch_compile_fullgraph_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v, cu_q, cu_k = _small_op_args(requires_grad=True)

    def attention_sum(q, k, v):
        return (varlen_attention(q, k, v, cu_q, cu_k, 20, 20, causal=True, softcap=3.0) ** 2).sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attention_sum, backend=counter, fullgraph=True)
    compiled_grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    eager_grads = torch.autograd.grad(attention_sum(q, k, v), (q, k, v))
    assert counter.frame_count == 1
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)


def test_unchecked_offsets_still_check_shapes_and_match_checked():
    generator = torch.Generator().manual_seed(7)
    q, k, v, cu_q, cu_k = _inputs([5, 11], [5, 11], 4, 2, 32, torch.float32, generator)
    checked = varlen_attention(q, k, v, cu_q, cu_k, 11, 11)
    unchecked = varlen_attention(q, k, v, cu_q, cu_k, 11, 11, check_cu_seqlens=False)
    torch.testing.assert_close(unchecked, checked, atol=0, rtol=0)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        varlen_attention(q, k, v, cu_q.long(), cu_k, 11, 11, check_cu_seqlens=False)


def test_causal_defaults_to_false_as_in_flash_attn():
    """`flash_attn_varlen_func` is non-causal unless asked: a drop-in replacement must not change that."""
    generator = torch.Generator().manual_seed(3)
    q, k, v, cu_q, cu_k = _inputs([6, 9], [6, 9], 2, 1, 16, torch.float32, generator)
    default = varlen_attention(q, k, v, cu_q, cu_k, 9, 9)
    torch.testing.assert_close(default, varlen_attention(q, k, v, cu_q, cu_k, 9, 9, causal=False), atol=0, rtol=0)
    assert not torch.allclose(default, varlen_attention(q, k, v, cu_q, cu_k, 9, 9, causal=True))
