"""How documents become training rows: the window plan (decided once, `window_plan`), where each document's
windows start and how long they are (`window_layout`), and the rows themselves, materialised (`chunk_batch`) or as
offsets into the token pieces (`window_batch`, `WINDOW_SCHEMA`). Pure functions: the chunk stage (tasks/chunk.py)
writes them, token-stats predicts them, evaluate windows its general corpus with them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from tasks.core.config.base import ConfigError
from tasks.core.config.data import ChunkConfig


def chunk_schema(ids: pa.DataType = pa.uint32()) -> pa.Schema:
    """A chunk shard's columns. `trained_from`: positions of the row before it are context, not trained."""
    return pa.schema([
        ("input_ids", pa.list_(ids)),
        ("trained_from", pa.int32()),
        ("doc_id", pa.string()),
        ("start", pa.int32()),
    ])


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """How documents become rows, decided once (`window_plan`, by the chunk stage and by token-stats, which predicts
    the chunk stage's rows before it runs), recorded in the chunk output and read from there by what comes after
    (evaluate's general corpus is windowed the same way)."""

    window: int  # tokens of a document per row
    stride: int  # between the starts of a document's windows
    bos: int  # 1: every row starts with the tokenizer's BOS (one position not a document token)
    masked_overlap: int  # positions after BOS of a window (not a document's first) that are context, not trained

    @property
    def overlap(self) -> int:
        return self.window - self.stride

    def meta(self) -> dict[str, int]:
        return {"window": self.window, "stride": self.stride, "bos": self.bos, "masked_overlap": self.masked_overlap}

    @classmethod
    def of(cls, meta) -> WindowPlan:
        """The plan a chunk output records: its meta (tasks.chunk.ChunkMeta, typed, so every field is there;
        named by duck type, data/ imports no stage module)."""
        return cls(meta.window, meta.stride, meta.bos, meta.masked_overlap)


def window_plan(cfg: ChunkConfig, has_bos: bool) -> WindowPlan:
    """The windows of `cfg` for a tokenizer that adds BOS (`has_bos`) or not: window W = max_seq_length - BOS,
    stride S = W - overlap, the overlap masked in labels or not."""
    max_seq_length, overlap = cfg.max_seq_length, cfg.overlap
    window = max_seq_length - (1 if has_bos else 0)
    if window < 1:
        raise ConfigError(f"chunk.max_seq_length: {max_seq_length} leaves no room for a token after BOS")
    if overlap >= window:
        why = f"max_seq_length {max_seq_length} minus 1 for the tokenizer's BOS" if has_bos else "max_seq_length"
        raise ConfigError(f"chunk.overlap: {overlap} must be smaller than the window of {window} tokens ({why})")
    return WindowPlan(window, window - overlap, int(has_bos), overlap if cfg.mask_overlap else 0)


def windows_per_document(lengths: np.ndarray, window: int, stride: int) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    return (np.maximum(lengths - window, 0) + stride - 1) // stride + 1


def window_layout(lengths: np.ndarray, window: int, stride: int):
    """Per window: (document index, index within its document, start in `ids`, length without BOS)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = windows_per_document(lengths, window, stride)
    doc_index = np.repeat(np.arange(len(lengths)), counts)
    first_of_doc = np.cumsum(counts) - counts
    nth = np.arange(int(counts.sum())) - np.repeat(first_of_doc, counts)
    starts = nth * stride
    sizes = np.minimum(window, lengths[doc_index] - starts)
    return doc_index, nth, starts, sizes


def chunk_lengths(doc_lengths: np.ndarray, plan: WindowPlan) -> np.ndarray:
    """Lengths of the rows `chunk` will emit, computed from document lengths alone (used by token-stats)."""
    _, _, _, sizes = window_layout(doc_lengths, plan.window, plan.stride)
    return sizes + plan.bos


def chunk_batch(doc_ids: pa.Array, ids: pa.ListArray, plan: WindowPlan, bos_id: int | None) -> pa.RecordBatch:
    """Windows of every document in the batch, as one record batch of `chunk_schema(ids' value type)`."""
    bos, window, stride = plan.bos, plan.window, plan.stride
    offsets = ids.offsets.to_numpy().astype(np.int64)
    values = ids.flatten().to_numpy(zero_copy_only=False)
    doc_index, nth, starts, sizes = window_layout(np.diff(offsets), window, stride)

    row_sizes = sizes + bos
    row_offsets = np.zeros(len(row_sizes) + 1, dtype=np.int64)
    np.cumsum(row_sizes, out=row_offsets[1:])
    row_starts = row_offsets[:-1]
    # One gather for all rows: position p of a row reads token (window start + p - bos) of its document;
    # the BOS slot reads a neighbour and is overwritten below.
    position = np.arange(row_offsets[-1], dtype=np.int64) - np.repeat(row_starts, row_sizes)
    first_token = offsets[doc_index] - offsets[0] + starts - bos
    input_ids = values.take(np.repeat(first_token, row_sizes) + position, mode="clip")
    if bos:
        input_ids[row_starts] = bos_id
    # The trained part starts after the BOS, and after the overlap in every window but a document's first.
    trained_from = np.full(len(row_sizes), bos, dtype=np.int32)
    if plan.masked_overlap:
        trained_from[nth > 0] += plan.masked_overlap
    value_type = ids.type.value_type
    return pa.record_batch(
        [
            pa.ListArray.from_arrays(pa.array(row_offsets.astype(np.int32)), pa.array(input_ids, value_type)),
            pa.array(trained_from),
            doc_ids.take(pa.array(doc_index)),
            pa.array(starts.astype(np.int32)),
        ],
        schema=chunk_schema(value_type),
    )


def trained_tokens(ids: pa.ListArray, rows: pa.RecordBatch, plan: WindowPlan) -> int:
    """Tokens with a label: every token once when the overlap is masked, else every row token but BOS."""
    if plan.masked_overlap == plan.overlap:
        return len(ids.flatten())
    return len(rows.column("input_ids").flatten()) - rows.num_rows * plan.bos


# Windows are stored as offsets into the token pieces, not as rows: a window is 24 bytes and a doc id where its
# row would be ~2 × the document's tokens at 50% overlap (bench/windows.py: the chunk stage's bytes 0.008× the
# materialised rows; gathered at training start in about the time today's labels took to derive, and the
# per-batch reads as fast). `Chunks.row_batches` gathers the rows from the memory-mapped tokens.
WINDOW_SCHEMA = pa.schema([
    ("part", pa.int32()),  # which token piece (the output's `token_files`)
    ("row", pa.int64()),  # the document's row in that piece
    ("start", pa.int32()),  # the window's first token in the document
    ("length", pa.int32()),  # tokens of the document in the window (BOS not counted)
    ("trained_from", pa.int32()),  # positions of the row (BOS included) before it are context, not trained
    ("doc_id", pa.string()),
])


def window_batch(doc_ids: pa.Array, lengths: np.ndarray, rows: np.ndarray, plan: WindowPlan) -> pa.RecordBatch:
    """The windows of the documents `rows` (of lengths `lengths`, ids `doc_ids`), as `WINDOW_SCHEMA` rows with
    part 0: the same windows `chunk_batch` materialises, by offset."""
    doc_index, nth, starts, sizes = window_layout(lengths, plan.window, plan.stride)
    trained_from = np.full(len(doc_index), plan.bos, dtype=np.int32)
    if plan.masked_overlap:
        trained_from[nth > 0] += plan.masked_overlap
    return pa.record_batch([
        pa.array(np.zeros(len(doc_index), np.int32)), pa.array(np.asarray(rows, np.int64)[doc_index]),
        pa.array(starts.astype(np.int32)), pa.array(sizes.astype(np.int32)), pa.array(trained_from),
        doc_ids.take(pa.array(doc_index)),
    ], schema=WINDOW_SCHEMA)
