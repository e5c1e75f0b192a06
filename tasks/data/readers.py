"""Corpus file formats: one reader function per format and the suffix -> reader table (`READERS`).

A reader takes an open binary file, the name its records are sourced by and the corpus settings, and yields
`Record`s and `Reject`s in file order. Every reader streams: it holds about one block plus one record, whatever
the file's size, and keeps each record's line. A record too long to hold is a reject with its place, never an
out-of-memory. Adding a format is one function and one row of `READERS` (docs/adding-a-reader.md).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

import orjson
import pyarrow as pa

from tasks.core.config.data import CorpusConfig
from tasks.data.arrow import decoded_lengths, parquet_plan, row_bytes, values_within
from tasks.data.records import _RAW_KEPT, Record, Reject, _decode, _line_of, _raw_limit, missing_field, _record, _unfit_text

_BLOCK = 8 << 20  # bytes of JSON lines read at a time
# Characters of a JSON array's window, and bytes of the UTF-8 check, read at a time: a block of text decoded
# into a Python str takes up to 4 bytes a character (one character past U+FFFF makes the whole str so).
_TEXT_BLOCK = 1 << 20
_PARQUET_BATCH = 4096  # rows at most
# Bytes of text a parquet batch may decode to: its rows are cut by the decoded size (from the file's metadata
# before reading, from dictionary value lengths after), never by a row count alone.
_PARQUET_BATCH_BYTES = 64 << 20
# A parquet file's text may decode to at most this many times its size on disk (or to the document limit, if
# that is more). Text compresses 2-10x; one dictionary value repeated thousands of times is a decompression bomb
# (a 6 KB file holding one 56 MB value in 4,096 rows decodes to 230 GB).
MAX_EXPANSION = 100
# Fields a CSV row may hold (the header's included): csv makes a Python string of each before a row is seen.
_CSV_MAX_FIELDS = 10_000


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


class _RowTooLarge(csv.Error):
    """A CSV record over the size or field limit: reading it is stopped before the csv module holds it."""


class _BoundedRows:
    """The lines of a CSV text file as the csv module asks for them, one record at a time: a record (header
    included) over `max_chars` characters or `max_fields` fields raises before the csv module parses it into
    Python strings (a row of millions of fields would take ~50 bytes per field). Each read is bounded, so a line
    without a newline is never held whole. `next_record()` marks where the csv module finished a record."""

    _FIELD_EDGES = re.compile(r'"|,')

    def __init__(self, f: TextIO, max_chars: int, max_fields: int):
        self.f, self.max_chars, self.max_fields = f, max_chars, max_fields
        self.next_record()

    def next_record(self) -> None:
        self.chars, self.commas, self.lines = 0, 0, []
        self.fields, self.quoted = None, False  # counted exactly once the commas alone pass the limit

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.f.readline(self.max_chars - self.chars + 1)
        if not line:
            raise StopIteration
        self.chars += len(line)
        if self.chars > self.max_chars:
            raise _RowTooLarge(f"a record over {self.max_chars} characters")
        self.commas += line.count(",")
        if self.fields is None:
            self.lines.append(line)
            if self.commas >= self.max_fields:  # maybe in quoted text: count the fields, once, then line by line
                self.fields = 1
                for held in self.lines:
                    self._count(held)
                self.lines = []
        else:
            self._count(line)
        if self.fields is not None and self.fields > self.max_fields:
            raise _RowTooLarge(f"a record of over {self.max_fields} fields")
        return line

    def _count(self, text: str) -> None:
        """Fields: commas outside quotes (a doubled quote toggles twice), plus one."""
        for m in self._FIELD_EDGES.finditer(text):
            if m.group() == '"':
                self.quoted = not self.quoted
            elif not self.quoted:
                self.fields += 1


def _csv_rows(f: TextIO, name: str, cfg: CorpusConfig) -> Iterator[Record | Reject]:
    rows = _BoundedRows(f, _raw_limit(cfg), _CSV_MAX_FIELDS)
    reader = csv.DictReader(rows)
    wanted = [cfg.text_field] if cfg.question_field is None else [cfg.question_field, cfg.answer_field]
    start = 1
    try:
        missing = [k for k in wanted if k not in (reader.fieldnames or [])]
        if missing:
            yield Reject(f"{name}:1", missing_field(missing[0], cfg, list(reader.fieldnames or [])), "")
            return
        start = 2
        rows.next_record()
        for row in reader:
            rows.next_record()
            # csv line_num is the line where the record ended; multi-line fields start earlier.
            line, start = start, reader.line_num + 1
            if None in row:
                yield Reject(f"{name}:{line}", "more values than header columns", json.dumps(row, ensure_ascii=False))
                continue
            yield _record(row, f"{name}:{line}", cfg, lambda row=row: json.dumps(row, ensure_ascii=False))
    except csv.Error as e:  # a field over the limit, a NUL byte: the record cannot be delimited
        over = (f": a field over corpus.max_document_bytes={cfg.max_document_bytes}"
                if "field larger than field limit" in str(e) else
                f" (corpus.max_document_bytes={cfg.max_document_bytes}, twice that for escapes, plus 1 MiB; at most "
                f"{_CSV_MAX_FIELDS} fields)" if isinstance(e, _RowTooLarge) else "")
        yield Reject(f"{name}:{start}", f"malformed CSV: {e}{over} (the rest of the file is not read)", "")


def read_parquet(f: BinaryIO, name: str, cfg: CorpusConfig) -> Iterator[Record | Reject]:
    """Parquet by batches cut by their decoded size (`parquet_plan`, from the metadata), only the text columns,
    dictionary-encoded ones kept as dictionaries. Each value's size is known before it becomes a Python string:
    one over the document limit is a reject naming its row and column; a file whose text decodes to more than
    `MAX_EXPANSION` times its size (and the document limit) is rejected at the row where it does, the rest not
    read — from the metadata, before reading, when a row group alone says so."""
    import pyarrow.parquet as pq

    size = _size(f)
    if not size:
        yield Reject(f"{name}:1", "empty file", "")
        return
    wanted = [cfg.text_field] if cfg.question_field is None else [cfg.question_field, cfg.answer_field]
    limit = max(cfg.max_document_bytes, MAX_EXPANSION * size)
    bomb = (f"over {MAX_EXPANSION}x its {size} bytes on disk and over corpus.max_document_bytes="
            f"{cfg.max_document_bytes} (a decompression bomb): the rest of the file is not read")
    with pq.ParquetFile(f, pre_buffer=False) as probe:
        meta, columns = probe.metadata, probe.schema_arrow.names
    for k in wanted:
        if k not in columns:
            yield Reject(f"{name}:1", missing_field(k, cfg, columns), "")
            return
    dictionary, rows, biggest = parquet_plan(meta, wanted, _PARQUET_BATCH, _PARQUET_BATCH_BYTES)
    if biggest is not None and biggest[3] > limit:
        g, first, k, decoded = biggest
        yield Reject(f"{name}:{first}", f"field {k!r}: row group {g} decodes to {decoded} bytes, {bomb}", "")
        return
    f.seek(0)
    # Not pre-buffered: pre-buffering keeps read column chunks in Arrow's pool (peak anonymous memory reading
    # 160 MB of row groups of 6 MB: 193 MiB by default, 99 MiB so; bench/readers.py).
    with pq.ParquetFile(f, pre_buffer=False, metadata=meta, read_dictionary=dictionary) as pf:
        row, total = 0, 0
        for batch in pf.iter_batches(batch_size=rows, columns=wanted, use_threads=False):
            lengths = {k: decoded_lengths(batch.column(k)) for k in wanted}
            sizes = {k: v.to_numpy(zero_copy_only=False) for k, v in lengths.items() if v is not None}
            start = 0
            while start < batch.num_rows:
                # The next slice: rows whose decoded text fits the batch budget (at least one row).
                end, held = start, 0
                while end < batch.num_rows and (end == start or held + row_bytes(sizes, end) <= _PARQUET_BATCH_BYTES):
                    held += row_bytes(sizes, end)
                    end += 1
                values = {k: values_within(batch.column(k).slice(start, end - start),
                                            None if lengths[k] is None else lengths[k].slice(start, end - start),
                                            cfg.max_document_bytes) for k in wanted}
                for i in range(start, end):
                    row += 1
                    big = [(k, int(s[i])) for k, s in sizes.items() if s[i] > cfg.max_document_bytes]
                    if big:
                        k, n = big[0]
                        yield Reject(f"{name}:{row}", f"field {k!r} is {n} bytes, over corpus.max_document_bytes="
                                                      f"{cfg.max_document_bytes}", "")
                        continue
                    total += row_bytes(sizes, i)
                    if total > limit:
                        k = max(sizes, key=lambda c: sizes[c][i])
                        yield Reject(f"{name}:{row}", f"field {k!r}: the file's text decodes to {total} bytes by "
                                                      f"this row, {bomb}", "")
                        return
                    obj = {k: values[k][i - start] for k in wanted}
                    yield _record(obj, f"{name}:{row}", cfg, lambda obj=obj: json.dumps(obj, ensure_ascii=False,
                                                                                          default=str))
                start = end


def read_jsonl(f: BinaryIO, name: str, cfg: CorpusConfig) -> Iterator[Record | Reject]:
    """JSON lines: one record a line."""
    yield from _read_json_lines(f, name, cfg)


def read_json(f: BinaryIO, name: str, cfg: CorpusConfig) -> Iterator[Record | Reject]:
    """A JSON array of records (its first character `[`), else JSON lines under a .json name."""
    first = _first_byte(f)
    if first != b"[":
        yield from _read_json_lines(f, name, cfg)
        return
    yield from _whole_file(f, name, cfg, _read_json_array)


def read_csv(f: BinaryIO, name: str, cfg: CorpusConfig) -> Iterator[Record | Reject]:
    """CSV with a header row: one record a row, its fields by the header's names."""
    if not _first_byte(f):
        yield Reject(f"{name}:1", "empty file", "")
        return
    yield from _whole_file(f, name, cfg, _read_csv)


def read_txt(f: BinaryIO, name: str, cfg: CorpusConfig) -> Iterator[Record | Reject]:
    """A .txt file: one document, or with `corpus.txt_split: paragraph` one document per paragraph (text between
    blank lines). Over the document limit it is not read at all."""
    size = _size(f)
    if size > cfg.max_document_bytes:
        yield Reject(f"{name}:1", f"file is {size} bytes, over corpus.max_document_bytes={cfg.max_document_bytes} "
                                  "(a .txt file is one document)", "")
        return
    # At most one byte past the limit: a file that grew since its size was taken is still bounded.
    data = f.read(cfg.max_document_bytes + 1)
    if cfg.txt_split == "paragraph":
        yield from _paragraphs(data, name, cfg)
        return
    yield from _read_text(data, name, cfg)


_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def _paragraphs(data: bytes, name: str, cfg: CorpusConfig) -> Iterator[Record | Reject]:
    """A .txt file's bytes as paragraphs: text between blank lines, each named by the line it starts on."""
    if not data.strip():
        yield Reject(f"{name}:1", "empty file", "")
        return
    text, bad = _decode(data, name)
    if bad is not None:
        yield bad
        return
    text = text.replace("\r\n", "\n")
    start = 0
    for end in [m.start() for m in _BLANK_LINES.finditer(text)] + [len(text)]:
        piece = text[start:end]
        lead = len(piece) - len(piece.lstrip())
        if piece.strip():
            line = text.count("\n", 0, start + lead) + 1
            reason = _unfit_text(piece.strip(), cfg)
            yield Reject(f"{name}:{line}", reason, "") if reason else Record(f"{name}:{line}", piece.strip())
        m = _BLANK_LINES.match(text, end)
        start = m.end() if m else end


Reader = Callable[[BinaryIO, str, CorpusConfig], Iterator[Record | Reject]]
# The formats a corpus may hold, by file suffix (lower case): a new format is one reader and one row here.
READERS: dict[str, Reader] = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet, ".csv": read_csv,
                              ".txt": read_txt}


def supported_suffixes() -> tuple[str, ...]:
    return tuple(READERS)


def reader_for(path: Path) -> Reader | None:
    return READERS.get(path.suffix.lower())


def _size(f: BinaryIO) -> int:
    import os

    return os.fstat(f.fileno()).st_size


def _whole_file(f: BinaryIO, name: str, cfg: CorpusConfig, parse) -> Iterator[Record | Reject]:
    """A format whose records can only be delimited by parsing the whole file (a JSON array, CSV): checked to be
    UTF-8 first (one bad byte makes the whole file unreadable: the file is the record), then parsed as text."""
    bad = _utf8_reject(f, name)
    if bad is not None:
        yield bad
        return
    # newline="": csv sees the file's own line ends (a quoted field may hold them); JSON does not care.
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    try:
        yield from parse(text, name, cfg)
    finally:
        text.detach()  # the binary file stays open: its opener closes it


# What reading a file raises when the file is bad or cannot be read: a corrupt parquet file (ArrowInvalid,
# ArrowIOError, OSError), a file that vanished or may not be read (OSError), a parser's limit.
FILE_ERRORS = (OSError, ValueError, RecursionError, csv.Error, pa.ArrowException)


class ReadPosition:
    """How far the reader of one file has read, in bytes, for progress (a parquet file's reader reads out of
    order: its progress is its position, and the whole file once it is done)."""

    def __init__(self):
        self.file: BinaryIO | None = None

    def __call__(self) -> int:
        try:
            return self.file.tell() if self.file is not None else 0
        except (OSError, ValueError):  # closed, or not seekable
            return 0


def read_corpus_file(path: Path, cfg: CorpusConfig, name: str | None = None,
                     position: ReadPosition | None = None, digest: str | None = None) -> Iterator[Record | Reject]:
    """Records and rejects of one file, in file order, through the reader of its suffix (`READERS`) on one open
    file (`tasks.data.opening.open_regular`: no symlink followed, a regular file, hashed as it is read). `name`
    is how sources are written (default: path). A file that cannot be read on (a corrupt parquet file, an I/O
    error) ends with one reject, never an exception: the readers reject what they can place at its line, this
    says `file:1` for the rest. With `digest` (the file as it was listed: its real path and content), a file that
    cannot be opened so or whose bytes are not those raises FileChanged once read: nothing is taken from it."""
    from tasks.data.opening import FileChanged, open_regular

    name = name or str(path)
    read = 0
    f = None
    try:
        reader = reader_for(Path(path))
        if reader is None:
            raise ValueError(f"no reader for {Path(path).suffix or '(no extension)'} files")
        try:
            # Listed (a real path, a digest): opened exactly there. Given directly: the user's own path.
            f = open_regular(path if digest else os.path.realpath(path), digest)
        except (OSError, ValueError) as e:
            if digest is not None:
                raise FileChanged(f"{path}: cannot be opened as the regular file it was listed as ({e})") from None
            raise
        if position is not None:
            position.file = f
        for item in reader(f, name, cfg):
            read += 1
            yield item
    except FileChanged:
        raise
    except FILE_ERRORS as e:
        # Without the file's path: a piece depends on the file's content alone, wherever it was first read.
        message = str(e).replace(str(path), "<file>")
        what = f"{type(e).__name__}: {message}" if message else type(e).__name__
        kind = Path(path).suffix.lower().lstrip(".") or "corpus"
        rest = f"; the rest of the file after record {read} is not read" if read else ""
        if f is not None:
            f.finish()  # the reject stands for these bytes only if they are the listed ones
        yield Reject(f"{name}:1", f"unreadable {kind} file ({what}{rest})", "")
    else:
        f.finish()
    finally:
        if f is not None:
            f.close()


def _read_text(data: bytes, name: str, cfg: CorpusConfig) -> Iterator[Record | Reject]:
    """A .txt file's bytes: one document (its size is checked again here: it may have grown since it was listed)."""
    if not data.strip():
        yield Reject(f"{name}:1", "empty file", "")
        return
    text, bad = _decode(data, name)
    if bad is not None:
        yield bad
        return
    reason = _unfit_text(text, cfg)
    yield Reject(f"{name}:1", reason, "") if reason else Record(f"{name}:1", text)
