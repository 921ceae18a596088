"""`PackedTrainer`: the HF `Trainer` fed by `PackedBatchSampler` (token-balanced batches on every rank)."""

import torch
import transformers
from accelerate.data_loader import prepare_data_loader
from transformers.utils import is_datasets_available

from fused_train.ops.checks import check_int
from fused_train.training.batch_sampler import PackedBatchSampler
from fused_train.training.token_count import warn_if_tokens_not_averaged


class PackedTrainer(transformers.Trainer):
    """`transformers.Trainer` whose training batches come from a `PackedBatchSampler`.

    One line replaces `Trainer(...)`:

        trainer = fused_train.PackedTrainer(model=model, args=args, train_dataset=dataset,
                                            data_collator=fused_train.PackedCollator(4096),
                                            tokens_per_step=4096)

    Each rank's micro-batch then holds about `tokens_per_step` tokens (`per_device_train_batch_size`
    is not used), every rank has the same number of micro-batches per epoch, and with
    `gradient_accumulation_steps=k` an optimizer step takes k of them on every rank. The dataset's
    items are dicts with `input_ids` (a `datasets.Dataset` may carry a `length` column, named by
    `args.length_column_name`, instead of having its items measured). The plan's seed is
    `args.data_seed`, else `args.seed`.

    The sampler is already per rank, so the dataloader is prepared by accelerate as for one
    process: accelerate would otherwise shard its batches across the ranks a second time (each
    rank training 1/world of its own batches). Resuming with `train(resume_from_checkpoint=...)`
    skips the batches already trained in the epoch's deterministic plan, so every document of the
    epoch is trained exactly once. The same keyword works on subclasses of `Trainer` listed after
    it, e.g. `class PackedSFTTrainer(fused_train.PackedTrainer, trl.SFTTrainer)`.
    """

    def __init__(self, *args, tokens_per_step: int, **kwargs):
        check_int(tokens_per_step=tokens_per_step)
        self.tokens_per_step = tokens_per_step
        super().__init__(*args, **kwargs)
        # Ranks hold different numbers of tokens by design: only the Trainer's token averaging
        # keeps the loss the token mean of the step.
        warn_if_tokens_not_averaged(self.args, self.data_collator)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        if self.train_dataset is None:
            raise ValueError("PackedTrainer: training requires a train_dataset")
        dataset = self.train_dataset
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise ValueError(
                "train_dataset must be a map-style dataset with a length: the epoch is planned from its lengths"
            )
        collator = self.data_collator
        if _is_hf_dataset(dataset):
            lengths = _lengths(dataset, self.args.length_column_name)
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            lengths = _lengths(dataset, None)
            collator = self._get_collator_with_removed_columns(collator, description="training")
        sampler = PackedBatchSampler(
            lengths,
            self.tokens_per_step,
            num_replicas=max(1, self.args.world_size),
            rank=self.args.process_index,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor,
        )
        # num_processes=1: no BatchSamplerShard around the sampler, so the Trainer's set_epoch reaches
        # it (through the loader here, through skip_first_batches' wrapper on resume).
        return prepare_data_loader(loader, self.args.device, num_processes=1, process_index=0)


def _is_hf_dataset(dataset) -> bool:
    if not is_datasets_available():
        return False
    import datasets

    return isinstance(dataset, datasets.Dataset)


def _lengths(dataset, length_column):
    if length_column is not None and length_column in dataset.column_names:
        return list(dataset[length_column])
    if _is_hf_dataset(dataset):
        if "input_ids" not in dataset.column_names:
            raise ValueError("train_dataset needs an 'input_ids' column (or a length column) to plan its batches")
        return [len(ids) for ids in dataset["input_ids"]]
    lengths = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, dict) or "input_ids" not in item:
            raise ValueError(f"train_dataset[{i}] must be a dict with 'input_ids', got {type(item).__name__}")
        lengths.append(len(item["input_ids"]))
    return lengths
