"""patch(model, fused_loss=True): the training loss without logits, equal to HF's loss path."""

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

import fused_train
import fused_train.ops.varlen_attention
from tests.hf.tiny_models import tiny_model

# The softcapped one (gemma2, final_logit_softcapping=30) and a plain one.
MODEL_TYPES = ["gemma2", "llama"]


@pytest.fixture(autouse=True)
def attention_by_its_reference(monkeypatch):
    """Both sides of every comparison run fused_train attention; its kernels (tested in
    test_patch_models) are orders of magnitude slower in the interpreter than its reference."""
    monkeypatch.setattr(fused_train.ops.varlen_attention, "triton_runs_on", lambda *tensors: False)


def _packed_batch(seed=1, lengths=(11, 1, 5, 17, 3, 9)):
    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, 97, (n,), generator=generator) for n in lengths]
    return fused_train.PackedCollator(max_tokens=24)([{"input_ids": doc} for doc in docs])


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_loss_close(got, expected):
    assert abs(got - expected) <= 1e-6 * max(1.0, abs(expected)), (got, expected)


def _assert_grads_close(got, expected):
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert (got[name] - grad).abs().max() <= 1e-5 * grad.abs().max().clamp_min(1e-6), name


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_fused_loss_equals_hf_loss_and_returns_no_logits(model_type):
    reference = fused_train.patch(tiny_model(model_type)).train()
    fused = fused_train.patch(copy.deepcopy(reference), fused_loss=True).train()
    batch = _packed_batch()
    expected, expected_grads = _loss_and_grads(reference, batch)
    got, grads = _loss_and_grads(fused, batch)
    assert got.logits is None
    _assert_loss_close(got.loss.item(), expected.loss.item())
    _assert_grads_close(grads, expected_grads)
    # Evaluation (and a call without labels) keeps the model's own forward, logits included.
    with torch.no_grad():
        assert torch.equal(fused.eval()(**batch).logits, reference.eval()(**batch).logits)
    fused_train.unpatch(fused)
    assert "forward" not in fused.__dict__ and fused.train()(**batch).logits is not None


def test_logits_to_keep_shift_labels_and_tuples_as_hf():
    reference = tiny_model("llama").train()
    fused = fused_train.patch(copy.deepcopy(reference), fused_loss=True).train()
    input_ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    for kwargs in (
        dict(labels=input_ids[:, -4:], logits_to_keep=4),
        dict(labels=input_ids, shift_labels=torch.roll(input_ids, -2, 1), num_items_in_batch=torch.tensor(7)),
    ):
        expected, expected_grads = _loss_and_grads(reference, dict(input_ids=input_ids, **kwargs))
        got, grads = _loss_and_grads(fused, dict(input_ids=input_ids, **kwargs))
        _assert_loss_close(got.loss.item(), expected.loss.item())
        _assert_grads_close(grads, expected_grads)
    loss, *_ = fused(input_ids, labels=input_ids, return_dict=False)
    _assert_loss_close(loss.item(), reference(input_ids, labels=input_ids).loss.item())
    with pytest.raises(ValueError, match="logits_to_keep"):
        fused(input_ids=input_ids, labels=input_ids, logits_to_keep=4)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_trainer_with_gradient_accumulation_trains_as_hf(model_type, tmp_path):
    """Two optimizer steps of two micro-batches each: the Trainer passes num_items_in_batch (the
    targets of both micro-batches), so the summed micro-batch losses must be divided by it."""
    datasets = pytest.importorskip("datasets")
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 30, (16,), generator=generator)
    docs = [{"input_ids": torch.randint(3, 97, (int(n),), generator=generator).tolist()} for n in lengths]
    models, histories = [], []
    for fused_loss in (False, True):
        model = fused_train.patch(tiny_model(model_type), fused_loss=fused_loss)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(fused_loss)), per_device_train_batch_size=4, gradient_accumulation_steps=2,
            max_steps=2, learning_rate=0.5, optim="sgd", logging_steps=1, report_to=[], save_strategy="no",
            remove_unused_columns=False, bf16=False, dataloader_drop_last=True, seed=0,
        )  # fmt: skip
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=datasets.Dataset.from_list(docs),
            data_collator=fused_train.PackedCollator(max_tokens=64, flatten=True),
        )  # fmt: skip
        trainer.train()
        models.append(model)
        histories.append([(log["loss"], log["grad_norm"]) for log in trainer.state.log_history if "loss" in log])
    assert len(histories[0]) == 2
    for (loss, norm), (fused_loss, fused_norm) in zip(*histories):
        assert abs(fused_loss - loss) <= 1e-5 * abs(loss) and abs(fused_norm - norm) <= 1e-4 * norm
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert (p - q).abs().max() <= 1e-5 * p.abs().max(), name


def test_peft_modules_to_save_lm_head_is_trained_and_lora_on_it_refused():
    base = fused_train.patch(tiny_model("llama"))
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    reference = get_peft_model(base, config).train()
    fused = fused_train.patch(copy.deepcopy(reference), fused_loss=True).train()
    batch = _packed_batch(seed=2)
    expected, expected_grads = _loss_and_grads(reference, batch)
    got, grads = _loss_and_grads(fused, batch)
    assert got.logits is None
    _assert_loss_close(got.loss.item(), expected.loss.item())
    assert any("modules_to_save" in name for name in grads)
    _assert_grads_close(grads, expected_grads)

    on_lm_head = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):
        fused_train.patch(on_lm_head, fused_loss=True)


def test_refuses_a_custom_loss_function():
    model = tiny_model("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    with pytest.raises(ValueError, match="loss_function"):
        fused_train.patch(model, fused_loss=True)
