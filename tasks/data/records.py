"""One corpus record on its way to a document: a `Record` (its text and `file:line`) or a `Reject` (why not),
the text fields a record's document is made of, and the ids of a document (exact and whitespace-normalised).
Every reader (tasks/data/readers.py) judges its records here, so every format says the same thing about the
same fault."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks.core.config.data import CorpusConfig

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


# Field names that usually hold a document's text, in the order a missing field's message suggests them.
_TEXT_NAMES = ("text", "content", "body", "document", "article", "passage", "contents", "raw_content")


def missing_field(field: str, cfg: CorpusConfig, present: list[str], values: dict[str, Any] | None = None) -> str:
    """Why a record has no text: the missing field, the fields the record has, and the config key that names
    the field to read (with the likeliest one: the longest string value, else a usual name for text)."""
    key = ("corpus.text_field" if field == cfg.text_field and cfg.question_field is None else
           "corpus.question_field" if field == cfg.question_field else "corpus.answer_field")
    shown = ", ".join(repr(p) for p in present[:12]) + (f" and {len(present) - 12} more" if len(present) > 12 else "")
    guess = None
    if values:
        strings = {k: len(v) for k, v in values.items() if isinstance(v, str)}
        guess = max(strings, key=strings.get) if strings else None
    if guess is None:
        guess = next((n for n in _TEXT_NAMES if n in present), None)
    hint = f", e.g. --set {key}={guess}" if guess else ""
    return (f"missing field {field!r} (the record has {shown or 'no fields'}): set {key} to the field that holds "
            f"the text{hint}")


def _text_of(obj: Any, cfg: CorpusConfig) -> tuple[str | None, str | None]:
    """The document text of one record, or the reason it has none."""
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    fields = [cfg.text_field] if cfg.question_field is None else [cfg.question_field, cfg.answer_field]
    values = []
    for f in fields:
        if f not in obj:
            return None, missing_field(f, cfg, [str(k) for k in obj], obj)
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


def doc_id_of(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def norm_id_of(text: str) -> str:
    """Identity of the text after whitespace normalisation: the same document re-wrapped or re-indented by
    another export has the same norm id (used to keep validation documents out of training)."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=8).hexdigest()


def _line_no(source: str) -> int:
    return int(source.rsplit(":", 1)[1])
