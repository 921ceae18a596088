"""patch/unpatch behaviour: idempotent, reversible, state_dict untouched, clear refusals."""

import copy
import logging

import peft
import pytest
import torch
import transformers

import fused_train
from tests.hf.tiny_models import tiny_model


def test_patch_is_idempotent_and_unpatch_restores():
    model = tiny_model("llama", attn_implementation="sdpa")
    keys = list(model.state_dict())
    assert fused_train.patch(model) is model
    assert model.config._attn_implementation == "fused_train" and fused_train.is_patched(model)
    fused_train.patch(model)
    assert list(model.state_dict()) == keys
    fused_train.unpatch(model)
    assert model.config._attn_implementation == "sdpa" and not fused_train.is_patched(model)
    fused_train.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


def test_unpatched_model_computes_what_it_did_before():
    model = tiny_model("llama")
    input_ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
        fused_train.unpatch(fused_train.patch(model))
        after = model(input_ids=input_ids).logits
    assert torch.equal(before, after)


def test_patch_peft_model_keeps_adapter_keys_and_matches_documents_alone(caplog):
    base = tiny_model("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    reference = peft.get_peft_model(base, config)
    model = copy.deepcopy(reference)
    keys = list(model.state_dict())
    with caplog.at_level(logging.INFO, logger="fused_train"):
        fused_train.patch(model)
    assert "fused LoRA: 4 of 4 LoRA layers fused" in caplog.text
    assert list(model.state_dict()) == keys
    assert model.get_base_model().config._attn_implementation == "fused_train"

    docs = [torch.randint(3, 97, (n,)) for n in (6, 13, 4)]
    batch = fused_train.PackedCollator(max_tokens=16)([{"input_ids": d} for d in docs])
    with torch.no_grad():
        packed_loss = model(**batch).loss
        alone = [reference(input_ids=d[None], labels=d[None]).loss * (len(d) - 1) for d in docs]
    expected = torch.stack(alone).sum() / sum(len(d) - 1 for d in docs)
    assert abs(packed_loss.item() - expected.item()) <= 1e-5

    fused_train.unpatch(model)
    assert not any("forward" in module.__dict__ for module in model.modules())
    assert model.get_base_model().config._attn_implementation == "eager"


def test_refuses_what_it_cannot_patch():
    with pytest.raises(ValueError, match="PreTrainedModel"):
        fused_train.patch(torch.nn.Linear(2, 2))
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    )
    with pytest.raises(ValueError, match="encoder-decoder"):
        fused_train.patch(t5)
    dropout_model = tiny_model("llama")
    dropout_model.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="attention_dropout"):
        fused_train.patch(dropout_model)


def test_bad_cu_seq_lens_raise():
    model = fused_train.patch(tiny_model("llama"))
    batch = fused_train.PackedCollator(max_tokens=16)([{"input_ids": torch.randint(3, 97, (n,))} for n in (5, 7)])
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor([0, 5, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(**batch)
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor([0, 9, 5, 16], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        model(**batch)


def test_reused_position_ids_buffer_updated_in_place_gets_new_documents():
    model = fused_train.patch(tiny_model("llama"))
    input_ids = torch.randint(3, 97, (1, 12))
    position_ids = torch.arange(12)[None].clone()
    with torch.no_grad():
        one_document = model(input_ids=input_ids, position_ids=position_ids).logits
        position_ids[0, 6:] = torch.arange(6)  # the same buffer now holds two documents
        two_documents = model(input_ids=input_ids, position_ids=position_ids).logits
        fresh = model(input_ids=input_ids, position_ids=position_ids.clone()).logits
    assert not torch.allclose(one_document[0, 6:], two_documents[0, 6:])
    torch.testing.assert_close(two_documents, fresh)
