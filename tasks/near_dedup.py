"""Near-duplicate removal (MinHash + LSH) and decontamination: pure functions, no stage.

Shingles are character n-grams of the text lower-cased with whitespace collapsed (NFKC first, so full-width and
compatibility forms of the same text match): a re-export that re-wraps lines changes no shingle, and Korean,
whose words carry particles and endings, is compared below the word. Signatures are computed per load-file piece
and cached with it (`signatures`); one assembly rebuilds the LSH index from the cached signatures of every piece
(`near_duplicates`), which for a line of drops costs less than keeping an index per line in step with drops that
come and go (bench.near_dedup measures it). Which document of a group is kept is decided by a priority the caller
gives (the order the line had the documents in, then the smallest doc_id), so a document kept in one run is kept
in the next: a later drop is only ever compared with what came before it.

Decontamination (`ContaminationIndex`) removes a training document that shares a long span with held-out text:
`min_words` words for text in a spaced script, `min_chars` characters for text mostly in Hangul.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Signatures from rensa (Rust): bench.near_dedup measured it against datasketch's MinHash.bulk on our corpora.
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


class SignatureIndex:
    """LSH over signatures (datasketch's MinHashLSH, bands chosen for `threshold`); candidates are verified on
    the signatures, so a pair sharing only a band is not a near-duplicate."""

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        # Bands weighted against false negatives: a false candidate costs one signature comparison, a missed one
        # stays in the corpus (at 0.8 and 128 permutations: 14 bands of 9 rows, a pair at J = 0.8 a candidate
        # with p = 0.87, at 0.9 with p = 0.999, where the even weighting gives 0.40 and 0.93).
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        self.sigs: dict[object, np.ndarray] = {}

    def _lean(self, sig: np.ndarray):
        from datasketch import LeanMinHash

        # The scheme only names how the values were made; LSH bands hash the values alone.
        return LeanMinHash(seed=1, hashvalues=sig.astype(np.uint64), scheme="legacy")

    def insert(self, key, sig: np.ndarray) -> None:
        self.sigs[key] = sig
        self.lsh.insert(key, self._lean(sig), check_duplication=False)

    def match(self, sig: np.ndarray) -> tuple[object, float] | None:
        """The most similar indexed key at or above the threshold (ties: the smallest key), or None."""
        best = None
        for key in self.lsh.query(self._lean(sig)):
            j = estimated_jaccard(sig, self.sigs[key])
            if j >= self.threshold and (best is None or (-j, str(key)) < (-best[1], str(best[0]))):
                best = (key, j)
        return best


@dataclass(frozen=True)
class NearDuplicate:
    row: tuple[int, int]  # (part, row) of the document removed
    doc_id: str
    kept: tuple[int, int]  # (part, row) of the document it repeats
    kept_doc_id: str
    similarity: float


def near_duplicates(parts: Sequence[tuple[Sequence[str], np.ndarray]], ranks: Sequence[int], threshold: float,
                    num_perm: int) -> list[NearDuplicate]:
    """Which rows of the pieces `parts` ([(doc_ids, signatures)]) repeat an earlier document. Documents are
    visited by (rank of their part, doc_id): the line's older files have the lower ranks, so a document is only
    ever removed for one that came before it, and what was kept stays kept when a drop joins. An exact copy of
    a document seen before (the same doc_id) is the exact dedup's, not counted here."""
    order = sorted(((ranks[p], doc_id, p, r) for p, (ids, _) in enumerate(parts) for r, doc_id in enumerate(ids)))
    index = SignatureIndex(threshold, num_perm)
    seen: set[str] = set()
    where: dict[str, tuple[int, int]] = {}
    out = []
    for _, doc_id, p, r in order:
        if doc_id in seen:
            continue
        seen.add(doc_id)
        sig = parts[p][1][r]
        hit = index.match(sig)
        if hit is None:
            index.insert(doc_id, sig)
            where[doc_id] = (p, r)
        else:
            out.append(NearDuplicate((p, r), doc_id, where[hit[0]], hit[0], hit[1]))
    return out


def drop_matches(line_parts: Sequence[tuple[Sequence[str], np.ndarray]],
                 drop_parts: Sequence[tuple[Sequence[str], np.ndarray]], threshold: float, num_perm: int,
                 ) -> list[tuple[str, str, float]]:
    """(drop doc_id, line doc_id, similarity) for each drop document near a document the line already has
    (exact copies included: the drop gate counts both as duplicates)."""
    index = SignatureIndex(threshold, num_perm)
    for ids, sigs in line_parts:
        for doc_id, sig in zip(ids, sigs):
            if doc_id not in index.sigs:
                index.insert(doc_id, sig)
    out, seen = [], set()
    for ids, sigs in drop_parts:
        for doc_id, sig in zip(ids, sigs):
            if doc_id in seen:
                continue
            seen.add(doc_id)
            hit = index.match(sig)
            if hit is not None:
                out.append((doc_id, str(hit[0]), hit[1]))
    return out


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
