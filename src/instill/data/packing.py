"""Best-fit packing of rows into sequences of at most `max_length` tokens, kept apart.

Each row's position ids restart at 0 and no attention mask is passed: transformers then builds a
block-diagonal causal mask from the position ids (masking_utils.find_packed_sequence_indices), so
no token attends across rows. Labels are -100 on each row's first token (it predicts nothing
from the previous row) and on padding. tests/test_packing.py proves packed losses equal
unpacked ones, and that the test fails when attention crosses rows.
"""

from __future__ import annotations

import bisect

import torch

from instill.data.dataset import Row, labels_from, pad_right
from instill.errors import InstillError


def pack_best_fit(rows: list[Row], max_length: int) -> list[list[int]]:
    """Bins of row indices. Rows go longest first into the fullest bin that still has room
    (best-fit decreasing); deterministic for given rows."""
    return best_fit([len(r.input_ids) for r in rows], max_length)


def best_fit(lengths: list[int], max_length: int) -> list[list[int]]:
    """pack_best_fit on bare lengths (also packs a preference micro-batch's sequences)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (room left, bin id), sorted
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > max_length:
            # Rows are truncated to data.max_length when tokenised, so this means rows built
            # with one max_length are being packed at a smaller one (library use, stale rows).
            raise InstillError(
                f"row {i} has {n} tokens and cannot fit a packed sequence of max_length="
                f"{max_length}; tokenise the rows with data.max_length <= {max_length} or "
                f"raise the packing length (data.max_length) to at least {n}"
            )
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - n, len(bins) - 1))
    return bins


def packing_efficiency(rows: list[Row], bins: list[list[int]], max_length: int) -> float:
    used = sum(len(rows[i].input_ids) for b in bins for i in b)
    return used / (len(bins) * max_length) if bins else 0.0


def collate_packed(rows: list[Row], bins: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """One micro-batch of packed sequences, right-padded to the longest."""
    seqs = []
    for b in bins:
        ids: list[int] = []
        mask: list[int] = []
        for i in b:
            ids += rows[i].input_ids
            # the first token of a row is never a target across the boundary
            mask += [0, *rows[i].mask[1:]]
        seqs.append((ids, mask))
    ids, attn, mask = pad_right(seqs, pad_id)
    width = ids.shape[1]
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    replay = torch.zeros((len(bins), width), dtype=torch.bool)
    for r, b in enumerate(bins):
        at = 0
        for i in b:
            n = len(rows[i].input_ids)
            pos[r, at : at + n] = torch.arange(n)
            replay[r, at : at + n] = rows[i].replay
            at += n
        pos[r, at:] = torch.arange(width - at)  # padding forms its own segment
    batch = {
        "input_ids": ids,
        "labels": labels_from(ids, mask),
        "position_ids": pos,
        "real_tokens": attn.sum(),
    }
    if replay.any():  # the tokens of replay rows (train.kl_to_base)
        batch["replay_mask"] = replay
    return batch
