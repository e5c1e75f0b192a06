"""Near-duplicates: MinHash signatures of a text's shingles (tasks/data/shingles.py) and LSH over them.

Signatures are computed by rensa (`signatures`; bench.near_dedup: about 55× faster than datasketch's MinHash.bulk
on our corpora, shingling included) and cached per load-file piece with their band keys (tasks/data/near_pieces.py).
The pass over a line (`decide`) visits its documents in a fixed order and removes a document that is a
near-duplicate of an earlier *kept* one sharing an LSH band with it (datasketch's choice of bands), checked on
their exact Jaccard when the texts are at hand. Comparing with kept documents only keeps the pass linear in the
corpus however large its clusters of near-copies grow (a cluster keeps one document, and each later member is
compared with it), and leaves the guarantee a user reads the output by: every removed document has a
near-duplicate in what is kept, and no two kept documents are near-duplicates. The order follows a priority the
caller gives (the line's older files first, then the smallest doc_id), so a document kept in one run is kept in
the next: a later drop is only ever compared with what came before it, and the pass over the line before the drop
is taken as it was (`Decisions`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.data.shingles import _MULT, _arrow_batches, _batches, _native, _shingle_batch, _utf8_of, shingles

# Signatures from rensa (Rust): bench.near_dedup measures it against datasketch's MinHash.bulk on our corpora.
BACKEND = "rensa"


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


# Signature rows and candidate pairs are handled this many at a time (32 MB of signatures at 128 permutations): a
# line's signatures (512 bytes a document) stay in their memory-mapped files, and a corpus of many copies (every
# document in a bucket with its copies) does not build one array of every pair's signatures.
_BLOCK = 1 << 16


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
_LOWER_HEX = np.zeros(256, bool)
_LOWER_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = True


def sortable_ids(ids) -> np.ndarray:
    """doc_ids (strings, or a pyarrow string column) as an array that sorts as the strings do, in little memory:
    load's ids are 16 lower-case hex digits, which as big-endian 64-bit integers keep their order (8 bytes an id,
    read from an Arrow column's buffer without making Python strings; a numpy string array takes 64 bytes an
    id); any other ids (a tool's, a test's) as strings."""
    import re

    if hasattr(ids, "to_pylist"):
        import pyarrow as pa

        column = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        if not len(column):
            return np.zeros(0, np.uint64)
        if not column.null_count and pa.types.is_string(column.type):
            # _HEX16 checked on the bytes (each id 16 of them, each a lower-case hex digit): a regex over the
            # column cost a third of the near-dedup pass's set-up on a line of 16x the documents.
            data, lengths = _utf8_of(column)
            if bool(np.all(lengths == 16)) and bool(_LOWER_HEX[np.frombuffer(data, np.uint8)].all()):
                return np.frombuffer(bytes.fromhex(bytes(data).decode("ascii")), ">u8").astype(np.uint64)
        ids = column.to_pylist()
    joined = "".join(ids)
    if len(joined) == 16 * len(ids) and re.fullmatch("[0-9a-f]*", joined):
        return np.frombuffer(bytes.fromhex(joined), dtype=">u8").astype(np.uint64)
    return np.array(ids, dtype=object).astype(str)


def hex_ids(x: np.ndarray) -> np.ndarray:
    """uint64 ids (sortable_ids') back as their 16 hex digits, to meet ids that are strings (not `astype(str)`:
    that writes the integer in decimal, and the same doc_id would no longer meet itself)."""
    return np.array([f"{v:016x}" for v in x.tolist()], dtype=str) if len(x) else np.zeros(0, str)


def argsort_ids(ids: np.ndarray) -> np.ndarray:
    """`np.argsort(ids, kind="stable")`, faster for load's ids (uint64 `sortable_ids`, hashes: spread evenly): a
    stable radix pass on their top 16 bits, then a stable merge sort of what that leaves nearly sorted (runs of
    equal top bits). Measured 2.2x faster than numpy's quicksort at 68,000 ids and 2.6x at a million, on the sorts
    a drop pays over its whole line (the visiting order, the first-copy filter). Any other array (strings, ids
    that are not spread) is sorted the same, only not faster."""
    if ids.dtype != np.uint64 or len(ids) < 1024:
        return np.argsort(ids, kind="stable")
    top = np.argsort((ids >> np.uint64(48)).astype(np.uint16), kind="stable")
    return top[np.argsort(ids[top], kind="stable")]


def _visiting_order(every: np.ndarray, part: np.ndarray, part_rank: np.ndarray) -> np.ndarray:
    """Positions of `every` (the pieces' ids, concatenated in (part, row) order; `part` each one's piece, ranked
    `part_rank`) in visiting order: each doc_id once, by the copy least in (rank, position), then sorted by (rank, doc_id). What a lexsort of
    (rank, doc_id, position) and a first-of-each gives, without a lexsort: the ids sorted once (`argsort_ids`),
    each id's copy chosen by (rank, position) explicitly, then a stable sort of the small ranks (a radix pass)."""
    if not len(every):
        return np.zeros(0, np.int64)
    levels, dense = np.unique(part_rank, return_inverse=True)  # ranked among the pieces, not per document
    dense = dense.reshape(-1).astype(np.int64)[part]
    order = argsort_ids(every)
    ordered = every[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    least = dense[order] * len(every) + order
    if len(starts) < len(every):  # some id in two pieces: each id's copy least in (rank, pos)
        least = np.minimum.reduceat(least, starts)
    # One copy per id, in the ids' sorted order already (a group per distinct id, in `ordered`'s order): sorting
    # them by id again was a second sort of the line's ids on every drop.
    pick = least % len(every)
    ranks = least // len(every)
    return pick[np.argsort(ranks.astype(np.int16 if len(levels) < 2 ** 15 else np.int64), kind="stable")]


def band_lookup(keys: np.ndarray) -> np.ndarray:
    """A piece's band keys ((n, b) uint64) as one sorted array with where each was (row * b + band): (2, n * b)
    uint64. Cached beside the keys (tasks/data/near_pieces.py), so a drop's buckets are found in an older piece by
    binary search, in time that grows with the drop and the log of the piece, not with the piece."""
    flat = np.ascontiguousarray(keys, np.uint64).reshape(-1)
    order = np.argsort(flat, kind="stable")
    return np.stack([flat[order], order.astype(np.uint64)])


def _joined(blocks: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if len(blocks) == 1:
        return blocks[0]
    return np.concatenate([k for k, _ in blocks]), np.concatenate([a for _, a in blocks])


class _Line:
    """The documents of some pieces ([(doc_ids, signatures)]; signatures may be memory-mapped) in the order they
    are visited: one row per doc_id, the first by (`key(part)`, doc_id, part, row). Arrays only (part, row and
    doc_id: 20 bytes a document; band keys are read from their pieces), so a line of millions of documents fits
    beside the load stage.
    `keys`: each piece's band keys (`_band_keys`, cached per piece by tasks/data/near_pieces.py), else computed
    here from the signatures; `ids` likewise each piece's `sortable_ids` where cached (None: from its ids);
    `lookups` each piece's band keys sorted (`band_lookup`), where cached: a drop's buckets are then searched in
    them, not found by a scan of the line's keys (`older_lookups`)."""

    def __init__(self, parts: Sequence[tuple], key: Callable[[int], Any], threshold: float, num_perm: int,
                 keys: Sequence[np.ndarray] | None = None, ids: Sequence[np.ndarray | None] | None = None,
                 lookups: Sequence[np.ndarray | None] | None = None):
        self.parts = parts
        self._lookups = lookups
        ids = ids if ids is not None else [None] * len(parts)
        names = [sortable_ids(column) if cached is None else cached for (column, _), cached in zip(parts, ids)]
        if any(x.dtype != np.uint64 for x in names):
            names = [hex_ids(x) if x.dtype == np.uint64 else x for x in names]
        sizes = [len(x) for x in names]
        part = np.repeat(np.arange(len(parts), dtype=np.int32), sizes)
        row = np.concatenate([np.arange(k, dtype=np.int64) for k in sizes]) if parts else np.zeros(0, np.int64)
        every = np.concatenate(names) if parts else np.zeros(0, np.uint64)
        pick = _visiting_order(every, part, np.array([key(p) for p in range(len(parts))]))
        self.part, self.row, self.names = part[pick], row[pick], every[pick]
        self.b, self.r = bands(threshold, num_perm)
        self.num_perm = num_perm
        self._sigs = [sigs.reshape(-1, num_perm) for _, sigs in parts]
        # Band keys stay in their pieces (memory-mapped), read where a pass needs them: a drop's pass reads the
        # drop's rows' keys and scans the older rows' in piece order (`key_blocks`); gathering the whole line's
        # keys into visiting order first (a scatter of every row) grew a drop's pass with the line.
        self._given_keys = keys
        self._piece_keys: dict[int, np.ndarray] = {}
        # Where each piece's rows were visited (-1: not, a doc_id visited in another copy), from its own slice.
        visited_at = np.full(len(every), -1, np.int64)
        visited_at[pick] = np.arange(len(pick))
        ends = np.cumsum(sizes)
        self._visited_at = [visited_at[e - k:e] for e, k in zip(ends.tolist(), sizes)]

    def piece_keys(self, p: int) -> np.ndarray:
        """Piece p's band keys, every row (given, or computed from its signatures once)."""
        if p not in self._piece_keys:
            given = self._given_keys[p] if self._given_keys is not None else None
            self._piece_keys[p] = given if given is not None else _band_keys(self._sigs[p], self.b, self.r)
        return self._piece_keys[p]

    def keys_of(self, rows: np.ndarray) -> np.ndarray:
        """The band keys of visited rows `rows` ((len(rows), b) uint64), gathered from their pieces."""
        out = np.empty((len(rows), self.b), np.uint64)
        part, row = self.part[rows], self.row[rows]
        for p in np.unique(part).tolist():
            mine = part == p
            out[mine] = np.asarray(self.piece_keys(p))[row[mine]]
        return out

    @functools.cached_property
    def keys(self) -> np.ndarray:
        """Every visited row's band keys, in visiting order ((len, b) uint64)."""
        return self.keys_of(np.arange(len(self)))

    def key_blocks(self, stop: int, size: int):
        """(keys (m, b), visited row of each, -1 where not visited) of every piece holding a visited row below
        `stop`, the rows in piece order (not visiting order), about `size` rows at a time: small pieces are
        joined into one block, so a line of many small files costs a few numpy calls, not a few per file."""
        held: list[tuple[np.ndarray, np.ndarray]] = []
        rows = 0
        for p, at in enumerate(self._visited_at):
            if not len(at) or not bool(np.any((at >= 0) & (at < stop))):
                continue
            keys = self.piece_keys(p)
            for lo in range(0, len(at), size):
                held.append((np.asarray(keys[lo:lo + size]), at[lo:lo + size]))
                rows += len(held[-1][1])
                if rows >= size:
                    yield _joined(held)
                    held, rows = [], 0
        if held:
            yield _joined(held)

    def older_lookups(self, stop: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """(visited row of each of its rows, its `band_lookup`) of every piece holding a visited row below `stop`,
        or None when one of them has no lookup (the caller scans `key_blocks` instead)."""
        if self._lookups is None:
            return None
        out = []
        for p, at in enumerate(self._visited_at):
            if not len(at) or not bool(np.any((at >= 0) & (at < stop))):
                continue
            if self._lookups[p] is None:
                return None
            out.append((at, self._lookups[p]))
        return out

    def __len__(self) -> int:
        return len(self.part)

    def sig_rows(self, rows: np.ndarray) -> np.ndarray:
        """The signatures of visited rows `rows`, gathered from their pieces."""
        if len(rows) <= 4:  # the greedy pass asks a few rows at a time: no grouping by piece
            out = np.empty((len(rows), self.num_perm), np.uint32)
            for k, x in enumerate(rows.tolist()):
                out[k] = self._sigs[self.part[x]][self.row[x]]
            return out
        out = np.empty((len(rows), self.num_perm), np.uint32)
        part, row = self.part[rows], self.row[rows]
        for p in np.unique(part).tolist():
            mine = part == p
            out[mine] = self._sigs[p][row[mine]]  # reads those rows only
        return out

    def buckets(self) -> tuple[np.ndarray, np.ndarray]:
        """(bucket, shared): each row's bucket in every band (ids unique across bands, (len, b) int64) and whether
        another row is in that bucket too."""
        bucket = np.empty(self.keys.shape, np.int64)
        shared = np.empty(self.keys.shape, bool)
        offset = 0
        for band in range(self.b):
            uniq, inverse, counts = np.unique(self.keys[:, band], return_inverse=True, return_counts=True)
            bucket[:, band] = inverse + offset
            shared[:, band] = counts[inverse] > 1
            offset += len(uniq)
        return bucket, shared

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


# Shingle sets kept for the exact checks of one pass: a cluster's kept document is checked against each of its
# later members, and is shingled once, not once a member (a few thousand documents' sets: a few MB).
_SHINGLE_CACHE = 4096


def pair_similarity(line: _Line, i: np.ndarray, j: np.ndarray, threshold: float,
                    text_of: Callable[[int, int], str] | None, shingle_chars: int,
                    cache: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """The similarity by which the candidate pairs (i, j) of the line's rows are judged: a pair is a near-duplicate
    when it is at least the threshold (`near_pairs`). The share of signature values they agree on (MinHash's
    estimate); with `text_of(part, row)`, those whose estimate lies within VERIFY_MARGIN of the threshold are
    measured on their exact Jaccard instead, a block of pairs at a time (a block's texts shingled in one batch):
    an estimate a margin away is 3 standard errors clear of the threshold and taken as it is. `cache`: shingle
    sets by row, kept across calls (at most _SHINGLE_CACHE)."""
    if len(i) == 1:  # the greedy pass's usual call: one kept document, one new one
        sim = np.array([np.count_nonzero(line.sig_rows(i)[0] == line.sig_rows(j)[0]) / line.num_perm])
    else:
        sim = _agreement(line.sig_rows, i, j)
    if text_of is None:
        return sim
    near = np.flatnonzero((sim >= threshold - VERIFY_MARGIN) & (sim < threshold + VERIFY_MARGIN))
    if not len(near):
        return sim
    cache = {} if cache is None else cache
    for start in range(0, len(near), 2048):
        block = near[start:start + 2048]
        needed = np.unique(np.concatenate([i[block], j[block]])).tolist()
        docs = [d for d in needed if d not in cache]
        if len(cache) + len(docs) > _SHINGLE_CACHE:
            cache.clear()
            docs = needed
        cache.update(zip(docs, shingle_sets([text_of(*line.where(k)) for k in docs], shingle_chars)))
        for k, a, b in zip(block.tolist(), i[block].tolist(), j[block].tolist()):
            x, y = cache[a], cache[b]
            inter = len(np.intersect1d(x, y, assume_unique=True))
            sim[k] = inter / max(len(x) + len(y) - inter, 1)
    return sim


def near_pairs(line: _Line, i: np.ndarray, j: np.ndarray, threshold: float,
               text_of: Callable[[int, int], str] | None, shingle_chars: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, similarity) of the candidate pairs that are near-duplicates: the one decision load's near-dedup and
    the drop gate both take (`pair_similarity` at least the threshold)."""
    sim = pair_similarity(line, i, j, threshold, text_of, shingle_chars)
    ok = sim >= threshold
    return i[ok], j[ok], sim[ok]
