"""Near-duplicate removal (MinHash + LSH) and decontamination: pure functions, no stage.

Shingles are character 5-grams (`corpus.near_dedup.shingle_chars`) of the text NFKC-normalised, lower-cased and
with whitespace collapsed: a re-export that re-wraps lines changes no shingle, and Korean, whose words carry
particles and endings (a word-shingle changes when one ending does), is compared below the word. Texts are
normalised and hashed in batches, in one pass of a small C extension where it is built (tasks/_shingle.c, with a
fold table made here from unicodedata: `_fold_table`; the load stage hands it the Arrow column's UTF-8, no Python
strings) and on their code points in numpy where not (`normalised_codepoints`, `_hash_batch`: the same hashes,
tests compare them), and MinHashed by rensa (`signatures`; bench.near_dedup: about 55× faster than datasketch's
MinHash.bulk on our corpora, shingling included). Signatures
are cached per load-file piece; each assembly bands the signatures of the whole line again (`similar_pairs`, with
datasketch's choice of bands; 0.1-0.5 s for a few thousand documents, against keeping a per-line index in step
with drops that come and go) and checks candidates on their exact Jaccard when the texts are at hand. Which
document of a group is kept follows a priority the caller gives (the order the line had the documents in, then
the smallest doc_id), so a document kept in one run is kept in the next: a later drop is only ever compared with
what came before it.

Decontamination (`ContaminationIndex`) removes a training document that shares a long span with held-out text:
`min_words` words for text in a spaced script, `min_chars` characters for text mostly in Hangul.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Signatures from rensa (Rust): bench.near_dedup measures it against datasketch's MinHash.bulk on our corpora.
BACKEND = "rensa"


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

    from tasks.core.paths import user_cache_dir

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
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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


_scratch = threading.local()


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


def signatures(texts, num_perm: int, n: int, seed: int, backend: str = BACKEND) -> np.ndarray:
    """MinHash signatures of the texts' shingles, one row (uint32 × num_perm) per text. `texts`: strings, or a
    pyarrow string column (read from its UTF-8 bytes where tasks/_shingle.c is built)."""
    arrow = hasattr(texts, "to_pylist")  # a pyarrow string column: hashed from its UTF-8 bytes
    if not arrow or _native() is None or backend != "rensa":
        texts, arrow = (texts.to_pylist() if arrow else list(texts)), False
    if not len(texts):
        return np.zeros((0, num_perm), np.uint32)
    if backend == "rensa":
        import rensa

        out = np.empty((len(texts), num_perm), np.uint32)
        batches = _arrow_batches(texts) if arrow else (texts[a:b] for a, b in _batches(texts))
        row = 0
        for batch in batches:
            h, lens = _shingle_batch(batch, n)
            offsets = np.zeros(len(lens) + 1, np.uint64)
            np.cumsum(lens, out=offsets[1:])
            matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(h, offsets, num_perm, seed)
            out[row:row + len(lens)] = np.array(matrix.to_rows(), np.uint32).reshape(len(lens), num_perm)
            row += len(lens)
        return out
    from datasketch import MinHash

    sets = [shingles(t, n) for t in texts]
    minhashes = MinHash.bulk([[s.encode("utf-8") for s in sh] for sh in sets], num_perm=num_perm, seed=seed)
    return np.stack([m.hashvalues for m in minhashes]).astype(np.uint32)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def exact_jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@functools.cache
def bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH chooses for `threshold`, weighted against misses: a
    false candidate costs one signature comparison, a missed pair stays in the corpus (at 0.8 and 128
    permutations: 14 bands of 9 rows; a pair at J = 0.8 is a candidate with p = 0.87, at 0.9 with p = 0.999,
    where the even weighting gives 0.40 and 0.93). Its choice (`datasketch.lsh._optimal_param`: the weighted
    areas under the candidate probability below and above the threshold, least over every b × r ≤ num_perm)
    computed here on a fixed quadrature: importing datasketch (scipy.integrate) takes about a second, three
    times the whole near-dedup of a few thousand documents. tests/test_near_dedup.py checks it gives
    datasketch's choice."""
    b, r = (np.array(v, np.float64) for v in zip(*[(b, r) for b in range(1, num_perm + 1)
                                                   for r in range(1, num_perm // b + 1)]))
    x, w = np.polynomial.legendre.leggauss(64)

    def area(lo: float, hi: float, f) -> np.ndarray:
        s = (hi - lo) / 2 * x + (hi + lo) / 2
        return f(s[:, None]).T @ w * (hi - lo) / 2

    candidate = lambda s: 1 - (1 - s ** r) ** b  # noqa: E731
    fp = area(0.0, threshold, candidate)
    fn = area(threshold, 1.0, lambda s: 1 - candidate(s))
    best = int(np.argmin(0.1 * fp + 0.9 * fn))
    return int(b[best]), int(r[best])


# A band bucket holding more documents than this pairs each with this many before it only: such buckets are
# boilerplate repeated many times, and every member is similar to the first ones anyway.
_BUCKET_PAIRS = 256
# Signature rows and candidate pairs are handled this many at a time (4-8 MB of signatures): a line's signatures
# (512 bytes a document at 128 permutations) stay in their memory-mapped files, and a corpus of many copies (every
# document in a bucket with its copies) does not build one array of every pair's signatures.
_BLOCK = 1 << 13


def _band_keys(sigs: np.ndarray, b: int, r: int) -> np.ndarray:
    """(len(sigs), b) uint64: each band's r signature values hashed to one key (14 bands: 112 bytes a document
    instead of the signature's 512). Read a block of rows at a time: `sigs` may be memory-mapped."""
    out = np.empty((len(sigs), b), np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, len(sigs), _BLOCK):
            block = np.asarray(sigs[start:start + _BLOCK], np.uint64)
            keys = np.zeros((len(block), b), np.uint64)
            for c in range(r):  # band k's c-th value is column k * r + c
                keys *= _MULT
                keys += block[:, c:b * r:r]
            out[start:start + len(block)] = keys
    return out


def _candidates(keys: np.ndarray) -> np.ndarray:
    """Pairs i < j (as i * n + j, sorted, distinct) of rows that share a band's key. Each member of a bucket
    pairs with the (up to _BUCKET_PAIRS) members before it; a band's pairs are merged into the others' at once."""
    n = len(keys)
    code = np.zeros(0, np.int64)
    for band in range(keys.shape[1]):
        key = keys[:, band]
        order = np.argsort(key, kind="stable")  # within a bucket, the rows in their own order
        sorted_key = key[order]
        at = np.flatnonzero(sorted_key[1:] == sorted_key[:-1]) + 1
        found, lag = [], 1
        while len(at) and lag <= _BUCKET_PAIRS:
            found.append(order[at - lag] * n + order[at])
            at = at[(at - lag - 1 >= 0) & (sorted_key[np.maximum(at - lag - 1, 0)] == sorted_key[at])]
            lag += 1
        if found:
            code = np.union1d(code, np.concatenate(found))
    return code


def _agreement(sig_rows: Callable[[np.ndarray], np.ndarray], i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The share of signature values pairs (i, j) agree on (MinHash's Jaccard estimate), _BLOCK pairs at a time."""
    out = np.empty(len(i))
    for start in range(0, len(i), _BLOCK):
        stop = start + _BLOCK
        a, b = sig_rows(i[start:stop]), sig_rows(j[start:stop])
        out[start:stop] = np.count_nonzero(a == b, axis=1) / a.shape[1] if len(a) else 0.0
    return out


def _pairs_at_least(keys: np.ndarray, sig_rows, lower: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    code = _candidates(keys)
    n = max(len(keys), 1)
    i, j = code // n, code % n
    sim = _agreement(sig_rows, i, j)
    ok = sim >= lower
    return i[ok], j[ok], sim[ok]


def similar_pairs(sigs: np.ndarray, threshold: float, lower: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, estimated Jaccard) with i < j for rows of `sigs` that share an LSH band and whose signatures agree
    on at least `lower` (default `threshold`) of their values. The banding is datasketch's (`bands`), done on the
    whole matrix at once: its MinHashLSH inserts and queries one document at a time in Python, which measured
    0.35 ms a document (bench.near_dedup), rebuilt for the whole line on every run. A band's rows are hashed to
    one 64-bit key: two bands that collide only add a candidate, which the signature check then drops."""
    n, num_perm = sigs.shape
    if n < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    b, r = bands(threshold, num_perm)
    return _pairs_at_least(_band_keys(sigs, b, r), lambda rows: np.asarray(sigs[rows]),
                           threshold if lower is None else lower)


@dataclass(frozen=True)
class NearDuplicate:
    row: tuple[int, int]  # (part, row) of the document removed
    doc_id: str
    kept: tuple[int, int]  # (part, row) of the document it repeats
    kept_doc_id: str
    similarity: float


_HEX16 = r"^[0-9a-f]{16}$"


def sortable_ids(ids) -> np.ndarray:
    """doc_ids (strings, or a pyarrow string column) as an array that sorts as the strings do, in little memory:
    load's ids are 16 lower-case hex digits, which as big-endian 64-bit integers keep their order (8 bytes an id,
    read from an Arrow column's buffer without making Python strings; a numpy string array takes 64 bytes an
    id); any other ids (a tool's, a test's) as strings."""
    import re

    if hasattr(ids, "to_pylist"):
        import pyarrow as pa
        import pyarrow.compute as pc

        column = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        if not len(column):
            return np.zeros(0, np.uint64)
        if (not column.null_count and pa.types.is_string(column.type)
                and pc.all(pc.match_substring_regex(column, _HEX16)).as_py()):
            data, _ = _utf8_of(column)
            return np.frombuffer(bytes.fromhex(bytes(data).decode("ascii")), ">u8").astype(np.uint64)
        ids = column.to_pylist()
    joined = "".join(ids)
    if len(joined) == 16 * len(ids) and re.fullmatch("[0-9a-f]*", joined):
        return np.frombuffer(bytes.fromhex(joined), dtype=">u8").astype(np.uint64)
    return np.array(ids, dtype=object).astype(str)


class _Line:
    """The documents of some pieces ([(doc_ids, signatures)]; signatures may be memory-mapped) in the order they
    are visited: one row per doc_id, the first by (`key(part)`, doc_id, part, row). Arrays only (part, row,
    band keys: about 130 bytes a document), so a line of millions of documents fits beside the load stage."""

    def __init__(self, parts: Sequence[tuple], key: Callable[[int], Any], threshold: float, num_perm: int):
        self.parts = parts
        names = [sortable_ids(ids) for ids, _ in parts]
        if any(x.dtype != np.uint64 for x in names):
            names = [x.astype(str) for x in names]
        sizes = [len(x) for x in names]
        part = np.repeat(np.arange(len(parts), dtype=np.int32), sizes)
        row = np.concatenate([np.arange(k, dtype=np.int64) for k in sizes]) if parts else np.zeros(0, np.int64)
        every = np.concatenate(names) if parts else np.zeros(0, np.uint64)
        rank = np.array([key(p) for p in range(len(parts))])[part] if parts else np.zeros(0)
        order = np.lexsort((row, part, every, rank))
        _, first = np.unique(every[order], return_index=True)  # the first of each doc_id in that order
        pick = order[np.sort(first)]
        self.part, self.row, self.names = part[pick], row[pick], every[pick]
        self.b, self.r = bands(threshold, num_perm)
        self.num_perm = num_perm
        # Band keys straight into visiting order, a piece at a time (no second copy of the line's keys).
        self.keys = np.empty((len(self.part), self.b), np.uint64)
        for p, (_, sigs) in enumerate(parts):
            at = np.flatnonzero(self.part == p)
            if len(at):
                self.keys[at] = _band_keys(sigs.reshape(-1, num_perm), self.b, self.r)[self.row[at]]

    def __len__(self) -> int:
        return len(self.part)

    def sig_rows(self, rows: np.ndarray) -> np.ndarray:
        """The signatures of visited rows `rows`, gathered from their pieces."""
        out = np.empty((len(rows), self.num_perm), np.uint32)
        part, row = self.part[rows], self.row[rows]
        for p in np.unique(part).tolist():
            mine = part == p
            out[mine] = self.parts[p][1].reshape(-1, self.num_perm)[row[mine]]  # reads those rows only
        return out

    def pairs(self, lower: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(self) < 2:
            empty = np.zeros(0, np.int64)
            return empty, empty, np.zeros(0)
        return _pairs_at_least(self.keys, self.sig_rows, lower)

    def where(self, k: int) -> tuple[int, int]:
        return int(self.part[k]), int(self.row[k])

    def doc_id(self, k: int) -> str:
        ids = self.parts[self.part[k]][0]
        d = ids[int(self.row[k])]
        return d.as_py() if hasattr(d, "as_py") else d


def shingle_sets(texts: Sequence[str], n: int) -> list[np.ndarray]:
    """Each text's distinct shingle hashes (sorted), the texts hashed in batches."""
    out = []
    for a, b in _batches(texts):
        h, lens = _shingle_batch(texts[a:b], n)
        ends = np.cumsum(lens)
        out += [_distinct(h[e - m:e]) for e, m in zip(ends.tolist(), lens.tolist())]
    return out


def _distinct(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting: numpy 2's hash-based unique measured 5× slower on a text's shingle hashes."""
    s = np.sort(values)
    keep = np.ones(len(s), bool)
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


# With the texts at hand, candidates whose signatures agree on threshold ± this are checked on the exact
# Jaccard of their shingles: MinHash's estimate errs by about 0.035 at 128 permutations, which either way
# would cost precision (pairs just below the threshold) or recall (pairs just above).
VERIFY_MARGIN = 0.1


def near_duplicates(parts: Sequence[tuple[Sequence[str], np.ndarray]], ranks: Sequence[int], threshold: float,
                    num_perm: int, text_of: Callable[[int, int], str] | None = None, shingle_chars: int = 5,
                    ) -> list[NearDuplicate]:
    """Which rows of the pieces `parts` ([(doc_ids, signatures)]: ids as strings or a pyarrow column, signatures
    possibly memory-mapped) repeat an earlier document. Documents are visited by (rank of their part, doc_id):
    the line's older files have the lower ranks, so a document is only ever removed for a kept one that came
    before it, and what was kept stays kept when a drop joins. An exact copy of a document seen before (the same
    doc_id) is the exact dedup's, not counted here. `text_of(part, row)`: the text, to check candidates on their
    exact Jaccard (`VERIFY_MARGIN`)."""
    line = _Line(parts, lambda p: ranks[p], threshold, num_perm)
    i, j, sim = line.pairs(threshold - VERIFY_MARGIN if text_of else threshold)
    if text_of is not None:
        # Pairs whose estimate is within the margin are checked on the exact Jaccard, a block of pairs at a time
        # (a block's texts shingled in one batch); an estimate a margin above the threshold is 3 standard errors
        # clear of it and taken as it is.
        near = np.flatnonzero(sim < threshold + VERIFY_MARGIN)
        for start in range(0, len(near), 2048):
            block = near[start:start + 2048]
            docs = np.unique(np.concatenate([i[block], j[block]])).tolist()
            sets = dict(zip(docs, shingle_sets([text_of(*line.where(k)) for k in docs], shingle_chars)))
            for k, a, b in zip(block.tolist(), i[block].tolist(), j[block].tolist()):
                x, y = sets[a], sets[b]
                inter = len(np.intersect1d(x, y, assume_unique=True))
                sim[k] = inter / max(len(x) + len(y) - inter, 1)
        ok = sim >= threshold
        i, j, sim = i[ok], j[ok], sim[ok]
    # Visit the removed-candidates in order; each takes the most similar earlier document still kept (then the
    # earliest). A document's own fate is settled before any later one looks at it (its pairs have i < j).
    by = np.lexsort((i, -sim, j))
    il, jl, sl = i[by].tolist(), j[by].tolist(), sim[by].tolist()
    removed = bytearray(len(line))
    out, k = [], 0
    while k < len(jl):
        b, chosen = jl[k], None
        while k < len(jl) and jl[k] == b:
            if chosen is None and not removed[il[k]]:
                chosen = k
            k += 1
        if chosen is not None:
            removed[b] = 1
            a = il[chosen]
            out.append(NearDuplicate(line.where(b), line.doc_id(b), line.where(a), line.doc_id(a), sl[chosen]))
    return out


def drop_matches(line_parts: Sequence[tuple[Sequence[str], np.ndarray]],
                 drop_parts: Sequence[tuple[Sequence[str], np.ndarray]], threshold: float, num_perm: int,
                 ) -> list[tuple[str, str, float]]:
    """(drop doc_id, line doc_id, similarity) for each drop document near a document the line already has
    (exact copies included: the drop gate counts both as duplicates)."""
    parts = [*line_parts, *drop_parts]
    line = _Line(parts, lambda p: int(p >= len(line_parts)), threshold, num_perm)
    # A doc_id the line has is visited in a line piece (they come first), so a visited row is the line's exactly
    # when its piece is.
    in_line = line.part < len(line_parts)
    i, j, sim = line.pairs(threshold)
    mine = in_line[i] & ~in_line[j]
    i, j, sim = i[mine], j[mine], sim[mine]
    by = np.lexsort((-sim, j))  # per drop document, the most similar line document first
    i, j, sim = i[by], j[by], sim[by]
    first = np.ones(len(j), bool)
    first[1:] = j[1:] != j[:-1]
    matches = [(line.doc_id(b), line.doc_id(a), s) for a, b, s in zip(i[first].tolist(), j[first].tolist(),
                                                                        sim[first].tolist())]
    # A drop document that is itself a line document (an exact copy) matches it with similarity 1.
    line_names = line.names[in_line]
    copies = []
    for ids, _ in drop_parts:
        names = sortable_ids(ids)
        if names.dtype != line_names.dtype:
            names, line_names = names.astype(str), line_names.astype(str)
        hit = np.isin(names, line_names)
        as_list = ids.to_pylist() if hasattr(ids, "to_pylist") else list(ids)
        copies += [(d, d, 1.0) for d in dict.fromkeys(d for d, h in zip(as_list, hit.tolist()) if h)]
    return copies + matches


# ----------------------------------------------------------------------------------- decontamination


@functools.cache
def _alpha_table() -> np.ndarray:
    """str.isalpha of every code point of the Basic Multilingual Plane, for a lookup on arrays."""
    return np.array([chr(c).isalpha() for c in range(0x10000)], dtype=bool)


def _codes(t: str) -> np.ndarray:
    return np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32)


def _hangul_share(text: str | np.ndarray) -> float:
    """Share of the letters (str.isalpha) that are Hangul syllables, on the code points at once."""
    cps = _codes(text) if isinstance(text, str) else text
    bmp = cps < 0x10000
    letters = int(_alpha_table()[cps[bmp]].sum()) + sum(chr(c).isalpha() for c in cps[~bmp].tolist())
    return int(((cps >= 0xAC00) & (cps <= 0xD7A3)).sum()) / letters if letters else 0.0


def _units(text: str) -> tuple[str, list[str] | str]:
    """("c", the normalised characters) for text mostly in Hangul, else ("w", its words)."""
    t = normalise(text)
    return ("c", t) if _hangul_share(t) > 0.5 else ("w", t.split())


# Gram hashes: a polynomial in M modulo 2**64 of a window's values, from prefix hashes computed a block at a
# time (M is odd, so invertible: a block's prefixes are one cumulative sum), never one Python string per gram.
_BLOCK = 1 << 16
_GRAM_MULT = 0x100000001B3  # FNV-64 prime (its own constant: the shingle hashes above may change apart)
_MINV = pow(_GRAM_MULT, -1, 1 << 64)


def _powers(base: int, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) modulo 2**64 (integer arrays wrap)."""
    return np.concatenate([[np.uint64(1)], np.cumprod(np.full(n - 1, np.uint64(base), np.uint64))])


_POW = _powers(_GRAM_MULT, _BLOCK + 1)  # M^0 .. M^B
_INV = _powers(_MINV, _BLOCK)  # M^0 .. M^-(B-1)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (the polynomial alone leaves the low bits poorly mixed)."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(30))
        h = h * np.uint64(0xBF58476D1CE4E5B9)
        h = h ^ (h >> np.uint64(27))
        h = h * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def _window_hashes(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Σ_{s≤j<e} values[j]·M^(e-1-j) for every window [s, e): P[e] - P[s]·M^(e-s) from the prefix hashes P."""
    n = len(values)
    prefix = np.zeros(n + 1, np.uint64)
    with np.errstate(over="ignore"):
        for s in range(0, n, _BLOCK):
            v = values[s:s + _BLOCK]
            k = len(v)
            local = _POW[:k] * np.cumsum(v * _INV[:k], dtype=np.uint64)  # Σ_{j≤i} v_j·M^(i-j)
            prefix[s + 1:s + k + 1] = prefix[s] * _POW[1:k + 1] + local
        lengths = ends - starts
        powers = _POW[np.minimum(lengths, _BLOCK)]
        for i in np.flatnonzero(lengths > _BLOCK):  # a window longer than a block (a very long word): rare
            powers[i] = np.uint64(pow(_GRAM_MULT, int(lengths[i]), 1 << 64))
        return prefix[ends] - prefix[starts] * powers


def _gram_hashes(cps: np.ndarray, unit: str, g: int, step: int = 1) -> np.ndarray:
    """The 64-bit hashes of the grams of g units ("c": characters, "w": words) of a normalised text (its code
    points `cps`), every step-th one, in text order."""
    values = cps.astype(np.uint64) + np.uint64(1)
    if unit == "w" and len(values):
        spaces = np.flatnonzero(values == 33)  # normalise leaves single spaces between words
        values = _mix(_window_hashes(values, np.concatenate([[0], spaces + 1]),
                                     np.concatenate([spaces, [len(values)]])))
    n = len(values) - g + 1
    if n <= 0:
        return np.zeros(0, np.uint64)
    if step == g <= _BLOCK:  # grams side by side (a training text's check): the same polynomial, row-wise
        with np.errstate(over="ignore"):
            rows = values[:(len(values) // g) * g].reshape(-1, g)
            return _mix((rows * _POW[g - 1::-1]).sum(axis=1, dtype=np.uint64))
    starts = np.arange(0, n, step)
    return _mix(_window_hashes(values, starts, starts + g))


class ContaminationIndex:
    """Every gram of g units of the held-out texts (g = span // 2), in both units, as sorted 64-bit hashes with
    the source each was first added from (10 bytes a gram, against ~100 for a dict of Python ints). A training
    text is checked at every g-th position only: a shared span of 2g - 1 ≤ span units always holds an aligned
    gram, so spans of `span` units are found at 1/g of the cost of checking every position."""

    # Grams waiting before they are merged into the sorted arrays: at least this many, and at least as many as
    # are merged already, so the merges cost O(n log n) in all and the waiting lists stay within the index's size.
    _MERGE = 1 << 20

    def __init__(self, min_words: int, min_chars: int):
        self.g = {"w": max(min_words // 2, 1), "c": max(min_chars // 2, 1)}
        self.sources: list[str] = []
        self._source_ids: dict[str, int] = {}
        self.grams = {u: np.zeros(0, np.uint64) for u in self.g}
        self._from = {u: np.zeros(0, np.uint16) for u in self.g}
        self._pending: dict[str, list[tuple[np.ndarray, int]]] = {u: [] for u in self.g}
        self._waiting = 0

    def add(self, text: str, source: str) -> None:
        sid = self._source_ids.setdefault(source, len(self._source_ids))
        if sid == len(self.sources):
            if sid > np.iinfo(np.uint16).max:
                raise ValueError(f"decontamination: more than 65536 held-out sources (the last: {source!r})")
            self.sources.append(source)
        cps = _codes(normalise(text))
        for unit, g in self.g.items():
            hashes = _gram_hashes(cps, unit, g)
            if len(hashes):
                self._pending[unit].append((hashes, sid))
                self._waiting += len(hashes)
        if self._waiting > max(self._MERGE, len(self.grams["w"]) + len(self.grams["c"])):
            self._merge()

    def _merge(self) -> None:
        """Pending grams into the sorted arrays; a gram already there (or added earlier) keeps its source."""
        for unit, pending in self._pending.items():
            if not pending:
                continue
            hashes = np.concatenate([self.grams[unit], *(h for h, _ in pending)])
            sources = np.concatenate([self._from[unit], *(np.full(len(h), s, np.uint16) for h, s in pending)])
            self.grams[unit], first = np.unique(hashes, return_index=True)  # first occurrence: the earliest add
            self._from[unit] = sources[first]
            pending.clear()
        self._waiting = 0

    def __len__(self) -> int:
        self._merge()
        return sum(len(v) for v in self.grams.values())

    def match_many(self, texts: Sequence[str]) -> list[str | None]:
        """Per text, the source of a held-out text it shares a span with (the first such gram in the text), or
        None: one sorted search for the whole batch."""
        self._merge()
        found: list[str | None] = [None] * len(texts)
        by_unit: dict[str, tuple[list[np.ndarray], list[int]]] = {u: ([], []) for u in self.g}
        for i, text in enumerate(texts):
            cps = _codes(normalise(text))
            unit = "c" if _hangul_share(cps) > 0.5 else "w"
            if not len(self.grams[unit]):
                continue
            hashes = _gram_hashes(cps, unit, self.g[unit], self.g[unit])
            by_unit[unit][0].append(hashes)
            by_unit[unit][1].append(i)
        for unit, (arrays, rows) in by_unit.items():
            if not arrays:
                continue
            hashes = np.concatenate(arrays)
            owner = np.repeat(np.array(rows, np.int64), [len(a) for a in arrays])
            grams = self.grams[unit]
            at = np.minimum(np.searchsorted(grams, hashes), len(grams) - 1)
            hit = grams[at] == hashes
            texts_hit, first = np.unique(owner[hit], return_index=True)  # the first hit of each text
            for i, s in zip(texts_hit.tolist(), self._from[unit][at[hit][first]].tolist()):
                found[i] = self.sources[s]
        return found

    def match(self, text: str) -> str | None:
        """The source of a held-out text this text shares a span with, or None."""
        return self.match_many([text])[0]
