"""The exact token-mean loss of a packed step split over 2 gloo ranks, through the Trainer (DDP) and a plain loop,
and `TelemetryCallback`'s figures on those Trainer runs.

`rank_checks` runs on the 2 ranks (conftest's `two_ranks`); the single-process references run in
the pytest process. The corpus mixes 2-5 token documents with 40-60 token ones, so ranks
(and micro-batches) hold different numbers of packed rows and of targets.
"""

import warnings

import pytest
import torch
import transformers

import fused_train
from fused_train.training.token_count import global_token_count, warn_if_tokens_not_averaged
from tests.hf.tiny_models import tiny_model

DOCS_PER_RANK = 3
MAX_TOKENS = 64
ACCUMULATIONS = (1, 3)


def _documents(count):
    generator = torch.Generator().manual_seed(1)
    lengths = [int(torch.randint(*(40, 61) if i % 3 == 0 else (2, 6), (), generator=generator)) for i in range(count)]
    return [torch.randint(3, 97, (n,), generator=generator).tolist() for n in lengths]


class _RecordingCollator(fused_train.PackedCollator):
    """Keeps the rows of every batch it builds, so the test can count what each rank trained on."""

    def __init__(self):
        super().__init__(MAX_TOKENS)
        self.batches = []

    def __call__(self, examples):
        batch = super().__call__(examples)
        real_tokens = sum(len(example["input_ids"]) for example in examples)
        self.batches.append({"rows": batch["input_ids"].shape[0], "real_tokens": real_tokens,
                             "processed_tokens": batch["input_ids"].numel()})  # fmt: skip
        return batch


class _GradientCapture(transformers.TrainerCallback):
    """The gradients the optimizer is about to apply (after DDP's all-reduce)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _train_one_step(docs, accumulation, per_device_docs, folder, average_tokens=True):
    import datasets  # where it is not installed, `exact_loss` skips the tests that come here

    model = fused_train.patch(tiny_model("llama"))
    collator, capture = _RecordingCollator(), _GradientCapture()
    args = transformers.TrainingArguments(
        output_dir=folder, per_device_train_batch_size=per_device_docs, gradient_accumulation_steps=accumulation,
        max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
        logging_steps=1, report_to=[], save_strategy="no", remove_unused_columns=False, use_cpu=True,
        average_tokens_across_devices=average_tokens, dataloader_num_workers=0,
    )  # fmt: skip
    dataset = datasets.Dataset.from_list([{"input_ids": d} for d in docs])
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                   callbacks=[capture])  # fmt: skip
    fused_train.TelemetryCallback().add_to(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.train()
    logs = trainer.state.log_history[0]
    return {"loss": result.training_loss, "gradients": capture.gradients, "batches": collator.batches,
            "telemetry": {key: value for key, value in logs.items() if key.startswith("telemetry/")},
            "warned": any("average_tokens_across_devices=False" in str(w.message) for w in caught)}  # fmt: skip


def rank_checks(rank, world_size, folder):
    out = {}
    for accumulation in ACCUMULATIONS:
        docs = _documents(world_size * DOCS_PER_RANK * accumulation)
        out[accumulation] = _train_one_step(docs, accumulation, DOCS_PER_RANK, f"{folder}/ga{accumulation}")
    # The same step with each rank dividing by its own count: the loss the warning is about.
    out["not_averaged"] = _train_one_step(
        _documents(world_size * DOCS_PER_RANK), 1, DOCS_PER_RANK, f"{folder}/na", average_tokens=False
    )
    out["plain_loop"] = _plain_loop(rank, world_size)
    return out


def _plain_loop(rank, world_size):
    """Two micro-batches per rank, DDP, `num_items_in_batch = global count / world size`."""
    docs = _documents(4 * world_size)
    collator = fused_train.PackedCollator(MAX_TOKENS)
    mine = docs[rank::world_size]
    micro_batches = [collator(_examples(mine[m::2])) for m in range(2)]
    model = torch.nn.parallel.DistributedDataParallel(fused_train.patch(tiny_model("llama")))
    count = global_token_count([b["labels"] for b in micro_batches])
    for batch in micro_batches:
        model(**batch, num_items_in_batch=count / world_size).loss.backward()
    return {"count": int(count), "gradients": {n: p.grad.clone() for n, p in model.module.named_parameters()}}


def _examples(docs):
    return [{"input_ids": d} for d in docs]


@pytest.fixture
def exact_loss(two_ranks):
    pytest.importorskip("datasets")  # the Trainer's runs on the ranks need it (conftest's _every_check)
    return [ranked["exact_loss"] for ranked in two_ranks]


def _assert_gradients_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("accumulation", ACCUMULATIONS)
def test_trainer_ddp_step_equals_one_process(exact_loss, accumulation, tmp_path):
    docs = _documents(2 * DOCS_PER_RANK * accumulation)
    single = _train_one_step(docs, accumulation, 2 * DOCS_PER_RANK, str(tmp_path))
    rows = [[b["rows"] for b in ranked[accumulation]["batches"]] for ranked in exact_loss]
    assert rows[0] != rows[1], f"the corpus should give the ranks different row counts, got {rows}"
    for ranked in exact_loss:
        assert ranked[accumulation]["loss"] == pytest.approx(single["loss"], rel=1e-5)
        _assert_gradients_close(ranked[accumulation]["gradients"], single["gradients"])


@pytest.mark.parametrize("accumulation", ACCUMULATIONS)
def test_telemetry_callback_figures_are_the_batches_counts(exact_loss, accumulation):
    real = torch.tensor([sum(b["real_tokens"] for b in ranked[accumulation]["batches"]) for ranked in exact_loss])
    processed = sum(b["processed_tokens"] for ranked in exact_loss for b in ranked[accumulation]["batches"])
    for ranked in exact_loss:
        figures = ranked[accumulation]["telemetry"]
        assert figures["telemetry/real_tokens_per_rank_max"] == real.max()
        assert figures["telemetry/real_tokens_per_rank_mean"] == pytest.approx(real.float().mean())
        assert figures["telemetry/rank_imbalance"] == pytest.approx(real.max() / real.float().mean())
        assert figures["telemetry/padding_fraction"] == pytest.approx(1 - real.sum() / processed)
        assert figures["telemetry/real_tokens_per_s"] > 0 and figures["telemetry/peak_memory_mb"] > 0
        assert "telemetry/mfu" not in figures


def test_trainer_loss_without_token_averaging_is_not_the_token_mean(exact_loss, tmp_path):
    single = _train_one_step(_documents(2 * DOCS_PER_RANK), 1, 2 * DOCS_PER_RANK, str(tmp_path))
    assert exact_loss[0]["not_averaged"]["loss"] != pytest.approx(single["loss"], rel=1e-3)
    # TelemetryCallback finds the PackedCollator behind the Trainer's dataloader and warns, on that run only.
    assert all(ranked["not_averaged"]["warned"] for ranked in exact_loss)
    assert not any(ranked[a]["warned"] for ranked in exact_loss for a in ACCUMULATIONS) and not single["warned"]


def test_plain_loop_with_global_token_count_equals_one_process(exact_loss):
    docs = _documents(8)
    batch = fused_train.PackedCollator(MAX_TOKENS)(_examples(docs))
    model = fused_train.patch(tiny_model("llama"))
    model(**batch).loss.backward()
    targets = sum(len(d) - 1 for d in docs)
    for ranked in exact_loss:
        assert ranked["plain_loop"]["count"] == targets
        _assert_gradients_close(ranked["plain_loop"]["gradients"], {n: p.grad for n, p in model.named_parameters()})


def test_global_token_count_without_process_group_counts_shifted_targets():
    labels = torch.tensor([[-100, 5, 6, -100, 7], [9, 9, -100, -100, -100]])
    assert int(global_token_count(labels)) == 4
    assert int(global_token_count([labels, labels[:1]])) == 7
    with pytest.raises(ValueError, match="labels"):
        global_token_count([])


def test_packed_labels_count_the_same_shifted_or_not():
    # transformers 4.x counts labels != -100, 5.x counts labels[..., 1:]: both must be the targets.
    docs = _documents(12) + [list(range(3, 3 + 150))]  # the last one is cut into chunks of MAX_TOKENS
    for flatten in (False, True):
        labels = fused_train.PackedCollator(MAX_TOKENS, flatten=flatten)(_examples(docs))["labels"]
        assert int((labels != -100).sum()) == int((labels[..., 1:] != -100).sum())
        assert int((labels != -100).sum()) == sum(len(d) - 1 for d in docs[:-1]) + 150 - 3


def test_warns_when_a_packed_run_turns_token_averaging_off():
    class Args:
        world_size, average_tokens_across_devices = 2, False

    with pytest.warns(UserWarning, match="average_tokens_across_devices=False"):
        assert warn_if_tokens_not_averaged(Args, fused_train.PackedCollator(8))
    Args.average_tokens_across_devices = True
    assert not warn_if_tokens_not_averaged(Args, fused_train.PackedCollator(8))
    Args.world_size, Args.average_tokens_across_devices = 1, False
    assert not warn_if_tokens_not_averaged(Args, fused_train.PackedCollator(8))
    Args.world_size = 2
    assert not warn_if_tokens_not_averaged(Args, transformers.default_data_collator)
