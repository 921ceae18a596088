"""PackedBatchSampler: equal steps on every rank, each document once per epoch, exact resume."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fused_train import PackedBatchSampler


@st.composite
def corpora(draw):
    """Random lengths (some longer than the budget), a world size and a budget."""
    num_replicas = draw(st.integers(1, 64))
    tokens_per_step = draw(st.integers(1, 300))
    num_documents = draw(st.integers(num_replicas, num_replicas + 300))
    lengths = draw(st.lists(st.integers(1, 2 * tokens_per_step + 5), min_size=num_documents, max_size=num_documents))
    return lengths, tokens_per_step, num_replicas


def _batches(lengths, tokens_per_step, num_replicas, **kwargs):
    """Per rank, the list of its batches, each rank from its own sampler, as in a real run."""
    return [
        list(PackedBatchSampler(lengths, tokens_per_step, num_replicas=num_replicas, rank=rank, **kwargs))
        for rank in range(num_replicas)
    ]


@settings(max_examples=200, deadline=None)
@given(corpora(), st.integers(0, 3), st.booleans(), st.data())
def test_every_rank_same_steps_every_document_once(corpus, epoch, shuffle, data):
    lengths, tokens_per_step, num_replicas = corpus
    plan_sampler = PackedBatchSampler(lengths, tokens_per_step, num_replicas=num_replicas, shuffle=shuffle)
    plan_sampler.set_epoch(epoch)
    plan = plan_sampler.epoch_plan()
    assert all(len(step) == num_replicas for step in plan)
    # Each rank plans on its own (no communication) and must iterate its column of the same plan.
    for rank in {0, num_replicas - 1, data.draw(st.integers(0, num_replicas - 1))}:
        sampler = PackedBatchSampler(lengths, tokens_per_step, num_replicas=num_replicas, rank=rank, shuffle=shuffle)
        sampler.set_epoch(epoch)
        assert list(sampler) == [step[rank].tolist() for step in plan]
        assert len(sampler) == len(plan)
    batches = [batch for step in plan for batch in step]
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert all(len(batch) > 0 for batch in batches)
    # Over budget only alone (a long document) or when there are too few documents to split bins.
    if len(lengths) >= len(plan) * num_replicas + num_replicas:
        assert all(sum(lengths[i] for i in batch) <= tokens_per_step for batch in batches if len(batch) > 1)


@settings(max_examples=60, deadline=None)
@given(corpora(), st.integers(0, 1000))
def test_plan_is_a_function_of_seed_and_epoch(corpus, seed):
    lengths, tokens_per_step, num_replicas = corpus
    first = PackedBatchSampler(lengths, tokens_per_step, num_replicas=num_replicas, seed=seed)
    second = PackedBatchSampler(lengths, tokens_per_step, num_replicas=num_replicas, seed=seed)
    second.set_epoch(5)
    list(second)
    second.set_epoch(2)
    first.set_epoch(2)
    assert list(first) == list(second)
    assert len(first) == len(second)  # the step count does not depend on the epoch either


def test_epochs_differ_when_shuffled():
    lengths = np.random.default_rng(0).integers(5, 200, 500)
    sampler = PackedBatchSampler(lengths, 1024, num_replicas=4, rank=1)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    unshuffled = PackedBatchSampler(lengths, 1024, num_replicas=4, rank=1, shuffle=False)
    again = list(unshuffled)
    unshuffled.set_epoch(1)
    assert list(unshuffled) == again


@settings(max_examples=60, deadline=None)
@given(corpora(), st.data())
def test_resume_at_a_random_step_continues_exactly(corpus, data):
    lengths, tokens_per_step, num_replicas = corpus
    rank = data.draw(st.integers(0, num_replicas - 1))
    sampler = PackedBatchSampler(lengths, tokens_per_step, num_replicas=num_replicas, rank=rank, seed=7)
    sampler.set_epoch(3)
    full = list(sampler)
    stop = data.draw(st.integers(0, len(full)))
    sampler = PackedBatchSampler(lengths, tokens_per_step, num_replicas=num_replicas, rank=rank, seed=7)
    sampler.set_epoch(3)
    iterator = iter(sampler)
    before = [next(iterator) for _ in range(stop)]
    state = sampler.state_dict()
    assert state["epoch"] == 3 and state["step"] == stop

    resumed = PackedBatchSampler(lengths, tokens_per_step, num_replicas=num_replicas, rank=rank, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # what a training loop does before iterating: keeps the resume point
    assert before + list(resumed) == full
    assert list(resumed) == full  # the resume applies to one iteration only


def test_long_documents_are_batches_of_their_own():
    lengths = [50, 10, 10, 10, 10, 10, 10, 10]
    batches = _batches(lengths, 20, 2, shuffle=False)
    assert [len(rank_batches) for rank_batches in batches] == [3, 3]
    assert [0] in batches[0] + batches[1]


def test_too_few_documents_for_the_budget_merge_instead_of_leaving_a_rank_empty():
    # Three documents of a full budget each, two ranks: one step, one rank takes two documents.
    batches = _batches([8, 8, 8], 8, 2)
    assert [len(rank_batches) for rank_batches in batches] == [1, 1]
    assert sorted(len(rank_batches[0]) for rank_batches in batches) == [1, 2]


def test_slowest_rank_within_two_percent_of_the_mean_on_the_embedded_corpus():
    from bench.common import load_documents

    lengths = np.array([len(doc) for doc in load_documents(1024)[0]])
    for num_replicas in (2, 8, 64):
        plan = PackedBatchSampler(lengths, 5590, num_replicas=num_replicas).epoch_plan()
        loads = np.array([[lengths[batch].sum() for batch in step] for step in plan])
        assert (loads.max(axis=1) / loads.mean(axis=1)).max() <= 1.02


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lengths=[3, 0, 2], tokens_per_step=8), r"lengths\[1\]"),
        (dict(lengths=[[3, 2]], tokens_per_step=8), "lengths"),
        (dict(lengths=[3, 2], tokens_per_step=0), "tokens_per_step"),
        (dict(lengths=[3, 2], tokens_per_step=8, num_replicas=3), "lengths holds 2 documents"),
        (dict(lengths=[3, 2], tokens_per_step=8, num_replicas=2, rank=2), "rank"),
        (dict(lengths=[3, 2], tokens_per_step=8, num_replicas=0), "num_replicas"),
        (dict(lengths=[3, 2], tokens_per_step=8, seed=-1), "seed"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PackedBatchSampler(**kwargs)


def test_load_state_dict_refuses_another_plan():
    sampler = PackedBatchSampler([5] * 10, 16, num_replicas=2, rank=0, seed=1)
    other = PackedBatchSampler([5] * 10, 16, num_replicas=2, rank=0, seed=2)
    with pytest.raises(ValueError, match="state\\['seed'\\]"):
        other.load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="state\\['step'\\]"):
        sampler.load_state_dict({**sampler.state_dict(), "step": len(sampler) + 1})


def _trained_documents(trainer_class):
    """A Trainer subclass that records the documents of every batch it trains on, in order."""

    class Recording(trainer_class):
        batches = []

        def compute_loss(self, model, inputs, *args, **kwargs):
            ids, starts = inputs["input_ids"][0].tolist(), inputs["position_ids"][0].tolist()
            cuts = [i for i, p in enumerate(starts) if p == 0] + [len(ids)]
            self.batches.append([tuple(ids[a:b]) for a, b in zip(cuts, cuts[1:])])
            return super().compute_loss(model, inputs, *args, **kwargs)

    return Recording


def test_trainer_resume_trains_every_document_of_the_epoch_once(tmp_path):
    import datasets
    import torch
    import transformers

    import fused_train
    from tests.hf.tiny_models import tiny_model

    generator = torch.Generator().manual_seed(0)
    # The first two tokens number the document, so each is told apart from its tokens alone.
    docs = [[3 + i // 90, 3 + i % 90] + torch.randint(3, 97, (int(n),), generator=generator).tolist()
            for i, n in enumerate(torch.randint(1, 28, (40,), generator=generator))]
    dataset = datasets.Dataset.from_list([{"input_ids": d} for d in docs])
    tokens_per_step, accumulation = 64, 2

    def trainer(**overrides):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), gradient_accumulation_steps=accumulation, num_train_epochs=2,
            learning_rate=1e-3, report_to=[], use_cpu=True, seed=3, **{"save_strategy": "no", **overrides},
        )  # fmt: skip
        return _trained_documents(fused_train.PackedTrainer)(
            model=tiny_model("llama"), args=args, train_dataset=dataset, tokens_per_step=tokens_per_step,
            data_collator=fused_train.PackedCollator(tokens_per_step, flatten=True),
        )  # fmt: skip

    sampler = PackedBatchSampler([len(d) for d in docs], tokens_per_step, seed=3)
    steps_per_epoch = len(sampler)
    assert steps_per_epoch % accumulation == 0 and steps_per_epoch >= 8
    stop = steps_per_epoch // accumulation + 2  # optimizer steps: two into the second epoch
    first = trainer(max_steps=stop, save_strategy="steps", save_steps=stop)
    first.train()
    second = trainer()
    second.batches = []
    second.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{stop}"))

    expected = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected += [[tuple(docs[i]) for i in batch] for batch in sampler]
    assert first.batches + second.batches == expected
    epoch = expected[steps_per_epoch:]
    assert sorted(d for batch in epoch for d in batch) == sorted(map(tuple, docs))
    assert expected[:steps_per_epoch] != epoch


def test_packed_trainer_needs_a_positive_token_budget():
    import fused_train

    with pytest.raises(ValueError, match="tokens_per_step"):
        fused_train.PackedTrainer(tokens_per_step=0)


def test_packed_trainer_warns_when_tokens_are_not_averaged_across_ranks(monkeypatch, tmp_path):
    import transformers

    import fused_train
    from tests.hf.tiny_models import tiny_model

    monkeypatch.setattr(transformers.TrainingArguments, "world_size", property(lambda self: 2))
    for averaged in (True, False):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                                              average_tokens_across_devices=averaged)  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused_train.PackedTrainer(model=tiny_model("llama"), args=args, tokens_per_step=64,
                                      data_collator=fused_train.PackedCollator(64, flatten=True))  # fmt: skip
        told = [w for w in caught if "average_tokens_across_devices=False" in str(w.message)]
        assert len(told) == (0 if averaged else 1)
