"""chunk: tokenized documents → overlapping training windows, stored as offsets into the token pieces.

Semantics (per document, `ids` = its tokens + EOS):
- window `W = max_seq_length - (1 if the tokenizer adds BOS else 0)`, stride `S = W - overlap`;
- windows start at 0, S, 2S, … and stop at the first window that reaches the end of `ids`
  (the seed's loop also emitted tails wholly inside the previous window);
- every chunk starts with BOS when the tokenizer uses one;
- the labels are not stored: a row's `trained_from` says where its trained part starts, and the labels are
  `input_ids` with the positions before it set to -100 (`tasks.data.arrow.derived_labels`): the BOS and — in every
  window after a document's first, when `mask_overlap` — the leading `overlap` tokens, which are context
  already trained on in the previous window, so every token is trained exactly once;
- a window is stored as (token piece, document row, start, length, trained_from, doc_id), not as its tokens:
  at 50% overlap every token would be written twice; the rows are gathered from the memory-mapped token pieces
  by whoever reads them (`Chunks.row_batches`), in the tokens' own type (uint16 for a vocabulary of up to 65,536
  ids, else uint32). `chunk_batch` / `chunk_rows` materialise the same rows (the general corpus of evaluate,
  benchmarks, tests).

The windowing is vectorised over a whole batch of documents with numpy (no Python loop per token or per
window) and written to Arrow batch by batch, so memory stays flat as the corpus grows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import AfterValidator, model_validator

from tasks.core.config.data import ChunkConfig, RuntimeConfig, SPLITS
from tasks.core.keys import register_code_version, stage_key
from tasks.core.manifest import OutputMeta, StageOutput, entry_of, piece_key
from tasks.core.report import Progress
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import Build, publish_piece, stage
from tasks.data.arrow import batch_bounds, read_arrow, take_rows
from tasks.data.layout import TOKEN_PIECE, TokenFile, TokenFiles, TokenPart, TokenType  # noqa: F401
from tasks.data.windows import (WINDOW_SCHEMA, WindowPlan, chunk_batch, chunk_schema, trained_tokens, window_batch,
                                window_plan)

if TYPE_CHECKING:
    from tasks.shuffle import Split
    from tasks.tokenize import Tokens


SHARD = "data-00000-of-00001.arrow"


ID_TYPES = {"uint16": pa.uint16(), "uint32": pa.uint32(), "int32": pa.int32()}


def chunk_feature_dict(ids: pa.DataType = pa.uint32()) -> dict[str, Any]:
    """What datasets' Features of the chunk columns (`chunk_features`) serialise to, written out so the stages
    never import datasets (~1.2 s per process); tests/test_chunk.py checks both against the library."""
    return {
        "input_ids": {"feature": {"dtype": str(ids), "_type": "Value"}, "_type": "List"},
        "trained_from": {"dtype": "int32", "_type": "Value"},
        "doc_id": {"dtype": "string", "_type": "Value"},
        "start": {"dtype": "int32", "_type": "Value"},
    }


def chunk_arrow_schema(ids: pa.DataType = pa.uint32()) -> pa.Schema:
    """The shard schema with the metadata datasets writes (its Features), so load_from_disk reads our types."""
    return chunk_schema(ids).with_metadata(
        {"huggingface": json.dumps({"info": {"features": chunk_feature_dict(ids)}})})


def chunk_features(ids: str = "uint32"):
    """The chunk columns as datasets' Features (what load_from_disk gives the trainer); the stages write its
    serialised form, `chunk_feature_dict` / `chunk_arrow_schema`, without importing datasets."""
    from datasets import Features, List, Value

    return Features({
        "input_ids": List(Value(ids)),
        "trained_from": Value("int32"),
        "doc_id": Value("string"),
        "start": Value("int32"),
    })


def write_dataset_dict(out_dir: Path, shards: dict[str, list[str]], fingerprint: str,
                       ids: pa.DataType = pa.uint32(), features: dict[str, Any] | None = None) -> None:
    """The files `DatasetDict.save_to_disk` writes, around Arrow shards (`out_dir/<split>/<file>`) we wrote; the
    chunk rows' Features unless `features` are given."""
    for name, files in shards.items():
        (out_dir / name / "state.json").write_text(json.dumps({
            "_data_files": [{"filename": f} for f in files],
            "_fingerprint": f"{fingerprint[-16:]}{name}"[-16:],
            "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
            "_output_all_columns": False, "_split": None,
        }, indent=2))
        (out_dir / name / "dataset_info.json").write_text(json.dumps({
            "citation": "", "description": "", "features": features or chunk_feature_dict(ids), "homepage": "",
            "license": "",
        }, indent=2))
    (out_dir / "dataset_dict.json").write_text(json.dumps({"splits": list(shards)}))


def chunk_rows(tokens: pa.Table, rows: np.ndarray, plan: WindowPlan, bos_id: int | None, dst: Path,
               progress: Progress | None = None, batch_tokens: int = 1 << 20) -> dict[str, int]:
    """Windows of the documents `rows` of `tokens` (doc_id, input_ids), in that order, streamed into one
    datasets shard at `dst`, a batch of documents at a time so memory stays flat. A batch holds about
    `batch_tokens` document tokens: the windowing's int64 index arrays take ~8 bytes × 4 per row token (twice
    the document's at 50% overlap), so 1M tokens is ~100 MB at most, whatever the file's size."""
    ids_type = tokens.schema.field("input_ids").type.value_type
    schema = chunk_arrow_schema(ids_type)
    counts = {"documents": 0, "chunks": 0, "tokens": 0, "trained_tokens": 0}
    lengths = pc.list_value_length(tokens.column("input_ids")).to_numpy(zero_copy_only=False)
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start, end in batch_bounds(lengths[rows], 4096, batch_tokens):
            docs = take_rows(tokens, rows[start:end])
            ids = docs.column("input_ids").combine_chunks()
            out = chunk_batch(docs.column("doc_id").combine_chunks(), ids, plan, bos_id)
            writer.write_batch(pa.RecordBatch.from_arrays(out.columns, schema=schema))
            counts["documents"] += docs.num_rows
            counts["chunks"] += out.num_rows
            counts["tokens"] += len(out.column("input_ids").values)
            counts["trained_tokens"] += trained_tokens(ids, out, plan)
            if progress is not None:
                progress.update(docs.num_rows)
    return counts


def chunk_file(src: Path, dst_dir: Path, plan: WindowPlan, bos_id: int | None,
               progress: Progress | None = None) -> dict:
    """All documents of one token file into `dst_dir/data-00000-of-00001.arrow`; returns counts."""
    tokens = read_arrow(src)
    dst_dir.mkdir(parents=True, exist_ok=True)
    return chunk_rows(tokens, np.arange(tokens.num_rows), plan, bos_id, dst_dir / SHARD, progress)


def window_rows(tokens: pa.Table, rows: np.ndarray, plan: WindowPlan, dst: Path,
                progress: Progress | None = None, batch_docs: int = 65536) -> dict[str, int]:
    """The windows of the documents `rows` of `tokens` (doc_id, input_ids), in that order, into the Arrow file
    `dst`, a block of documents at a time (only list lengths are read: no token is). Counts as the rows they
    stand for: documents, chunks, tokens (BOS included), trained_tokens."""
    bos = plan.bos
    counts = {"documents": 0, "chunks": 0, "tokens": 0, "trained_tokens": 0}
    lengths = pc.list_value_length(tokens.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    doc_ids = tokens.column("doc_id")
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_file(sink, WINDOW_SCHEMA) as writer:
        for start in range(0, len(rows), batch_docs):
            block = np.asarray(rows[start:start + batch_docs], np.int64)
            ids = take_rows(doc_ids, block).combine_chunks()
            out = window_batch(ids, lengths[block], block, plan)
            writer.write_batch(out)
            row_tokens = int(out.column("length").to_numpy().sum()) + bos * out.num_rows
            counts["documents"] += len(block)
            counts["chunks"] += out.num_rows
            counts["tokens"] += row_tokens
            counts["trained_tokens"] += (int(lengths[block].sum()) if plan.masked_overlap == plan.overlap
                                         else row_tokens - bos * out.num_rows)
            if progress is not None:
                progress.update(len(block))
    return counts


def gather_rows(windows: pa.Table | pa.RecordBatch, files, bos_id: int | None,
                ids_type: pa.DataType) -> pa.RecordBatch:
    """Window rows (`WINDOW_SCHEMA`) as the chunk rows they stand for: input_ids (BOS first when the tokenizer
    uses one) in `ids_type`, trained_from, doc_id, start."""
    bos = 1 if bos_id is not None else 0
    if isinstance(windows, pa.Table):
        windows = pa.RecordBatch.from_struct_array(windows.to_struct_array().combine_chunks()) if windows.num_rows \
            else pa.RecordBatch.from_pylist([], schema=WINDOW_SCHEMA)
    part = windows.column("part").to_numpy()
    rows, starts = windows.column("row").to_numpy(), windows.column("start").to_numpy().astype(np.int64)
    sizes = windows.column("length").to_numpy().astype(np.int64)
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes + bos, out=offsets[1:])
    ids = np.empty(int(offsets[-1]), dtype=ids_type.to_pandas_dtype())
    for p in np.unique(part):
        sel = part == p
        files[p].gather(rows[sel], starts[sel], sizes[sel], ids, offsets[:-1][sel] + bos)
    if bos:
        ids[offsets[:-1]] = bos_id
    return pa.record_batch([
        pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids, ids_type)),
        pa.array(windows.column("trained_from").to_numpy()), windows.column("doc_id"),
        pa.array(starts.astype(np.int32)),
    ], schema=chunk_schema(ids_type))


def write_windows(dst: Path, tables) -> None:
    """Window tables (each with its `part` already set) one after another into the Arrow file `dst`."""
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_file(sink, WINDOW_SCHEMA) as writer:
        for table in tables:
            for batch in table.to_batches(max_chunksize=65536):
                writer.write_batch(batch)


def with_part(table: pa.Table, part: int) -> pa.Table:
    return table.set_column(0, "part", pa.array(np.full(table.num_rows, part, np.int32)))


def rows_by_part(split_file: Path, n_parts: int) -> list[np.ndarray]:
    """For each part (source file), the rows of its documents in this split, in the split's order."""
    index = read_arrow(split_file)
    part, row = index.column("part").to_numpy(), index.column("row").to_numpy()
    return [row[part == p] for p in range(n_parts)]


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the part's shard is immutable: sharing its inode costs nothing
    except OSError:
        shutil.copyfile(src, dst)


def chunk_piece(part: TokenPart, token_path: str, rows: dict[str, np.ndarray], plan: WindowPlan,
                root: ArtifactsRoot, progress: Progress | None = None) -> tuple[StageOutput, bool]:
    """One source file's windows, per split, cached by its tokens' content, its documents' split assignment and
    the window plan. Returns (output, reused)."""
    assignment = {name: hashlib.blake2b(r.tobytes(), digest_size=16).hexdigest() for name, r in rows.items()}
    key = stage_key("chunk-part", {"plan": plan.meta(), "tokens": part.content or part.key, "rows": assignment})

    def build(tmp: Path):
        table = read_arrow(Path(token_path))
        counts = {}
        for name in SPLITS:
            c = window_rows(table, rows[name], plan, tmp / f"{name}.arrow", progress)
            counts.update({f"{name}_{k}": v for k, v in c.items()})
        return counts, {}

    return publish_piece(root, "chunk-part", key, build, progress, part.documents)


register_code_version("chunk-part", 3, [chunk_piece], ["numpy", "pyarrow"])


def windows_file(split: str) -> str:
    return f"{split}.arrow"


class ChunkMeta(OutputMeta):
    """The window plan, the special ids, and the token pieces the windows' `part` numbers name (by key)."""

    window: int
    stride: int
    bos: int
    masked_overlap: int
    bos_id: int | None
    eos_id: int
    token_type: TokenType
    token_pieces: list[Annotated[str, AfterValidator(piece_key(TOKEN_PIECE))]]
    format: str = ""


class Chunks(StageOutput):
    """chunk's (and mix's) output: per split, `<split>.arrow`, a table of windows (`WINDOW_SCHEMA`) into the token
    pieces the output refers to (`token_pieces`, by key; they are its deps, so it is complete only while they
    are). Read through these methods: `row_batches` (the chunk rows: input_ids in the tokens' type, trained_from,
    doc_id, start), `labelled` (input_ids and labels: -100 before trained_from), `write_training_set` (what the
    trainer loads), `export` (a standalone datasets folder)."""

    meta: ChunkMeta

    @model_validator(mode="after")
    def _pieces_are_deps(self):
        for rel in self.token_files:
            self.refers(rel)
        return self

    @property
    def ids_type(self) -> pa.DataType:
        return ID_TYPES[self.meta.token_type]

    def plan(self) -> WindowPlan:
        """The windows these chunks were made with."""
        return WindowPlan.of(self.meta)

    @property
    def token_files(self) -> list[str]:
        """The token pieces the windows' `part` numbers name: each its entry's place (`cache/tokenize-file/<key>`;
        its file is `tokens.arrow`)."""
        return [entry_of(TOKEN_PIECE, key) for key in self.meta.token_pieces]

    def windows(self, root: ArtifactsRoot, split: str) -> pa.Table:
        """The window table of `split`, memory-mapped (fetched on a host that lacks it)."""
        return read_arrow(self.file(root, windows_file(split)))

    def num_rows(self, split: str) -> int:
        return self.counts.get(f"{split}_chunks", 0)

    def row_batches(self, root: ArtifactsRoot, split: str, rows_per_batch: int = 4096, limit: int | None = None):
        """The chunk rows of `split` in stored order, gathered from the memory-mapped token pieces a block of
        rows at a time (each piece is fetched, alone, on first use)."""
        windows = self.windows(root, split)
        if limit is not None:
            windows = windows.slice(0, limit)
        files = TokenFiles(root, self.token_files)
        for batch in windows.to_batches(max_chunksize=rows_per_batch):
            yield gather_rows(batch, files, self.meta.bos_id, self.ids_type)

    def labelled(self, root: ArtifactsRoot, split: str, limit: int | None = None) -> pa.Table:
        """The first `limit` rows of `split` as int32 input_ids and labels (`tasks.data.arrow.with_labels`)."""
        from tasks.data.arrow import with_labels

        batches = [with_labels(b) for b in self.row_batches(root, split, limit=limit)]
        if not batches:
            return pa.table({"input_ids": pa.array([], pa.list_(pa.int32())),
                             "labels": pa.array([], pa.list_(pa.int32()))})
        return pa.concat_tables(batches)

    def write_dataset(self, root: ArtifactsRoot, dst: Path, columns, features: dict[str, Any]) -> dict[str, int]:
        """Every split's rows through `columns` (a batch -> an Arrow table) into a `DatasetDict.save_to_disk`
        folder at `dst`, streamed a block at a time (datasets not imported: its files are written here, their
        Features given as `features`). Returns the rows per split."""
        rows = {}
        for split in SPLITS:
            (dst / split).mkdir(parents=True)
            schema = None
            writer = sink = None
            n = 0
            for batch in self.row_batches(root, split):
                table = columns(batch)
                if writer is None:
                    schema = table.schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
                    sink = pa.OSFile(str(dst / split / SHARD), "wb")
                    writer = pa.ipc.new_stream(sink, schema)
                writer.write_table(table.cast(schema))
                n += table.num_rows
            if writer is None:  # an empty split still gets its (empty) shard
                empty = {name: pa.array([], pa.list_(pa.int32() if f["feature"]["dtype"] == "int32" else pa.int8()))
                         for name, f in features.items()}
                schema = pa.table(empty).schema.with_metadata(
                    {"huggingface": json.dumps({"info": {"features": features}})})
                sink = pa.OSFile(str(dst / split / SHARD), "wb")
                writer = pa.ipc.new_stream(sink, schema)
            writer.close()
            sink.close()
            rows[split] = n
        write_dataset_dict(dst, {split: [SHARD] for split in SPLITS}, self.content or self.key, features=features)
        return rows

    def write_training_set(self, root: ArtifactsRoot, dst: Path) -> dict[str, int]:
        """What the trainer loads (`datasets.load_from_disk(dst)`): int32 input_ids and labels per split."""
        from tasks.data.arrow import with_labels

        return self.write_dataset(root, dst, with_labels, {name: _int_list("int32") for name in ("input_ids", "labels")})

    def export(self, root: ArtifactsRoot, dst: Path) -> dict[str, int]:
        """Every split as a standalone `DatasetDict.save_to_disk` folder at `dst` (not there yet): input_ids,
        attention_mask and labels (`tasks.data.arrow.export_columns`); nothing of this package is needed to read it.
        Returns the rows per split."""
        from tasks.data.arrow import export_columns

        return self.write_dataset(root, dst, export_columns, {"input_ids": _int_list("int32"),
                                                              "attention_mask": _int_list("int8"),
                                                              "labels": _int_list("int32")})

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        c, m = self.counts, self.meta
        return [(logging.INFO, f"{c['train_chunks']} train / {c['validation_chunks']} validation rows (window "
                               f"{m.window}, stride {m.stride}), stored as windows into the tokens")]


def _int_list(dtype: str) -> dict[str, Any]:
    return {"feature": {"dtype": dtype, "_type": "Value"}, "_type": "List"}


def piece_windows(root: ArtifactsRoot, piece: StageOutput, split: str) -> Path:
    """The windows of one chunk-part piece for `split`."""
    return piece.file(root, f"{split}.arrow")


@stage("chunk", version=3, output=Chunks, key_exclude={"runtime"})
def chunk(build: Build, chunk: ChunkConfig, tokens: Tokens, split: Split, runtime: RuntimeConfig | None = None):
    """Each source file's documents are windowed into their own tables (cached by the file's tokens, its
    documents' splits and the chunk settings), and the output's tables join them, each window naming its token
    piece: a drop windows only its own files. Rows are grouped by source file; the trainer samples them in a
    seeded random order."""
    root = build.root
    bos_id = tokens.bos_id
    plan = window_plan(chunk, bos_id is not None)  # checked before any piece is built; recorded in the meta
    parts = tokens.parts
    by_split = {name: rows_by_part(split.split_file(root, name), len(parts)) for name in SPLITS}

    calls = [{"part": part, "token_path": str(tokens.token_file(root, part)),
              "rows": {name: by_split[name][p] for name in SPLITS}, "plan": plan, "root": root}
             for p, part in enumerate(parts)]
    with Progress(tokens.counts["documents"], "chunk", unit="doc") as progress:
        if runtime is None or runtime.task_runner == "sequential":
            done = [chunk_piece(**call, progress=progress) for call in calls]
        else:
            from tasks.core.fanout import map_pieces

            done = map_pieces(chunk_piece, calls, runtime, "chunk-part",
                              on_done=lambda i, _: progress.update(parts[i].documents))
    pieces = [out for out, _ in done]
    fresh = sum(not reused for _, reused in done)

    counts: dict[str, int] = {}
    for name in SPLITS:
        write_windows(build.tmp / windows_file(name),
                      (with_part(read_arrow(piece_windows(root, s, name)), p) for p, s in enumerate(pieces)))
        for k in ("documents", "chunks", "tokens", "trained_tokens"):
            counts[f"{name}_{k}"] = sum(s.counts[f"{name}_{k}"] for s in pieces)
    counts.update(files_chunked=fresh, files_cached=len(pieces) - fresh)
    meta = {**plan.meta(), "bos_id": bos_id, "eos_id": tokens.eos_id,
                    "token_type": tokens.meta.token_type, "token_pieces": [part.key for part in parts],
                    "format": "windows into the token pieces; `cpt export-chunks` writes them as a datasets folder "
                    "(input_ids, attention_mask, labels: input_ids with positions before trained_from set to -100)"}
    return counts, meta, {"deps": sorted({part.rel for part in parts})}


class ExportError(Exception):
    """An export that cannot be written where it was asked (said before any row is read)."""


def export_chunks(chunks: Chunks, root: ArtifactsRoot, out: Path, force: bool = False) -> dict[str, int]:
    """`chunks` exported to the folder `out` (`Chunks.export`), atomically: built in a temp folder beside it and
    renamed into place, so `out` holds a complete export or what it held before. A non-empty `out` is replaced
    only with `force`. Returns the rows per split."""
    out = Path(out).absolute()

    def check() -> None:
        if out.exists() and not out.is_dir():
            raise ExportError(f"{out} is a file, not a folder")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise ExportError(f"{out} is not empty (--force replaces it)")

    check()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    try:
        rows = chunks.export(root, tmp)
        check()  # again: something may have been written there meanwhile
        if out.is_dir():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)  # os.replace cannot overwrite a non-empty folder: the old one is moved aside first
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
