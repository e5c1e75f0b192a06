"""load: corpus files → one Arrow table of documents (`doc_id`, `text`, `source`).

Every record either becomes a document, is counted as a duplicate or too short, or is a reject with
`file:line: reason`. Under `on_bad_record: fail` the first reject stops the stage with that message; under
`skip` rejects are kept in `rejects.jsonl` beside the output and counted. Nothing disappears silently.
"""

from __future__ import annotations

import csv
import functools
import glob
import logging
import hashlib
import io
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks import near_dedup
from tasks.core.config import ConfigError, CorpusConfig, NearDedupConfig, RuntimeConfig
from tasks.core.keys import register_code_version, stage_key
from tasks.core.manifest import Fingerprint, StageOutput, combine_digests, hash_file
from tasks.core.root import ArtifactsRoot
from tasks.arrow import read_arrow
from tasks.core.stage import Build, publish_piece, stage

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
DOCS_FILE = "docs.arrow"
REJECTS_FILE = "rejects.jsonl"
# One file's piece: nothing in it depends on where the file sits (its line numbers, not its path), so the
# piece is keyed by the file's content alone and a corpus or drop anywhere reuses it.
PIECE_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("norm_id", pa.string()),
                          ("line", pa.int64())])
DOC_SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("norm_id", pa.string()),
                        ("source", pa.string())])
# The assembled corpus also says where each document's row lives in the per-file outputs.
ASSEMBLED_SCHEMA = DOC_SCHEMA.append(pa.field("part", pa.int32())).append(pa.field("row", pa.int64()))
_WRITE_BATCH = 2048
_RAW_KEPT = 100_000  # characters of a rejected record kept in rejects.jsonl


class BadRecordError(ValueError):
    """A corpus record that cannot become a document; the message starts with `file:line:`."""


@dataclass(frozen=True)
class Record:
    source: str  # file:line
    text: str


@dataclass(frozen=True)
class Reject:
    source: str
    reason: str
    raw: str

    def message(self) -> str:
        return f"{self.source}: {self.reason}"


# ------------------------------------------------------------------------------------ pure functions


GLOB_CHARS = "*?["
# Regular files on these are not files (procfs, sysfs): never read, even when a symlink leads there.
_PSEUDO_FILESYSTEMS = ("/proc", "/sys")


def is_glob(entry: str, p: Path) -> bool:
    """A path that exists is taken literally, even with `*?[` in its name; only one that does not is a glob."""
    return any(ch in entry for ch in GLOB_CHARS) and not os.path.lexists(p)


def _inside(p: Path, folder: Path) -> bool:
    return p == folder or folder in p.parents


def glob_base(pattern: Path) -> Path:
    """The folder a glob lists: its parts before the first one holding a wildcard."""
    parts = pattern.parts
    cut = next((i for i, part in enumerate(parts) if any(ch in part for ch in GLOB_CHARS)), len(parts))
    return Path(*parts[:cut]) if cut else Path(".")


@functools.cache
def _pseudo_devices() -> frozenset[int]:
    devices = set()
    for folder in _PSEUDO_FILESYSTEMS:
        try:
            devices.add(os.stat(folder).st_dev)
        except OSError:
            pass
    return frozenset(devices)


def _not_readable(f: Path, folder: Path) -> str | None:
    """Why `f`, found under `folder` (resolved), is not read: a symlink whose target lies outside the folder (or
    nowhere), or anything but a regular file (FIFO, socket, device, a /proc or /sys file). None: read it."""
    try:
        if f.is_symlink():
            target = f.resolve(strict=True)
            if not _inside(target, folder):
                return "a symlink out of the folder"
        st = f.stat()
    except (OSError, RuntimeError):  # a broken symlink or a loop
        return "a broken symlink"
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a folder"
                if stat.S_ISDIR(st.st_mode) else "not a regular file")
        return f"{kind}, not a regular file"
    if st.st_dev in _pseudo_devices():
        return "a /proc or /sys file, not a regular file"
    return None


def _walk(folder: Path, skipped: list[str]) -> list[Path]:
    """Supported files under `folder`, not following symlinks out of it: names starting with `.` and other
    formats are not corpus files (left alone); a symlink leading out of the folder, a broken one and anything
    but a regular file are skipped and named in `skipped`. A symlinked folder is never descended: one leading
    out is skipped, one inside is reached by its own path."""
    top = folder.resolve()
    files = []

    def unlistable(e: OSError) -> None:
        skipped.append(f"{e.filename}: cannot be listed ({e.strerror})")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlistable):  # followlinks=False
        here = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            sub = here / name
            if sub.is_symlink():
                if not _inside(sub.resolve(), top):
                    skipped.append(f"{sub}: a symlink out of the folder")
                continue
            keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            f = here / name
            if name.startswith(".") or f.suffix.lower() not in SUPPORTED_SUFFIXES:
                continue
            _take(f, top, files, skipped)
    return files


def _take(f: Path, top: Path, files: list[Path], skipped: list[str]) -> None:
    """`f` into `files` if it is a regular file inside `top`, else its name and why into `skipped`."""
    why = _not_readable(f, top)
    if why:
        skipped.append(f"{f}: {why}")
    else:
        files.append(f)


def _excluded(cfg: CorpusConfig, base: Path) -> tuple[set[Path], list[Path]]:
    """`corpus.exclude` as (files matched by its globs, folders and files named or matched). A path that exists
    is taken literally, even with `*?[` in its name."""
    files, roots = set(), []
    for entry in cfg.exclude:
        p = Path(entry).expanduser()
        p = p if p.is_absolute() else base / p
        if is_glob(entry, p):
            for m in glob.glob(str(p), recursive=True):
                (roots.append if os.path.isdir(m) else files.add)(Path(m).resolve())
        else:
            roots.append(p.resolve())
    return files, roots


def list_corpus_files(cfg: CorpusConfig, base: Path | None = None,
                      labels: list[str] | None = None) -> tuple[list[Path], list[str]]:
    """Expand `corpus.paths` (files, globs, folders) into a sorted, de-duplicated list of files, less those
    under `corpus.exclude`, and the files skipped (`path: why`). A path that exists is taken literally, even
    with `*?[` in its name. Only regular files are read, and no symlink is followed out of the folder (or the
    glob's folder) it was found in: such files are skipped and named. A file or symlink given directly is read
    as given. `labels` name the paths in errors (default `corpus.paths[i] ('entry')`)."""
    base = base or Path.cwd()
    found: dict[Path, None] = {}
    skipped: list[str] = []
    excluded_files, excluded_roots = _excluded(cfg, base)
    for i, entry in enumerate(cfg.paths):
        where = labels[i] if labels else f"corpus.paths[{i}] ({entry!r})"
        p = Path(entry).expanduser()
        p = p if p.is_absolute() else base / p
        before = len(skipped)
        if is_glob(entry, p):
            top = glob_base(p).resolve()
            files = []
            for m in sorted(glob.glob(str(p), recursive=True)):
                m = Path(m)
                if m.name.startswith(".") or m.is_dir():
                    continue
                _take(m, top, files, skipped)
            if not files:
                raise ConfigError(f"{where}: the glob matches no file" + _skipped_note(skipped[before:]))
        elif p.is_dir():
            files = _walk(p, skipped)
            if not files:
                raise ConfigError(f"{where}: the folder holds no {'/'.join(SUPPORTED_SUFFIXES)} file"
                                  + _skipped_note(skipped[before:]))
        elif p.is_file():
            if p.stat().st_dev in _pseudo_devices():
                raise ConfigError(f"{where}: a /proc or /sys file, not a regular file")
            files = [p]  # given directly (a symlink too): the user's own choice
        elif p.exists():
            raise ConfigError(f"{where}: not a regular file or folder (a FIFO, socket or device)")
        else:
            raise ConfigError(f"{where}: no such file or folder")
        for f in files:
            if f.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise ConfigError(
                    f"{where}: {f}: unsupported format {f.suffix or '(no extension)'}; "
                    f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
                )
            r = f.resolve()
            if r not in excluded_files and not any(r == x or x in r.parents for x in excluded_roots):
                found[r] = None
    return sorted(found), skipped


def _skipped_note(skipped: list[str]) -> str:
    if not skipped:
        return ""
    return f" (skipped {len(skipped)}: {'; '.join(skipped[:5])}{'; …' if len(skipped) > 5 else ''})"


def resolve_corpus_files(cfg: CorpusConfig, base: Path | None = None) -> list[Path]:
    """`list_corpus_files`' files; the files it skipped are logged as a warning (nothing is left out silently)."""
    files, skipped = list_corpus_files(cfg, base)
    if skipped:
        from tasks.core.report import run_logger

        run_logger().warning("corpus: %d files skipped (only regular files are read, and no symlink out of "
                             "the folder it is in; list a target in corpus.paths to read it): %s", len(skipped),
                             "; ".join(skipped[:20]) + ("; …" if len(skipped) > 20 else ""))
    return files


def fingerprint_files(files: list[Path], digest=hash_file, location: str = "") -> Fingerprint:
    """Content fingerprint of a list of corpus files: the multiset of their digests, not their paths, so the
    same files in another folder (a moved corpus, a drop anywhere) have the same fingerprint."""
    items = [{"path": str(f), "digest": digest(f), "bytes": f.stat().st_size} for f in files]
    return Fingerprint(kind="corpus", digest=combine_digests([("file", d) for d in sorted(i["digest"] for i in items)]),
                       location=location, items=items)


def fingerprint_corpus(cfg: CorpusConfig, base: Path | None = None, digest=hash_file) -> Fingerprint:
    return fingerprint_files(resolve_corpus_files(cfg, base), digest, str(base or Path.cwd()))


def _line_of(data: bytes | str, offset: int) -> int:
    return data.count(b"\n" if isinstance(data, bytes) else "\n", 0, offset) + 1


def _decode(data: bytes, name: str, first_line: int = 1) -> tuple[str | None, Reject | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        line = first_line + _line_of(data, e.start) - 1
        return None, Reject(f"{name}:{line}", f"invalid UTF-8 (byte 0x{data[e.start]:02x})",
                            data.decode("utf-8", "backslashreplace"))


def _text_of(obj: Any, cfg: CorpusConfig) -> tuple[str | None, str | None]:
    """The document text of one record, or the reason it has none."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    fields = [cfg.text_field] if cfg.question_field is None else [cfg.question_field, cfg.answer_field]
    values = []
    for f in fields:
        if f not in obj:
            return None, f"missing field {f!r}"
        v = obj[f]
        if not isinstance(v, str):
            kind = "null" if v is None else type(v).__name__
            return None, f"field {f!r} is {kind}, expected a string"
        values.append(v)
    if cfg.question_field is None:
        return values[0], None
    return cfg.template.format(question=values[0], answer=values[1]), None


def _unfit_text(text: str, cfg: CorpusConfig) -> str | None:
    """Why a document's text cannot be kept (over `corpus.max_document_bytes`, or not encodable: a lone
    surrogate from a JSON escape), or None."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        return f"invalid Unicode: a lone surrogate (\\u{ord(text[e.start]):04x}) at character {e.start}"
    if size > cfg.max_document_bytes:
        return f"document is {size} bytes, over corpus.max_document_bytes={cfg.max_document_bytes}"
    return None


def _records_from_objects(objs: Iterator[tuple[int, Any, str]], name: str, cfg: CorpusConfig):
    for line, obj, raw in objs:
        text, reason = _text_of(obj, cfg)
        if reason is None:
            reason = _unfit_text(text, cfg)
        if reason is not None:
            yield Reject(f"{name}:{line}", reason, raw[:_RAW_KEPT])
        else:
            yield Record(f"{name}:{line}", text)


def _read_json_lines(data: bytes, name: str, cfg: CorpusConfig):
    def objects():
        for lineno, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            text, bad = _decode(raw, name, lineno)
            if bad is not None:
                yield lineno, None, bad
                continue
            try:
                yield lineno, json.loads(text), text
            except json.JSONDecodeError as e:
                yield lineno, None, Reject(f"{name}:{lineno}", f"malformed JSON: {e.msg} (column {e.colno})", text)
            except RecursionError:
                yield lineno, None, Reject(f"{name}:{lineno}", "malformed JSON: nested too deeply", text[:2000])

    for lineno, obj, raw in objects():
        if isinstance(raw, Reject):
            yield raw
        else:
            yield from _records_from_objects(iter([(lineno, obj, raw)]), name, cfg)


def _read_json_array(text: str, name: str, cfg: CorpusConfig):
    """A top-level JSON array, element by element, so each record knows its line."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)

    def skip(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        line = _line_of(text, pos)
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # Past a syntax error inside an array nothing after it can be located reliably.
            yield Reject(f"{name}:{_line_of(text, e.pos)}", f"malformed JSON: {e.msg}", text[pos : pos + 2000])
            return
        except RecursionError:  # nor past an element nested too deeply to parse
            yield Reject(f"{name}:{line}", "malformed JSON: nested too deeply (the rest of the array is not read)",
                         text[pos : pos + 2000])
            return
        yield from _records_from_objects(iter([(line, obj, text[pos:end])]), name, cfg)
        pos = skip(end)
        if pos < n and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            if skip(pos + 1) < n:
                yield Reject(f"{name}:{_line_of(text, pos + 1)}", "malformed JSON: data after the array", "")
            return
        yield Reject(f"{name}:{_line_of(text, pos)}", "malformed JSON: expected ',' or ']'", text[pos : pos + 200])
        return


def _read_csv(text: str, name: str, cfg: CorpusConfig):
    reader = csv.DictReader(io.StringIO(text, newline=""))
    wanted = [cfg.text_field] if cfg.question_field is None else [cfg.question_field, cfg.answer_field]
    start = 1
    try:
        missing = [f for f in wanted if f not in (reader.fieldnames or [])]
        if missing:
            yield Reject(f"{name}:1", f"missing field {missing[0]!r} (header has {reader.fieldnames})", "")
            return
        start = 2
        for row in reader:
            # csv line_num is the line where the record ended; multi-line fields start earlier.
            line, start = start, reader.line_num + 1
            raw = json.dumps(row, ensure_ascii=False)
            if None in row:
                yield Reject(f"{name}:{line}", "more values than header columns", raw)
                continue
            row = {k: (None if v is None else v) for k, v in row.items()}
            yield from _records_from_objects(iter([(line, row, raw)]), name, cfg)
    except csv.Error as e:  # a field over the csv module's limit, a NUL byte: the record cannot be delimited
        yield Reject(f"{name}:{start}", f"malformed CSV: {e} (the rest of the file is not read)", "")


def _read_parquet(path: Path, name: str, cfg: CorpusConfig):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    wanted = [cfg.text_field] if cfg.question_field is None else [cfg.question_field, cfg.answer_field]
    for f in wanted:
        if f not in table.column_names:
            yield Reject(f"{name}:1", f"missing field {f!r} (columns: {table.column_names})", "")
            return
    columns = {f: table.column(f).to_pylist() for f in wanted}
    for i in range(table.num_rows):
        obj = {f: columns[f][i] for f in wanted}
        yield from _records_from_objects(iter([(i + 1, obj, json.dumps(obj, ensure_ascii=False, default=str))]),
                                         name, cfg)


# What reading a file raises when the file is bad or cannot be read: a corrupt parquet file (ArrowInvalid,
# ArrowIOError, OSError), a file that vanished or may not be read (OSError), a parser's limit.
FILE_ERRORS = (OSError, ValueError, RecursionError, csv.Error, pa.ArrowException)


def read_corpus_file(path: Path, cfg: CorpusConfig, name: str | None = None) -> Iterator[Record | Reject]:
    """Records and rejects of one file, in file order. `name` is how sources are written (default: path).
    A file that cannot be read on (a corrupt parquet file, an I/O error) ends with one reject, never an
    exception: the readers reject what they can place at its line, this says `file:1` for the rest."""
    name = name or str(path)
    read = 0
    try:
        for item in _read_file(path, cfg, name):
            read += 1
            yield item
    except FILE_ERRORS as e:
        # Without the file's path: a piece depends on the file's content alone, wherever it was first read.
        message = str(e).replace(str(path), "<file>")
        what = f"{type(e).__name__}: {message}" if message else type(e).__name__
        kind = path.suffix.lower().lstrip(".") or "corpus"
        rest = f"; the rest of the file after record {read} is not read" if read else ""
        yield Reject(f"{name}:1", f"unreadable {kind} file ({what}{rest})", "")


def _read_file(path: Path, cfg: CorpusConfig, name: str) -> Iterator[Record | Reject]:
    suffix = path.suffix.lower()
    if suffix == ".txt" and path.stat().st_size > cfg.max_document_bytes:
        # The file is one document: not read at all.
        yield Reject(f"{name}:1", f"file is {path.stat().st_size} bytes, over corpus.max_document_bytes="
                                  f"{cfg.max_document_bytes} (a .txt file is one document)", "")
        return
    if suffix == ".parquet":
        if path.stat().st_size == 0:
            yield Reject(f"{name}:1", "empty file", "")
            return
        yield from _read_parquet(path, name, cfg)
        return
    data = path.read_bytes()
    if not data.strip():
        yield Reject(f"{name}:1", "empty file", "")
        return
    if suffix == ".jsonl" or (suffix == ".json" and not data.lstrip().startswith(b"[")):
        yield from _read_json_lines(data, name, cfg)
        return
    text, bad = _decode(data, name)
    if bad is not None:
        # One bad byte makes a whole-file format unreadable; the file is the record.
        yield bad
        return
    if suffix == ".json":
        yield from _read_json_array(text, name, cfg)
    elif suffix == ".csv":
        yield from _read_csv(text, name, cfg)
    else:  # .txt: the file is one document (checked again: it may have grown since its size was read)
        reason = _unfit_text(text, cfg)
        yield Reject(f"{name}:1", reason, "") if reason else Record(f"{name}:1", text)


def doc_id_of(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def norm_id_of(text: str) -> str:
    """Identity of the text after whitespace normalisation: the same document re-wrapped or re-indented by
    another export has the same norm id (used to keep validation documents out of training)."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=8).hexdigest()


def _line_no(source: str) -> int:
    return int(source.rsplit(":", 1)[1])


def load_file(path: Path, name: str, cfg: CorpusConfig, out_dir: Path) -> dict[str, int]:
    """One corpus file → `out_dir/docs.arrow` (doc_id, text, norm_id, line) + `rejects.jsonl` (line, reason,
    raw); duplicates within the file and too-short documents are dropped and counted. `name` appears only in
    errors: the output holds line numbers, so it depends on the file's content alone. Raises BadRecordError at
    the first reject under `on_bad_record: fail`."""
    counts = {"files": 1, "records": 0, "documents": 0, "rejected": 0, "duplicates": 0, "too_short": 0,
              "characters": 0}
    seen: set[str] = set()
    batch: dict[str, list] = {"doc_id": [], "text": [], "norm_id": [], "line": []}
    with pa.OSFile(str(out_dir / DOCS_FILE), "wb") as sink, pa.ipc.new_file(sink, PIECE_SCHEMA) as writer, \
            open(out_dir / REJECTS_FILE, "w", encoding="utf-8") as rejects:

        def flush():
            if batch["doc_id"]:
                writer.write_batch(pa.record_batch(batch, schema=PIECE_SCHEMA))
                for v in batch.values():
                    v.clear()

        for item in read_corpus_file(path, cfg, name):
            counts["records"] += 1
            if isinstance(item, Reject):
                if cfg.on_bad_record == "fail":
                    raise BadRecordError(item.message() + " (set corpus.on_bad_record: skip to keep going)")
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
            if len(batch["doc_id"]) >= _WRITE_BATCH:
                flush()
        flush()
    return counts


def assemble_documents(parts: list[Path], names: list[str], out_dir: Path, deduplicate: bool,
                       near: set[str] | None = None) -> dict[str, Any]:
    """Per-file outputs → `out_dir/docs.arrow` (doc_id, text, norm_id, source = name:line, part, row) and all
    rejects (with their source). A document already seen in an earlier part is a duplicate; documents whose
    doc_id is in `near` (near-duplicates, `near_dedup_rows`) are left out and counted, in total and per part
    (`near_per_part`)."""
    counts: dict[str, Any] = {"documents": 0, "duplicates": 0, "characters": 0}
    if near is not None:
        counts.update(near_duplicates=0, near_per_part=[0] * len(parts))
    seen: set[str] = set()
    with pa.OSFile(str(out_dir / DOCS_FILE), "wb") as sink, pa.ipc.new_file(sink, ASSEMBLED_SCHEMA) as writer, \
            open(out_dir / REJECTS_FILE, "wb") as rejects:
        for part, directory in enumerate(parts):
            table = read_arrow(directory / DOCS_FILE)
            ids = table.column("doc_id").to_pylist()
            keep = [i for i, d in enumerate(ids) if not (deduplicate and d in seen)]
            seen.update(ids)
            counts["duplicates"] += len(ids) - len(keep)
            if near:
                before = len(keep)
                keep = [i for i in keep if ids[i] not in near]
                counts["near_duplicates"] += before - len(keep)
                counts["near_per_part"][part] = before - len(keep)
            kept = table.take(pa.array(keep, pa.int64())) if len(keep) != len(ids) else table
            prefix = f"{names[part]}:"
            source = pc.binary_join_element_wise(prefix, pc.cast(kept.column("line"), pa.string()), "")
            kept = pa.table([kept.column("doc_id"), kept.column("text"), kept.column("norm_id"), source,
                             pa.array([part] * kept.num_rows, pa.int32()), pa.array(keep, pa.int64())],
                            schema=ASSEMBLED_SCHEMA)
            writer.write_table(kept, max_chunksize=_WRITE_BATCH)
            counts["documents"] += kept.num_rows
            counts["characters"] += int(pc.sum(pc.utf8_length(kept.column("text"))).as_py() or 0)
            with open(directory / REJECTS_FILE, encoding="utf-8") as f:
                for raw in f:
                    r = json.loads(raw)
                    rejects.write((json.dumps({"source": f"{prefix}{r['line']}", "reason": r["reason"],
                                               "raw": r["raw"]}, ensure_ascii=False) + "\n").encode())
    return counts


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
    counts = merge_counts(per_file, assemble_documents(parts, names, out_dir, cfg.deduplicate))
    return {"counts": counts, "files": [{"file": n, **c} for n, c in zip(names, per_file)]}


def source_names(files: list[Path]) -> list[str]:
    """Short, stable names for sources: paths relative to the files' common folder."""
    if not files:
        return []
    common = Path(os.path.commonpath([str(f.parent) for f in files]))
    return [f.relative_to(common).as_posix() for f in files]


# ---------------------------------------------------------------------------------------- the task


def reading_config(corpus: CorpusConfig) -> dict[str, Any]:
    """What decides how one file is read: everything but the list of paths and the near-dedup settings (which
    only the assembly and the signature pieces use: changing them never re-reads a file)."""
    out = corpus.key_material()
    out.pop("near_dedup", None)
    return out


def load_file_key(item: dict[str, Any], corpus: CorpusConfig) -> str:
    """A file's piece is keyed by its content and the reading settings, never by where it sits."""
    return stage_key("load-file", {"corpus": reading_config(corpus), "digest": item["digest"]})


def load_file_cached(item: dict[str, Any], corpus: CorpusConfig, root: ArtifactsRoot) -> tuple[StageOutput, bool]:
    """One file's output, content-addressed by the file's digest and the reading config: a new drop reads
    only its own files, wherever it lands. Returns (output, reused)."""
    key = load_file_key(item, corpus)

    def build(tmp: Path):
        # The key promised this content; a file changed since fingerprinting must not be cached under it.
        if hash_file(item["path"]) != item["digest"]:
            raise BadRecordError(f"{item['path']}: changed while the run was starting; run again")
        return load_file(Path(item["path"]), item["path"], corpus, tmp), {}

    return publish_piece(root, "load-file", key, build)


register_code_version("load-file", 1, [load_file_cached], ["pyarrow"])
register_code_version("load-content", 1, [assemble_documents, merge_counts], ["pyarrow"])


def load_pieces(items: list[dict[str, Any]], corpus: CorpusConfig, root: ArtifactsRoot, runtime=None):
    """Every file's piece, in a location-free order (by piece key, then path): the assembled corpus, its
    duplicates and part numbers are the same wherever the files sit. Returns [(item, output, reused)]."""
    from tasks.core.fanout import map_pieces

    done = map_pieces(load_file_cached, [{"item": item, "corpus": corpus, "root": root} for item in items],
                      runtime, "load-file")
    pieces = [(item, *result) for item, result in zip(items, done)]
    return sorted(pieces, key=lambda p: (p[1].key, p[0]["path"]))


class Docs(StageOutput):
    """load's output: `docs.arrow` (doc_id, text, norm_id, source = path:line, part, row) and `rejects.jsonl`,
    assembled from per-file pieces (`parts`, each a load-file entry with its own docs.arrow)."""

    def docs_file(self, root: ArtifactsRoot) -> Path:
        return self.dir(root) / DOCS_FILE

    def rejects_file(self, root: ArtifactsRoot) -> Path:
        return self.dir(root) / REJECTS_FILE

    @property
    def parts(self) -> list[dict[str, Any]]:
        """Per source file: name, key, path, content and counts of its piece, in corpus order."""
        return self.meta["parts"]

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        c = self.counts
        lines = [(logging.INFO, f"{c['documents']} documents from {c['files']} files ({c['files_read']} read now, the "
                                f"rest cached by content; {c['records']} records; {c['rejected']} rejected, "
                                f"{c['duplicates']} duplicates, {c['too_short']} too short)")]
        if c["rejected"]:
            lines.append((logging.WARNING, f"{c['rejected']} rejected records kept in {self.rejects_file(root)}"))
        return lines


def piece_docs_file(root: ArtifactsRoot, piece_path: str) -> Path:
    """The docs.arrow of one load-file piece (by its path relative to the artifacts root)."""
    return root.path(piece_path) / DOCS_FILE


def piece_ids(root: ArtifactsRoot, pieces: list[StageOutput]) -> tuple[set[str], set[str]]:
    """The doc_ids and norm_ids of load-file pieces (`load_pieces`' outputs), each piece's file read once."""
    tables = [read_arrow(piece_docs_file(root, out.path)).select(["doc_id", "norm_id"]) for out in pieces]
    if not tables:
        return set(), set()
    table = pa.concat_tables(tables)
    return set(table.column("doc_id").to_pylist()), set(table.column("norm_id").to_pylist())


# ------------------------------------------------------------------------------ near-dedup pieces
# A signature piece is keyed by its load-file piece (the file's content and the reading settings) and the
# near-dedup settings, so a drop computes only its own signatures and a changed setting recomputes them from the
# cached texts, never re-reading a file. `near_dedup_rows` is the assembly's hook: which documents to leave
# out, independent of how the assembled output is written.

SIGNATURES_FILE = "signatures.npy"
SAMPLES = 5
SAMPLE_CHARS = 400


def signature_key(piece: StageOutput, cfg: NearDedupConfig) -> str:
    return stage_key("near-dedup-sig", {"piece": piece.key, "near_dedup": cfg.key_material(),
                                        "backend": near_dedup.BACKEND})


def signature_piece(piece: StageOutput, docs_file: Path, cfg: NearDedupConfig, root: ArtifactsRoot
                    ) -> tuple[StageOutput, bool]:
    """The MinHash signatures of one load-file piece's documents (`docs_file`: its doc_id/text table), in its
    row order."""

    def build(tmp: Path):
        texts = read_arrow(docs_file).column("text").to_pylist()
        sigs = near_dedup.signatures(texts, cfg.num_perm, cfg.shingle_chars, cfg.seed)
        np.save(tmp / SIGNATURES_FILE, sigs)
        return {"documents": len(texts)}, {}

    return publish_piece(root, "near-dedup-sig", signature_key(piece, cfg), build)


register_code_version("near-dedup-sig", 1, [signature_piece], ["numpy", "pyarrow", "rensa"])


def piece_signatures(pieces: list[StageOutput], docs_files: list[Path], cfg: NearDedupConfig, root: ArtifactsRoot
                     ) -> tuple[list[tuple[list[str], np.ndarray]], list[str]]:
    """[(doc_ids, signatures)] per load-file piece (`docs_files`: their doc_id/text tables), and the signature
    pieces' paths (the load output's deps)."""
    out, deps = [], []
    for piece, docs_file in zip(pieces, docs_files):
        sig, _ = signature_piece(piece, docs_file, cfg, root)
        ids = read_arrow(docs_file).column("doc_id").to_pylist()
        out.append((ids, np.load(sig.dir(root) / SIGNATURES_FILE)))
        deps.append(sig.path)
    return out, deps


@dataclass
class NearDedupResult:
    doc_ids: set[str]  # documents left out (every copy of them)
    ranks: list[int]
    samples: list[dict[str, Any]]
    deps: list[str] = field(default_factory=list)


def samples_of(found: list[near_dedup.NearDuplicate], docs_files: list[Path], names: list[str], limit: int = SAMPLES
               ) -> list[dict[str, Any]]:
    """A few pairs side by side (the removed document and the one it repeats), for a person to judge."""
    out = []
    for d in found[:limit]:
        text = {}
        for side, (p, r) in (("removed", d.row), ("kept", d.kept)):
            t = read_arrow(docs_files[p]).column("text")[r].as_py()
            text[side] = {"doc_id": d.doc_id if side == "removed" else d.kept_doc_id, "file": names[p],
                          "text": t[:SAMPLE_CHARS]}
        out.append({"similarity": round(d.similarity, 3), **text})
    return out


def near_dedup_rows(pieces: list[StageOutput], docs_files: list[Path], names: list[str], ranks: list[int],
                    cfg: NearDedupConfig, root: ArtifactsRoot) -> NearDedupResult:
    """load's assembly hook: which documents of its load-file pieces (in assembly order, each with its doc_id/text
    table, its file's name and its rank: lower is older in the line) are near-duplicates of one the line had
    before (`near_dedup.near_duplicates`). Independent of how the assembled output is written."""
    parts, deps = piece_signatures(pieces, docs_files, cfg, root)
    texts = {}

    def text_of(part: int, row: int) -> str:
        if part not in texts:
            texts[part] = read_arrow(docs_files[part]).column("text")
        return texts[part][row].as_py()

    found = near_dedup.near_duplicates(parts, ranks, cfg.threshold, cfg.num_perm, text_of, cfg.shingle_chars)
    return NearDedupResult({d.doc_id for d in found}, ranks, samples_of(found, docs_files, names), deps)


def path_ranks(corpus: CorpusConfig, files: list[str], base: Path | None = None) -> list[int]:
    """Per file, the index of the first `corpus.paths` entry that yields it: a line lists its configured corpus
    first and its drops in the order they joined, so a lower rank is a document the line had earlier."""
    rank: dict[str, int] = {}
    for i, entry in enumerate(corpus.paths):
        try:
            found, _ = list_corpus_files(corpus.model_copy(update={"paths": [entry]}), base)
        except ConfigError:
            continue
        for f in found:
            rank.setdefault(str(f), i)
    return [rank.get(str(Path(f).resolve()), len(corpus.paths)) for f in files]


@stage("load", version=1, output=Docs, libraries=["pyarrow"], key_exclude={"runtime"})
def load(build: Build, corpus: CorpusConfig, sources: Fingerprint, files: list[str], runtime: RuntimeConfig | None = None):
    """`files` are the resolved paths of `sources` (they go into the `source` column, so into this key);
    what the stages below see is the output's `content`: the pieces it was made of, not their paths."""
    pieces = load_pieces(sources.items, corpus, build.root, runtime)
    parts = [out for _, out, _ in pieces]
    near = None
    if corpus.near_dedup.enabled:
        names = [item["path"] for item, _, _ in pieces]
        near = near_dedup_rows(parts, [p.dir(build.root) / DOCS_FILE for p in parts], names,
                               path_ranks(corpus, names), corpus.near_dedup, build.root)
    assembled = assemble_documents([p.dir(build.root) for p in parts], [i["path"] for i, _, _ in pieces],
                                   build.tmp, corpus.deduplicate, near.doc_ids if near else None)
    counts = merge_counts([p.counts for p in parts], assembled)
    counts["files_read"] = sum(not reused for _, _, reused in pieces)
    meta = {"parts": [{"name": item["path"], "key": p.key, "path": p.path, "content": p.content, **p.counts}
                      for item, p, _ in pieces]}
    material = {"deduplicate": corpus.deduplicate, "parts": [p.content or p.key for p in parts]}
    deps = [p.path for p in parts]
    if near is not None:
        # Off, nothing of near-dedup enters the key or the output: today's content key and outputs.
        counts["near_duplicates"] = counts.get("near_duplicates", 0)
        for i, n in enumerate(assembled["near_per_part"]):
            meta["parts"][i]["near_duplicates"] = n
        meta["near_duplicate_samples"] = near.samples
        material.update(near_dedup=corpus.near_dedup.key_material(), ranks=near.ranks)
        deps += near.deps
    content = stage_key("load-content", material)
    return counts, meta, {"content": content, "deps": deps}
