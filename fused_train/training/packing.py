"""Planning which documents share a row of `max_tokens` tokens (the planner itself is C++)."""

from collections.abc import Sequence

import numpy as np
import torch

from fused_train import _C
from fused_train.ops.checks import check_int


def plan_packing(lengths, max_tokens: int, *, split_long: bool = True) -> list[list[int]]:
    """Packs documents of the given token lengths into rows of at most `max_tokens` tokens.

    Best-fit-decreasing: the pieces are taken longest first (equal lengths by document index),
    and each goes into the open row whose free space `max_tokens - sum(row)` is the smallest that
    still holds it (equal free space: the lower row index), or opens a new row if none does. The
    C++ planner finds that row in O(log n), so planning n pieces costs O(n log n). (Up to
    `max_tokens` = 2^20 it sorts the pieces by counting and keeps the open rows in tables indexed
    by free space; above, in an ordered set. Both give the same plan.)

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
        `lengths` gives no rows. For millions of documents `plan_packing_arrays` returns the same
        plan without building a Python int per document.
    """
    # The C++ side builds the lists with the garbage collector paused: a list per row made here
    # (slicing a `tolist()`) sets off collections, some over the whole heap, that for millions of
    # documents cost more than the planning itself.
    return _C.plan_packing_lists(*_planner_args(lengths, max_tokens, split_long))


def plan_packing_arrays(lengths, max_tokens: int, *, split_long: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """`plan_packing` as two flat int64 arrays (compressed rows), for large datasets.

    Row r holds the documents `doc_ids[row_offsets[r]:row_offsets[r + 1]]`, in the order of
    `plan_packing(lengths, max_tokens, split_long=split_long)[r]`; `row_offsets` has rows + 1
    entries, from 0 to the number of pieces. Planning a whole corpus offline (millions of
    documents) this way costs no Python object per document: save the two arrays, and slice them
    per batch. A document cut into chunks appears once per chunk, as in `plan_packing`: its k-th
    occurrence in `doc_ids` is its chunk k.

    Args: as for `plan_packing`.

    Returns:
        (row_offsets, doc_ids), both 1-D np.int64. An empty `lengths` gives ([0], []).
    """
    return _C.plan_packing(*_planner_args(lengths, max_tokens, split_long))


def chunk_spans(rows: Sequence[Sequence[int]], lengths, max_tokens: int) -> list[list[tuple[int, int, int]]]:
    """Resolves a plan of `plan_packing` into token spans: per row, (document, start, end) per piece.

    The k-th occurrence of document i (in row order) is its chunk k, tokens [start, end) with
    start = k * max_tokens and end = min(start + max_tokens, lengths[i]).
    """
    lengths = as_int64_array(lengths).tolist()
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


def _planner_args(lengths, max_tokens, split_long) -> tuple[np.ndarray, int, bool]:
    check_int(max_tokens=max_tokens)
    # The C++ side checks the values (lengths >= 1, not over-long without split_long) and raises
    # ValueError naming the offending `lengths[i]`.
    return as_int64_array(lengths), int(max_tokens), bool(split_long)


def as_int64_array(lengths) -> np.ndarray:
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
