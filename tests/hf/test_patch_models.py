"""A patched model must compute, on a packed batch, exactly what the stock model computes per document."""

import copy

import pytest
import torch

import fused_train
import fused_train.ops.varlen_attention
from tests.hf.tiny_models import CONFIGS, tiny_model

# Lengths that straddle the sliding windows of tiny_models, a one-token document included.
DOC_LENGTHS = [11, 1, 5, 17, 3, 9]


def make_docs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=generator) for n in DOC_LENGTHS]


def per_document_loss_and_grads(model, docs):
    """Token-weighted loss of each document run alone through the stock model, and its gradients."""
    model.zero_grad()
    targets = sum(len(doc) - 1 for doc in docs)
    total = 0.0
    for doc in docs:
        if len(doc) < 2:
            continue
        out = model(input_ids=doc[None], labels=doc[None], use_cache=False)
        weighted = out.loss * (len(doc) - 1) / targets
        weighted.backward()
        total += weighted.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_batch_equals_documents_alone(model_type, use_cache):
    reference = tiny_model(model_type).train()
    patched = fused_train.patch(copy.deepcopy(reference)).train()
    docs = make_docs()
    expected_loss, expected_grads = per_document_loss_and_grads(reference, docs)

    batch = fused_train.PackedCollator(max_tokens=24)([{"input_ids": doc} for doc in docs])
    assert batch["input_ids"].shape[0] >= 2, "the test needs documents packed into several rows"
    out = patched(**batch, use_cache=use_cache)
    out.loss.backward()

    assert abs(out.loss.item() - expected_loss) <= 1e-5
    for name, param in patched.named_parameters():
        expected = expected_grads[name]
        scale = expected.abs().max().clamp_min(1e-6)
        assert (param.grad - expected).abs().max() / scale <= 1e-4, name


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_packed_rows_without_cu_seqlens_use_position_ids(model_type):
    """DataCollatorWithFlattening-style input: boundaries come from position_ids alone."""
    reference = tiny_model(model_type)
    patched = fused_train.patch(copy.deepcopy(reference))
    docs = make_docs(seed=2)
    expected_loss, _ = per_document_loss_and_grads(reference, docs)
    batch = fused_train.PackedCollator(max_tokens=24, flatten=True)([{"input_ids": doc} for doc in docs])
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        batch.pop(key)
    with torch.no_grad():
        loss = patched(**batch, use_cache=True).loss
    assert abs(loss.item() - expected_loss) <= 1e-5


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_unpatched(model_type, padding_side):
    reference = tiny_model(model_type)
    patched = fused_train.patch(copy.deepcopy(reference))
    docs = make_docs(seed=3)
    width = max(DOC_LENGTHS)
    input_ids = torch.zeros(len(docs), width, dtype=torch.long)
    attention_mask = torch.zeros(len(docs), width, dtype=torch.long)
    for row, doc in enumerate(docs):
        span = slice(width - len(doc), width) if padding_side == "left" else slice(0, len(doc))
        input_ids[row, span] = doc
        attention_mask[row, span] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    # Under left padding the first real token would be "predicted" from a padding position, whose
    # output is meaningless (fused_train writes zeros there, eager attention something else).
    first_real = attention_mask.argmax(dim=1)
    labels[torch.arange(len(docs)), first_real] = -100
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        got = patched(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    real = attention_mask.bool()
    torch.testing.assert_close(got.logits[real], expected.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_generation_with_cache_matches_unpatched(model_type):
    reference = tiny_model(model_type).eval()
    patched = fused_train.patch(copy.deepcopy(reference))
    prompts = make_docs(seed=4)[:3]
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        expected = reference.generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        got = patched.generate(**kwargs, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    for got_step, expected_step in zip(got.logits, expected.logits):
        torch.testing.assert_close(got_step, expected_step, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["gemma2", "mistral"])
def test_reference_path_packed_batch_equals_documents_alone(model_type, monkeypatch):
    """Without a GPU or the interpreter, patched models run the PyTorch reference: same result."""
    monkeypatch.setattr(fused_train.ops.varlen_attention, "triton_runs_on", lambda *tensors: False)
    reference = tiny_model(model_type).train()
    patched = fused_train.patch(copy.deepcopy(reference)).train()
    docs = make_docs()
    expected_loss, expected_grads = per_document_loss_and_grads(reference, docs)
    out = patched(**fused_train.PackedCollator(max_tokens=24)([{"input_ids": doc} for doc in docs]))
    out.loss.backward()
    assert abs(out.loss.item() - expected_loss) <= 1e-5
    for name, param in patched.named_parameters():
        expected = expected_grads[name]
        assert (param.grad - expected).abs().max() / expected.abs().max().clamp_min(1e-6) <= 1e-4, name
