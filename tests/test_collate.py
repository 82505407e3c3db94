"""data.dataset.pad_right: the one padded-batch builder, and the batches built on it (training,
packed training, scoring), pinned to exact ids, masks and labels."""

from __future__ import annotations

import torch

from instill.data.dataset import Row, collate, labels_from, pad_right
from instill.data.packing import collate_packed

P = 0  # pad id
ROWS = [
    Row([5, 6, 7], [0, 1, 1], "a"),
    Row([8, 9], [1, 0], "b", replay=True),
    Row([3, 4, 5, 6], [0, 0, 1, 1], "c"),
]


def test_pad_right_exact():
    ids, attn, mask = pad_right([(r.input_ids, r.mask) for r in ROWS], P)
    assert ids.tolist() == [[5, 6, 7, P], [8, 9, P, P], [3, 4, 5, 6]]
    assert attn.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert mask.tolist() == [
        [False, True, True, False],
        [True, False, False, False],
        [False, False, True, True],
    ]
    assert ids.dtype == attn.dtype == torch.long and mask.dtype == torch.bool
    assert labels_from(ids, mask).tolist() == [
        [-100, 6, 7, -100],
        [8, -100, -100, -100],
        [-100, -100, 5, 6],
    ]


def test_padding_is_never_a_target_even_when_pad_is_a_real_token():
    # pad id 7 is also a trained token of row a: only the mask decides what is a target
    ids, attn, mask = pad_right([([5, 7], [1, 1]), ([4], [1])], 7)
    assert ids.tolist() == [[5, 7], [4, 7]]
    assert labels_from(ids, mask).tolist() == [[5, 7], [4, -100]]
    assert attn.tolist() == [[1, 1], [1, 0]]


def test_training_batch_exact():
    batch = collate(ROWS, P)
    assert batch["input_ids"].tolist() == [[5, 6, 7, P], [8, 9, P, P], [3, 4, 5, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [
        [-100, 6, 7, -100],
        [8, -100, -100, -100],
        [-100, -100, 5, 6],
    ]
    assert int(batch["real_tokens"]) == 9
    assert batch["replay_mask"].tolist() == [
        [False] * 4,
        [True, True, False, False],
        [False] * 4,
    ]
    assert "replay_mask" not in collate([ROWS[0], ROWS[2]], P)


def test_packed_batch_exact():
    batch = collate_packed(ROWS, [[0, 1], [2]], P)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [3, 4, 5, 6, P]]
    # each row's first token is never a target (it would be predicted from the row before)
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 5, 6, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["replay_mask"].tolist() == [
        [False, False, False, True, True],
        [False] * 5,
    ]
    assert int(batch["real_tokens"]) == 9 and "attention_mask" not in batch
