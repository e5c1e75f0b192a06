"""load: corpus files → one Arrow table of documents (`doc_id`, `text`, `source`).

Every record either becomes a document, is counted as a duplicate or too short, or is a reject with
`file:line: reason`. Under `on_bad_record: fail` the first reject stops the stage with that message; under
`skip` rejects are kept in `rejects.jsonl` beside the output and counted. Nothing disappears silently.
"""

from __future__ import annotations

import codecs
import csv
import functools
import glob
import logging
import hashlib
import io
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from tasks import near_dedup
from tasks.core.config.base import ConfigError
from tasks.core.config.data import CorpusConfig, NearDedupConfig, RuntimeConfig
from tasks.core.keys import register_code_version, stage_key
from tasks.core.manifest import Fingerprint, StageOutput, combine_digests, hash_file
from tasks.core.report import Progress
from tasks.core.root import ArtifactsRoot
from tasks.arrow import read_arrow, take_rows
from tasks.core.stage import Build, publish_piece, stage

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
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
_INDEX_BATCH = 65536
_WRITE_BATCH = 2048  # documents of a piece per record batch, or fewer when they reach _WRITE_BYTES of text
_WRITE_BYTES = 16 << 20
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


# ------------------------------------------------------------------------------------------ readers
# Every reader streams: it holds about one block plus one record, whatever the file's size, and keeps each
# record's line. A record too long to hold is a reject with its place, never an out-of-memory.

_BLOCK = 8 << 20  # bytes of JSON lines read at a time
# Characters of a JSON array's window, and bytes of the UTF-8 check, read at a time: a block of text decoded
# into a Python str takes up to 4 bytes a character (one character past U+FFFF makes the whole str so).
_TEXT_BLOCK = 1 << 20
_PARQUET_BATCH = 4096  # rows


def _raw_limit(cfg: CorpusConfig) -> int:
    """How long one record's raw form may be: twice the document limit (a text written with `\\uXXXX`
    escapes, as `ensure_ascii` exports do, takes two bytes per UTF-8 byte of Korean) plus 1 MiB of other
    fields. Longer is never held: a reject."""
    return 2 * cfg.max_document_bytes + (1 << 20)


def _line_of(data: bytes | str, offset: int) -> int:
    return data.count(b"\n" if isinstance(data, bytes) else "\n", 0, offset) + 1


def _decode(data: bytes, name: str, first_line: int = 1) -> tuple[str | None, Reject | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        line = first_line + _line_of(data, e.start) - 1
        return None, Reject(f"{name}:{line}", f"invalid UTF-8 (byte 0x{data[e.start]:02x})",
                            data.decode("utf-8", "backslashreplace")[:_RAW_KEPT])


def _first_byte(f: BinaryIO) -> bytes:
    """The file's first byte that is not whitespace (b"" when there is none); the file is left at its start."""
    found = b""
    while chunk := f.read(1 << 16):
        stripped = chunk.lstrip()
        if stripped:
            found = stripped[:1]
            break
    f.seek(0)
    return found


def _utf8_reject(f: BinaryIO, name: str) -> Reject | None:
    """A whole-file format (a JSON array, CSV) with one bad byte is unreadable: the reject naming its line, or
    None. Checked block by block before parsing, so no record is taken from a file that then turns out bad."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 0
    try:
        while block := f.read(_TEXT_BLOCK):
            decoder.decode(block)
            lines += block.count(b"\n")
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        data = e.object
        line = lines + _line_of(data, e.start)
        # e.object may start with up to 3 bytes kept from the block before; their newlines are not counted.
        raw = data[max(0, e.start - 1000): e.start + 1000].decode("utf-8", "backslashreplace")
        return Reject(f"{name}:{line}", f"invalid UTF-8 (byte 0x{data[e.start]:02x})", raw)
    finally:
        f.seek(0)
    return None


def _lines(f: BinaryIO, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) of a binary file read in blocks; a line over `limit` bytes comes as (number, None)
    and is skipped without being held."""
    lineno, pending, held, skipping = 0, [], 0, False
    while block := f.read(_BLOCK):
        cut = block.find(b"\n")
        if skipping:  # the rest of a line already reported as too long
            if cut < 0:
                continue
            block, cut, skipping = block[cut + 1:], -1, False
            cut = block.find(b"\n")
        if cut < 0:
            pending.append(block)
            held += len(block)
            if held > limit:
                lineno += 1
                yield lineno, None
                pending, held, skipping = [], 0, True
            continue
        data = b"".join([*pending, block]) if pending else block
        lines = data.split(b"\n")
        tail = lines.pop()
        for line in lines:
            lineno += 1
            yield lineno, (line if len(line) <= limit else None)
        pending, held = ([tail], len(tail)) if tail else ([], 0)
        if held > limit:
            lineno += 1
            yield lineno, None
            pending, held, skipping = [], 0, True
    if pending and not skipping:
        lineno += 1
        line = b"".join(pending)
        yield lineno, (line if len(line) <= limit else None)


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


def _record(obj: Any, source: str, cfg: CorpusConfig, raw: Callable[[], str]) -> Record | Reject:
    """One parsed record as a document, or its reject; `raw` gives the record's text only when it is kept in a
    reject (most records never need it)."""
    text, reason = _text_of(obj, cfg)
    if reason is None:
        reason = _unfit_text(text, cfg)
    return Record(source, text) if reason is None else Reject(source, reason, raw()[:_RAW_KEPT])


def _json_line_slowly(raw: bytes, lineno: int, name: str, cfg: CorpusConfig) -> Record | Reject:
    """A line orjson refused, read by the standard library: its error messages (with the column), and what it
    accepts beyond strict JSON (NaN, a lone surrogate escape, integers past 64 bits) judged as before."""
    text, bad = _decode(raw, name, lineno)
    if bad is not None:
        return bad
    source = f"{name}:{lineno}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return Reject(source, f"malformed JSON: {e.msg} (column {e.colno})", text[:_RAW_KEPT])
    except RecursionError:
        return Reject(source, "malformed JSON: nested too deeply", text[:2000])
    return _record(obj, source, cfg, lambda: text)


def _read_json_lines(f: BinaryIO, name: str, cfg: CorpusConfig) -> Iterator[Record | Reject]:
    """JSON lines in blocks. orjson parses (the fastest correct parser measured, bench/readers.py); a line it
    refuses goes through `_json_line_slowly`, so messages and verdicts are the standard library's."""
    limit, empty = _raw_limit(cfg), True
    for lineno, raw in _lines(f, limit):
        if raw is None:
            empty = False
            yield Reject(f"{name}:{lineno}", f"line over {limit} bytes (corpus.max_document_bytes="
                                             f"{cfg.max_document_bytes}, twice that for escapes, plus 1 MiB): not read", "")
            continue
        if not raw or raw.isspace():
            continue
        empty = False
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            yield _json_line_slowly(raw, lineno, name, cfg)
            continue
        yield _record(obj, f"{name}:{lineno}", cfg,
                      lambda raw=raw: raw[:4 * _RAW_KEPT].decode("utf-8", "backslashreplace"))
    if empty:
        yield Reject(f"{name}:1", "empty file", "")


class _Window:
    """A sliding window over a text file for the JSON array reader: the text from the record being parsed on,
    refilled by blocks, with the line number of any position kept by counting newlines once each."""

    _SPACE = re.compile(r"[ \t\r\n]*")

    def __init__(self, f: TextIO):
        self.f, self.buf, self.eof = f, "", False
        self.pos = self.mark = 0
        self.mark_line = 1  # the line of buf[mark]

    def fill(self, size: int | None = None) -> bool:
        """Read `size` more characters (default a block); False at the end of the file."""
        if self.eof:
            return False
        chunk = self.f.read(size or _TEXT_BLOCK)
        if not chunk:
            self.eof = True
            return False
        if self.pos > _TEXT_BLOCK:  # drop what was parsed (its newlines counted first)
            self.line_at(self.pos)
            self.buf, self.mark, self.pos = self.buf[self.pos:], 0, 0
        self.buf += chunk
        return True

    def line_at(self, p: int) -> int:
        """The line of buf[p]; positions are asked for in increasing order."""
        self.mark_line += self.buf.count("\n", self.mark, p)
        self.mark = p
        return self.mark_line

    def skip_space(self) -> str:
        """Past whitespace; the next character ("" at the end of the file)."""
        while True:
            self.pos = self._SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.fill():
                return self.buf[self.pos: self.pos + 1]

    def held(self) -> int:
        return len(self.buf) - self.pos


def _read_json_array(f: TextIO, name: str, cfg: CorpusConfig) -> Iterator[Record | Reject]:
    """A top-level JSON array, element by element over a sliding window (linear time, memory about one block
    plus one element), so each record knows the line it starts on. An element not yet complete in the window
    makes the window grow (doubling, so re-parsing stays linear) up to `_raw_limit`."""
    decoder, limit = json.JSONDecoder(), _raw_limit(cfg)
    w = _Window(f)
    w.skip_space()
    w.pos += 1  # the "[" (the caller checked it)
    if w.skip_space() == "]":
        return
    while True:
        start = w.pos
        try:
            obj, end = decoder.raw_decode(w.buf, start)
            complete = end < len(w.buf) or w.eof  # a number cut by the window's end parses too
        except json.JSONDecodeError as e:
            # Unterminated, or failing near the window's end: maybe only cut off there. Elsewhere: a real error.
            cut = e.msg.startswith("Unterminated string") or e.pos >= len(w.buf) - 4096
            if w.eof or not cut:
                # Past a syntax error inside an array nothing after it can be located reliably.
                yield Reject(f"{name}:{w.line_at(max(e.pos, w.mark))}", f"malformed JSON: {e.msg}",
                             w.buf[start: start + 2000])
                return
            complete = False
        except RecursionError:  # nor past an element nested too deeply to parse
            yield Reject(f"{name}:{w.line_at(start)}", "malformed JSON: nested too deeply (the rest of the array "
                         "is not read)", w.buf[start: start + 2000])
            return
        if not complete:
            if w.held() > limit:
                yield Reject(f"{name}:{w.line_at(start)}", f"an element over {limit} characters (corpus."
                             f"max_document_bytes={cfg.max_document_bytes}, twice that for escapes, plus 1 MiB): "
                             "the rest of the array is not read", "")
                return
            # Doubling (re-parsing stays linear), never past the limit by more than one character.
            w.fill(max(1, min(max(_TEXT_BLOCK, w.held()), limit + 1 - w.held())))
            continue
        line = w.line_at(start)
        yield _record(obj, f"{name}:{line}", cfg, lambda s=start, e=end: w.buf[s:e])
        w.pos = end
        sep = w.skip_space()
        if sep == ",":
            w.pos += 1
            w.skip_space()
            continue
        if sep == "]":
            w.pos += 1
            if w.skip_space():
                yield Reject(f"{name}:{w.line_at(w.pos)}", "malformed JSON: data after the array", "")
            return
        yield Reject(f"{name}:{w.line_at(w.pos)}", "malformed JSON: expected ',' or ']'", w.buf[w.pos: w.pos + 200])
        return


def _read_csv(f: TextIO, name: str, cfg: CorpusConfig) -> Iterator[Record | Reject]:
    """CSV row by row from the open file. The csv module's field limit is the document limit (in characters,
    so never below it in bytes): a longer field is a reject naming its line."""
    previous = csv.field_size_limit(cfg.max_document_bytes)
    try:
        yield from _csv_rows(f, name, cfg)
    finally:
        csv.field_size_limit(previous)


def _csv_rows(f: TextIO, name: str, cfg: CorpusConfig) -> Iterator[Record | Reject]:
    reader = csv.DictReader(f)
    wanted = [cfg.text_field] if cfg.question_field is None else [cfg.question_field, cfg.answer_field]
    start = 1
    try:
        missing = [k for k in wanted if k not in (reader.fieldnames or [])]
        if missing:
            yield Reject(f"{name}:1", f"missing field {missing[0]!r} (header has {reader.fieldnames})", "")
            return
        start = 2
        for row in reader:
            # csv line_num is the line where the record ended; multi-line fields start earlier.
            line, start = start, reader.line_num + 1
            if None in row:
                yield Reject(f"{name}:{line}", "more values than header columns", json.dumps(row, ensure_ascii=False))
                continue
            yield _record(row, f"{name}:{line}", cfg, lambda row=row: json.dumps(row, ensure_ascii=False))
    except csv.Error as e:  # a field over the limit, a NUL byte: the record cannot be delimited
        over = (f": a field over corpus.max_document_bytes={cfg.max_document_bytes}"
                if "field larger than field limit" in str(e) else "")
        yield Reject(f"{name}:{start}", f"malformed CSV: {e}{over} (the rest of the file is not read)", "")


def _read_parquet(path: Path, name: str, cfg: CorpusConfig) -> Iterator[Record | Reject]:
    """Parquet by batches of rows (`iter_batches`: one row group's columns at a time), only the text columns.
    A value over the document limit is a reject found from its length, never turned into a Python string."""
    import pyarrow.parquet as pq

    wanted = [cfg.text_field] if cfg.question_field is None else [cfg.question_field, cfg.answer_field]
    # Memory-mapped and not pre-buffered: pre-buffering keeps read column chunks in Arrow's pool (peak anonymous
    # memory reading 160 MB of row groups of 6 MB: 193 MiB by default, 99 MiB so; bench/readers.py).
    with pq.ParquetFile(path, memory_map=True, pre_buffer=False) as pf:
        columns = pf.schema_arrow.names
        for k in wanted:
            if k not in columns:
                yield Reject(f"{name}:1", f"missing field {k!r} (columns: {columns})", "")
                return
        row = 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=wanted, use_threads=False):
            values, sizes = {}, {}
            for k in wanted:
                col = batch.column(k)
                if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                    lengths = pc.fill_null(pc.binary_length(col), 0)
                    over = pc.greater(lengths, cfg.max_document_bytes)
                    if pc.any(over).as_py():
                        sizes[k] = lengths.to_pylist()
                        col = pc.if_else(over, pa.scalar(None, col.type), col)
                values[k] = col.to_pylist()
            for i in range(batch.num_rows):
                row += 1
                big = [(k, s[i]) for k, s in sizes.items() if s[i] > cfg.max_document_bytes]
                if big:
                    k, size = big[0]
                    yield Reject(f"{name}:{row}", f"field {k!r} is {size} bytes, over corpus.max_document_bytes="
                                                  f"{cfg.max_document_bytes}", "")
                    continue
                obj = {k: values[k][i] for k in wanted}
                yield _record(obj, f"{name}:{row}", cfg, lambda obj=obj: json.dumps(obj, ensure_ascii=False,
                                                                                      default=str))


# What reading a file raises when the file is bad or cannot be read: a corrupt parquet file (ArrowInvalid,
# ArrowIOError, OSError), a file that vanished or may not be read (OSError), a parser's limit.
FILE_ERRORS = (OSError, ValueError, RecursionError, csv.Error, pa.ArrowException)


class ReadPosition:
    """How far the reader of one file has read, in bytes, for progress: the reader that opens the file sets
    `file` (a parquet file's reader does not: its progress comes when the file is done)."""

    def __init__(self):
        self.file: BinaryIO | None = None

    def __call__(self) -> int:
        try:
            return self.file.tell() if self.file is not None else 0
        except (OSError, ValueError):  # closed, or not seekable
            return 0


def read_corpus_file(path: Path, cfg: CorpusConfig, name: str | None = None,
                     position: ReadPosition | None = None) -> Iterator[Record | Reject]:
    """Records and rejects of one file, in file order. `name` is how sources are written (default: path).
    A file that cannot be read on (a corrupt parquet file, an I/O error) ends with one reject, never an
    exception: the readers reject what they can place at its line, this says `file:1` for the rest."""
    name = name or str(path)
    read = 0
    try:
        for item in _read_file(path, cfg, name, position):
            read += 1
            yield item
    except FILE_ERRORS as e:
        # Without the file's path: a piece depends on the file's content alone, wherever it was first read.
        message = str(e).replace(str(path), "<file>")
        what = f"{type(e).__name__}: {message}" if message else type(e).__name__
        kind = path.suffix.lower().lstrip(".") or "corpus"
        rest = f"; the rest of the file after record {read} is not read" if read else ""
        yield Reject(f"{name}:1", f"unreadable {kind} file ({what}{rest})", "")


def _read_file(path: Path, cfg: CorpusConfig, name: str, position: ReadPosition | None = None
               ) -> Iterator[Record | Reject]:
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
    if suffix == ".txt":  # bounded by the size checked above
        yield from _read_text(path.read_bytes(), name, cfg)
        return
    with open(path, "rb") as f:
        if position is not None:
            position.file = f
        first = _first_byte(f)
        if suffix == ".jsonl" or (suffix == ".json" and first != b"["):
            yield from _read_json_lines(f, name, cfg)
            return
        if not first:
            yield Reject(f"{name}:1", "empty file", "")
            return
        bad = _utf8_reject(f, name)
        if bad is not None:
            # One bad byte makes a whole-file format unreadable; the file is the record.
            yield bad
            return
        # newline="": csv sees the file's own line ends (a quoted field may hold them); JSON does not care.
        with io.TextIOWrapper(f, encoding="utf-8", newline="") as text:
            yield from (_read_json_array if suffix == ".json" else _read_csv)(text, name, cfg)


def _read_text(data: bytes, name: str, cfg: CorpusConfig) -> Iterator[Record | Reject]:
    """A .txt file: one document (its size was checked again here: it may have grown since it was listed)."""
    if not data.strip():
        yield Reject(f"{name}:1", "empty file", "")
        return
    text, bad = _decode(data, name)
    if bad is not None:
        yield bad
        return
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


def load_file(path: Path, name: str, cfg: CorpusConfig, out_dir: Path,
              progress: Progress | None = None) -> dict[str, int]:
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

        for item in read_corpus_file(path, cfg, name, position):
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
            held += len(item.text)
            if len(batch["doc_id"]) >= _WRITE_BATCH or held >= _WRITE_BYTES:
                flush()
                held = 0
        flush()
    if progress is not None:
        progress.update(size - reported)
    return counts


def piece_index(directory: Path, part: int) -> pa.Table:
    """One piece's documents as index rows (doc_id, norm_id, part, row, line): its ids and where each text
    lives, read from the memory-mapped piece without touching its text column."""
    table = read_arrow(directory / DOCS_FILE)
    n = table.num_rows
    return pa.table([table.column("doc_id"), table.column("norm_id"), pa.array(np.full(n, part, np.int32)),
                     pa.array(np.arange(n, dtype=np.int64)), table.column("line")], schema=INDEX_SCHEMA)


def first_copies(index: pa.Table, seen: set[str]) -> pa.Table:
    """`index` less documents already in `seen` (an earlier piece holds the same text); `seen` takes the rest.
    Each filter of the assembly (this exact one; a near-duplicate one would sit beside it) takes and gives an
    index table, so texts are read only by a filter that needs them."""
    ids = index.column("doc_id").to_pylist()
    keep = [i for i, d in enumerate(ids) if d not in seen]
    seen.update(ids)
    return index if len(keep) == len(ids) else take_rows(index, keep)


def copy_rejects(directory: Path, prefix: str, sink) -> None:
    """A piece's rejects (line, reason, raw) into the assembled rejects.jsonl with their source (`name:line`)."""
    with open(directory / REJECTS_FILE, encoding="utf-8") as f:
        for raw in f:
            r = json.loads(raw)
            sink.write((json.dumps({"source": f"{prefix}{r['line']}", "reason": r["reason"], "raw": r["raw"]},
                                   ensure_ascii=False) + "\n").encode())


def without_near(index: pa.Table, near: set[str]) -> pa.Table:
    """`index` less the near-duplicates (`near_dedup_rows`' doc_ids): the assembly's second filter, ids only."""
    mask = pc.invert(pc.is_in(index.column("doc_id"), value_set=pa.array(sorted(near), pa.string())))
    return index.filter(mask)


def assemble_documents(parts: list[Path], names: list[str], out_dir: Path, deduplicate: bool,
                       characters: list[int] | None = None, near: set[str] | None = None) -> dict[str, Any]:
    """Per-file pieces → `out_dir/index.arrow` (doc_id, norm_id, part, row, line: which row of which piece
    holds each document; no text) and all rejects (with their source). A document already seen in an earlier
    part is a duplicate. Only ids are read and written: adding one file costs its own piece and one pass over
    the ids, never a copy of every text. `characters`: each piece's own count (load_file's), if known.
    Documents whose doc_id is in `near` (near-duplicates of one the line had first) are left out and counted, in
    total and per part (`near_per_part`)."""
    counts: dict[str, Any] = {"documents": 0, "duplicates": 0, "characters": 0}
    if near is not None:
        counts.update(near_duplicates=0, near_per_part=[0] * len(parts))
    seen: set[str] = set()
    with pa.OSFile(str(out_dir / INDEX_FILE), "wb") as sink, pa.ipc.new_file(sink, INDEX_SCHEMA) as writer, \
            open(out_dir / REJECTS_FILE, "wb") as rejects:
        for part, directory in enumerate(parts):
            index = piece_index(directory, part)
            kept = first_copies(index, seen) if deduplicate else index
            counts["duplicates"] += index.num_rows - kept.num_rows
            if near:
                before = kept.num_rows
                kept = without_near(kept, near)
                counts["near_duplicates"] += before - kept.num_rows
                counts["near_per_part"][part] = before - kept.num_rows
            writer.write_table(kept, max_chunksize=_INDEX_BATCH)
            counts["documents"] += kept.num_rows
            counts["characters"] += (characters[part] if characters and kept.num_rows == index.num_rows
                                     else piece_characters(directory, kept))
            copy_rejects(directory, f"{names[part]}:", rejects)
    return counts


def piece_characters(directory: Path, kept: pa.Table) -> int:
    """Characters of the documents `kept` (index rows) of one piece, counted from their texts."""
    texts = take_rows(read_arrow(directory / DOCS_FILE).column("text"), kept.column("row").to_numpy())
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


def load_file_cached(item: dict[str, Any], corpus: CorpusConfig, root: ArtifactsRoot,
                     progress: Progress | None = None) -> tuple[StageOutput, bool]:
    """One file's output, content-addressed by the file's digest and the reading config: a new drop reads
    only its own files, wherever it lands. Returns (output, reused)."""
    key = load_file_key(item, corpus)

    def build(tmp: Path):
        # The key promised this content; a file changed since fingerprinting must not be cached under it.
        if hash_file(item["path"]) != item["digest"]:
            raise BadRecordError(f"{item['path']}: changed while the run was starting; run again")
        return load_file(Path(item["path"]), item["path"], corpus, tmp, progress), {}

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


class Docs(StageOutput):
    """load's output: `index.arrow` (doc_id, norm_id, part, row, line: where each document lives in the per-file
    pieces, no text) and `rejects.jsonl`; the texts stay in the pieces (`parts`, each a load-file entry with
    its own docs.arrow of doc_id, text, norm_id, line)."""

    def index_file(self, root: ArtifactsRoot) -> Path:
        return self.dir(root) / INDEX_FILE

    def index(self, root: ArtifactsRoot, columns: list[str] | None = None) -> pa.Table:
        """The index (memory-mapped), or some of its columns."""
        table = read_arrow(self.index_file(root))
        return table.select(columns) if columns else table

    def norm_ids(self, root: ArtifactsRoot) -> set[str]:
        return set(pc.unique(self.index(root, ["norm_id"]).column("norm_id")).to_pylist())

    def text_reader(self, root: ArtifactsRoot, rows: pa.Table | None = None) -> Callable[[int], str]:
        """The text of the index's row i (or of `rows`' row i: a table of `part` and `row`, such as a split of
        shuffle's), read from its memory-mapped piece when asked (one text at a time in memory, each piece
        opened once)."""
        index = rows if rows is not None else self.index(root, ["part", "row"])
        part, row = index.column("part").to_numpy(), index.column("row").to_numpy()
        columns: dict[int, pa.ChunkedArray] = {}

        def text_of(i: int) -> str:
            p = int(part[i])
            if p not in columns:
                columns[p] = read_arrow(root.entry(self.parts[p]["path"]) / DOCS_FILE).column("text")
            return columns[p][int(row[i])].as_py()

        return text_of

    def part_dirs(self, root: ArtifactsRoot) -> list[Path]:
        return [root.entry(p["path"]) for p in self.parts]

    def documents(self, root: ArtifactsRoot) -> pa.Table:
        """Every document with its text and `source` (path:line), joined from the pieces: for tools and tests on
        small corpora (the stages read piece by piece)."""
        return read_documents(self.index_file(root), self.part_dirs(root), [p["name"] for p in self.parts])

    def rejects_file(self, root: ArtifactsRoot) -> Path:
        return self.dir(root) / REJECTS_FILE

    @property
    def parts(self) -> list[dict[str, Any]]:
        """Per source file: name, key, path, content and counts of its piece, in corpus order (its `part`)."""
        return self.meta["parts"]

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        c = self.counts
        lines = [(logging.INFO, f"{c['documents']} documents from {c['files']} files ({c['files_read']} read now, the "
                                f"rest cached by content; {c['records']} records; {c['rejected']} rejected, "
                                f"{c['duplicates']} duplicates, "
                                + (f"{c['near_duplicates']} near-duplicates, " if "near_duplicates" in c else "")
                                + f"{c['too_short']} too short)")]
        if c["rejected"]:
            lines.append((logging.WARNING, f"{c['rejected']} rejected records kept in {self.rejects_file(root)}"))
        return lines


def entry_documents(entry: Path, artifacts: Path) -> pa.Table:
    """`Docs.documents` of a load entry found by its folder on a local artifacts root (tools and tests)."""
    from tasks.core.manifest import read_manifest

    parts = read_manifest(entry).meta["parts"]
    return read_documents(entry / INDEX_FILE, [artifacts / p["path"] for p in parts], [p["name"] for p in parts])


def piece_docs_file(root: ArtifactsRoot, piece_path: str) -> Path:
    """The docs.arrow of one load-file piece (by its path relative to the artifacts root)."""
    return root.file(piece_path, DOCS_FILE)  # fetched on a host that did not build it (a Dask worker)


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


def signature_piece(piece: StageOutput, cfg: NearDedupConfig, root: ArtifactsRoot) -> tuple[StageOutput, bool]:
    """The MinHash signatures of one load-file piece's documents, in its row order. Its texts are read (fetched,
    on a worker that did not build the piece) only when the signatures are missing."""

    def build(tmp: Path):
        texts = read_arrow(piece_docs_file(root, piece.path)).column("text")  # hashed from its UTF-8 bytes
        sigs = near_dedup.signatures(texts, cfg.num_perm, cfg.shingle_chars, cfg.seed)
        np.save(tmp / SIGNATURES_FILE, sigs)
        return {"documents": len(texts)}, {}

    return publish_piece(root, "near-dedup-sig", signature_key(piece, cfg), build)


# 2: shingles hashed without a finaliser (rensa mixes its input), a text shorter than the n-gram padded.
register_code_version("near-dedup-sig", 2, [signature_piece], ["numpy", "pyarrow", "rensa"])


def piece_signatures(pieces: list[StageOutput], docs_files: list[Path], cfg: NearDedupConfig, root: ArtifactsRoot,
                     runtime: RuntimeConfig | None = None, docs: list[pa.Table] | None = None
                     ) -> tuple[list[tuple[pa.ChunkedArray, np.ndarray]], list[str]]:
    """[(doc_id column, signatures)] per load-file piece (`docs_files`: their doc_id/text tables, `docs` the same
    opened), and the signature pieces' paths (the load output's deps). The pieces missing are built through the
    same fan-out as load's (`runtime`), one per file."""
    from tasks.core.fanout import map_pieces

    done = map_pieces(signature_piece, [{"piece": piece, "cfg": cfg, "root": root} for piece in pieces], runtime,
                      "near-dedup-sig")
    docs = docs or [read_arrow(f) for f in docs_files]
    # The ids as the (memory-mapped) Arrow column and the signatures memory-mapped: the LSH reads a block of rows
    # at a time, so a line of millions of documents holds neither in memory.
    out = [(table.column("doc_id"), np.load(sig.dir(root) / SIGNATURES_FILE, mmap_mode="r"))
           for table, (sig, _) in zip(docs, done)]
    return out, [sig.path for sig, _ in done]


@dataclass
class NearDedupResult:
    doc_ids: set[str]  # documents left out (every copy of them)
    ranks: list[int]
    samples: list[dict[str, Any]]
    deps: list[str] = field(default_factory=list)


def samples_of(found: list[near_dedup.NearDuplicate], docs: list[pa.Table], names: list[str], limit: int = SAMPLES
               ) -> list[dict[str, Any]]:
    """A few pairs side by side (the removed document and the one it repeats), for a person to judge."""
    out = []
    for d in found[:limit]:
        text = {}
        for side, (p, r) in (("removed", d.row), ("kept", d.kept)):
            t = docs[p].column("text")[r].as_py()
            text[side] = {"doc_id": d.doc_id if side == "removed" else d.kept_doc_id, "file": names[p],
                          "text": t[:SAMPLE_CHARS]}
        out.append({"similarity": round(d.similarity, 3), **text})
    return out


def near_dedup_rows(pieces: list[StageOutput], docs_files: list[Path], names: list[str], ranks: list[int],
                    cfg: NearDedupConfig, root: ArtifactsRoot, runtime: RuntimeConfig | None = None
                    ) -> NearDedupResult:
    """load's assembly hook: which documents of its load-file pieces (in assembly order, each with its doc_id/text
    table, its file's name and its rank: lower is older in the line) are near-duplicates of one the line had
    before (`near_dedup.near_duplicates`). Independent of how the assembled output is written."""
    docs = [read_arrow(f) for f in docs_files]  # memory-mapped, opened once each
    parts, deps = piece_signatures(pieces, docs_files, cfg, root, runtime, docs)
    found = near_dedup.near_duplicates(parts, ranks, cfg.threshold, cfg.num_perm,
                                       lambda p, r: docs[p].column("text")[r].as_py(), cfg.shingle_chars)
    return NearDedupResult({d.doc_id for d in found}, ranks, samples_of(found, docs, names), deps)


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


# Bytes the data stages write per corpus byte, at most: load's pieces ~1.0, tokens 0.4 (uint16) to 0.9 (uint32),
# chunks 0.7 to 1.4 at a 50% overlap (bench.scale) — 3.3 with the widest ids, rounded up.
WRITTEN_PER_CORPUS_BYTE = 3.5


def disk_shortfall(folder: Path, corpus_bytes: int) -> str | None:
    """A warning when the artifacts' disk may not hold what the data stages write for this corpus: said before
    hours of tokenizing, not as a full disk at the end (files built before are not written again, so this is
    an upper bound)."""
    import shutil

    need = int(corpus_bytes * WRITTEN_PER_CORPUS_BYTE)
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return None
    if free >= need:
        return None
    return (f"load: the data stages may write up to {need / 1e9:,.1f} GB under {folder} "
            f"({WRITTEN_PER_CORPUS_BYTE}× the {corpus_bytes / 1e9:,.1f} GB of corpus files, less what is cached) "
            f"and {free / 1e9:,.1f} GB is free there")


def load_inputs(corpus: CorpusConfig, sources: Fingerprint) -> dict[str, Any]:
    """load's inputs for `corpus` and its fingerprint `sources`: the files, and with near-dedup on each file's
    rank (`path_ranks`: which document of a group is kept follows it, so it is in the key; corpus.paths itself
    is not, and reordering it over the same files must not serve the old keep-choice)."""
    files = [i["path"] for i in sources.items]
    return dict(corpus=corpus, sources=sources, files=files,
                ranks=path_ranks(corpus, files) if corpus.near_dedup.enabled else None)


@stage("load", version=2, output=Docs, libraries=["pyarrow", "numpy"], key_exclude={"runtime"})
def load(build: Build, corpus: CorpusConfig, sources: Fingerprint, files: list[str],
         runtime: RuntimeConfig | None = None, ranks: list[int] | None = None):
    """`files` are the resolved paths of `sources` (they go into the `source` column, so into this key);
    `ranks` their ranks, with near-dedup on (`load_inputs` makes both; without them, the order of `files`, which
    is in the key too). What the stages below see is the output's `content`: the pieces it was made of, not
    their paths."""
    if corpus.near_dedup.enabled and ranks is None:
        ranks = list(range(len(files)))
    if corpus.near_dedup.enabled and len(ranks) != len(files):
        raise ValueError(f"load: {len(ranks)} ranks for {len(files)} files (load_inputs makes both)")
    total = sum(item.get("bytes", 0) for item in sources.items)
    short = disk_shortfall(build.root.local, total)
    if short:
        build.log.warning(short)
    with Progress(total, "load", unit="B") as progress:
        pieces = load_pieces(sources.items, corpus, build.root, runtime, progress)
    parts = [out for _, out, _ in pieces]
    near = None
    if corpus.near_dedup.enabled:
        names = [item["path"] for item, _, _ in pieces]
        rank_of = dict(zip(files, ranks))
        near = near_dedup_rows(parts, [p.dir(build.root) / DOCS_FILE for p in parts], names,
                               [rank_of[n] for n in names], corpus.near_dedup, build.root,
                               runtime)
    assembled = assemble_documents([p.dir(build.root) for p in parts], [i["path"] for i, _, _ in pieces],
                                   build.tmp, corpus.deduplicate, [p.counts["characters"] for p in parts],
                                   near.doc_ids if near else None)
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
