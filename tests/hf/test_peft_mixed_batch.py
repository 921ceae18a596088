"""peft's mixed-adapter batches (`adapter_names`) on a patched model: one multi_lora_linear call per
LoRA layer whatever the number of adapters, outputs and greedy generations as unpatched peft's."""

import copy
from collections import Counter

import pytest
import torch
from peft import LoraConfig, get_peft_model

import fused_train
from fused_train.hf import peft_lora
from tests.conftest import DEVICE
from tests.hf.tiny_models import tiny_model

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Different ranks and target sets (init_lora_weights=False: B is not zero, so every adapter counts).
ADAPTERS = {
    "qv4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all8": dict(r=8, lora_alpha=16, target_modules=ATTENTION + ["gate_proj", "up_proj", "down_proj"]),
    "rs2": dict(r=2, lora_alpha=2, target_modules=["q_proj", "up_proj", "down_proj"], use_rslora=True),
}
MIXED = ["qv4", "__base__", "all8", "rs2", "all8"]
TOLERANCE = 1e-2 if DEVICE == "cuda" else 1e-5


def _peft_model(adapters=ADAPTERS):
    torch.manual_seed(0)
    (first, config), *rest = adapters.items()
    model = get_peft_model(tiny_model("llama").to(DEVICE), LoraConfig(init_lora_weights=False, **config), first)
    for name, config in rest:
        model.add_adapter(name, LoraConfig(init_lora_weights=False, **config))
    return model.eval()


@pytest.fixture(scope="module")
def models():
    reference = _peft_model()
    return reference, fused_train.patch(copy.deepcopy(reference))


@pytest.fixture
def op_calls(models, monkeypatch):
    """Counts multi_lora_linear calls per LoRA layer (named by its base weight)."""
    layer_of = {
        module.get_base_layer().weight.data_ptr(): name
        for name, module in models[1].named_modules()
        if isinstance(module, peft_lora.LoraLinear)
    }
    calls = Counter()
    op = peft_lora.multi_lora_linear

    def counting(x, weight, *args, **kwargs):
        calls[layer_of.get(weight.data_ptr(), "another model")] += 1
        return op(x, weight, *args, **kwargs)

    monkeypatch.setattr(peft_lora, "multi_lora_linear", counting)
    return calls


def _input_ids(batch):
    return torch.randint(3, 97, (batch, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _assert_close(actual, expected):
    error = (actual - expected).abs().max().item()
    assert error <= TOLERANCE * expected.abs().max().item(), error


def _targeted_layers(model, names):
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, peft_lora.LoraLinear) and any(adapter in module.lora_A for adapter in names)
    }


@torch.no_grad()
def test_forward_matches_peft_with_one_call_per_layer(models, op_calls):
    reference, patched = models
    per_batch = {}
    for names in (["all8"] * len(MIXED), MIXED):
        op_calls.clear()
        _assert_close(
            patched(_input_ids(len(names)), adapter_names=names).logits,
            reference(_input_ids(len(names)), adapter_names=names).logits,
        )
        per_batch[len(set(names))] = dict(op_calls)
    # Every layer that an adapter of the batch targets: one call, for 1 adapter as for 3 (and the base).
    assert per_batch[1] == dict.fromkeys(_targeted_layers(patched, ["all8"]), 1)
    assert per_batch[4] == dict.fromkeys(_targeted_layers(patched, MIXED), 1)


@torch.no_grad()
def test_greedy_generate_matches_peft(models, op_calls):
    reference, patched = models
    kwargs = dict(max_new_tokens=4, do_sample=False, adapter_names=MIXED, pad_token_id=0)
    expected = reference.generate(input_ids=_input_ids(len(MIXED)), **kwargs)
    assert torch.equal(patched.generate(input_ids=_input_ids(len(MIXED)), **kwargs), expected)
    assert set(op_calls.values()) == {4}  # the prompt and 3 decode steps, one call per layer each


def test_calls_the_op_cannot_serve_run_peft(op_calls):
    """DoRA in the batch: peft's own refusal; gradients needed: peft's path (the op is forward-only)."""
    reference = _peft_model({**ADAPTERS, "dora": dict(r=4, lora_alpha=8, target_modules=["v_proj"], use_dora=True)})
    for name, parameter in reference.named_parameters():
        parameter.requires_grad_("lora_" in name)
    patched = fused_train.patch(copy.deepcopy(reference))
    ids = _input_ids(len(MIXED))
    with torch.no_grad():
        for model in (reference, patched):
            with pytest.raises(ValueError, match="DoRA"):
                model(ids, adapter_names=MIXED[:-1] + ["dora"])
    op_calls.clear()
    _assert_close(patched(ids, adapter_names=MIXED).logits, reference(ids, adapter_names=MIXED).logits)
    assert not op_calls
    layer = patched.base_model.model.model.layers[0].self_attn.v_proj
    x = torch.randn(len(MIXED), 6, layer.in_features, device=DEVICE)
    assert "gradients" in peft_lora.mixed_batch_fallback_reason(layer, x, MIXED)
    with torch.no_grad():
        assert peft_lora.mixed_batch_fallback_reason(layer, x, MIXED) is None
        assert "variant" in peft_lora.mixed_batch_fallback_reason(layer, x, ["dora"] * len(MIXED))
