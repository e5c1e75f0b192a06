"""What a load piece and load's output hold: their files and Arrow schemas, and where a piece's documents are.
The readers of these files (tokenize, near-dedup, the drop gate) find them here, not in the code that writes them,
so reading a piece imports nothing of how it is built."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import pyarrow as pa
from pydantic import AfterValidator, BaseModel, ConfigDict

from tasks.core.manifest import OutputMeta, Piece, PieceMeta, StageOutput, entry_of, piece_key, register_output

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


LOAD_PIECE = "load-file"


class LoadSource(BaseModel):
    """A load-file piece as a reader of its documents names it: by key (its place is derived: `rel`), with its
    content identity and its documents."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    key: Annotated[str, AfterValidator(piece_key(LOAD_PIECE))]
    content: str = ""
    documents: int

    @property
    def rel(self) -> str:
        return entry_of(LOAD_PIECE, self.key)

    @classmethod
    def of(cls, piece) -> LoadSource:
        """The source of a load-file piece's manifest (a `Piece` just published or fetched)."""
        return cls(key=piece.key, content=piece.content, documents=piece.counts["documents"])


class LoadPart(LoadSource):
    """One source file of load's output: its piece (by key) and counts. `name` is the file as the run that read
    it listed it: a label of its documents' `source`, never opened."""

    name: str
    files: int
    records: int
    rejected: int
    duplicates: int
    too_short: int
    characters: int
    near_duplicates: int | None = None


def piece_docs_file(root: ArtifactsRoot, piece_rel: str) -> Path:
    """The docs.arrow of one load-file piece (by its place, `cache/load-file/<key>`)."""
    return root.file(piece_rel, DOCS_FILE)  # fetched on a host that did not build it (a Dask worker)


# ------------------------------------------------------------------------------ token pieces

TOKENS_FILE = "tokens.arrow"
TOKEN_PIECE = "tokenize-file"
TokenType = Literal["uint16", "uint32", "int32"]


class Specials(OutputMeta):
    """The tokenizer's special ids and the type its ids are stored in."""

    bos_id: int | None
    eos_id: int
    vocab_size: int
    id_limit: int
    token_type: TokenType


class TokenPieceMeta(Specials, PieceMeta):
    pass


class TokenPiece(StageOutput):
    """A tokenize-file piece: `tokens.arrow` of one load piece, and the special ids it was made with."""

    meta: TokenPieceMeta


class TokenPart(BaseModel):
    """One source file's token piece as tokenize's output names it: by key (its place is derived: `rel`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    key: Annotated[str, AfterValidator(piece_key(TOKEN_PIECE))]
    content: str = ""
    documents: int
    tokens: int

    @property
    def rel(self) -> str:
        return entry_of(TOKEN_PIECE, self.key)


# Parsed as their types wherever they are read, from the first import of what reads them.
register_output(LOAD_PIECE, Piece)
register_output(TOKEN_PIECE, TokenPiece)


def token_file(root: ArtifactsRoot, piece_rel: str) -> Path:
    """The Arrow file of one tokenize-file piece (by its place, `cache/tokenize-file/<key>`)."""
    return root.file(piece_rel, TOKENS_FILE)  # fetched on a host that did not build it (a Dask worker)


class TokenFile:
    """One token piece, memory-mapped: every record batch's flat ids as a zero-copy numpy view, so a window is
    read by slicing, whatever the file's size."""

    def __init__(self, path: Path):
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        self.values, self.offsets = [], []
        bounds = [0]
        for b in range(reader.num_record_batches):
            ids = reader.get_batch(b).column("input_ids")
            offsets = ids.offsets.to_numpy().astype(np.int64)
            self.values.append(ids.values.to_numpy(zero_copy_only=False))
            self.offsets.append(offsets)
            bounds.append(bounds[-1] + len(ids))
        self.bounds = np.array(bounds, dtype=np.int64)
        self.type = reader.schema.field("input_ids").type.value_type

    def gather(self, rows: np.ndarray, starts: np.ndarray, sizes: np.ndarray, out: np.ndarray,
               at: np.ndarray) -> None:
        """Tokens `starts[i] : starts[i] + sizes[i]` of document `rows[i]`, written at `out[at[i]:]`."""
        batch = np.searchsorted(self.bounds, rows, side="right") - 1
        for b in np.unique(batch):
            sel = batch == b
            first = self.offsets[b][rows[sel] - self.bounds[b]] + starts[sel]
            n = sizes[sel]
            position = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
            out[np.repeat(at[sel], n) + position] = self.values[b][np.repeat(first, n) + position]


class TokenFiles:
    """The token pieces an output's windows refer to (their places), each opened (and on an object-store root
    fetched) on first use: a reader of the validation windows fetches only the pieces they fall in."""

    def __init__(self, root: ArtifactsRoot, rels: list[str]):
        self.root, self.rels, self.opened = root, rels, {}

    def __getitem__(self, part) -> TokenFile:
        part = int(part)
        if part not in self.opened:
            self.opened[part] = TokenFile(token_file(self.root, self.rels[part]))
        return self.opened[part]
