"""PackedCollator as the data_collator of transformers.Trainer and TRL's SFTTrainer."""

import copy

import pytest

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import fused_train  # noqa: E402
from tests.hf.tiny_models import tiny_model  # noqa: E402


def _documents():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 30, (16,), generator=generator)
    return [torch.randint(3, 97, (int(n),), generator=generator).tolist() for n in lengths]


def _per_document_loss(model, docs):
    with torch.no_grad():
        weighted = [model(input_ids=torch.tensor([d]), labels=torch.tensor([d])).loss * (len(d) - 1) for d in docs]
    return (torch.stack(weighted).sum() / sum(len(d) - 1 for d in docs)).item()


def _word_level_tokenizer():
    vocab = {f"<{i}>": i for i in range(97)}
    model = tokenizers.models.WordLevel(vocab, unk_token="<3>")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(model), pad_token="<0>", bos_token="<1>", eos_token="<2>", unk_token="<3>"
    )


@pytest.mark.parametrize("trainer_name", ["Trainer", "SFTTrainer"])
def test_trainer_loss_is_the_per_document_loss(trainer_name, tmp_path):
    docs = _documents()
    reference = tiny_model("llama")
    model = fused_train.patch(copy.deepcopy(reference))
    dataset = datasets.Dataset.from_list([{"input_ids": d} for d in docs])
    common = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(docs),
        max_steps=1,
        learning_rate=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        bf16=False,
    )
    collator = fused_train.PackedCollator(max_tokens=64)
    if trainer_name == "Trainer":
        trainer = transformers.Trainer(
            model=model, args=transformers.TrainingArguments(**common), train_dataset=dataset, data_collator=collator
        )
    else:
        args = trl.SFTConfig(**common, dataset_kwargs={"skip_prepare_dataset": True})
        trainer = trl.SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=_word_level_tokenizer(),
            data_collator=collator,
        )
    result = trainer.train()
    assert result.training_loss == pytest.approx(_per_document_loss(reference, docs), abs=1e-5)
