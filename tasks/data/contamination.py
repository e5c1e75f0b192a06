"""Contamination: training text that shares a long span with held-out text (validation, evaluation tasks, a
general corpus). Spans are word n-grams, or character n-grams for text mostly in Hangul (no spaces between all
morphemes), hashed from prefix hashes a block at a time; `ContaminationIndex` holds the held-out grams sorted.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from tasks.data.shingles import normalise


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
