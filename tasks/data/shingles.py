"""Character shingles of a text, hashed: what a MinHash signature is computed from.

A text is folded (`lower(NFKC(c))` where that is context-free), its whitespace collapsed, and every n-gram of
characters hashed polynomially. The compiled kernel (tasks/_shingle.c) does it in one pass over an Arrow
column's UTF-8; where it is not built, or a text holds a character the fold table cannot take alone, numpy and
Python compute exactly the same hashes (tests check the three against each other).
"""

from __future__ import annotations

import functools
import hashlib
import threading
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def shingles(text: str, n: int) -> set[str]:
    """Character n-grams of the normalised text; a text shorter than n is one shingle."""
    t = normalise(text)
    if len(t) <= n:
        return {t}
    return {t[i:i + n] for i in range(len(t) - n + 1)}


# Whitespace as str.split() sees it, after NFKC (which maps the other Unicode spaces to " "): code points up to 32
# by a table; the four others are rare and replaced by " " in the string (one character for one: lengths hold).
_WS_LOW = np.array([chr(c).isspace() for c in range(33)])
_WS_RARE = ("\x85", "\u1680", "\u2028", "\u2029")
_PAD = np.uint64(0x110000)  # not a code point: pads a text shorter than n to one n-gram
_MULT = np.uint64(0x100000001B3)  # FNV-64 prime: the polynomial base of the n-gram hash
# Texts are shingled in batches of about this many characters, so that each pass over a batch stays in cache.
_BATCH_CHARS = 1 << 16


def _nfkc(text: str) -> str:
    """unicodedata.normalize("NFKC", text), applied to the runs of characters other than ASCII, Hangul syllables
    and CJK ideographs only, each with the character before it. Those three NFKC leaves as they are and never
    composes with what precedes them, so the text between runs is already normal and a boundary before one is
    safe. On a Korean text with a few compatibility characters (ㆍ, ？) the whole text's NFKC decomposes and
    recomposes every syllable: on bench.near_dedup's corpus the runs take a tenth of the time of their texts."""
    if unicodedata.is_normalized("NFKC", text):
        return text
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    other = np.flatnonzero((cps >= 0x80) & ((cps - 0xAC00) >= 11172) & ((cps - 0x4E00) >= 0x5200))
    cut = np.flatnonzero(other[1:] - other[:-1] > 1)
    starts = np.maximum(other[np.concatenate(([0], cut + 1))] - 1, 0).tolist()
    ends = (other[np.concatenate((cut, [len(other) - 1]))] + 1).tolist()
    pieces, prev = [], 0
    for a, b in zip(starts, ends):
        pieces += [text[prev:a], unicodedata.normalize("NFKC", text[a:b])]
        prev = b
    pieces.append(text[prev:])
    return "".join(pieces)


def normalised_codepoints(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """`normalise` of every text at once: the code points of all of them in a row (uint32) and each one's length.
    NFKC and lower-casing are Python's own; the whitespace collapse (str.split's, a third of normalise's time
    in Python) is done on the code points."""
    norm = [_nfkc(t).lower() for t in texts]
    lens = np.fromiter(map(len, norm), np.int64, len(norm))
    big = "".join(norm)
    for c in _WS_RARE:
        if c in big:
            big = big.replace(c, " ")
    cps = np.frombuffer(bytearray(big.encode("utf-32-le", "surrogatepass")), np.uint32)
    if not len(cps):
        return cps, lens
    low = np.flatnonzero(cps <= 32)
    ws = low[_WS_LOW[cps[low]]]  # where the whitespace is, in order
    cps[ws] = 32
    # A whitespace run becomes one space where a word follows it in the same text: the last of the run stays
    # unless a text ends there (the next position is no whitespace: a word or the next text) or it leads its text.
    ends = np.cumsum(lens)
    last = np.ones(len(ws), bool)
    last[:-1] = ws[1:] != ws[:-1] + 1
    at_end = np.zeros(len(cps) + 1, bool)
    at_end[ends] = True
    drop = ~last | at_end[ws + 1]
    starts = ends - lens
    first = np.minimum(np.searchsorted(ws, starts), len(ws) - 1)  # each text's first whitespace, among `ws`
    lead = (lens > 0) & (ws[first] == starts) if len(ws) else np.zeros(len(lens), bool)
    if lead.any():  # the space a leading run would leave before a text's first word goes too
        run_ends = np.flatnonzero(last)
        drop[run_ends[np.searchsorted(run_ends, first[lead])]] = True
    gone = ws[drop]
    keep = np.ones(len(cps), bool)
    keep[gone] = False
    lens = lens - np.diff(np.searchsorted(gone, ends), prepend=0)
    return cps[keep], lens


def _hash_batch(cps: np.ndarray, lens: np.ndarray, n: int) -> np.ndarray:
    """One 64-bit value per code point of `cps` (texts of `lens` in a row): at a position where an n-gram of its
    text starts, the n-gram's polynomial hash; at the n - 1 positions after a text's last n-gram, a repeat of its
    first (a MinHash is the same for a multiset), so each text's values are exactly its own positions. A text
    shorter than n is one n-gram, padded. Not mixed further: rensa hashes the values again with its seeds."""
    total = len(cps)
    c = np.empty(total + n - 1, np.uint64)
    c[:total] = cps
    c[total:] = _PAD
    h = c[:total].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            h *= _MULT
            h += c[k:total + k]
    starts = np.cumsum(lens) - lens
    long = lens >= n
    if long.any():
        tail = (starts[long] + lens[long])[:, None] - np.arange(1, n)[None, :]
        h[tail.ravel()] = np.repeat(h[starts[long]], n - 1)
    for d in np.flatnonzero((lens > 0) & ~long).tolist():
        s, m = int(starts[d]), int(lens[d])
        value = 0
        for x in [int(_PAD)] * (n - m) + c[s:s + m].tolist():
            value = (value * int(_MULT) + x) % (1 << 64)
        h[s:s + m] = value
    return h


def _batches(texts: Sequence[str]) -> Iterable[tuple[int, int]]:
    start, chars = 0, 0
    for i, t in enumerate(texts):
        chars += len(t)
        if chars >= _BATCH_CHARS:
            yield start, i + 1
            start, chars = i + 1, 0
    if start < len(texts):
        yield start, len(texts)


_COMPLEX = 0xFFFFFFFF
_EXPAND = 0x80000000
_TABLE_SIZE = 0x10000  # the BMP; a character above it sends its text to Python (rare: emoji, old scripts)


@functools.cache
def _composes_after() -> frozenset[int]:
    """Code points NFKC may compose with the character before them: every one after the first in a canonical
    decomposition (combining marks, a few vowel signs), and the Hangul vowel and final jamo."""
    seconds = set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))
    for lo, hi in ((0, 0x10000), (0x11000, 0x12000), (0x1D100, 0x1D200)):  # the planes' canonical composites
        for c in range(lo, hi):
            d = unicodedata.decomposition(chr(c))
            if d and d[0] != "<":
                seconds.update(int(x, 16) for x in d.split()[1:])
    return frozenset(seconds)


# Bump when _build_fold_table or _composes_after changes what they give: a machine's cached table is named by it.
_TABLE_VERSION = 1
_TABLE_NAMES = ("strict", "offsets", "pool", "loose")


def _table_digest(arrays) -> np.ndarray:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return np.frombuffer(h.digest(), np.uint8)


@functools.cache
def _fold_table() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`_build_fold_table`'s tables, kept in this machine's cache folder (`user_cache_dir`), named by the Unicode
    version of this Python and _TABLE_VERSION: building them costs 30-60 ms a process, which a +1 file drop's gate
    and load paid on every run. Read with its digest checked; missing, damaged or unwritable means built here (and
    written, atomically, when it can be)."""
    import os

    from tasks.core.paths import temp_beside, user_cache_dir

    path = user_cache_dir() / f"fold-table-{unicodedata.unidata_version}-v{_TABLE_VERSION}.npz"
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = tuple(f[k] for k in _TABLE_NAMES)
            if np.array_equal(f["digest"], _table_digest(arrays)) and len(arrays[0]) == _TABLE_SIZE:
                return arrays
    except Exception:  # noqa: BLE001 - unreadable in any way (missing, a broken zip, wrong arrays): build it
        pass
    arrays = _build_fold_table()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(path)
        with open(tmp, "wb") as f:
            np.savez(f, **dict(zip(_TABLE_NAMES, arrays)), digest=_table_digest(arrays))
        os.replace(tmp, path)
    except OSError:
        pass
    return arrays


def _build_fold_table() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The tables tasks/_shingle.c folds texts with: (strict, offsets, pool, loose). `strict[c]` is `normalise`'s
    result for the character c on its own (NFKC, lower-cased, whitespace as U+0020) where that is the same
    whatever its neighbours are, else _COMPLEX; a result of several characters is _EXPAND + k, the k-th run of
    `pool` (`offsets`). Context-free: c and the first character of its NFKD do not combine (ccc 0), so no
    canonical reordering reaches past c; neither c nor what it becomes composes with the character before it;
    what follows c and could compose with it is itself _COMPLEX; lower-casing is per character except for the
    final sigma (U+03A3, _COMPLEX). tests/test_near_dedup.py checks the table against `normalise` on texts of
    every kind of character. `loose`: whitespace to U+0020 only, for texts Python has normalised."""
    seconds = _composes_after()
    strict = np.full(_TABLE_SIZE, _COMPLEX, np.uint32)
    loose = np.arange(_TABLE_SIZE, dtype=np.uint32)
    offsets, pool = [0], []
    for c in range(_TABLE_SIZE):
        ch = chr(c)
        if ch.isspace():
            loose[c] = 32
        if 0xD800 <= c < 0xE000 or c == 0x3A3 or c in seconds or unicodedata.combining(ch):
            continue
        d = unicodedata.normalize("NFKC", ch)
        if d == ch and ch.lower() == ch:  # most characters: nothing to look up further
            strict[c] = 32 if ch.isspace() else c
            continue
        first = unicodedata.normalize("NFKD", ch)[0]
        if unicodedata.combining(first) or ord(first) in seconds or ord(d[0]) in seconds or "\u03a3" in d:
            continue
        out = [32 if x.isspace() else ord(x) for x in d.lower()]
        if len(out) == 1:
            strict[c] = out[0]
        else:
            strict[c] = _EXPAND + len(offsets) - 1
            pool += out
            offsets.append(len(pool))
    # tasks/_shingle.c folds these two blocks to themselves without looking them up.
    for lo, count in ((0xAC00, 11172), (0x4E00, 0x5200)):
        assert np.array_equal(strict[lo:lo + count], np.arange(lo, lo + count)), hex(lo)
    return strict, np.array(offsets, np.int64), np.array(pool or [0], np.uint32), loose


def _native():
    try:
        from tasks import _shingle
    except ImportError:  # built without a C compiler: numpy computes the same hashes (tests compare them)
        return None
    return _shingle


_scratch = threading.local()  # each thread's output buffer for the kernel


def _native_hash(native, data, lens: np.ndarray, table: np.ndarray, n: int, strict: bool, utf8: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """tasks/_shingle.c's hashes into this thread's buffer, reused between batches: a fresh one would fault its
    pages in on every batch. The view holds until this thread's next call."""
    _, offsets, pool, _ = _fold_table()
    out_lens = np.empty(len(lens), np.int64)
    units = len(data) if utf8 else len(data) // 4
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < units:
        buf = _scratch.buf = np.empty(max(units, _BATCH_CHARS) * 5 // 4, np.uint64)
    args = (offsets, pool, n, int(_MULT), int(_PAD), int(strict))
    written = native.hash_texts(data, lens, table, *args, buf, out_lens, int(utf8))
    if written < 0:  # expansions (㎡ → m2) made it longer than the text
        buf = _scratch.buf = np.empty(-written, np.uint64)
        written = native.hash_texts(data, lens, table, *args, buf, out_lens, int(utf8))
    return buf[:written], out_lens


def _shingle_batch(texts, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, lens): `_hash_batch(*normalised_codepoints(texts), n)` with each text's count of values, by
    tasks/_shingle.c when it is built (the hashes then a view that holds until this thread's next call). `texts`:
    strings, or a pyarrow string array (read from its UTF-8 buffer, no Python strings made). A text the table
    cannot fold on its own goes through Python's NFKC and is hashed again on its own."""
    native = _native()
    arrow = not isinstance(texts, (list, tuple))
    if native is None:
        texts = texts.to_pylist() if arrow else texts
        cps, lens = normalised_codepoints(texts)
        return _hash_batch(cps, lens, n), lens
    strict, _, _, loose = _fold_table()
    if arrow:
        data, lens = _utf8_of(texts)
        h, out_lens = _native_hash(native, data, lens, strict, n, True, utf8=True)
    else:
        lens = np.fromiter(map(len, texts), np.int64, len(texts))
        h, out_lens = _native_hash(native, "".join(texts).encode("utf-32-le", "surrogatepass"), lens, strict, n,
                                   True)
    odd = np.flatnonzero(out_lens < 0)
    if not len(odd):
        return h, out_lens
    h = h.copy()
    norm = [_nfkc(texts[i].as_py() if arrow else texts[i]).lower() for i in odd.tolist()]
    h2, lens2 = _native_hash(native, "".join(norm).encode("utf-32-le", "surrogatepass"),
                             np.fromiter(map(len, norm), np.int64, len(norm)), loose, n, False)
    out_lens[odd] = lens2
    mine = np.zeros(len(out_lens), bool)
    mine[odd] = True
    at = np.repeat(mine, out_lens)
    merged = np.empty(len(at), np.uint64)
    merged[~at] = h
    merged[at] = h2
    return merged, out_lens


def _utf8_of(array) -> tuple[memoryview | bytes, np.ndarray]:
    """A pyarrow string array's UTF-8 bytes (its own buffer, not copied) and each text's length in bytes; a null
    is an empty text."""
    import pyarrow as pa

    if array.null_count:
        array = array.fill_null("")
    if pa.types.is_string_view(array.type):
        array = array.cast(pa.large_string())
    off_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(array.buffers()[1], off_type, len(array) + 1, array.offset * off_type().itemsize)
    data = array.buffers()[2]
    lo, hi = int(offsets[0]), int(offsets[-1])
    view = memoryview(data)[lo:hi] if data is not None else b""
    return view, np.diff(offsets).astype(np.int64)


def _arrow_batches(column) -> Iterable:
    """Slices of a pyarrow string column (Array or ChunkedArray) of about _BATCH_CHARS bytes each."""
    chunks = column.chunks if hasattr(column, "chunks") else [column]
    for chunk in chunks:
        if not len(chunk):
            continue
        sizes = _utf8_of(chunk)[1]
        ends = np.cumsum(sizes)
        start = 0
        while start < len(chunk):
            base = ends[start - 1] if start else 0
            stop = max(int(np.searchsorted(ends, base + _BATCH_CHARS, "left")) + 1, start + 1)
            stop = min(stop, len(chunk))
            yield chunk.slice(start, stop - start)
            start = stop


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """`shingles(text, n)` as 64-bit hashes, with repeats (see `_hash_batch`)."""
    return _shingle_batch([text], n)[0].copy()
