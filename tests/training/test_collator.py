"""PackedCollator and the block-diagonal 4D mask, on hand-made batches."""

import pytest
import torch

import fused_train


def test_packs_rows_with_restarting_positions_and_flash_kwargs():
    collate = fused_train.PackedCollator(max_tokens=8, pad_token_id=0)
    batch = collate([{"input_ids": [11, 12, 13]}, {"input_ids": [21, 22, 23, 24, 25]}, {"input_ids": [31, 32]}])
    # Best fit decreasing: the 5-token document opens row 0 and the 3-token one fills it; the
    # 2-token one opens row 1, followed by 6 filler tokens.
    assert batch["input_ids"].tolist() == [[21, 22, 23, 24, 25, 11, 12, 13], [31, 32, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [
        [-100, 22, 23, 24, 25, -100, 12, 13],
        [-100, 32, -100, -100, -100, -100, -100, -100],
    ]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 8, 10, 16]
    assert torch.equal(batch["cu_seq_lens_k"], batch["cu_seq_lens_q"])
    assert batch["max_length_q"] == batch["max_length_k"] == 6


def test_keeps_given_labels_and_splits_long_documents():
    collate = fused_train.PackedCollator(max_tokens=4, label_pad_id=-1)
    batch = collate([{"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-1, -1, 3, 4, 5, 6]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert batch["labels"].tolist() == [[-1, -1, 3, 4], [-1, 6, -1, -1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 1]]


def test_flatten_gives_one_row_without_filler():
    batch = fused_train.PackedCollator(max_tokens=8, flatten=True)([{"input_ids": [5, 6]}, {"input_ids": [7, 8, 9]}])
    assert batch["input_ids"].tolist() == [[7, 8, 9, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5]


def test_rows_are_spread_to_the_narrowest_width_by_default():
    docs = [[i] * n for i, n in zip(range(3, 8), (120, 120, 70, 60, 30))]
    examples = [{"input_ids": d} for d in docs]
    # At 256 best-fit-decreasing needs 2 rows: [120, 120] and [70, 60, 30], 400 tokens. Spread over
    # 2 rows in steps of 8, the narrowest that holds them is 216: [120, 70] and [120, 60, 30].
    batch = fused_train.PackedCollator(max_tokens=256, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].shape == (2, 216)
    assert batch["cu_seq_lens_q"].tolist() == [0, 120, 190, 216, 336, 396, 426, 432]
    assert batch["max_length_q"] == 120
    # Steps of 64 (the default): 256 at most, the best-fit rows as they are; one row for a batch
    # that fits.
    assert fused_train.PackedCollator(max_tokens=256)(examples)["input_ids"].shape == (2, 256)
    assert fused_train.PackedCollator(max_tokens=1024)(examples)["input_ids"].shape == (1, 448)


def test_pad_to_max_tokens_keeps_one_shape():
    examples = [{"input_ids": [5] * n} for n in (120, 120, 70, 60, 30)]
    batch = fused_train.PackedCollator(max_tokens=512, pad_to_max_tokens=True)(examples)
    assert batch["input_ids"].shape == (1, 512)
    assert batch["cu_seq_lens_q"].tolist() == [0, 120, 240, 310, 370, 400, 512]


def _check_batch(batch, docs, row_width_at_most):
    """Every document's tokens exactly once, each sequence within one row, labels the ids but -100
    on each first token, positions restarting at 0, filler only at the end of a row."""
    input_ids, labels, positions = (batch[key] for key in ("input_ids", "labels", "position_ids"))
    rows, width = input_ids.shape
    assert width <= row_width_at_most
    cu = batch["cu_seq_lens_q"].tolist()
    assert cu[0] == 0 and cu[-1] == rows * width and batch["cu_seq_lens_k"].tolist() == cu
    assert batch["max_length_q"] == batch["max_length_k"] == max(b - a for a, b in zip(cu, cu[1:]))
    flat_ids, flat_labels, flat_positions = input_ids.flatten(), labels.flatten(), positions.flatten()
    sequences = []
    for start, end in zip(cu, cu[1:]):
        assert start // width == (end - 1) // width, "a sequence spans two rows"
        assert flat_positions[start:end].tolist() == list(range(end - start))
        ids = flat_ids[start:end]
        if (ids == 0).all():
            assert end % width == 0 and (flat_labels[start:end] == -100).all(), "filler before the end of a row"
            continue
        assert flat_labels[start].item() == -100 and torch.equal(flat_labels[start + 1 : end], ids[1:])
        sequences.append(ids.tolist())
    assert sorted(sequences) == sorted(d.tolist() for d in docs)


@pytest.mark.parametrize(
    "layout, row_width_at_most",
    [({}, 64), ({"pad_to_multiple_of": 1}, 64), ({"pad_to_max_tokens": True}, 64), ({"flatten": True}, 10**6)],
    ids=["default", "multiple_of_1", "pad_to_max_tokens", "flatten"],
)
def test_every_layout_keeps_every_token_labels_and_positions(layout, row_width_at_most):
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 40, (60,), generator=generator)
    docs = [torch.randint(3, 1000, (int(n),), generator=generator) for n in lengths]
    batch = fused_train.PackedCollator(max_tokens=64, **layout)([{"input_ids": d} for d in docs])
    _check_batch(batch, docs, row_width_at_most)
    if layout.get("pad_to_max_tokens"):
        assert batch["input_ids"].shape[1] == 64


@pytest.mark.parametrize(
    "examples, match",
    [
        ([], "empty batch"),
        ([{"labels": [1]}], "input_ids"),
        ([{"input_ids": []}], "empty"),
        ([{"input_ids": [1.5, 2.0]}], "integer token ids"),
        ([{"input_ids": [[1, 2]]}], "1-D"),
        ([{"input_ids": [1, 2], "labels": [1]}], "labels"),
        ([{"input_ids": [1, 2], "attention_mask": [1, 0]}], "unpadded"),
    ],
)
def test_bad_examples_raise(examples, match):
    with pytest.raises(ValueError, match=match):
        fused_train.PackedCollator(max_tokens=8)(examples)


def test_bad_layout_arguments_raise():
    with pytest.raises(ValueError, match="max_tokens"):
        fused_train.PackedCollator(max_tokens=0)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        fused_train.PackedCollator(max_tokens=8, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="pad_to_max_tokens"):
        fused_train.PackedCollator(max_tokens=8, flatten=True, pad_to_max_tokens=True)


def test_block_diagonal_causal_mask():
    position_ids = torch.tensor([[0, 1, 0, 1, 2]])
    mask = fused_train.block_diagonal_causal_mask(position_ids)
    assert mask.shape == (1, 1, 5, 5)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected)
    additive = fused_train.block_diagonal_causal_mask(position_ids, dtype=torch.float32)
    assert torch.equal(additive[0, 0] == 0, expected)
    assert additive.min() == torch.finfo(torch.float32).min
