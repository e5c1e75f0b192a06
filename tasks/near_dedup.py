"""Near-duplicate removal (MinHash + LSH) and decontamination: pure functions, no stage.

Shingles are character 5-grams (`corpus.near_dedup.shingle_chars`) of the text NFKC-normalised, lower-cased and
with whitespace collapsed: a re-export that re-wraps lines changes no shingle, and Korean, whose words carry
particles and endings (a word-shingle changes when one ending does), is compared below the word. They are hashed
on the code points at once (`shingle_hashes`) and MinHashed by rensa (`signatures`; bench.near_dedup: 15× faster
than datasketch's MinHash.bulk on our corpora). Signatures are cached per load-file piece; each assembly bands
the signatures of the whole line again (`similar_pairs`, with datasketch's choice of bands; 0.1-0.5 s for a few
thousand documents, against keeping a per-line index in step with drops that come and go) and checks candidates
on their exact Jaccard when the texts are at hand. Which document of a group is kept follows a priority the
caller gives (the order the line had the documents in, then the smallest doc_id), so a document kept in one
run is kept in the next: a later drop is only ever compared with what came before it.

Decontamination (`ContaminationIndex`) removes a training document that shares a long span with held-out text:
`min_words` words for text in a spaced script, `min_chars` characters for text mostly in Hangul.
"""

from __future__ import annotations

import functools
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


_MULT = np.uint64(0x100000001B3)  # FNV-64 prime: the polynomial base of the rolling n-gram hash


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """`shingles(text, n)` as 64-bit hashes (with repeats: a MinHash is the same for a multiset), computed on
    the code points at once instead of one Python string per shingle."""
    t = normalise(text)
    cps = np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(cps) <= n:
        windows = [cps]
        h = np.zeros(1, np.uint64)
    else:
        windows = [cps[k:len(cps) - n + 1 + k] for k in range(n)]
        h = np.zeros(len(cps) - n + 1, np.uint64)
    with np.errstate(over="ignore"):
        for w in windows:
            h = h * _MULT + w + np.uint64(1)
        # splitmix64's finaliser: the polynomial alone leaves the low bits poorly mixed.
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    if len(cps) <= n:  # a short text is one shingle: its whole code points
        return h[:1]
    return h


def signatures(texts: Iterable[str], num_perm: int, n: int, seed: int, backend: str = BACKEND) -> np.ndarray:
    """MinHash signatures of the texts' shingles, one row (uint32 × num_perm) per text."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, num_perm), np.uint32)
    if backend == "rensa":
        import rensa

        hashes = [shingle_hashes(t, n) for t in texts]
        offsets = np.zeros(len(hashes) + 1, np.uint64)
        np.cumsum([len(h) for h in hashes], out=offsets[1:])
        matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(np.concatenate(hashes), offsets, num_perm, seed)
        return np.asarray(matrix.to_rows(), dtype=np.uint32).reshape(len(texts), num_perm)
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
    where the even weighting gives 0.40 and 0.93)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    return lsh.b, lsh.r


# A band bucket holding more documents than this pairs each with this many before it only: such buckets are
# boilerplate repeated many times, and every member is similar to the first ones anyway.
_BUCKET_PAIRS = 256


def similar_pairs(sigs: np.ndarray, threshold: float, lower: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, estimated Jaccard) with i < j for rows of `sigs` that share an LSH band and whose signatures agree
    on at least `lower` (default `threshold`) of their values. The banding is datasketch's (`bands`), done on the whole matrix
    at once: its MinHashLSH inserts and queries one document at a time in Python, which measured 0.35 ms a
    document (bench.near_dedup), rebuilt for the whole line on every run."""
    n, num_perm = sigs.shape
    if n < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    b, r = bands(threshold, num_perm)
    left, right = [], []
    for band in range(b):
        keys = np.ascontiguousarray(sigs[:, band * r:(band + 1) * r]).view(np.dtype((np.void, 4 * r))).ravel()
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, n])
        for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
            members = np.sort(order[start:start + size])
            for k in range(1, size):
                before = members[max(0, k - _BUCKET_PAIRS):k] if k > _BUCKET_PAIRS else members[:k]
                left.append(before)
                right.append(np.full(len(before), members[k]))
    if not left:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    pairs = np.unique(np.stack([np.concatenate(left), np.concatenate(right)], axis=1), axis=0)
    i, j = pairs[:, 0], pairs[:, 1]
    sim = (sigs[i] == sigs[j]).mean(axis=1)
    ok = sim >= (threshold if lower is None else lower)
    return i[ok], j[ok], sim[ok]


@dataclass(frozen=True)
class NearDuplicate:
    row: tuple[int, int]  # (part, row) of the document removed
    doc_id: str
    kept: tuple[int, int]  # (part, row) of the document it repeats
    kept_doc_id: str
    similarity: float


def _unique_rows(parts: Sequence[tuple[Sequence[str], np.ndarray]], key) -> tuple[list[tuple[str, int, int]], np.ndarray]:
    """One (doc_id, part, row) per doc_id, the first by `key`, in that order; and their signatures."""
    rows = sorted(((key(p, d), d, p, r) for p, (ids, _) in enumerate(parts) for r, d in enumerate(ids)))
    seen, out = set(), []
    for _, d, p, r in rows:
        if d not in seen:
            seen.add(d)
            out.append((d, p, r))
    num_perm = next((s.shape[1] for _, s in parts if len(s)), 1)
    sigs = np.stack([parts[p][1][r] for _, p, r in out]) if out else np.zeros((0, num_perm), np.uint32)
    return out, sigs


# With the texts at hand, candidates whose signatures agree on threshold ± this are checked on the exact
# Jaccard of their shingles: MinHash's estimate errs by about 0.035 at 128 permutations, which either way
# would cost precision (pairs just below the threshold) or recall (pairs just above).
VERIFY_MARGIN = 0.1


def near_duplicates(parts: Sequence[tuple[Sequence[str], np.ndarray]], ranks: Sequence[int], threshold: float,
                    num_perm: int, text_of: Callable[[int, int], str] | None = None, shingle_chars: int = 5,
                    ) -> list[NearDuplicate]:
    """Which rows of the pieces `parts` ([(doc_ids, signatures)]) repeat an earlier document. Documents are
    visited by (rank of their part, doc_id): the line's older files have the lower ranks, so a document is only
    ever removed for a kept one that came before it, and what was kept stays kept when a drop joins. An exact
    copy of a document seen before (the same doc_id) is the exact dedup's, not counted here. `text_of(part,
    row)`: the text, to check candidates on their exact Jaccard (`VERIFY_MARGIN`)."""
    rows, sigs = _unique_rows(parts, lambda p, d: (ranks[p], d))
    i, j, sim = similar_pairs(sigs, threshold, threshold - VERIFY_MARGIN if text_of else None)
    earlier: dict[int, list[tuple[int, float]]] = {}
    for a, b, s in zip(i.tolist(), j.tolist(), sim.tolist()):
        earlier.setdefault(b, []).append((a, s))
    sets: dict[int, np.ndarray] = {}

    def shingle_set(k: int) -> np.ndarray:
        if k not in sets:
            sets[k] = np.unique(shingle_hashes(text_of(rows[k][1], rows[k][2]), shingle_chars))
        return sets[k]

    def exact(a: int, b: int) -> float:
        x, y = shingle_set(a), shingle_set(b)
        inter = len(np.intersect1d(x, y, assume_unique=True))
        return inter / (len(x) + len(y) - inter)

    removed: set[int] = set()
    out = []
    for b in range(len(rows)):
        kept = [(a, s) for a, s in earlier.get(b, ()) if a not in removed]
        if text_of is not None:
            # An estimate a margin above the threshold is 3 standard errors clear of it: taken as it is.
            kept = [(a, j) for a, e in kept for j in [e if e >= threshold + VERIFY_MARGIN else exact(a, b)]
                    if j >= threshold]
        if kept:
            a, s = max(kept, key=lambda x: (x[1], -x[0]))  # the most similar, then the earliest
            removed.add(b)
            d, p, r = rows[b]
            kd, kp, kr = rows[a]
            out.append(NearDuplicate((p, r), d, (kp, kr), kd, s))
    return out


def drop_matches(line_parts: Sequence[tuple[Sequence[str], np.ndarray]],
                 drop_parts: Sequence[tuple[Sequence[str], np.ndarray]], threshold: float, num_perm: int,
                 ) -> list[tuple[str, str, float]]:
    """(drop doc_id, line doc_id, similarity) for each drop document near a document the line already has
    (exact copies included: the drop gate counts both as duplicates)."""
    parts = [*line_parts, *drop_parts]
    rows, sigs = _unique_rows(parts, lambda p, d: (p >= len(line_parts), d))
    line_ids = {d for ids, _ in line_parts for d in ids}
    in_line = np.array([d in line_ids for d, _, _ in rows], dtype=bool)
    i, j, sim = similar_pairs(sigs, threshold)
    best: dict[int, tuple[int, float]] = {}
    for a, b, s in zip(i.tolist(), j.tolist(), sim.tolist()):
        if in_line[a] and not in_line[b] and (b not in best or s > best[b][1]):
            best[b] = (a, s)
    matches = [(rows[b][0], rows[a][0], s) for b, (a, s) in sorted(best.items())]
    # A drop document that is itself a line document (an exact copy) matches it with similarity 1.
    copies = [(d, d, 1.0) for ids, _ in drop_parts for d in dict.fromkeys(ids) if d in line_ids]
    return copies + matches


# ----------------------------------------------------------------------------------- decontamination


def _hangul_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum("\uac00" <= c <= "\ud7a3" for c in letters) / len(letters) if letters else 0.0


def _units(text: str) -> tuple[str, list[str] | str]:
    """("c", the normalised characters) for text mostly in Hangul, else ("w", its words)."""
    t = normalise(text)
    return ("c", t) if _hangul_share(t) > 0.5 else ("w", t.split())


class ContaminationIndex:
    """Every gram of g units of the held-out texts (g = span // 2), in both units. A training text is checked at
    every g-th position only: a shared span of 2g - 1 ≤ span units always holds an aligned gram, so spans of
    `span` units are found at 1/g of the cost of checking every position."""

    def __init__(self, min_words: int, min_chars: int):
        self.g = {"w": max(min_words // 2, 1), "c": max(min_chars // 2, 1)}
        self.grams: dict[str, dict[int, str]] = {"w": {}, "c": {}}

    @staticmethod
    def _gram(units, i: int, g: int) -> int:
        return hash(units[i:i + g] if isinstance(units, str) else " ".join(units[i:i + g]))

    def add(self, text: str, source: str) -> None:
        t = normalise(text)
        for unit, units in (("c", t), ("w", t.split())):
            g, grams = self.g[unit], self.grams[unit]
            for i in range(len(units) - g + 1):
                grams.setdefault(self._gram(units, i, g), source)

    def __len__(self) -> int:
        return len(self.grams["w"]) + len(self.grams["c"])

    def match(self, text: str) -> str | None:
        """The source of a held-out text this text shares a span with, or None."""
        unit, units = _units(text)
        g, grams = self.g[unit], self.grams[unit]
        if not grams:
            return None
        for i in range(0, len(units) - g + 1, g):
            source = grams.get(self._gram(units, i, g))
            if source is not None:
                return source
        return None
