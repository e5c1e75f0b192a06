"""Arrow files and batches: what the data stages share that is no stage's layout (each stage's files are named
and written by the stage that produces them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa


def read_arrow(path: str | Path) -> pa.Table:
    """A stage's Arrow IPC file, memory-mapped: reading it costs no copy until columns are used."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


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
