"""Planning which documents share a row of `max_tokens` tokens (the planner itself is C++)."""

from collections.abc import Sequence
from numbers import Integral

import numpy as np
import torch

from fused_train import _C


def plan_packing(lengths, max_tokens: int, *, split_long: bool = True) -> list[list[int]]:
    """Packs documents of the given token lengths into rows of at most `max_tokens` tokens.

    Best-fit-decreasing: the pieces are taken longest first (equal lengths by document index),
    and each goes into the open row whose free space `max_tokens - sum(row)` is the smallest that
    still holds it (equal free space: the lower row index), or opens a new row if none does. The
    C++ planner finds that row in O(log n), so planning n pieces costs O(n log n).

    A document longer than `max_tokens` is never dropped or truncated. With `split_long=True` it
    is cut into ceil(length / max_tokens) pieces: full chunks of `max_tokens` tokens, then the
    remainder. Each piece appears in the plan as its document's index, and the k-th row (in row
    order) that holds document i holds its chunk k, tokens [k * max_tokens, min((k + 1) *
    max_tokens, length)); `chunk_spans` resolves this. With `split_long=False` such a document
    raises a ValueError.

    Args:
        lengths: token count of each document, >= 1: a sequence of ints, a 1-D integer numpy
            array or a 1-D integer torch tensor.
        max_tokens: tokens per row, a positive int.
        split_long: cut documents longer than `max_tokens` into chunks (True) or reject them.

    Returns:
        One list per row of the document indices placed in it, in placement order. An empty
        `lengths` gives no rows.
    """
    if not isinstance(max_tokens, Integral) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    lengths = _as_int64_array(lengths)
    if lengths.size == 0:
        return []
    # The C++ side checks the values (lengths >= 1, not over-long without split_long) and raises
    # ValueError naming the offending `lengths[i]`.
    return _C.plan_packing(lengths, int(max_tokens), bool(split_long))


def chunk_spans(rows: Sequence[Sequence[int]], lengths, max_tokens: int) -> list[list[tuple[int, int, int]]]:
    """Resolves a plan of `plan_packing` into token spans: per row, (document, start, end) per piece.

    The k-th occurrence of document i (in row order) is its chunk k, tokens [start, end) with
    start = k * max_tokens and end = min(start + max_tokens, lengths[i]).
    """
    lengths = _as_int64_array(lengths).tolist()
    next_start = [0] * len(lengths)
    spans = []
    for row in rows:
        row_spans = []
        for doc in row:
            start = next_start[doc]
            if start >= lengths[doc]:
                raise ValueError(f"rows hold document {doc} more often than its {lengths[doc]} tokens allow")
            end = min(start + max_tokens, lengths[doc])
            next_start[doc] = end
            row_spans.append((doc, start, end))
        spans.append(row_spans)
    return spans


def _as_int64_array(lengths) -> np.ndarray:
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype == torch.bool or lengths.dtype.is_floating_point or lengths.dtype.is_complex:
            raise ValueError(f"lengths must hold integers, got a tensor of {lengths.dtype}")
        lengths = lengths.detach().cpu().numpy()
    elif not isinstance(lengths, np.ndarray):
        if len(lengths) == 0:
            return np.zeros(0, dtype=np.int64)
        lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iu":
        raise ValueError(f"lengths must hold integers, got dtype {lengths.dtype}")
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {tuple(lengths.shape)}")
    return lengths.astype(np.int64, copy=False)
