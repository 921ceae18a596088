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


def test_every_token_appears_once():
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 1000, (int(n),), generator=generator) for n in torch.randint(1, 40, (50,), generator=generator)]
    batch = fused_train.PackedCollator(max_tokens=32)([{"input_ids": d} for d in docs])
    real = batch["input_ids"] != 0
    assert sorted(batch["input_ids"][real].tolist()) == sorted(torch.cat(docs).tolist())


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


def test_bad_max_tokens_raises():
    with pytest.raises(ValueError, match="max_tokens"):
        fused_train.PackedCollator(max_tokens=0)


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
