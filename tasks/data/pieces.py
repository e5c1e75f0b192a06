"""Per-file pieces of the load stage and their assembly.

A piece (`load-file` entry) is one corpus file read into `docs.arrow` (doc_id, text, norm_id, line) and
`rejects.jsonl`, keyed by the file's content and the reading settings alone, so a corpus or drop anywhere reuses
it. The assembly (`assemble_documents`) writes an index into the pieces (which row of which piece holds each
document, no text): adding one file costs its own piece and one pass over the ids, never a copy of every text.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.core.config.data import CorpusConfig
from tasks.core.keys import register_code_version, stage_key
from tasks.core.manifest import StageOutput
from tasks.core.report import Progress
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import publish_piece
from tasks.data.arrow import read_arrow, take_rows
from tasks.data.layout import (
    DOC_SCHEMA,
    DOCS_FILE,
    INDEX_FILE,
    INDEX_SCHEMA,
    PIECE_SCHEMA,
    REJECTS_FILE,
    piece_docs_file,
)
from tasks.data.minhash import argsort_ids, hex_ids, sortable_ids
from tasks.data.readers import ReadPosition, read_corpus_file
from tasks.data.records import BadRecordError, Reject, _line_no, doc_id_of, norm_id_of

_INDEX_BATCH = 65536
_WRITE_BATCH = 2048  # documents of a piece per record batch, or fewer when they reach _WRITE_BYTES of text
_WRITE_BYTES = 16 << 20


def load_file(path: Path, name: str, cfg: CorpusConfig, out_dir: Path,
              progress: Progress | None = None, digest: str | None = None) -> dict[str, int]:
    """One corpus file → `out_dir/docs.arrow` (doc_id, text, norm_id, line) + `rejects.jsonl` (line, reason,
    raw); duplicates within the file and too-short documents are dropped and counted. `name` appears only in
    errors: the output holds line numbers, so it depends on the file's content alone. Raises BadRecordError at
    the first reject under `on_bad_record: fail`. `progress` advances by the file's bytes as they are read."""
    counts = {"files": 1, "records": 0, "documents": 0, "rejected": 0, "duplicates": 0, "too_short": 0,
              "characters": 0}
    seen: set[str] = set()
    batch: dict[str, list] = {"doc_id": [], "text": [], "norm_id": [], "line": []}
    held = 0  # characters of text in `batch` (a lower bound of its bytes)
    position, reported = ReadPosition(), 0
    size = path.stat().st_size
    with pa.OSFile(str(out_dir / DOCS_FILE), "wb") as sink, pa.ipc.new_file(sink, PIECE_SCHEMA) as writer, \
            open(out_dir / REJECTS_FILE, "w", encoding="utf-8") as rejects:

        def flush():
            nonlocal reported
            if batch["doc_id"]:
                writer.write_batch(pa.record_batch(batch, schema=PIECE_SCHEMA))
                for v in batch.values():
                    v.clear()
            if progress is not None:
                now = max(reported, min(position(), size))  # a closed file says 0
                progress.update(now - reported)
                reported = now

        items = read_corpus_file(path, cfg, name, position, digest)
        for item in items:
            counts["records"] += 1
            if isinstance(item, Reject):
                if cfg.on_bad_record == "fail":
                    kept = counts["records"] - 1 - counts["rejected"]
                    raise BadRecordError(item.message() + _fail_advice(items, kept))
                counts["rejected"] += 1
                rejects.write(json.dumps({"line": _line_no(item.source), "reason": item.reason, "raw": item.raw},
                                         ensure_ascii=False) + "\n")
                continue
            if len(item.text.strip()) < cfg.min_chars:
                counts["too_short"] += 1
                continue
            doc_id = doc_id_of(item.text)
            if cfg.deduplicate and doc_id in seen:
                counts["duplicates"] += 1
                continue
            seen.add(doc_id)
            counts["documents"] += 1
            counts["characters"] += len(item.text)
            batch["doc_id"].append(doc_id)
            batch["text"].append(item.text)
            batch["norm_id"].append(norm_id_of(item.text))
            batch["line"].append(_line_no(item.source))
            held += len(item.text)
            if len(batch["doc_id"]) >= _WRITE_BATCH or held >= _WRITE_BYTES:
                flush()
                held = 0
        flush()
    if progress is not None:
        progress.update(size - reported)
    return counts


_ADVICE_LOOKAHEAD = 1000  # records read past a first reject to tell whether skipping it would leave any


def _fail_advice(rest, kept_before: int) -> str:
    """What to advise after the first reject under `on_bad_record: fail`: skipping, only when the file has records
    that are not rejected (read up to `_ADVICE_LOOKAHEAD` more to tell); when every one read is rejected, skipping
    would keep nothing, so the reject's own reason (the field to set, the encoding) is the fix."""
    if kept_before:
        return " (set corpus.on_bad_record: skip to keep going without such records)"
    read = 1
    for item in itertools.islice(rest, _ADVICE_LOOKAHEAD):
        read += 1
        if not isinstance(item, Reject):
            return " (set corpus.on_bad_record: skip to keep going without such records)"
    return (f" (all {read} records read{' so far' if read > _ADVICE_LOOKAHEAD else ''} are rejected: "
            "corpus.on_bad_record: skip would keep none of them)")


def piece_index(directory: Path, part: int, table: pa.Table | None = None) -> pa.Table:
    """One piece's documents as index rows (doc_id, norm_id, part, row, line): its ids and where each text
    lives, read from the memory-mapped piece (`table`, when opened already) without touching its text column."""
    table = read_arrow(directory / DOCS_FILE) if table is None else table
    n = table.num_rows
    return pa.table([table.column("doc_id"), table.column("norm_id"), pa.array(np.full(n, part, np.int32)),
                     pa.array(np.arange(n, dtype=np.int64)), table.column("line")], schema=INDEX_SCHEMA)


def line_ids(columns: list, cached: list | None = None) -> list[np.ndarray]:
    """Each piece's doc_id column as one array, all of one kind (`minhash.sortable_ids`): load's ids as uint64
    (8 bytes an id, read from the Arrow buffer, no Python string per document), any other ids all as strings.
    `cached`: a piece's uint64 ids computed before (None where not), taken when they fit its column."""
    cached = cached if cached is not None else [None] * len(columns)
    ids = [c if c is not None and c.dtype == np.uint64 and len(c) == len(column) else sortable_ids(column)
           for column, c in zip(columns, cached)]
    if any(x.dtype != np.uint64 for x in ids):
        ids = [hex_ids(x) if x.dtype == np.uint64 else x for x in ids]
    return ids


def line_filters(ids: list[np.ndarray], deduplicate: bool, near: np.ndarray | None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per piece (in assembly order), which rows are first copies (no earlier piece holds their doc_id: the exact
    dedup across pieces; within one piece load_file has already dropped copies) and which are in `near` (sorted,
    distinct; of `ids`' kind or the other, see `line_ids`). One sort of the line's ids and one search of
    them, in order, in `near`: a drop costs passes over arrays, not a Python set of every id."""
    sizes = [len(x) for x in ids]
    if not sum(sizes):
        return [(np.ones(0, bool), np.zeros(0, bool)) for _ in ids]
    every = np.concatenate(ids)
    if near is not None and every.dtype.kind != near.dtype.kind:
        every, near = (hex_ids(x) if x.dtype == np.uint64 else x for x in (every, near))
    part = np.repeat(np.arange(len(ids)), sizes)
    order = argsort_ids(every)  # each id's pieces compared below
    ordered = every[order]
    first = np.ones(len(order), bool)
    starts = np.ones(len(order), bool)
    if deduplicate:
        np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    if deduplicate and not bool(starts.all()):  # else every id once: every row a first copy
        group = np.cumsum(starts) - 1
        earliest = np.minimum.reduceat(part[order], np.flatnonzero(starts))
        first[order] = part[order] == earliest[group]  # in the first piece that holds the id
    hit = np.zeros(len(order), bool)
    if near is not None and len(near):
        at = np.minimum(np.searchsorted(near, ordered), len(near) - 1)
        hit[order] = near[at] == ordered
    cuts = np.cumsum(sizes)[:-1]
    return list(zip(np.split(first, cuts), np.split(hit, cuts)))


def copy_rejects(directory: Path, prefix: str, sink) -> None:
    """A piece's rejects (line, reason, raw) into the assembled rejects.jsonl with their source (`name:line`)."""
    with open(directory / REJECTS_FILE, encoding="utf-8") as f:
        for raw in f:
            r = json.loads(raw)
            sink.write((json.dumps({"source": f"{prefix}{r['line']}", "reason": r["reason"], "raw": r["raw"]},
                                   ensure_ascii=False) + "\n").encode())


def assemble_documents(parts: list[Path], names: list[str], out_dir: Path, deduplicate: bool,
                       characters: list[int] | None = None, near=None, ids: list | None = None,
                       row_characters: list | None = None, tables: list[pa.Table] | None = None) -> dict[str, Any]:
    """Per-file pieces → `out_dir/index.arrow` (doc_id, norm_id, part, row, line: which row of which piece
    holds each document; no text) and all rejects (with their source). A document already seen in an earlier
    part is a duplicate. Only ids are read and written: adding one file costs its own piece and one pass over
    the ids, never a copy of every text. `characters`: each piece's own count (load_file's), if known.
    Documents whose doc_id is in `near` (near-duplicates of one the line had first: an array as
    `minhash.sortable_ids` gives, or any iterable of ids) are left out and counted, in total and per part
    (`near_per_part`). Both filters work on the line's ids as arrays (`line_ids`): on a line of 16x the documents
    the Python sets they replace made a one-file drop's assembly 3x slower (bench.drop_load). `ids`: each part's
    ids as `line_ids` gives them, where cached (near-dedup's index of the pieces), else read from the pieces;
    `row_characters` each part's documents' characters, where cached (likewise): a part that keeps some of its rows
    sums theirs instead of counting them from the texts (on bench.incremental_drop's line a third of a drop's load
    went to that count). `tables`: the parts' docs.arrow, opened (read_arrow) by the caller."""
    counts: dict[str, Any] = {"documents": 0, "duplicates": 0, "characters": 0}
    if near is not None:
        counts.update(near_duplicates=0, near_per_part=[0] * len(parts))
    # Memory-mapped, opened once each (`tables`: by the caller, who read the pieces' ids from them already).
    tables = tables or [read_arrow(directory / DOCS_FILE) for directory in parts]
    indexes = [piece_index(directory, part, table) for part, (directory, table) in enumerate(zip(parts, tables))]
    if near is not None and not isinstance(near, np.ndarray):
        near = sortable_ids(list(near))
    if near is not None and not (len(near) < 2 or bool(np.all(near[1:] > near[:-1]))):
        near = np.unique(near)  # near-dedup's array comes sorted and distinct; any other is made so
    filters = line_filters(line_ids([index.column("doc_id") for index in indexes], ids), deduplicate, near)
    with pa.OSFile(str(out_dir / INDEX_FILE), "wb") as sink, pa.ipc.new_file(sink, INDEX_SCHEMA) as writer, \
            open(out_dir / REJECTS_FILE, "wb") as rejects:
        for part, directory in enumerate(parts):
            index, (keep, in_near) = indexes[part], filters[part]
            counts["duplicates"] += int(len(keep) - keep.sum())
            if near is not None and len(near):
                removed = keep & in_near
                counts["near_duplicates"] += int(removed.sum())
                counts["near_per_part"][part] = int(removed.sum())
                keep = keep & ~removed
            # A filter by the mask, chunk by chunk (only the rows kept are copied): 3.4x faster than taking their
            # rows on a line of 16x copies, where most of each piece's rows are left out.
            kept = index if keep.all() else index.filter(pa.array(keep))
            writer.write_table(kept, max_chunksize=_INDEX_BATCH)
            counts["documents"] += kept.num_rows
            chars = row_characters[part] if row_characters else None
            if characters and kept.num_rows == index.num_rows:
                counts["characters"] += characters[part]
            elif chars is not None and len(chars) == len(keep):
                counts["characters"] += int(np.asarray(chars)[keep].sum())
            else:
                counts["characters"] += piece_characters(directory, kept, tables[part])
            copy_rejects(directory, f"{names[part]}:", rejects)
    return counts


def piece_characters(directory: Path, kept: pa.Table, table: pa.Table | None = None) -> int:
    """Characters of the documents `kept` (index rows) of one piece, counted from their texts (`table`: the piece,
    when opened already)."""
    table = read_arrow(directory / DOCS_FILE) if table is None else table
    texts = take_rows(table.column("text"), kept.column("row").to_numpy())
    return int(pc.sum(pc.utf8_length(texts)).as_py() or 0)


def read_documents(index_file: Path, part_dirs: list[Path], names: list[str] | None = None) -> pa.Table:
    """The assembled corpus with its texts (doc_id, text, norm_id, source = name:line), joined from the index and
    the pieces: for tools and tests on small corpora (the stages read piece by piece)."""
    index = read_arrow(index_file)
    names = names or [str(p) for p in part_dirs]
    tables = []
    for part, directory in enumerate(part_dirs):
        rows = index.filter(pc.equal(index.column("part"), part))
        if not rows.num_rows:
            continue
        texts = take_rows(read_arrow(directory / DOCS_FILE).column("text"), rows.column("row").to_numpy())
        source = pc.binary_join_element_wise(f"{names[part]}:", pc.cast(rows.column("line"), pa.string()), "")
        tables.append(pa.table([rows.column("doc_id"), texts, rows.column("norm_id"), source], schema=DOC_SCHEMA))
    return pa.concat_tables(tables) if tables else DOC_SCHEMA.empty_table()


def merge_counts(per_file: list[dict[str, int]], assembled: dict[str, int]) -> dict[str, int]:
    total = {k: sum(c[k] for c in per_file) for k in ("files", "records", "rejected", "too_short", "duplicates")}
    total["duplicates"] += assembled["duplicates"]
    if "near_duplicates" in assembled:
        total["near_duplicates"] = assembled["near_duplicates"]
    total.update(documents=assembled["documents"], characters=assembled["characters"])
    if total["documents"] == 0:
        raise BadRecordError(
            f"corpus.paths: no documents left out of {total['records']} records "
            f"({total['rejected']} rejected, {total['too_short']} too short, {total['duplicates']} duplicates)"
        )
    return total


def load_documents(files: list[Path], cfg: CorpusConfig, out_dir: Path, names: list[str] | None = None) -> dict:
    """Every file through `load_file` (into `out_dir/parts/<i>/`), then `assemble_documents` into `out_dir`."""
    names = names or [str(f) for f in files]
    per_file, parts = [], []
    for i, (path, name) in enumerate(zip(files, names)):
        part = out_dir / "parts" / str(i)
        part.mkdir(parents=True, exist_ok=True)
        per_file.append(load_file(path, name, cfg, part))
        parts.append(part)
    counts = merge_counts(per_file, assemble_documents(parts, names, out_dir, cfg.deduplicate,
                                                       [c["characters"] for c in per_file]))
    return {"counts": counts, "files": [{"file": n, **c} for n, c in zip(names, per_file)]}


def reading_config(corpus: CorpusConfig) -> dict[str, Any]:
    """What decides how one file is read: everything but the list of paths and the near-dedup settings (which
    only the assembly and the signature pieces use: changing them never re-reads a file)."""
    out = corpus.key_material()
    out.pop("near_dedup", None)
    return out


def load_file_key(item: dict[str, Any], corpus: CorpusConfig) -> str:
    """A file's piece is keyed by its content and the reading settings, never by where it sits."""
    return stage_key("load-file", {"corpus": reading_config(corpus), "digest": item["digest"]})


def load_file_cached(item: dict[str, Any], corpus: CorpusConfig, root: ArtifactsRoot,
                     progress: Progress | None = None) -> tuple[StageOutput, bool]:
    """One file's output, content-addressed by the file's digest and the reading config: a new drop reads
    only its own files, wherever it lands. Returns (output, reused)."""
    key = load_file_key(item, corpus)

    def build(tmp: Path):
        # The key promised this content: the file is read once, from the place it was listed at (no symlink
        # followed), and checked to be that content as it is read (FileChanged: nothing is published).
        return load_file(Path(item["path"]), item["path"], corpus, tmp, progress, item["digest"]), {}

    return publish_piece(root, "load-file", key, build, progress, item.get("bytes", 0))


register_code_version("load-file", 1, [load_file_cached], ["pyarrow"])


register_code_version("load-content", 2, [assemble_documents, merge_counts], ["pyarrow", "numpy"])


def load_pieces(items: list[dict[str, Any]], corpus: CorpusConfig, root: ArtifactsRoot, runtime=None,
                progress: Progress | None = None):
    """Every file's piece, in a location-free order (by piece key, then path): the assembled corpus, its
    duplicates and part numbers are the same wherever the files sit. Returns [(item, output, reused)].
    `progress` counts bytes: as they are read here, or a file's whole size as its piece comes back from a
    task runner (a piece built elsewhere cannot reach this process's bar)."""
    from tasks.core.fanout import map_pieces, runs_here

    here = runs_here(runtime, len(items))
    calls = [{"item": item, "corpus": corpus, "root": root, **({"progress": progress} if here else {})}
             for item in items]
    done = map_pieces(load_file_cached, calls, runtime, "load-file",
                      on_done=None if here or progress is None else lambda i, _: progress.update(items[i].get("bytes", 0)))
    pieces = [(item, *result) for item, result in zip(items, done)]
    return sorted(pieces, key=lambda p: (p[1].key, p[0]["path"]))


def entry_documents(entry: Path, artifacts: Path) -> pa.Table:
    """`Docs.documents` of a load entry found by its folder on a local artifacts root (tools and tests)."""
    from tasks.core.manifest import read_manifest
    from tasks.data.layout import LoadPart

    meta = read_manifest(entry).meta  # a Docs (typed) once tasks.load is imported
    parts = meta.parts if hasattr(meta, "parts") else [LoadPart.model_validate(p) for p in meta["parts"]]
    return read_documents(entry / INDEX_FILE, [artifacts / p.rel for p in parts], [p.name for p in parts])


def piece_ids(root: ArtifactsRoot, pieces: list[StageOutput]) -> tuple[set[str], set[str]]:
    """The doc_ids and norm_ids of load-file pieces (`load_pieces`' outputs), each piece's file read once."""
    tables = [read_arrow(piece_docs_file(root, out.path)).select(["doc_id", "norm_id"]) for out in pieces]
    if not tables:
        return set(), set()
    table = pa.concat_tables(tables)
    return set(table.column("doc_id").to_pylist()), set(table.column("norm_id").to_pylist())
