"""Collation of examples into packed rows that any Hugging Face causal LM accepts."""

from collections.abc import Mapping, Sequence

import torch

from fused_train.ops.checks import check_int
from fused_train.training.packing import chunk_spans, plan_packing


class PackedCollator:
    """Packs a list of examples into rows of at most `max_tokens` tokens (or one flat row) for causal LM training.

    Each example is a mapping with `input_ids` (a list of ints or a 1-D integer tensor) and optionally
    `labels` of the same length (-100 where no loss is wanted); without labels, the input ids are the
    labels. The rows are planned by best-fit-decreasing (`plan_packing`); an example longer than
    `max_tokens` is cut into chunks of `max_tokens`, each then treated as a document of its own,
    never dropped.

    Layouts, all `[rows, width]` tensors:
      - default: as few rows as best-fit-decreasing needs at `max_tokens`, with the documents then
        spread over those rows so that the widest is as narrow as it can be, in steps of
        `pad_to_multiple_of`; every row is padded to that width (at most `max_tokens`). A batch
        that leaves the last row half empty at `max_tokens` costs little filler this way, and
        widths vary from batch to batch in steps of `pad_to_multiple_of` only;
      - `pad_to_max_tokens=True`: rows of exactly `max_tokens`, one shape for every batch (static
        shapes: CUDA graphs, `torch.compile` without dynamic shapes), at the price of the filler
        that the last row leaves, which the model computes for nothing;
      - `flatten=True`: the same documents in one row of `total_tokens`, no filler.

    The returned dict holds:
      - `input_ids`: documents one after another, filler `pad_token_id` after them;
      - `labels`: the documents' labels with -100 on each document's first token, so that no
        document is trained to predict its successor's first token, and -100 on filler;
      - `position_ids`: restarting at 0 at every document (and at the filler);
    and transformers' flash-attention kwargs over the flattened token stream, where the filler of a
    row counts as one more sequence: `cu_seq_lens_q`/`cu_seq_lens_k` (int32) and
    `max_length_q`/`max_length_k` (ints). With `fused_train.patch(model)` attention never crosses a
    document; no attention mask is built.
    """

    def __init__(
        self,
        max_tokens: int,
        pad_token_id: int = 0,
        label_pad_id: int = -100,
        flatten: bool = False,
        pad_to_max_tokens: bool = False,
        pad_to_multiple_of: int = 64,
    ):
        check_int(max_tokens=max_tokens)
        if not isinstance(pad_to_multiple_of, int) or isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
        if flatten and pad_to_max_tokens:
            raise ValueError("flatten=True lays one row without filler; it cannot also pad_to_max_tokens")
        self.max_tokens = max_tokens
        self.pad_token_id = pad_token_id
        self.label_pad_id = label_pad_id
        self.flatten = flatten
        self.pad_to_max_tokens = pad_to_max_tokens
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Mapping]) -> dict:
        if len(examples) == 0:
            raise ValueError("examples must hold at least one example, got an empty batch")
        input_ids, labels = zip(*(self._read_example(i, example) for i, example in enumerate(examples)))
        lengths = [len(ids) for ids in input_ids]
        rows = chunk_spans(plan_packing(lengths, self.max_tokens), lengths, self.max_tokens)
        if self.flatten:
            rows = [[span for row in rows for span in row]]
            row_width = sum(lengths)
        elif self.pad_to_max_tokens:
            row_width = self.max_tokens
        else:
            rows, row_width = self._narrowest_rows(rows)

        out_ids = torch.full((len(rows), row_width), self.pad_token_id, dtype=torch.long)
        out_labels = torch.full((len(rows), row_width), self.label_pad_id, dtype=torch.long)
        out_positions = torch.zeros((len(rows), row_width), dtype=torch.long)
        seq_lens = []
        for r, row in enumerate(rows):
            offset = 0
            for doc, start, end in row:
                n = end - start
                out_ids[r, offset : offset + n] = input_ids[doc][start:end]
                out_labels[r, offset + 1 : offset + n] = labels[doc][start + 1 : end]
                out_positions[r, offset : offset + n] = torch.arange(n)
                seq_lens.append(n)
                offset += n
            if offset < row_width:
                out_positions[r, offset:] = torch.arange(row_width - offset)
                seq_lens.append(row_width - offset)
        cu_seq_lens = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        cu_seq_lens[1:] = torch.cumsum(torch.tensor(seq_lens), 0)
        return {
            "input_ids": out_ids,
            "labels": out_labels,
            "position_ids": out_positions,
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens.clone(),
            "max_length_q": max(seq_lens),
            "max_length_k": max(seq_lens),
        }

    def _narrowest_rows(self, rows):
        """The pieces of `rows` re-planned into as many rows, as narrow as they can be in steps of
        `pad_to_multiple_of` (at most `max_tokens`, where the given plan fits), and that width."""
        pieces = [span for row in rows for span in row]
        sizes = [end - start for _, start, end in pieces]
        step = self.pad_to_multiple_of
        width = max(-(-sum(sizes) // len(rows)), max(sizes))
        width = -(-width // step) * step
        while width < self.max_tokens:
            plan = plan_packing(sizes, width, split_long=False)
            if len(plan) <= len(rows):
                rows = [[pieces[i] for i in row] for row in plan]
                break
            width += step
        widest = max(sum(end - start for _, start, end in row) for row in rows)
        return rows, min(-(-widest // step) * step, self.max_tokens)

    @staticmethod
    def _read_example(index: int, example: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(example, Mapping) or "input_ids" not in example:
            raise ValueError(f"examples[{index}] must be a mapping with 'input_ids', got {type(example).__name__}")
        if len(example["input_ids"]) == 0:
            raise ValueError(f"examples[{index}]['input_ids'] is empty; every example needs at least one token")
        input_ids = _as_token_tensor(example["input_ids"], f"examples[{index}]['input_ids']")
        mask = example.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise ValueError(
                f"examples[{index}]['attention_mask'] has zeros: pass unpadded examples, the collator packs them"
            )
        labels = example.get("labels")
        if labels is None:
            return input_ids, input_ids
        labels = _as_token_tensor(labels, f"examples[{index}]['labels']")
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"examples[{index}]['labels'] must have the length of its input_ids ({input_ids.numel()}), "
                f"got {labels.numel()}"
            )
        return input_ids, labels


def _as_token_tensor(values, name: str) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if tensor.dim() != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"{name} must be a 1-D sequence of integer token ids, got {tensor.dim()}-D {tensor.dtype}")
    return tensor.long()


def block_diagonal_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The classic packed "4D mask": `[rows, 1, T, T]`, causal within each document, nothing across.

    Documents are read from `position_ids` (`[rows, T]`, restarting at 0 at every document, as
    `PackedCollator` emits). With `dtype=torch.bool` True means "may attend" (SDPA's convention);
    with a floating dtype the mask is additive: 0 where allowed, the dtype's minimum elsewhere
    (eager attention's convention). Only for baselines and tests: it costs T² per row, which is
    exactly what the varlen path avoids.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2:
        raise ValueError(
            f"position_ids must be a 2-D [rows, T] tensor, got {getattr(position_ids, 'shape', position_ids)}"
        )
    document = torch.cumsum(position_ids == 0, dim=1)
    same_document = document[:, :, None] == document[:, None, :]
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (same_document & causal)[:, None]
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
