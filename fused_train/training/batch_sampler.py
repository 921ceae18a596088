"""Token-balanced packed batches for data-parallel training: every rank the same steps, near-equal tokens."""

import heapq
import math

import numpy as np
import torch

from fused_train.ops.checks import check_int
from fused_train.training.packing import as_int64_array, plan_packing_arrays


class PackedBatchSampler:
    """A batch sampler that deals each rank, at every step, a batch of about `tokens_per_step` tokens.

    Iterating yields, for each step of the epoch, the dataset indices of this rank's batch: one
    micro-batch (with gradient accumulation k, one optimizer step takes k consecutive batches on
    every rank). Pass it as a `DataLoader`'s `batch_sampler` with `PackedCollator(max_tokens=
    tokens_per_step)`, which packs each batch into one row; under the HF `Trainer` use
    `fused_train.PackedTrainer`, which also keeps accelerate from sharding the batches again.

    The epoch is planned whole, from the lengths alone, as a deterministic function of `(seed,
    epoch)`, so every rank computes the same plan with no communication:
      1. the documents are shuffled (`shuffle=True`) and packed best-fit-decreasing into bins of
         at most `tokens_per_step` tokens (`plan_packing_arrays`; equal lengths are taken in the
         shuffled order, so which documents share a bin changes from epoch to epoch). A document
         longer than `tokens_per_step` is a bin of its own: never dropped or cut here, the
         collator cuts it into rows, and its step is as unbalanced as it is long;
      2. the number of steps is the bins over the ranks, rounded up. Every rank gets a non-empty
         batch at every step: missing bins are made by splitting the fullest bins of several
         documents in two. Only when there are fewer documents than steps x ranks (documents of
         about `tokens_per_step` each) is the number of steps rounded down instead, and the two
         smallest bins are merged until it fits, so a batch holds more than `tokens_per_step`;
      3. the bins, largest first, are dealt `num_replicas` per step, so each step's batches are
         of similar size; the last two steps, where the partly filled and split bins end up, are
         then dealt again document by document (largest first, each into the least-loaded batch)
         when that keeps every batch within the budget;
      4. the steps are shuffled (`shuffle=True`; otherwise largest first) and within each step
         the batches rotate over the ranks, so no rank always gets the largest.
    Every document is in exactly one batch of one rank per epoch, and every rank has `len(self)`
    steps, the same in every epoch. Fewer documents than ranks raise a ValueError.

    `state_dict()["step"]` counts the batches this sampler has yielded in the current epoch;
    after `load_state_dict`, the next iteration continues the same epoch's plan at that step
    (`set_epoch` with another epoch drops that). With `num_workers > 0` the DataLoader draws
    batches ahead of the ones trained on: save the count of batches consumed as `"step"` then.
    The `Trainer`'s resume (which skips the batches already trained) is exact as it is.

    Args:
        lengths: token count of each dataset item, >= 1 (sequence, numpy array or tensor).
        tokens_per_step: token budget of one rank's batch, a positive int.
        num_replicas: number of data-parallel ranks; default: the initialised
            `torch.distributed` world size, else 1.
        rank: this rank, in [0, num_replicas); default: the `torch.distributed` rank, else 0.
        seed: seed of the shuffles; the same on every rank.
        shuffle: shuffle documents and steps each epoch (False: the plan of `seed` order).
    """

    def __init__(
        self, lengths, tokens_per_step: int, *, num_replicas=None, rank=None, seed: int = 0, shuffle: bool = True
    ):
        self.lengths = as_int64_array(lengths)
        if len(self.lengths) and self.lengths.min() < 1:
            bad = int(np.flatnonzero(self.lengths < 1)[0])
            raise ValueError(f"lengths[{bad}] = {self.lengths[bad]}; every document needs at least one token")
        check_int(tokens_per_step=tokens_per_step)
        if num_replicas is None or rank is None:
            initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
            if num_replicas is None:
                num_replicas = torch.distributed.get_world_size() if initialised else 1
            if rank is None:
                rank = torch.distributed.get_rank() if initialised else 0
        check_int(num_replicas=num_replicas)
        check_int(0, rank=rank)
        if rank >= num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas = {num_replicas}), got {rank}")
        check_int(0, seed=seed)
        if len(self.lengths) < num_replicas:
            raise ValueError(
                f"lengths holds {len(self.lengths)} documents, fewer than num_replicas = {num_replicas}: "
                "some rank would get no batch"
            )
        self.tokens_per_step = int(tokens_per_step)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.step = 0
        self._resume_step = 0
        self._plan = None  # (epoch, plan of that epoch)

    def set_epoch(self, epoch: int) -> None:
        check_int(0, epoch=epoch)
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.step = 0
            self._resume_step = 0

    def epoch_plan(self) -> list[list[np.ndarray]]:
        """This epoch's plan for all ranks: per step, per rank, the dataset indices of its batch."""
        if self._plan is None or self._plan[0] != self.epoch:
            plan = _plan_epoch(self.lengths, self.tokens_per_step, self.num_replicas, self.seed, self.epoch,
                               self.shuffle)  # fmt: skip
            self._plan = (self.epoch, plan)
        return self._plan[1]

    def __len__(self) -> int:
        return len(self.epoch_plan())

    def __iter__(self):
        plan = self.epoch_plan()
        start, self._resume_step = self._resume_step, 0
        self.step = start
        for step in range(start, len(plan)):
            self.step = step + 1
            yield plan[step][self.rank].tolist()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "tokens_per_step": self.tokens_per_step,
            "shuffle": self.shuffle,
            "num_documents": len(self.lengths),
        }

    def load_state_dict(self, state: dict) -> None:
        # A plan made with other settings would silently repeat or skip documents: refuse it.
        for key, mine in (
            ("seed", self.seed),
            ("num_replicas", self.num_replicas),
            ("tokens_per_step", self.tokens_per_step),
            ("shuffle", self.shuffle),
            ("num_documents", len(self.lengths)),
        ):
            if state.get(key, mine) != mine:
                raise ValueError(f"state['{key}'] = {state[key]!r} differs from this sampler's {mine!r}")
        check_int(0, **{"state['epoch']": state["epoch"]})
        self.set_epoch(state["epoch"])
        check_int(0, **{"state['step']": state["step"]})
        if state["step"] > len(self):
            raise ValueError(f"state['step'] = {state['step']} exceeds the epoch's {len(self)} steps")
        self.step = self._resume_step = int(state["step"])


def _plan_epoch(lengths, tokens_per_step, num_replicas, seed, epoch, shuffle) -> list[list[np.ndarray]]:
    rng = np.random.default_rng([seed, epoch])
    num_documents = len(lengths)
    order = rng.permutation(num_documents) if shuffle else np.arange(num_documents)
    long = lengths[order] > tokens_per_step
    bins = [order[[i]] for i in np.flatnonzero(long)]
    fitting = order[~long]
    if len(fitting):
        row_offsets, doc_ids = plan_packing_arrays(lengths[fitting], tokens_per_step, split_long=False)
        bins += np.split(fitting[doc_ids], row_offsets[1:-1])
    bins = [(int(lengths[b].sum()), b) for b in bins]

    num_steps = min(math.ceil(len(bins) / num_replicas), num_documents // num_replicas)
    while len(bins) < num_steps * num_replicas:
        fullest = max((i for i, (_, b) in enumerate(bins) if len(b) > 1), key=lambda i: bins[i][0])
        bins[fullest : fullest + 1] = _deal(bins[fullest][1], lengths, 2)
    bins.sort(key=lambda item: item[0])
    while len(bins) > num_steps * num_replicas:
        (load_a, a), (load_b, b) = bins.pop(0), bins.pop(0)
        bins.append((load_a + load_b, np.concatenate([a, b])))
        bins.sort(key=lambda item: item[0])
    bins.reverse()

    tail_bins = min(2, num_steps) * num_replicas
    tail = bins[-tail_bins:]
    # Merged bins (too few documents) may already exceed the budget; a long document alone may too.
    budget = max([tokens_per_step] + [load for load, b in tail if len(b) > 1])
    redealt = _deal(np.concatenate([b for _, b in tail]), lengths, tail_bins)
    if all(load <= budget or len(b) == 1 for load, b in redealt):
        bins[-tail_bins:] = sorted(redealt, key=lambda item: -item[0])

    steps = [[b for _, b in bins[s * num_replicas : (s + 1) * num_replicas]] for s in range(num_steps)]
    if shuffle:
        steps = [steps[s] for s in rng.permutation(num_steps)]
    return [step[s % num_replicas :] + step[: s % num_replicas] for s, step in enumerate(steps)]


def _deal(docs: np.ndarray, lengths: np.ndarray, count: int) -> list[tuple[int, np.ndarray]]:
    """`docs` into `count` groups, longest first, each into the group with the fewest tokens (LPT)."""
    groups = [[] for _ in range(count)]
    heap = [(0, g) for g in range(count)]
    for doc in docs[np.argsort(-lengths[docs], kind="stable")]:
        load, g = heapq.heappop(heap)
        groups[g].append(doc)
        heapq.heappush(heap, (load + int(lengths[doc]), g))
    loads = dict((g, load) for load, g in heap)
    return [(loads[g], np.array(group, dtype=np.int64)) for g, group in enumerate(groups)]
