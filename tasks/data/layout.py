"""What a load piece and load's output hold: their files and Arrow schemas, and where a piece's documents are.
The readers of these files (tokenize, near-dedup, the drop gate) find them here, not in the code that writes them,
so reading a piece imports nothing of how it is built."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    from tasks.core.root import ArtifactsRoot

DOCS_FILE = "docs.arrow"
REJECTS_FILE = "rejects.jsonl"
# One file's piece: nothing in it depends on where the file sits (its line numbers, not its path), so the
# piece is keyed by the file's content alone and a corpus or drop anywhere reuses it.
PIECE_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("norm_id", pa.string()),
                          ("line", pa.int64())])
# Documents with their source (name:line): what `read_documents` gives, and a table tokenize_file can read.
DOC_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("norm_id", pa.string()),
                        ("source", pa.string())])
# The assembled corpus is an index into the pieces: which row of which piece holds each document, no text (the
# pieces hold it once), so a drop of one file re-assembles ids, never the corpus.
INDEX_FILE = "index.arrow"
INDEX_SCHEMA = pa.schema([("doc_id", pa.string()), ("norm_id", pa.string()), ("part", pa.int32()),
                          ("row", pa.int64()), ("line", pa.int64())])


def piece_docs_file(root: ArtifactsRoot, piece_path: str) -> Path:
    """The docs.arrow of one load-file piece (by its path relative to the artifacts root)."""
    return root.file(piece_path, DOCS_FILE)  # fetched on a host that did not build it (a Dask worker)
