"""peft LoRA models patched with the fused path behave exactly like unpatched ones."""

import copy
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from fused_train.hf import peft_lora
from fused_train.hf.peft_lora import patch_lora_layers, unpatch_lora_layers
from fused_train.hf.quantize import Int4Linear, Int8Linear, dequantize_base, quantize_base
from fused_train.ops.lora import dropout_keep_mask, lora_linear
from tests.conftest import DEVICE

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Largest error allowed, relative to the largest expected value: fp32 kernels run exactly in the
# interpreter, as tf32 on the GPU.
TOLERANCE = 1e-2 if DEVICE == "cuda" else 1e-5


def _assert_close(actual, expected, name=""):
    error = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert error <= TOLERANCE * scale, f"{name}: error {error:.3g} vs largest value {scale:.3g}"


def _tiny_llama(bias=False, dtype=torch.float32, tie_word_embeddings=False):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_bias=bias, mlp_bias=bias,
        tie_word_embeddings=tie_word_embeddings,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(device=DEVICE, dtype=dtype)


def _lora_model(dropout=0.0, bias=False, dtype=torch.float32):
    # init_lora_weights=False: B random too, so the LoRA branch and dA are not zero.
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=dropout, lora_bias=bias, init_lora_weights=False
    )
    return get_peft_model(_tiny_llama(bias, dtype), config)


class _SameMaskDropout(torch.nn.Module):
    """Dropout drawing its mask as the fused path does (on CUDA, nn.Dropout draws another one)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x * dropout_keep_mask(x, self.p) / (1 - self.p) if self.training else x


def _input_ids():
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEVICE)


def _logits_and_lora_grads(model, seed=5):
    model.zero_grad()
    torch.manual_seed(seed)
    logits = model(input_ids=_input_ids()).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("dropout, bias", [(0.0, False), (0.1, True)])
def test_patched_model_matches_peft(dropout, bias):
    reference = _lora_model(dropout, bias).train()
    patched = copy.deepcopy(reference)
    if DEVICE == "cuda" and dropout > 0:
        for module in reference.modules():
            if isinstance(module, torch.nn.Dropout) and module.p == dropout:
                module.forward = _SameMaskDropout(dropout).forward
    keys = list(patched.state_dict())
    report = patch_lora_layers(patched)
    assert report.num_fused == 7 and report.num_fallback == 0, str(report)
    assert "7 of 7 LoRA layers fused" in str(report)
    assert list(patched.state_dict()) == keys

    expected_logits, expected_grads = _logits_and_lora_grads(reference)
    logits, grads = _logits_and_lora_grads(patched)
    _assert_close(logits, expected_logits)
    assert grads.keys() == expected_grads.keys() and len(grads) == 7 * (3 if bias else 2)
    for name in grads:
        _assert_close(grads[name], expected_grads[name], name)


def test_adapter_state_changes_behave_as_in_peft(tmp_path):
    reference = _lora_model().eval()
    patched = copy.deepcopy(reference)
    patch_lora_layers(patched)
    ids = _input_ids()

    def assert_same():
        _assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits)

    assert_same()
    with reference.disable_adapter(), patched.disable_adapter():
        assert_same()
    for model in (reference, patched):
        model.merge_adapter()
    assert "merged" in str(patch_lora_layers(patched))
    assert_same()
    for model in (reference, patched):
        model.unmerge_adapter()
    assert_same()

    second = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    for model in (reference, patched):
        torch.manual_seed(7)
        model.add_adapter("second", second)
        model.set_adapter("second")
    assert_same()
    for model in (reference, patched):
        model.set_adapter("default")
    assert_same()

    patched.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_tiny_llama(), tmp_path).eval()
    assert patch_lora_layers(loaded).num_fused == 7
    _assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_patch_is_idempotent_and_reversible():
    model = _lora_model()
    first = patch_lora_layers(model)
    assert patch_lora_layers(model).fused == first.fused
    assert unpatch_lora_layers(model) == 7
    assert unpatch_lora_layers(model) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_within_rounding_and_trains(bits):
    model = _lora_model(dtype=torch.bfloat16)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    float_weight = layer.base_layer.weight.detach().float()
    float_bytes = float_weight.numel() * 2
    assert quantize_base(model, bits=bits) == 7
    base = layer.base_layer
    if bits == 8:
        assert isinstance(base, Int8Linear) and base.weight.dtype == torch.int8
        step = base.weight_scale[:, None].expand(-1, 48)
        quantized_bytes = base.weight.numel() + 4 * base.weight_scale.numel()
        assert quantized_bytes < 0.6 * float_bytes
    else:
        assert isinstance(base, Int4Linear) and base.weight.dtype == torch.uint8 and base.weight.shape == (48, 32)
        step = base.weight_scale.repeat_interleave(64, 1)[:, :48]
        # in=48 pads to one 64-wide group: 32 bytes + 8 of scale and offset per row, against 96.
        quantized_bytes = base.weight.numel() + 4 * (base.weight_scale.numel() + base.weight_offset.numel())
        assert quantized_bytes < 0.45 * float_bytes
        assert any(k.endswith("q_proj.base_layer.weight_offset") for k in model.state_dict())
    assert any(k.endswith("q_proj.base_layer.weight_scale") for k in model.state_dict())
    assert patch_lora_layers(model).num_fused == 7

    # |x·(W_q − W)ᵀ| ≤ |x|·(step/2)ᵀ per element, plus the bf16 rounding of the output.
    x = torch.randn(11, 48, device=DEVICE, dtype=torch.bfloat16)
    with model.disable_adapter():
        exact = x.float() @ float_weight.t()
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    lora = (x.float() @ lora_a.float().t() @ lora_b.float().t()) * layer.scaling["default"]
    error = (layer(x).float() - exact - lora).abs()
    bound = x.float().abs() @ (step / 2).t() + 2e-2 * exact.abs().max()
    assert (error <= bound).all()
    # The fused path and peft's own forward (dequantizing in Int*Linear.forward) agree.
    with torch.no_grad():
        unpatch_lora_layers(model)
        expected = layer(x)
        patch_lora_layers(model)
        # bf16 outputs: peft rounds base and LoRA terms apart, the kernel rounds their sum once.
        torch.testing.assert_close(layer(x), expected, atol=2e-2 * expected.abs().max().item(), rtol=0)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _input_ids()
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_merges_only_once_dequantized(bits):
    model = _lora_model(dtype=torch.bfloat16)
    quantize_base(model, bits=bits)
    patch_lora_layers(model)
    ids = _input_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
    with pytest.raises(RuntimeError):
        model.merge_adapter()  # the delta would be lost to int8/int4 rounding
    assert not any(getattr(m, "merged", False) for m in model.modules())
    with pytest.raises(ValueError, match="dtype"):
        dequantize_base(model, torch.int8)
    assert dequantize_base(model, torch.bfloat16) == 7
    assert not any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits.float()
        merged = model.merge_and_unload()(input_ids=ids).logits.float()
    # The dequantized base is the quantized one; merging adds bf16 rounding of W + s·B·A.
    torch.testing.assert_close(unmerged, expected, rtol=0, atol=2e-2 * expected.abs().max().item())
    torch.testing.assert_close(merged, expected, rtol=0, atol=3e-2 * expected.abs().max().item())


def test_quantized_base_of_another_format_falls_back():
    """A uint8 weight that quantize_base did not make (bitsandbytes' NF4 is one) is not read as int4."""

    class ForeignPacked(torch.nn.Linear):
        pass

    model = _lora_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    foreign = ForeignPacked(48, 48, bias=False)
    foreign.weight = torch.nn.Parameter(torch.zeros(48, 24, dtype=torch.uint8), requires_grad=False)
    layer.base_layer = foreign
    report = patch_lora_layers(model)
    assert report.num_fused == 6
    fallback = report.fallback["base_model.model.model.layers.0.self_attn.q_proj"]
    assert "not made by fused_train.quantize_base" in fallback


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_scales_stay_float32_through_a_dtype_cast(bits):
    model = _lora_model()
    quantize_base(model, bits=bits)
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    before = {name: buffer.clone() for name, buffer in base.named_buffers()}
    assert len(before) == (1 if bits == 8 else 2)
    model.to(torch.bfloat16)
    assert base.weight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    for name, buffer in before.items():
        assert getattr(base, name).dtype == torch.float32 and torch.equal(getattr(base, name), buffer), name
    assert model.base_model.model.lm_head.weight.dtype == torch.bfloat16  # float weights are cast as asked
    assert patch_lora_layers(model).num_fused == 7
    assert torch.isfinite(model(input_ids=_input_ids()).logits).all()


def test_quantize_base_beyond_lora_layers_leaves_tied_weights_float(caplog):
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(_tiny_llama(tie_word_embeddings=True), config)
    llama = model.base_model.model
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    with caplog.at_level(logging.INFO, logger="fused_train"):
        # q, v under LoRA; k, o, gate, up, down frozen plain linears; lm_head tied to the embedding.
        assert quantize_base(model, bits=8, only_lora_layers=False) == 7
    assert type(llama.lm_head) is torch.nn.Linear and llama.lm_head.weight is llama.model.embed_tokens.weight
    assert "lm_head left float" in caplog.text
    layer = llama.model.layers[0]
    assert isinstance(layer.self_attn.k_proj, Int8Linear) and isinstance(layer.mlp.down_proj, Int8Linear)
    assert isinstance(layer.self_attn.q_proj.base_layer, Int8Linear)
    assert torch.isfinite(model(input_ids=_input_ids()).logits).all()


def _autocast_logits_and_lora_grads(model):
    """A float32 model trained under bf16 autocast (HF Trainer's `bf16=True` over a float32 load)."""
    model.zero_grad()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        logits = model(input_ids=_input_ids()).logits
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def _saved_bytes_beyond_parameters(model):
    """Bytes that autograd keeps for the backward of an autocast forward, the parameters themselves not counted."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(DEVICE, dtype=torch.bfloat16):
        model(input_ids=_input_ids())
    return sum(saved.values())


def test_autocast_over_float32_base_is_fused_as_reported(monkeypatch, caplog):
    reference = _lora_model()
    patched = copy.deepcopy(reference)
    report = patch_lora_layers(patched)
    assert report.num_fused == 7, str(report)
    fused_calls = []
    monkeypatch.setattr(peft_lora, "lora_linear", lambda *a, **k: fused_calls.append(1) or lora_linear(*a, **k))

    exact_logits, exact_grads = _logits_and_lora_grads(reference)
    expected_logits, expected_grads = _autocast_logits_and_lora_grads(reference)
    with caplog.at_level(logging.WARNING, logger="fused_train"):
        logits, grads = _autocast_logits_and_lora_grads(patched)
    assert len(fused_calls) == 7 and not caplog.records  # all that the report said, and no fallback
    assert logits.dtype == expected_logits.dtype == torch.bfloat16

    # Both run the base matmul in bf16: the fused path may be at most 2x further from float32 than peft.
    def error(actual, exact):
        return (actual.float() - exact).abs().max().item()

    assert error(logits, exact_logits) <= 2 * error(expected_logits, exact_logits) + 1e-3 * exact_logits.abs().max()
    assert grads.keys() == exact_grads.keys()
    for name, exact in exact_grads.items():
        assert error(grads[name], exact) <= 2 * error(expected_grads[name], exact) + 1e-3 * exact.abs().max(), name
    # Both keep a bf16 copy of each base weight for the backward (autocast caches no cast of a frozen one);
    # they differ only in the LoRA branch's small tensors (fused: S fp32 [tokens, r]; peft: bf16 A, B, x·Aᵀ).
    assert _saved_bytes_beyond_parameters(patched) <= 1.05 * _saved_bytes_beyond_parameters(reference)


def test_a_call_that_falls_back_logs_its_reason_once(monkeypatch, caplog):
    monkeypatch.setattr(peft_lora, "_told_reasons", set())
    reference = _lora_model().eval()
    patched = copy.deepcopy(reference)
    for model in (reference, patched):
        model.merge_adapter()
    assert "merged" in str(patch_lora_layers(patched))
    ids = _input_ids()
    with caplog.at_level(logging.WARNING, logger="fused_train"):
        patched(input_ids=ids)  # falls back as the report said: nothing new to tell
        assert not caplog.records
        for model in (reference, patched):
            model.unmerge_adapter()
        with reference.disable_adapter(), patched.disable_adapter():
            for _ in range(2):
                _assert_close(patched(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert [r.getMessage() for r in caplog.records] == [
        "fused LoRA: a call runs peft's forward instead: adapters disabled (logged once per reason)"
    ]


@pytest.mark.parametrize("case", ["bf16 adapter over a float32 model", "float64 input over an int8 base"])
def test_inputs_the_kernel_does_not_take_fall_back_to_peft(case):
    model = _lora_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    if case.startswith("bf16 adapter"):
        layer.lora_A.to(torch.bfloat16)
        layer.lora_B.to(torch.bfloat16)
        x = torch.randn(5, 48, device=DEVICE)
    else:
        quantize_base(model, bits=8)
        x = torch.randn(5, 48, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
        patch_lora_layers(model)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert peft_lora.fused_fallback_reason(layer, x) is not None
