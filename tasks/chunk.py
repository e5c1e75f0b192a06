"""chunk: tokenized documents → overlapping training windows, saved as a datasets `DatasetDict`.

Semantics (per document, `ids` = its tokens + EOS):
- window `W = max_seq_length - (1 if the tokenizer adds BOS else 0)`, stride `S = W - overlap`;
- windows start at 0, S, 2S, … and stop at the first window that reaches the end of `ids`
  (the seed's loop also emitted tails wholly inside the previous window);
- every chunk starts with BOS when the tokenizer uses one;
- `labels` copy `input_ids`, with BOS and — in every window after a document's first, when
  `mask_overlap` — the leading `overlap` tokens set to -100: they are context, already trained on in the
  previous window, so every token is trained exactly once.

The windowing is vectorised over a whole batch of documents with numpy (no Python loop per token or per
window) and written to Arrow batch by batch, so memory stays flat as the corpus grows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.cache import StageOutput, current_key, publish, stage_task
from tasks.config import ChunkConfig, ConfigError
from tasks.report import Progress, run_logger
from tasks.shuffle import SPLITS

IGNORE_INDEX = -100
CHUNK_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("doc_id", pa.string()),
    ("start", pa.int32()),
])
SHARD = "data-00000-of-00001.arrow"


# ------------------------------------------------------------------------------------ pure functions


def window_plan(max_seq_length: int, overlap: int, has_bos: bool) -> tuple[int, int]:
    """(W, S): tokens of `ids` per window and stride between window starts."""
    window = max_seq_length - (1 if has_bos else 0)
    if window < 1:
        raise ConfigError(f"chunk.max_seq_length: {max_seq_length} leaves no room for a token after BOS")
    if overlap >= window:
        why = f"max_seq_length {max_seq_length} minus 1 for the tokenizer's BOS" if has_bos else "max_seq_length"
        raise ConfigError(f"chunk.overlap: {overlap} must be smaller than the window of {window} tokens ({why})")
    return window, window - overlap


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


def chunk_lengths(doc_lengths: np.ndarray, cfg: ChunkConfig, has_bos: bool) -> np.ndarray:
    """Lengths of the rows `chunk` will emit, computed from document lengths alone (used by token-stats)."""
    window, stride = window_plan(cfg.max_seq_length, cfg.overlap, has_bos)
    _, _, _, sizes = window_layout(doc_lengths, window, stride)
    return sizes + (1 if has_bos else 0)


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int32, copy=False)))


def chunk_batch(doc_ids: pa.Array, ids: pa.ListArray, cfg: ChunkConfig, bos_id: int | None) -> pa.RecordBatch:
    """Windows of every document in the batch, as one record batch of CHUNK_SCHEMA."""
    bos = 1 if bos_id is not None else 0
    window, stride = window_plan(cfg.max_seq_length, cfg.overlap, bool(bos))
    offsets = ids.offsets.to_numpy().astype(np.int64)
    values = ids.flatten().to_numpy()
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
    labels = input_ids.copy()
    if bos:
        input_ids[row_starts] = bos_id
    # Labels before `limit` in a row are -100: the BOS, plus the overlap in every window after the first.
    limit = np.full(len(row_sizes), bos, dtype=np.int64)
    if cfg.mask_overlap and cfg.overlap:
        limit[nth > 0] += cfg.overlap
    if limit.any():
        labels[position < np.repeat(limit, row_sizes)] = IGNORE_INDEX
    return pa.record_batch(
        [
            _list_array(row_offsets, input_ids),
            _list_array(row_offsets, labels),
            doc_ids.take(pa.array(doc_index)),
            pa.array(starts.astype(np.int32)),
        ],
        schema=CHUNK_SCHEMA,
    )


def trained_tokens(ids: pa.ListArray, rows: pa.RecordBatch, cfg: ChunkConfig, bos_id: int | None) -> int:
    """Tokens with a label: every token once when the overlap is masked, else every row token but BOS."""
    if cfg.mask_overlap:
        return len(ids.flatten())
    return len(rows.column("input_ids").flatten()) - (rows.num_rows if bos_id is not None else 0)


def chunk_features():
    from datasets import Features, List, Value

    return Features({
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "doc_id": Value("string"),
        "start": Value("int32"),
    })


def write_dataset_dict(out_dir: Path, splits: dict[str, Path], fingerprint: str) -> None:
    """The files `DatasetDict.save_to_disk` writes, around Arrow shards we streamed ourselves."""
    features = chunk_features()
    for name in splits:
        (out_dir / name / "state.json").write_text(json.dumps({
            "_data_files": [{"filename": SHARD}],
            "_fingerprint": f"{fingerprint[-16:]}{name}"[-16:],
            "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
            "_output_all_columns": False, "_split": None,
        }, indent=2))
        (out_dir / name / "dataset_info.json").write_text(json.dumps({
            "citation": "", "description": "", "features": features.to_dict(), "homepage": "", "license": "",
        }, indent=2))
    (out_dir / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))


def chunk_file(src: Path, dst_dir: Path, cfg: ChunkConfig, bos_id: int | None,
               progress: Progress | None = None) -> dict:
    """Stream one split's tokenized documents into a datasets shard; returns counts."""
    schema = chunk_features().arrow_schema
    reader = pa.ipc.open_file(pa.memory_map(str(src)))
    counts = {"documents": 0, "chunks": 0, "tokens": 0, "trained_tokens": 0}
    dst_dir.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(dst_dir / SHARD), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for i in range(reader.num_record_batches):
            rb = reader.get_batch(i)
            out = chunk_batch(rb.column("doc_id"), rb.column("input_ids"), cfg, bos_id)
            writer.write_batch(pa.RecordBatch.from_arrays(out.columns, schema=schema))
            counts["documents"] += rb.num_rows
            counts["chunks"] += out.num_rows
            counts["tokens"] += len(out.column("input_ids").values)
            counts["trained_tokens"] += trained_tokens(rb.column("input_ids"), out, cfg, bos_id)
            if progress is not None:
                progress.update(rb.num_rows)
    return counts


# ---------------------------------------------------------------------------------------- the task


@stage_task("chunk", libraries=["numpy", "pyarrow", "datasets"])
def chunk(chunk: ChunkConfig, tokens: StageOutput, artifacts: str) -> StageOutput:
    key = current_key("chunk", {"chunk": chunk, "tokens": tokens})
    bos_id = tokens.meta["bos_id"]
    window, stride = window_plan(chunk.max_seq_length, chunk.overlap, bos_id is not None)
    total = sum(tokens.counts[f"{s}_documents"] for s in SPLITS)

    def build(tmp: Path):
        counts = {}
        with Progress(total, "chunk", unit="doc") as progress:
            for name in SPLITS:
                c = chunk_file(tokens.dir(artifacts) / f"{name}.arrow", tmp / name, chunk, bos_id, progress)
                counts.update({f"{name}_{k}": v for k, v in c.items()})
        write_dataset_dict(tmp, {s: tmp / s for s in SPLITS}, key)
        return counts, {"window": window, "stride": stride, "bos_id": bos_id, "eos_id": tokens.meta["eos_id"],
                        "format": "datasets.DatasetDict (load_from_disk)"}

    out = publish(artifacts, "chunk", key, build)
    c = out.counts
    run_logger().info("chunk: %d train / %d validation rows of ≤ %d tokens (window %d, stride %d)",
                      c["train_chunks"], c["validation_chunks"], chunk.max_seq_length, window, stride)
    return out
