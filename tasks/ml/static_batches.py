"""Packed micro-batches of one fixed shape, so a compiled model and flex_attention's kernels compile once.

TRL's padding-free collator flattens a batch's packed rows into one row as long as their tokens: its length
changes with every batch, and each new length is a new shape (a recompilation under torch.compile, a new
flex_attention kernel). Here every packed row is padded to `length` positions (a multiple of 128) and a short
batch (the epoch's last) is filled with rows of padding up to `rows`, so every training micro-batch has the
same shape: `rows` rows of `length` (sdpa, eager, flex_attention: the attention mask is per row, rows x
length^2, where one flattened row would cost (rows x length)^2), or one row of `rows * length` for the
flash-attention kernels, which read packed sequences from the position ids of a single row only. Only the
attention mask differs between batches, and transformers derives it from the position ids on each forward
(no attention_mask, as in TRL's padding-free batches).

Padding is never trained on: each padding run is a sequence of its own (position ids restart at 0), so no real
token attends to it, and its labels are -100. The first label of every sequence is -100 too (it would be
predicted from the previous document's last token). Each batch carries `NUM_PADDING`, the positions it padded,
which the step clock's forward hook removes before the model sees it.

The labels come from the rows' `labels` column when it exists, else the input ids (everything trained);
`row_labels` is the one place that decides it.
"""

from __future__ import annotations

import math
from typing import Any

NUM_PADDING = "cpt_num_padding"
ALIGN = 128  # flex_attention's block size; also a friendly multiple for every matmul tile


def static_length(packing: bool, packed_length: int | str | None, max_seq_length: int) -> int | None:
    """The positions of every packed row with static shapes (`train.packed_length`; auto: the chunk length
    rounded up to ALIGN), or None (padding-free rows of varying length). Decided here, in the training child's
    code, so a change of the rule is a change of the train stage's key."""
    if not packing or packed_length is None:
        return None
    if packed_length == "auto":
        return -(-max_seq_length // ALIGN) * ALIGN
    return packed_length


def row_labels(example: dict[str, Any]) -> list[int]:
    return list(example["labels"]) if "labels" in example else list(example["input_ids"])


def static_packed_batch(examples: list[dict[str, Any]], rows: int, length: int, pad_id: int,
                        flat: bool = False) -> dict[str, Any]:
    """One micro-batch of `rows * length` positions from packed rows (`seq_lengths` per row, as TRL's best-fit
    packing writes them; a row without it is one sequence, e.g. an unpacked validation row). Validation batches
    (rows without `seq_lengths`) are not filled up to `rows`: they are never compiled for training."""
    import torch

    packed = "seq_lengths" in examples[0]
    if packed and len(examples) > rows:
        raise ValueError(f"a micro-batch of {len(examples)} packed rows; the static shape holds {rows}")
    ids, labels, positions = [], [], []
    padding = 0
    for ex in examples:
        n = len(ex["input_ids"])
        if n > length:
            raise ValueError(f"a packed row of {n} tokens is longer than train.packed_length ({length})")
        pos = [p for s in (ex["seq_lengths"] if packed else [n]) for p in range(s)]
        ids += [*ex["input_ids"], *[pad_id] * (length - n)]
        labels += [*row_labels(ex), *[-100] * (length - n)]
        positions += [*pos, *range(length - n)]
        padding += length - n
    for _ in range(rows - len(examples) if packed else 0):
        ids += [pad_id] * length
        labels += [-100] * length
        positions += list(range(length))
        padding += length
    shape = (1, -1) if flat else (-1, length)
    batch = {"input_ids": torch.tensor(ids).view(shape), "labels": torch.tensor(labels).view(shape),
             "position_ids": torch.tensor(positions).view(shape)}
    batch["labels"][batch["position_ids"] == 0] = -100
    batch[NUM_PADDING] = padding
    return batch


class StaticPackedCollator:
    """The Trainer's data_collator for static packed batches (a class, not a closure: DataLoader workers pickle
    it)."""

    def __init__(self, rows: int, length: int, pad_id: int, flat: bool = False):
        self.rows, self.length, self.pad_id, self.flat = rows, length, pad_id, flat

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return static_packed_batch(examples, self.rows, self.length, self.pad_id, self.flat)


def static_padding_fraction(packed, rows: int, length: int) -> dict[str, float]:
    """The share of the positions the static batches of `packed` (one epoch, batches of `rows`) hold that is
    padding: rows padded to `length`, and the last batch filled up to `rows`."""
    import pyarrow.compute as pc

    tokens = int(pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py() or 0)
    positions = math.ceil(len(packed) / rows) * rows * length
    return {"padding_fraction": 0.0 if positions == 0 else 1 - tokens / positions, "positions": positions,
            "tokens": tokens}
