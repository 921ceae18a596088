"""Fused linear cross-entropy vs the float64 definition: loss, dX, dW and dbias for every option.

float16/bfloat16/float32 inputs run the Triton kernels (the interpreter on CPU); float64 inputs run
the reference's chunked path, so both are checked against `linear_cross_entropy_ref`.
"""

import pytest
import torch

from fused_train.kernels import linear_cross_entropy as kernel_module
from fused_train.kernels import linear_cross_entropy_ref as ref_module
from fused_train.kernels.linear_cross_entropy_ref import linear_cross_entropy_ref
from fused_train.ops.linear_cross_entropy import _check_inputs, linear_cross_entropy
from tests.conftest import DEVICE

# Beyond twice PyTorch's own error in the same dtype, this much of the largest reference value.
EXTRA_ERROR = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# float32 against float64: exact in the interpreter, tf32 (10-bit mantissa) on the GPU.
FP32_TOLERANCE = dict(atol=1e-5, rtol=1e-4) if DEVICE == "cpu" else dict(atol=5e-3, rtol=5e-3)

OPTIONS = {
    "plain": {},
    "bias": dict(with_bias=True),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "num_items_in_batch": dict(num_items_in_batch=50),
    "label_smoothing": dict(label_smoothing=0.1),
    "softcap": dict(softcap=3.0),
    "z_loss": dict(z_loss=1e-2),
    "ignore_index 7": dict(ignore_index=7),
    "everything": dict(with_bias=True, reduction="none", label_smoothing=0.2, softcap=3.0, z_loss=1e-2),
}


@pytest.fixture(autouse=True)
def vocab_chunks_of_128(monkeypatch):
    """The backward's vocab chunks at 128 columns: every vocabulary over 128 here takes several
    chunks (dx summed across them, the last one short), those up to 128 one (dx written at once)."""
    monkeypatch.setattr(kernel_module, "DLOGITS_CHUNK_COLUMNS", 128)


def _make_inputs(batch, seq, hidden, vocab, dtype, with_bias=False, ignore_index=-100, seed=0):
    """Leaves in `dtype`; labels `[batch, seq]` with ignored tokens and, for batch > 1, a row all ignored."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, hidden, generator=generator)
    weight = torch.randn(vocab, hidden, generator=generator) * (2.0 / hidden**0.5)
    bias = torch.randn(vocab, generator=generator) if with_bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[:, ::4] = ignore_index
    if batch > 1:
        labels[1] = ignore_index
    leaves = [t if t is None else t.to(DEVICE, dtype).requires_grad_() for t in (x, weight, bias)]
    return *leaves, labels.to(DEVICE)


def _loss_and_grads(fn, x, weight, bias, labels, grad_seed=1, **kwargs):
    loss = fn(x, weight, labels, bias=bias, **kwargs)
    leaves = [t for t in (x, weight, bias) if t is not None]
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed)).to(loss.device, loss.dtype)
    grads = torch.autograd.grad(loss, leaves, upstream)
    return [loss.detach(), *grads]


def _float64(x, weight, bias, labels):
    return *[t if t is None else t.detach().double().requires_grad_() for t in (x, weight, bias)], labels


def _torch_path(x, weight, labels, bias=None, softcap=None, label_smoothing=0.0):
    """Plain PyTorch in the inputs' dtype: logits in that dtype, upcast for the loss (as HF does)."""
    logits = torch.nn.functional.linear(x, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), label_smoothing=label_smoothing)


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_definition(name, dtype, monkeypatch):
    # Chunks of 5 tokens on the reference path: several chunks and a short last one.
    monkeypatch.setattr(ref_module, "CHUNK_ELEMENTS", 5 * 301)
    options = dict(OPTIONS[name])
    with_bias = options.pop("with_bias", False)
    inputs = _make_inputs(3, 13, 48, 301, dtype, with_bias, options.get("ignore_index", -100))
    got = _loss_and_grads(linear_cross_entropy, *inputs, **options)
    expected = _loss_and_grads(linear_cross_entropy_ref, *_float64(*inputs), **options)
    tolerance = FP32_TOLERANCE if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, **tolerance)
    if options.get("reduction") == "none":
        assert got[0].shape == inputs[3].shape and (got[0][inputs[3] == options.get("ignore_index", -100)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_error_within_torchs_own_error(dtype, monkeypatch):
    """An odd vocabulary (4099: 33 tiles, the last one 3 wide; 32003 takes 36 s in the interpreter)
    and token count; softcap and smoothing on, so every term is rounded. The backward in 5 vocab
    chunks, the last 3 wide (fewer launches than at 128)."""
    monkeypatch.setattr(kernel_module, "DLOGITS_CHUNK_COLUMNS", 1024)
    options = dict(softcap=20.0, label_smoothing=0.1)
    inputs = _make_inputs(1, 9, 32, 4099, dtype, with_bias=True)
    ours = _loss_and_grads(linear_cross_entropy, *inputs, **options)
    plain = _loss_and_grads(_torch_path, *inputs, **options)
    exact = _loss_and_grads(linear_cross_entropy_ref, *_float64(*inputs), **options)
    for name, o, p, e in zip(("loss", "dx", "dW", "dbias"), ours, plain, exact):
        torch_error = (p.double() - e).abs().max().item()
        our_error = (o.double() - e).abs().max().item()
        assert our_error <= 2 * torch_error + EXTRA_ERROR[dtype] * e.abs().max().item(), (name, our_error, torch_error)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_confident_targets_keep_their_small_gradient(dtype):
    """softmax -> 1: each target's logit leads the others by 15, so `1 - p` is ~1e-4: fp32 resolves
    it, a 16-bit float rounds p to 1 (its spacing below 1 is 2**-8 or 2**-11), which would zero the
    target's gradient; `p - 1` must be formed in fp32 before anything is rounded (Liger #1329)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randperm(301, generator=generator)[:9]
    x = torch.linalg.qr(torch.randn(32, 9, generator=generator)).Q.T * 3.0  # orthogonal rows, |x_t| = 3
    weight = torch.randn(301, 32, generator=generator) * 0.1
    weight[labels] += 15.0 * x / 9.0
    x, weight = (t.to(DEVICE, dtype).requires_grad_() for t in (x, weight))
    labels = labels.to(DEVICE)
    ours = _loss_and_grads(linear_cross_entropy, x, weight, None, labels)
    plain = _loss_and_grads(_torch_path, x, weight, None, labels)
    exact = _loss_and_grads(linear_cross_entropy_ref, *_float64(x, weight, None, labels))
    assert 1e-5 < exact[0].item() < 1e-3
    for o, p, e in zip(ours, plain, exact):
        error, torch_error = (o.double() - e).abs().max().item(), (p.double() - e).abs().max().item()
        assert error <= 2 * torch_error + EXTRA_ERROR[dtype] * e.abs().max().item()


def test_outputs_are_fully_written(poisoned_outputs):
    inputs = _make_inputs(2, 11, 40, 200, torch.float32, with_bias=True)
    got = _loss_and_grads(linear_cross_entropy, *inputs, reduction="none")
    expected = _loss_and_grads(linear_cross_entropy_ref, *_float64(*inputs), reduction="none")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, **FP32_TOLERANCE)


def test_16bit_outputs_are_fully_written(request):
    """bf16: dx's fp32 sum over the vocab chunks is its own buffer (fp32 sums into dx itself), and
    poisoned buffers must give the same bits as clean ones."""
    inputs = _make_inputs(2, 11, 40, 200, torch.bfloat16, with_bias=True)
    clean = _loss_and_grads(linear_cross_entropy, *inputs, reduction="none")
    request.getfixturevalue("poisoned_outputs")
    poisoned = _loss_and_grads(linear_cross_entropy, *inputs, reduction="none")
    for name, c, p in zip(("loss", "dx", "dW", "dbias"), clean, poisoned):
        assert torch.equal(c, p), name


def test_frozen_weight_and_no_tokens():
    x, weight, _, labels = _make_inputs(1, 7, 40, 100, torch.float32)
    weight.requires_grad_(False)
    (grad_x,) = torch.autograd.grad(linear_cross_entropy(x, weight, labels), [x])
    x64 = x.detach().double().requires_grad_()
    linear_cross_entropy_ref(x64, weight.double(), labels).backward()
    torch.testing.assert_close(grad_x.double(), x64.grad, **FP32_TOLERANCE)
    empty = x[:, :0]
    assert linear_cross_entropy(empty, weight, labels[:, :0], reduction="sum").item() == 0.0


def _good_args():
    return dict(hidden=torch.randn(2, 5, 16), weight=torch.randn(30, 16), labels=torch.randint(0, 30, (2, 5)))


@pytest.mark.parametrize(
    "change, argument",
    [
        (dict(weight=torch.randn(30, 15)), "weight"),
        (dict(weight=torch.randn(30, 16, dtype=torch.float16)), "weight"),
        (dict(labels=torch.randint(0, 30, (2, 6))), "labels"),
        (dict(labels=torch.full((2, 5), 30)), "labels"),
        (dict(labels=torch.full((2, 5), -1)), "labels"),
        (dict(labels=torch.zeros(2, 5)), "labels"),
        (dict(bias=torch.randn(29)), "bias"),
        (dict(reduction="avg"), "reduction"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(softcap=0.0), "softcap"),
        (dict(z_loss=-1.0), "z_loss"),
        (dict(reduction="sum", num_items_in_batch=4), "num_items_in_batch"),
        (dict(hidden=torch.ones(2, 5, 16, dtype=torch.int32)), "hidden"),
    ],
)
def test_rejects_bad_input(change, argument):
    args = _good_args() | change
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=argument):
        linear_cross_entropy(**args)


def test_custom_ops_pass_opcheck():
    x, weight, bias, labels = (t.detach() for t in _make_inputs(1, 9, 40, 70, torch.float32, with_bias=True))
    labels = labels.reshape(-1)
    x = x.reshape(-1, 40)
    args = (x, weight, bias, labels, -100, 0.1, 3.0, 1e-3)
    torch.library.opcheck(torch.ops.fused_train.linear_cross_entropy_fwd.default, args)
    _, stats = torch.ops.fused_train.linear_cross_entropy_fwd(*args)
    grad = torch.randn(9, device=DEVICE)
    args = (grad, x, weight, bias, labels, stats, -100, 0.1, 3.0, 1e-3, True, True, True)
    torch.library.opcheck(torch.ops.fused_train.linear_cross_entropy_bwd.default, args)


def test_compiles_fullgraph():
    x, weight, _, labels = _make_inputs(1, 9, 40, 70, torch.float32)
    compiled = torch.compile(
        lambda *a: linear_cross_entropy(*a, num_items_in_batch=torch.tensor(5)), fullgraph=True, backend="aot_eager"
    )
    got = _loss_and_grads(lambda x, w, y, bias: compiled(x, w, y), x, weight, None, labels)
    expected = _loss_and_grads(lambda x, w, y, bias: linear_cross_entropy(x, w, y, num_items_in_batch=5), x, weight,
                               None, labels)  # fmt: skip
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.fixture
def programs_in_reverse(monkeypatch):
    """The interpreter runs a grid's programs last to first: a sum whose order follows the schedule
    (atomics) changes its low bits, as it does from run to run on a GPU."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    in_order = builder.set_grid_idx

    def reversed_idx(x, y, z):
        in_order(*(n - 1 - i for i, n in zip((x, y, z), builder.grid_dim)))

    monkeypatch.setattr(builder, "set_grid_idx", reversed_idx)


@pytest.mark.skipif(DEVICE != "cpu", reason="reorders the Triton interpreter's programs")
def test_gradients_do_not_depend_on_program_order(request):
    """300 tokens (3 token blocks, the last one short) × 301 vocab (several vocab blocks, the last
    short): each element of dx and dW sums over several blocks; bias and every option on."""
    options = dict(label_smoothing=0.1, softcap=3.0, z_loss=1e-2)
    inputs = _make_inputs(3, 100, 48, 301, torch.float32, with_bias=True)
    first, second = (_loss_and_grads(linear_cross_entropy, *inputs, **options) for _ in range(2))
    request.getfixturevalue("programs_in_reverse")
    reordered = _loss_and_grads(linear_cross_entropy, *inputs, **options)
    for name, a, b, c in zip(("loss", "dx", "dW", "dbias"), first, second, reordered):
        assert torch.equal(a, b) and torch.equal(a, c), name


def test_label_check_does_not_read_device_labels_back():
    """A training step must not sync with the host: off the CPU, the labels' range check is a device
    assert, never read back. Meta tensors, which cannot be read back at all, stand in for CUDA ones."""
    args = {k: v.to("meta") for k, v in _good_args().items()}
    _check_inputs(args["hidden"], args["weight"], args["labels"], None, -100, "mean", 0.0, None, 0.0, None)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA's sync debug mode")
def test_training_step_does_not_sync():
    x, weight, bias, labels = _make_inputs(2, 11, 40, 200, torch.bfloat16, with_bias=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = linear_cross_entropy(x, weight, labels, bias=bias)
        torch.autograd.grad(loss, [x, weight, bias])
    finally:
        torch.cuda.set_sync_debug_mode("default")
