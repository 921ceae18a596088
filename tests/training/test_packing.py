"""The packing planner (`plan_packing`, `plan_packing_arrays`, the C++ side) against the Python oracle."""

import gc
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.packing_oracle import plan_packing_python
from fused_train import _C
from fused_train.training.packing import chunk_spans, plan_packing, plan_packing_arrays


@st.composite
def packing_problems(draw):
    max_tokens = draw(st.integers(1, 64))
    lengths = draw(st.lists(st.integers(1, 3 * max_tokens + 1), max_size=120))
    return lengths, max_tokens


@settings(max_examples=300, deadline=None)
@given(packing_problems())
def test_plan_covers_every_token_once_within_capacity(problem):
    lengths, max_tokens = problem
    rows = plan_packing(lengths, max_tokens)
    spans = chunk_spans(rows, lengths, max_tokens)

    covered = [[] for _ in lengths]
    for row in spans:
        assert row, "a row without documents"
        assert sum(end - start for _, start, end in row) <= max_tokens
        for doc, start, end in row:
            covered[doc].append((start, end))
    for doc, length in enumerate(lengths):
        tokens = [t for start, end in sorted(covered[doc]) for t in range(start, end)]
        assert tokens == list(range(length)), f"document {doc}"

    loads = [sum(end - start for _, start, end in row) for row in spans]
    # Best fit never opens a row while an open one has room, so at most one row is half full or less.
    assert sum(2 * load <= max_tokens for load in loads) <= 1
    # Full rows (one max_tokens piece) come first: the chunk-by-occurrence contract relies on it.
    full = [len(row) == 1 and load == max_tokens for row, load in zip(rows, loads)]
    assert full == sorted(full, reverse=True)


def assert_arrays_hold_plan(arrays, rows):
    row_offsets, doc_ids = arrays
    assert row_offsets.dtype == np.int64 and doc_ids.dtype == np.int64
    assert row_offsets.tolist() == np.cumsum([0] + [len(row) for row in rows]).tolist()
    assert doc_ids.tolist() == [doc for row in rows for doc in row]


@settings(max_examples=300, deadline=None)
@given(packing_problems(), st.booleans())
def test_cpp_equals_python_oracle(problem, split_long):
    lengths, max_tokens = problem
    if not split_long:
        lengths = [min(length, max_tokens) for length in lengths]
    expected = plan_packing_python(lengths, max_tokens, split_long)
    assert plan_packing(lengths, max_tokens, split_long=split_long) == expected
    assert plan_packing(lengths, max_tokens, split_long=split_long) == expected  # deterministic
    assert_arrays_hold_plan(plan_packing_arrays(lengths, max_tokens, split_long=split_long), expected)


def best_fit_decreasing_brute_force(lengths, max_tokens):
    """The definition, one piece at a time with a scan of every row: what both planners must match."""
    pieces = []
    for doc, length in enumerate(lengths):
        pieces += [(max_tokens, doc)] * ((length - 1) // max_tokens) + [((length - 1) % max_tokens + 1, doc)]
    pieces.sort(key=lambda piece: -piece[0])
    rows, free = [], []
    for tokens, doc in pieces:
        fits = [(free[row], row) for row in range(len(rows)) if free[row] >= tokens]
        if fits:
            _, row = min(fits)
        else:
            row = len(rows)
            rows.append([])
            free.append(max_tokens)
        rows[row].append(doc)
        free[row] -= tokens
    return rows


@settings(max_examples=300, deadline=None)
@given(packing_problems())
def test_planners_equal_brute_force_best_fit(problem):
    # Both planners fill a found row with a whole run of equal pieces at once; the brute force
    # places every piece by a fresh search over all rows.
    lengths, max_tokens = problem
    expected = best_fit_decreasing_brute_force(lengths, max_tokens)
    assert plan_packing_python(lengths, max_tokens) == expected
    assert plan_packing(lengths, max_tokens) == expected


@settings(max_examples=100, deadline=None)
@given(packing_problems())
def test_cpp_equals_python_oracle_beyond_the_dense_limit(problem):
    # Above _C.DENSE_MAX_TOKENS the planner keeps open rows in an ordered set instead of tables
    # indexed by free space. Scaling every length and max_tokens by one factor keeps the many
    # equal lengths and free counts of the small problem, so the tie-breaking is tested there too.
    lengths, max_tokens = problem
    scale = _C.DENSE_MAX_TOKENS // max_tokens + 1
    lengths = [length * scale for length in lengths]
    max_tokens *= scale
    assert max_tokens > _C.DENSE_MAX_TOKENS
    assert plan_packing(lengths, max_tokens) == plan_packing_python(lengths, max_tokens)


@pytest.mark.parametrize("max_tokens", [512, _C.DENSE_MAX_TOKENS, _C.DENSE_MAX_TOKENS + 1])
def test_cpp_equals_python_oracle_on_many_documents(max_tokens):
    # Thousands of open rows and many equal free counts: exercises the tie-breaking at scale; and
    # rows at and just above the largest max_tokens the planner indexes tables by.
    rng = np.random.default_rng(0)
    lengths = rng.lognormal(np.log(max_tokens / 5), 1.0, size=20_000).round()
    lengths = np.clip(lengths, 1, 2.5 * max_tokens).astype(np.int64)
    expected = plan_packing_python(lengths.tolist(), max_tokens)
    assert plan_packing(lengths, max_tokens) == expected
    assert_arrays_hold_plan(plan_packing_arrays(lengths, max_tokens), expected)


def test_lists_are_built_without_garbage_collections():
    # 10^4 row lists. Built in Python, every list counted towards the next collection and 14 ran
    # during the call on Python 3.11; over 10^6 lengths one of them swept the whole heap, for more
    # time than the planning. Now at most the one collection the finished lists leave due runs.
    lengths = np.random.default_rng(0).integers(1, 20, size=200_000)
    collections = []
    caller = threading.get_ident()

    def count(phase, info):
        # The planning releases the GIL: another thread's collections are not the call's.
        if phase == "start" and threading.get_ident() == caller:
            collections.append(info["generation"])

    assert gc.isenabled()
    gc.callbacks.append(count)
    try:
        rows = plan_packing(lengths, 200)
    finally:
        gc.callbacks.remove(count)
    assert len(collections) <= 1, f"collections of generations {collections}"
    assert gc.isenabled()
    assert type(rows) is list and all(type(row) is list for row in rows)
    assert all(type(doc) is int for row in rows for doc in row)
    assert_arrays_hold_plan(plan_packing_arrays(lengths, 200), rows)


def test_collector_state_is_restored():
    gc.disable()
    try:
        assert plan_packing([3, 2], 4) == [[0], [1]]
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_hand_made_plan_and_spans():
    # max_tokens 4: documents 0 and 3 are cut (4+1, 4+4+1); full pieces take rows 0-3 in document
    # order, then 3 opens a row, 2 another, and the two 1-token remainders fill the tightest rows.
    rows = plan_packing([5, 3, 2, 9, 4], 4)
    assert rows == [[0], [3], [3], [4], [1, 0], [2, 3]]
    assert chunk_spans(rows, [5, 3, 2, 9, 4], 4) == [
        [(0, 0, 4)],
        [(3, 0, 4)],
        [(3, 4, 8)],
        [(4, 0, 4)],
        [(1, 0, 3), (0, 4, 5)],
        [(2, 0, 2), (3, 8, 9)],
    ]


def test_best_fit_not_first_fit():
    # After 7 | 4+4 the free counts are 3 and 2: the last token goes to the tighter, later row.
    assert plan_packing([7, 4, 4, 1], 10) == [[0], [1, 2, 3]]


def test_ties_go_to_the_lower_document_and_row():
    assert plan_packing([6, 6, 4], 10) == [[0, 2], [1]]
    assert plan_packing([3, 3, 3, 3], 6) == [[0, 1], [2, 3]]


def test_exact_multiples_and_single_tokens():
    assert plan_packing([8], 4) == [[0], [0]]
    assert plan_packing([1, 1, 1], 1) == [[0], [1], [2]]
    assert plan_packing([4, 4], 4, split_long=False) == [[0], [1]]


def test_long_document_rejected_without_split():
    with pytest.raises(ValueError, match=r"lengths\[1\] = 5 exceeds max_tokens = 4"):
        plan_packing([2, 5], 4, split_long=False)


def test_input_types_give_the_same_plan():
    lengths = [9, 2, 7, 3, 3, 12]
    expected = plan_packing(lengths, 8)
    assert plan_packing(tuple(lengths), 8) == expected
    assert plan_packing(np.array(lengths, dtype=np.int32), 8) == expected
    assert plan_packing(np.array(lengths, dtype=np.uint16), 8) == expected
    assert plan_packing(torch.tensor(lengths), np.int64(8)) == expected
    assert plan_packing(torch.tensor(lengths, dtype=torch.int32), 8) == expected
    assert plan_packing(np.repeat(lengths, 2)[::2], 8) == expected  # not contiguous


def test_empty_lengths():
    assert plan_packing([], 8) == []
    assert plan_packing(np.zeros(0, dtype=np.int64), 8) == []
    assert_arrays_hold_plan(plan_packing_arrays([], 8), [])
    assert chunk_spans([], [], 8) == []


@pytest.mark.parametrize(
    ("lengths", "max_tokens", "message"),
    [
        ([1.0, 2.0], 4, "lengths must hold integers"),
        (torch.tensor([1.0, 2.0]), 4, "lengths must hold integers"),
        (torch.tensor([True]), 4, "lengths must hold integers"),
        (["3"], 4, "lengths must hold integers"),
        ([[1, 2]], 4, "lengths must be one-dimensional"),
        (torch.ones(2, 2, dtype=torch.long), 4, "lengths must be one-dimensional"),
        ([3, 0], 4, r"lengths\[1\] must be >= 1, got 0"),
        (np.array([-2]), 4, r"lengths\[0\] must be >= 1, got -2"),
        ([3], 0, "max_tokens must be a positive int"),
        ([3], 2.5, "max_tokens must be a positive int"),
        ([3], True, "max_tokens must be a positive int"),
        ([5, 2**31], 1, r"lengths\[:2\] already make more than 2147483647 pieces"),
    ],
)
def test_bad_inputs_raise_value_error(lengths, max_tokens, message):
    with pytest.raises(ValueError, match=message):
        plan_packing(lengths, max_tokens)


def test_chunk_spans_rejects_a_plan_that_does_not_fit_the_lengths():
    with pytest.raises(ValueError, match="document 0"):
        chunk_spans([[0], [0]], [4], 4)
