"""Multi-LoRA linear (one adapter slot per token) vs a float64 per-token loop."""

import pytest
import torch

import fused_train
from fused_train.kernels import multi_lora as multi_lora_kernels
from fused_train.kernels import multi_lora_ref
from fused_train.kernels.lora_ref import quantize_int4, quantize_int8
from fused_train.kernels.multi_lora_ref import SlotPlan, base_linear_ref, multi_lora_linear_ref, plan_slots
from fused_train.ops import multi_lora as multi_lora_ops
from tests.conftest import DEVICE
from tests.kernels.conftest import make_base_weight

# Beyond twice the error of PyTorch in the same dtype, this much of the largest reference value:
# the kernels round the base output once before the LoRA term is added; fp32 runs as tf32 on the GPU.
EXTRA_ERROR = {torch.float32: 2e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}
PATHS = ["per_token", "segments"]


def _adapters(num_slots, r_max, in_features, out_features, ranks, dtype, pad=0.0):
    """Stacks whose entries past each slot's rank hold `pad` (NaN: they must never be read)."""
    lora_a = torch.randn(num_slots, r_max, in_features, device=DEVICE) / in_features**0.5
    lora_b = torch.randn(num_slots, out_features, r_max, device=DEVICE)
    in_rank = torch.arange(r_max, device=DEVICE) < ranks[:, None]
    lora_a = torch.where(in_rank[:, :, None], lora_a, pad).to(dtype)
    lora_b = torch.where(in_rank[:, None, :], lora_b, pad).to(dtype)
    return lora_a, lora_b


def _loop_ref(x, weight, lora_a, lora_b, token_slots, scalings, ranks, bias=None, **quantized):
    """float64, one token at a time, reading only each slot's first `ranks[s]` rows."""
    if quantized:
        weight = base_linear_ref(torch.eye(x.shape[1], device=DEVICE), weight, None, **quantized).T
    y = x.double() @ weight.double().T
    if bias is not None:
        y += bias.double()
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            rank = int(ranks[slot])
            shrunk = x[t].double() @ lora_a[slot, :rank].double().T
            y[t] += float(scalings[slot]) * shrunk @ lora_b[slot, :, :rank].double().T
    return y


@pytest.mark.parametrize("grouped_mm, dtype", [(True, torch.float32), (True, torch.float64), (False, torch.float32)],
                         ids=["grouped_mm", "float64", "torch before 2.10"])  # fmt: skip
@pytest.mark.parametrize("plan_given", [False, True], ids=["plan made", "plan given"])
@pytest.mark.parametrize("num_tokens, num_slots", [(3, 5), (40, 4), (0, 3)])
def test_reference_matches_per_token_loop(plan_given, num_tokens, num_slots, grouped_mm, dtype, monkeypatch):
    """With NaN padding, and feature counts that are no multiple of 16 bytes (grouped_mm's stride
    rule); in float64 (which grouped_mm refuses) and without `F.grouped_mm` (torch < 2.10) the
    groups are looped over."""
    if not grouped_mm:
        monkeypatch.delattr(torch.nn.functional, "grouped_mm", raising=False)
    in_features, out_features, r_max = 33, 17, 16
    ranks = torch.randint(0, r_max + 1, (num_slots,), dtype=torch.int32, device=DEVICE)
    lora_a, lora_b = _adapters(num_slots, r_max, in_features, out_features, ranks, dtype, pad=float("nan"))
    x = torch.randn(num_tokens, in_features, device=DEVICE, dtype=dtype)
    weight = torch.randn(out_features, in_features, device=DEVICE, dtype=dtype)
    token_slots = torch.randint(-1, num_slots, (num_tokens,), dtype=torch.int32, device=DEVICE)
    scalings = torch.rand(num_slots, device=DEVICE)
    plan = plan_slots(token_slots, num_slots) if plan_given else None
    y = multi_lora_linear_ref(x, weight, lora_a, lora_b, token_slots, scalings, ranks, slot_plan=plan)
    expected = _loop_ref(x, weight, lora_a, lora_b, token_slots, scalings, ranks)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def _case(tokens, num_slots, r_max, in_features, out_features, dtype, lora_dtype, slots, ranks, bias, bits):
    """Inputs of one case; `slots` ("random", "one", "distinct" or "base") says how tokens pick slots."""
    torch.manual_seed(0)
    ranks = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
    lora_a, lora_b = _adapters(num_slots, r_max, in_features, out_features, ranks, lora_dtype, pad=float("nan"))
    token_slots = {
        "random": lambda: torch.randint(-1, num_slots, (tokens,)),
        "one": lambda: torch.full((tokens,), num_slots - 1),
        "distinct": lambda: torch.randperm(num_slots)[:tokens],
        "base": lambda: torch.full((tokens,), -1),
    }[slots]().to(device=DEVICE, dtype=torch.int32)
    weight, quantized = make_base_weight(out_features, in_features, dtype, bits)
    return quantized | dict(
        x=torch.randn(tokens, in_features, device=DEVICE, dtype=dtype),
        weight=weight,
        lora_a=lora_a,
        lora_b=lora_b,
        token_slots=token_slots,
        scalings=torch.rand(num_slots, device=DEVICE) + 0.5,
        ranks=ranks,
        bias=torch.randn(out_features, device=DEVICE, dtype=bias) if bias else None,
    )


MIXED_RANKS = [64, 1, 17, 0, 33, 16, 48, 5]
CASES = {
    # -1 slots, unsorted slots, ranks 0..64 in an r_max 64 stack, odd in and out.
    "fp32 mixed": (40, 8, 64, 37, 45, torch.float32, torch.float32, "random", MIXED_RANKS, torch.float32, None),
    "fp16 one slot": (40, 3, 16, 64, 33, torch.float16, torch.float16, "one", [3, 16, 9], torch.float16, None),
    "bf16 distinct": (6, 8, 64, 40, 72, torch.bfloat16, torch.float32, "distinct", MIXED_RANKS, None, None),
    "bf16 int8": (24, 4, 32, 48, 40, torch.bfloat16, torch.bfloat16, "random", [32, 7, 16, 25], torch.float32, 8),
    "fp16 int4": (24, 4, 32, 70, 40, torch.float16, torch.float16, "random", [32, 7, 16, 25], None, 4),
    "base only": (20, 2, 16, 32, 24, torch.float32, torch.float32, "base", [16, 8], torch.float32, None),
    "empty": (0, 3, 16, 32, 24, torch.bfloat16, torch.bfloat16, "random", [16, 8, 1], None, None),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_reference(monkeypatch, poisoned_outputs, path, case):
    """Each path forced, against the float64 per-token loop, within twice PyTorch's error in the same
    dtype plus EXTRA_ERROR; the stacks' padding is NaN and the launchers' buffers start NaN."""
    monkeypatch.setattr(multi_lora_kernels, "choose_path", lambda num_tokens, num_slots: path)
    inputs = _case(*CASES[case])
    y = fused_train.multi_lora_linear(**inputs)
    assert y.dtype == inputs["x"].dtype and y.shape == (inputs["x"].shape[0], inputs["weight"].shape[0])
    _assert_within_error_rule(y, inputs)


def _assert_within_error_rule(y, inputs):
    """`y` of 2-d `inputs` against the float64 per-token loop: within twice the error of PyTorch in
    the same dtype (the stacks' NaN padding zeroed) plus EXTRA_ERROR of the loop's largest value."""
    exact = _loop_ref(**inputs)
    zero_padded = {k: torch.nan_to_num(v, nan=0.0) if k.startswith("lora_") else v for k, v in inputs.items()}
    same_dtype = multi_lora_linear_ref(**zero_padded)
    error = (y.double().reshape(exact.shape) - exact).abs().max().item() if y.numel() else 0.0
    torch_error = (same_dtype.double() - exact).abs().max().item() if y.numel() else 0.0
    allowed = 2 * torch_error + EXTRA_ERROR[inputs["x"].dtype] * (exact.abs().max().item() if y.numel() else 0.0)
    assert error <= allowed, f"error {error:.3g} > allowed {allowed:.3g}"


def test_wide_segment_tiles_span_slots(monkeypatch, poisoned_outputs):
    """64-row tiles (long prefill segments), forced at 150 tokens: tiles holding several slots'
    segments and the base-only tokens, which sort first."""
    monkeypatch.setattr(multi_lora_kernels, "choose_path", lambda num_tokens, num_slots: "segments")
    monkeypatch.setattr(multi_lora_kernels, "WIDE_TILES_MIN_TOKENS", 0)
    inputs = _case(150, 3, 32, 40, 136, torch.float32, torch.float32, "random", [32, 9, 20], None, None)
    _assert_within_error_rule(fused_train.multi_lora_linear(**inputs), inputs)


def _rounding_rule(x, weight, lora_a, lora_b, token_slots, scalings, ranks):
    """The kernels' rounding rule (kernels/multi_lora.py's docstring), one token at a time: the
    base output rounded to x's dtype, float32 `scalings[s]·S` rounded to it, the rest exact."""
    dtype = x.dtype
    y = (x.double() @ weight.double().T).to(dtype).double()
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            rank = int(ranks[slot])
            shrunk = (x[t].double() @ lora_a[slot, :rank].to(dtype).double().T).float()
            seed = (shrunk * scalings[slot]).to(dtype).double()
            y[t] += seed @ lora_b[slot, :, :rank].to(dtype).double().T
    return y.to(dtype)


@pytest.mark.parametrize("path", PATHS)
def test_paths_round_by_one_rule_in_bf16(monkeypatch, poisoned_outputs, path):
    """Each path gives exactly what the rounding rule gives, so the two agree: x and A hold small
    integers (times 2**-4), which makes S exact in any order of summation, and each slot's two rank
    rows nearly cancel in the expand, so that a path that skipped the rounding of `scalings[s]·S`
    would be off by many bf16 steps. The base weight is zero: y is the LoRA term alone."""
    monkeypatch.setattr(multi_lora_kernels, "choose_path", lambda num_tokens, num_slots: path)
    generator = torch.Generator().manual_seed(3)
    num_slots, r_max, in_features, out_features, tokens = 3, 16, 32, 40, 24
    lora_a = torch.randint(-3, 4, (num_slots, r_max, in_features), generator=generator) / 16
    lora_a[:, 1] = lora_a[:, 0]
    lora_a[:, 1, 0] += 1 / 16
    column = torch.randn(num_slots, out_features, generator=generator)
    lora_b = torch.zeros(num_slots, out_features, r_max)
    lora_b[:, :, 0], lora_b[:, :, 1] = column, -column
    inputs = dict(
        x=torch.randint(-3, 4, (tokens, in_features), generator=generator).to(DEVICE, torch.bfloat16),
        weight=torch.zeros(out_features, in_features, device=DEVICE, dtype=torch.bfloat16),
        lora_a=lora_a.to(DEVICE, torch.bfloat16),
        lora_b=lora_b.to(DEVICE, torch.bfloat16),
        token_slots=torch.randint(-1, num_slots, (tokens,), generator=generator, dtype=torch.int32).to(DEVICE),
        scalings=(torch.rand(num_slots, generator=generator) + 0.3).to(DEVICE),
        ranks=torch.full((num_slots,), 2, dtype=torch.int32, device=DEVICE),
    )
    y = fused_train.multi_lora_linear(**inputs)
    expected = _rounding_rule(**inputs)
    assert expected.abs().max() > 0
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_path_rule():
    assert multi_lora_kernels.choose_path(64, 32) == "per_token"
    assert multi_lora_kernels.choose_path(8192, 32) == "segments"
    assert multi_lora_kernels.choose_path(16, 1) == "segments"


@pytest.mark.parametrize("path", PATHS)
def test_launches_do_not_grow_with_distinct_adapters(monkeypatch, path):
    """The same Triton launches for a batch of one adapter as for one adapter per token."""
    monkeypatch.setattr(multi_lora_kernels, "choose_path", lambda num_tokens, num_slots: path)
    kernel_class = type(multi_lora_kernels._shrink_per_token_kernel)
    launched = []
    run = kernel_class.run

    def counting_run(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", counting_run)
    counts = []
    for slots in ("one", "distinct"):
        launched.clear()
        fused_train.multi_lora_linear(**_case(8, 8, 16, 32, 24, torch.float32, torch.float32, slots, [16] * 8, None,
                                              None))  # fmt: skip
        counts.append(list(launched))
    assert counts[0] == counts[1] and len(counts[0]) == 3, counts


def _valid_inputs():
    num_slots, r_max, in_features, out_features, tokens = 3, 8, 16, 12, 5
    ranks = torch.tensor([8, 4, 0], dtype=torch.int32, device=DEVICE)
    lora_a, lora_b = _adapters(num_slots, r_max, in_features, out_features, ranks, torch.float32)
    return dict(
        x=torch.randn(tokens, in_features, device=DEVICE),
        weight=torch.randn(out_features, in_features, device=DEVICE),
        lora_a=lora_a,
        lora_b=lora_b,
        token_slots=torch.tensor([0, -1, 2, 1, 0], dtype=torch.int32, device=DEVICE),
        scalings=torch.ones(num_slots, device=DEVICE),
        ranks=ranks,
    )


def _bad(**changes):
    return changes


BAD_INPUTS = {
    "slot below -1": ("token_slots", _bad(token_slots=torch.tensor([0, -2, 0, 0, 0], dtype=torch.int32))),
    "slot past S": ("token_slots", _bad(token_slots=torch.tensor([0, 3, 0, 0, 0], dtype=torch.int32))),
    "int64 slots": ("token_slots", _bad(token_slots=torch.zeros(5, dtype=torch.int64))),
    "slots per token": ("token_slots", _bad(token_slots=torch.zeros(4, dtype=torch.int32))),
    "rank past r_max": ("ranks", _bad(ranks=torch.tensor([9, 4, 0], dtype=torch.int32))),
    "negative rank": ("ranks", _bad(ranks=torch.tensor([8, -1, 0], dtype=torch.int32))),
    "ranks per slot": ("ranks", _bad(ranks=torch.tensor([8, 4], dtype=torch.int32))),
    "float scalings": ("scalings", _bad(scalings=torch.ones(3, dtype=torch.float16))),
    "scalings per slot": ("scalings", _bad(scalings=torch.ones(2))),
    "lora_a in": ("lora_a", _bad(lora_a=torch.zeros(3, 8, 15))),
    "lora_a 2-D": ("lora_a", _bad(lora_a=torch.zeros(8, 16))),
    "lora_a r_max": ("lora_a", _bad(lora_a=torch.zeros(3, 129, 16), lora_b=torch.zeros(3, 12, 129), ranks=None)),
    "lora_b": ("lora_b", _bad(lora_b=torch.zeros(3, 12, 4))),
    "lora dtype": ("lora_a and lora_b", _bad(lora_b=torch.zeros(3, 12, 8, dtype=torch.float16))),
    "weight in": ("weight", _bad(weight=torch.zeros(12, 15))),
    "weight dtype": ("weight", _bad(weight=torch.zeros(12, 16, dtype=torch.float16))),
    "x dtype": ("x", _bad(x=torch.zeros(5, 16, dtype=torch.float64))),
    "bias": ("bias", _bad(bias=torch.zeros(11))),
    "int8 without scale": ("weight_scale", _bad(weight=torch.zeros(12, 16, dtype=torch.int8))),
    "x requires grad": ("x", _bad(x=torch.zeros(5, 16, requires_grad=True))),
    "device": ("on one device", _bad(scalings=torch.ones(3, device="meta"))),
}


# The slots' and ranks' values: read back (ValueError) on CPU tensors only. On a GPU they are asserted
# on the device, whose failure would end the test session's CUDA context, so these cases run on a CPU.
VALUE_CASES = ("slot below -1", "slot past S", "rank past r_max", "negative rank")


@pytest.mark.parametrize("what", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument(what):
    name, changes = BAD_INPUTS[what]
    device = "cpu" if what in VALUE_CASES else DEVICE
    inputs = {k: v.to(device) for k, v in _valid_inputs().items()}
    inputs |= {k: v.to(device) if v is not None and v.device.type != "meta" else v for k, v in changes.items()}
    with pytest.raises(ValueError, match=name):
        fused_train.multi_lora_linear(**inputs)


def test_value_checks_can_be_skipped():
    """check_values=False reads nothing back (a GPU hot loop); the shapes are still checked."""
    inputs = _valid_inputs()
    fused_train.multi_lora_linear(**inputs | dict(ranks=torch.tensor([8, 4, 0], dtype=torch.int32)), check_values=False)
    with pytest.raises(ValueError, match="ranks"):
        fused_train.multi_lora_linear(**inputs | dict(ranks=torch.zeros(2, dtype=torch.int32)), check_values=False)


def test_value_checks_read_nothing_back_off_the_cpu():
    """Off a CPU the ranges are asserted on the device, no read back (which would sync a GPU at every
    call): meta tensors, whose values cannot be read, go through to the op's fake."""
    inputs = {name: t.to("meta") for name, t in _valid_inputs().items()}
    y = fused_train.multi_lora_linear(**inputs)
    assert y.device.type == "meta" and y.shape == (5, 12)


@pytest.mark.parametrize("what", VALUE_CASES)
def test_device_value_checks_name_the_argument(monkeypatch, what):
    """The device path's asserts, on CPU tensors, where `torch._assert_async` raises at once."""
    monkeypatch.setattr(multi_lora_ops, "values_readable", lambda tensor: False)
    name, changes = BAD_INPUTS[what]
    with pytest.raises(RuntimeError, match=name):
        fused_train.multi_lora_linear(**{k: v.cpu() for k, v in (_valid_inputs() | changes).items()})

def test_slot_plan_of_other_slots_or_shape_is_refused():
    inputs = {k: v.cpu() for k, v in _valid_inputs().items()}  # a CPU's check reads values: ValueError
    num_slots = inputs["lora_a"].shape[0]
    token_slots = inputs["token_slots"]
    other = plan_slots(torch.roll(token_slots, 1), num_slots)
    assert not torch.equal(other.order, plan_slots(token_slots, num_slots).order)  # the case tests something
    with pytest.raises(ValueError, match="slot_plan is not plan_slots"):
        fused_train.multi_lora_linear(**inputs, slot_plan=other)
    plan = plan_slots(token_slots, num_slots)
    bad_plans = {
        "slot_plan.order": SlotPlan(plan.order.int(), plan.ends),
        "slot_plan.ends": SlotPlan(plan.order, plan.ends[:-1]),
        "a SlotPlan": tuple(plan),
    }
    for match, bad in bad_plans.items():
        with pytest.raises(ValueError, match=match):
            fused_train.multi_lora_linear(**inputs, slot_plan=bad, check_values=False)
    with_plan = fused_train.multi_lora_linear(**inputs, slot_plan=plan)
    torch.testing.assert_close(with_plan, fused_train.multi_lora_linear(**inputs))


def test_leading_dimensions_and_default_ranks():
    inputs = _valid_inputs()
    x = inputs["x"][:4].reshape(2, 2, -1)
    slots = inputs["token_slots"][:4]
    full = torch.full((3,), 8, dtype=torch.int32, device=DEVICE)
    flat = inputs | dict(x=x.reshape(4, -1), token_slots=slots, ranks=full)
    for token_slots in (slots, slots.view(2, 2)):
        y = fused_train.multi_lora_linear(**inputs | dict(x=x, token_slots=token_slots, ranks=None))
        assert y.shape == (2, 2, 12)
        _assert_within_error_rule(y, flat)


def test_custom_op_passes_opcheck():
    inputs = _valid_inputs()
    weight, weight_scale = quantize_int8(inputs["weight"])
    args = (inputs["x"], weight, inputs["lora_a"], inputs["lora_b"], inputs["token_slots"], inputs["scalings"],
            inputs["ranks"], torch.randn(12, device=DEVICE), weight_scale, None)  # fmt: skip
    torch.library.opcheck(torch.ops.fused_train.multi_lora_linear.default, args)
    packed, scale, offset = quantize_int4(inputs["weight"])
    args = args[:1] + (packed,) + args[2:8] + (scale, offset)
    torch.library.opcheck(torch.ops.fused_train.multi_lora_linear.default, args)


def test_compiles_fullgraph():
    """torch.compile traces the custom op through its fake: one graph, no break (the value checks,
    which read tensors back, are skipped while tracing)."""
    inputs = _valid_inputs()
    compiled = torch.compile(fused_train.multi_lora_linear, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**inputs), fused_train.multi_lora_linear(**inputs))


def test_reference_sees_stacks_changed_in_place():
    """The reference caches padded stacks per tensor (an adapter pool's stay the same tensors):
    a slot refilled, a rank and a scale changed in place, as the pool does, show on the next call."""
    inputs = _case(12, 3, 16, 20, 24, torch.float32, torch.float32, "random", [16, 4, 9], None, None)
    stacks = [inputs[name] for name in ("lora_a", "lora_b", "scalings", "ranks")]
    assert multi_lora_ref.padded_stacks(*stacks) is multi_lora_ref.padded_stacks(*stacks)
    multi_lora_linear_ref(**inputs)
    inputs["lora_b"][1, :, :4].mul_(-2.0)
    inputs["ranks"][2] = 3
    inputs["scalings"][0] *= 3.0
    torch.testing.assert_close(multi_lora_linear_ref(**inputs).double(), _loop_ref(**inputs), rtol=1e-5, atol=1e-5)
