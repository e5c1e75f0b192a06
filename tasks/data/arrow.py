"""Arrow files and batches: what the data stages share that is no stage's layout (each stage's files are named
and written by the stage that produces them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def read_arrow(path: str | Path) -> pa.Table:
    """A stage's Arrow IPC file, memory-mapped: reading it costs no copy until columns are used."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def take_rows(data: pa.Table | pa.ChunkedArray, rows, memory_pool: pa.MemoryPool | None = None):
    """`data.take(rows)` copying only the rows taken. Arrow's take on a chunked table or column first joins its
    chunks into one array: for a memory-mapped file (a tokenize piece, a load piece's texts) that copies the
    whole file into memory for every call (1,000 rows of a 400 MB token file: 400 MB), and a text column over
    2 GiB cannot be joined at all. So the rows are taken chunk by chunk and put back in the order asked."""
    import pyarrow.compute as pc

    rows = np.asarray(rows, dtype=np.int64)
    chunks = data.to_batches() if isinstance(data, pa.Table) else data.chunks
    if len(chunks) <= 1:
        return pc.take(data, pa.array(rows), memory_pool=memory_pool)
    starts = np.concatenate(([0], np.cumsum([len(c) for c in chunks])))
    if len(rows) and (rows.min() < 0 or rows.max() >= starts[-1]):
        raise IndexError(f"take_rows: a row outside 0…{starts[-1] - 1}")
    which = np.searchsorted(starts, rows, side="right") - 1
    order = np.argsort(which, kind="stable")
    cuts = np.flatnonzero(np.diff(which[order])) + 1
    taken = [pc.take(chunks[which[g[0]]], pa.array(rows[g] - starts[which[g[0]]]), memory_pool=memory_pool)
             for g in np.split(order, cuts) if len(g)]
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    if isinstance(data, pa.Table):
        grouped = pa.Table.from_batches(taken, schema=data.schema).combine_chunks(memory_pool=memory_pool)
    else:
        grouped = pa.chunked_array(taken, type=data.type).combine_chunks(memory_pool=memory_pool) if taken \
            else pa.array([], type=data.type)
    out = pc.take(grouped, pa.array(back), memory_pool=memory_pool)
    return out if isinstance(data, pa.Table) else pa.chunked_array([out], type=data.type)


def batch_bounds(byte_lengths: np.ndarray, max_docs: int, max_bytes: int) -> list[tuple[int, int]]:
    """Split rows into batches of at most `max_docs` documents and about `max_bytes` of text (a longer
    document gets a batch of its own): the tokenizer holds every Encoding of a batch in memory at once."""
    bounds, start, size = [], 0, 0
    for i, n in enumerate(byte_lengths.tolist()):
        if i > start and (i - start >= max_docs or size + n > max_bytes):
            bounds.append((start, i))
            start, size = i, 0
        size += n
    if start < len(byte_lengths):
        bounds.append((start, len(byte_lengths)))
    return bounds


IGNORE_INDEX = -100  # the label of a position that is not trained (PyTorch's cross-entropy ignore_index)


def token_type(id_limit: int) -> pa.DataType:
    """The narrowest unsigned integer that holds every id below `id_limit`: tokens are the largest artifacts
    of the data path, and a 2-byte id halves them for any vocabulary of up to 65,536 entries."""
    if id_limit <= 1 << 16:
        return pa.uint16()
    if id_limit <= 1 << 32:
        return pa.uint32()
    raise ValueError(f"a vocabulary of {id_limit} ids does not fit 32 bits")


def labelled_lengths(input_ids: pa.ListArray, trained_from: np.ndarray) -> np.ndarray:
    """Labelled (trained) positions per chunk row: its length minus the positions before `trained_from`."""
    lengths = np.diff(input_ids.offsets.to_numpy()).astype(np.int64)
    return np.maximum(lengths - np.asarray(trained_from, dtype=np.int64), 0)


def derived_labels(input_ids: pa.ListArray, trained_from: np.ndarray) -> pa.ListArray:
    """The labels of chunk rows, which the chunk stage does not store: `input_ids` with every position before
    the row's `trained_from` (the BOS, and the overlap already trained in the previous window) set to -100."""
    offsets = input_ids.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    labels = input_ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
    position = np.arange(len(labels), dtype=np.int64) - np.repeat(offsets[:-1] - offsets[0], lengths)
    labels[position < np.repeat(np.asarray(trained_from, dtype=np.int64), lengths)] = IGNORE_INDEX
    return pa.ListArray.from_arrays(pa.array((offsets - offsets[0]).astype(np.int32)), pa.array(labels))


def with_labels(rows: pa.Table | pa.RecordBatch) -> pa.Table:
    """Chunk rows (input_ids, trained_from, …) as a trainer wants them: int32 `input_ids` and `labels` (what a
    standard causal-LM dataset holds). A batch at a time: `datasets.Dataset.map(with_labels, batched=True)`
    on the arrow-formatted dataset."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows])
    ids = table.column("input_ids").combine_chunks()
    trained_from = table.column("trained_from").to_numpy()
    return pa.table({"input_ids": ids.cast(pa.list_(pa.int32())),
                     "labels": derived_labels(ids, trained_from)})


def export_columns(rows: pa.Table | pa.RecordBatch) -> pa.Table:
    """Chunk rows as a standalone causal-LM dataset holds them (`cpt export-chunks`): int32 `input_ids`, int8
    `attention_mask` (all ones: rows are unpadded; the types datasets itself gives a tokenizer's output) and
    int32 `labels` by the rule of `derived_labels`."""
    table = with_labels(rows)
    ids = table.column("input_ids").combine_chunks()
    offsets = ids.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    mask = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(np.ones(offsets[-1], np.int8)))
    return pa.table({"input_ids": ids, "attention_mask": mask, "labels": table.column("labels")})


def parquet_plan(meta, wanted: list[str], max_rows: int,
                 batch_bytes: int) -> tuple[list[str], int, tuple[int, int, str, int] | None]:
    """From a parquet file's metadata alone: the wanted columns stored dictionary-encoded (read as Arrow
    dictionaries, so a value repeated in many rows is held once), the rows per batch that keep a batch's
    decoded text within `batch_bytes` (at most `max_rows`), and the row group, its first row, its column and
    its decoded size when one holds more than the whole file may decode to (checked by the caller) — else None."""
    paths = [meta.schema.column(i).path for i in range(meta.num_columns)]
    index = {k: paths.index(k) for k in wanted if k in paths}
    dictionary, rows, first, biggest = set(), max_rows, 1, None
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        per_row = 0
        for k, i in index.items():
            chunk = group.column(i)
            if chunk.has_dictionary_page:
                dictionary.add(k)
            per_row += chunk.total_uncompressed_size / max(group.num_rows, 1)
            if biggest is None or chunk.total_uncompressed_size > biggest[3]:
                biggest = (g, first, k, chunk.total_uncompressed_size)
        rows = min(rows, max(1, int(batch_bytes // max(per_row, 1))))
        first += group.num_rows
    return sorted(dictionary), rows, biggest



def decoded_lengths(col: pa.Array) -> pa.Array | None:
    """Bytes each value of a text or binary column (plain, large or dictionary-encoded) decodes to, nulls 0,
    computed from lengths and indices without materialising one value; None for other types."""
    if pa.types.is_dictionary(col.type):
        per_value = decoded_lengths(col.dictionary)
        return None if per_value is None else pc.fill_null(pc.take(per_value, col.indices), 0)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_binary(col.type) \
            or pa.types.is_large_binary(col.type):
        return pc.fill_null(pc.binary_length(col), 0).cast(pa.int64())
    return None



def values_within(col: pa.Array, lengths: pa.Array | None, limit: int) -> list:
    """The column's values as Python objects, None in place of each one over `limit` bytes (never built)."""
    if lengths is None:
        return col.to_pylist()
    over = pc.greater(lengths, limit)
    if not pc.any(over).as_py():
        return col.to_pylist()
    kept = iter(pc.filter(col, pc.invert(over)).to_pylist())
    return [None if o else next(kept) for o in over.to_pylist()]



def row_bytes(sizes: dict, i: int) -> int:
    return int(sum(s[i] for s in sizes.values()))
