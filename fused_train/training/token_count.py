"""The exact token-mean loss when packed batches are split over processes.

A packed rank holds as many documents as fit, so ranks (and the micro-batches of one optimizer
step) hold different numbers of target tokens. The loss that one process would compute on the
whole step, sum of token losses / all targets of the step, is then only reached if every rank
divides its sum by the count of targets over all ranks and micro-batches, not by its own count:

- `transformers.Trainer` does so with `average_tokens_across_devices=True` (its default): it
  counts `labels != -100` over the step's micro-batches (transformers >= 5 over `labels[..., 1:]`,
  the positions a causal LM predicts), gathers that count from every rank and passes it to the
  model as `num_items_in_batch`. `PackedCollator` sets -100 on the first token of every row (each
  row starts with a document), so both ways of counting give the same, exact number.
  `warn_if_tokens_not_averaged` warns when a packed run turns the averaging off.
- A plain torch loop calls `global_token_count` (below).
"""

import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist

from fused_train.training.collator import PackedCollator


def global_token_count(
    labels: torch.Tensor | Sequence[torch.Tensor], group=None, ignore_index: int = -100
) -> torch.Tensor:
    """The number of prediction targets in `labels` summed over all ranks of `group`.

    `labels` are one batch's labels as a causal LM takes them (unshifted: the model predicts
    `labels[..., 1:]`), or a sequence of such tensors (the micro-batches of one optimizer step,
    for gradient accumulation). Returns an int64 scalar tensor on the labels' device, the same on
    every rank; without an initialized process group, this process's count.

    Under DDP, which averages gradients over its ranks, each rank's loss must be
    `sum of its token losses / global_token_count(...) * world_size`; with a Hugging Face model:

        count = global_token_count([b["labels"] for b in micro_batches])
        for batch in micro_batches:
            loss = model(**batch, num_items_in_batch=count / dist.get_world_size()).loss
            loss.backward()
    """
    batches = [labels] if isinstance(labels, torch.Tensor) else list(labels)
    if not batches or not all(isinstance(b, torch.Tensor) and b.dim() >= 1 for b in batches):
        raise ValueError("labels must be a tensor of at least 1 dimension or a non-empty sequence of them")
    count = sum((b[..., 1:] != ignore_index).sum() for b in batches).to(torch.int64)
    if dist.is_available() and dist.is_initialized():
        # gloo has no all_reduce on CUDA tensors and NCCL none on CPU ones: use the backend's device.
        device = torch.device("cpu") if dist.get_backend(group) == "gloo" else batches[0].device
        reduced = count.to(device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
        count = reduced.to(batches[0].device)
    return count


def warn_if_tokens_not_averaged(args, data_collator) -> bool:
    """Warn (a UserWarning) when a `Trainer` on more than one process packs its batches with
    `PackedCollator` but has `average_tokens_across_devices=False`: each rank then divides by its
    own token count, and the loss is no longer the token mean over the step. `args` is the
    `TrainingArguments`; returns whether it warned."""
    packed = isinstance(data_collator, PackedCollator)
    if not (packed and args.world_size > 1 and not args.average_tokens_across_devices):
        return False
    warnings.warn(
        "average_tokens_across_devices=False with PackedCollator on "
        f"{args.world_size} processes: packed ranks hold different numbers of tokens, so each rank's "
        "mean over its own tokens gives a loss (and gradients) that is not the token mean of the step; "
        "set average_tokens_across_devices=True",
        UserWarning,
        stacklevel=2,
    )
    return True
