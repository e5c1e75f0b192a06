"""The near-dedup pass over a line (docs/near-dedup.md): documents visited in the line's order, each removed when it
is a near-duplicate of an earlier kept document of one of its band buckets, compared with those kept documents
only (linear, whatever the clusters). `Decisions` is what a pass decided and every pair it judged, so the next
pass, a drop later, starts from it; `drop_matches` is the drop gate's count, by the same pair decision."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tasks.data.minhash import NearDuplicate, _Line, argsort_ids, hex_ids, near_pairs, pair_similarity, sortable_ids

# A document is compared with at most this many kept documents of each of its band buckets (the earliest): a
# bucket holding more kept documents than this is boilerplate repeated many times, and under the rule below a
# cluster of near-copies keeps one, so a document meets its cluster's kept one first whatever the cluster's size.
_BUCKET_KEPT = 64


@dataclass
class Decisions:
    """Near-dedup's decisions over a line's visited rows (`_Line`'s order), and every pair it judged: what a later
    pass over the same documents plus a drop reuses (`decide(previous=...)`). Rows are named by their doc_ids
    (`names`, sortable_ids), so they map onto another line's rows."""
    names: np.ndarray
    kept_by: np.ndarray  # int64: the row a removed row repeats, -1 for a kept row
    similarity: np.ndarray  # float32: with kept_by
    pair_a: np.ndarray  # int64 rows, pair_a < pair_b: every pair judged, and its similarity
    pair_b: np.ndarray
    pair_sim: np.ndarray  # float32

    FIELDS = ("names", "kept_by", "similarity", "pair_a", "pair_b", "pair_sim")

    def save(self, path) -> None:
        np.savez(path, **{f: getattr(self, f) for f in self.FIELDS})

    @classmethod
    def load(cls, path) -> Decisions | None:
        """The decisions saved at `path`, or None when the file is not a consistent set of them (a damaged entry is
        a miss: the pass decides again)."""
        try:
            with np.load(path, allow_pickle=False) as f:
                d = cls(**{k: f[k] for k in cls.FIELDS})
        except Exception:  # any unreadable file (a bad zip CRC, a truncated array) is a miss
            return None
        n = len(d.names)
        ok = (d.kept_by.shape == (n,) and d.similarity.shape == (n,) and d.pair_a.shape == d.pair_b.shape
              == d.pair_sim.shape and d.names.dtype.kind in "uU" and d.kept_by.dtype.kind == "i"
              and d.pair_a.dtype.kind == "i" and d.pair_b.dtype.kind == "i"
              and bool(np.all((d.kept_by >= -1) & (d.kept_by < np.arange(n))))
              and bool(np.all((d.pair_a >= 0) & (d.pair_a < d.pair_b) & (d.pair_b < n))))
        return d if ok else None


@dataclass
class DecideStats:
    reused_rows: int = 0  # rows whose decision was taken from the previous pass as it was
    visited: int = 0  # rows the greedy pass looked at (rows sharing a band bucket with another, past the reuse)
    judged: int = 0  # pairs judged now (signatures compared, exact Jaccard within the margin)
    remembered: int = 0  # pairs whose judgement was taken from the previous pass


def _row_lookup(names: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Each of `wanted`'s rows in `names` (distinct), -1 where it is not there."""
    if not len(names) or not len(wanted) or names.dtype.kind != wanted.dtype.kind:
        return np.full(len(wanted), -1, np.int64)
    order = argsort_ids(names)
    at = np.minimum(np.searchsorted(names[order], wanted), len(names) - 1)
    found = names[order][at] == wanted
    return np.where(found, order[at], -1).astype(np.int64)


def _rows_now(names: np.ndarray, previous_names: np.ndarray, rows: np.ndarray, start: int) -> np.ndarray:
    """Rows of a previous pass as this line's rows: the same below `start` (where the two lines' names agree, so a
    drop after the line looks nothing up), else found by name (-1 where gone)."""
    out = np.array(rows, np.int64)
    late = out >= start
    if late.any():
        out[late] = _row_lookup(names, previous_names[out[late]])
    return out


# Rows of band keys handled at a time by `_rows_in_buckets`' lookup of the rows before the visited ones.
_KEY_BLOCK = 1 << 16


def _new_buckets(new_keys: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """The buckets of some rows' band keys: per band the distinct keys (sorted) and each row's index among them;
    and each band's first bucket id (`offsets`: bucket ids unique across bands)."""
    uniqs, inverses = [], []
    for band in range(new_keys.shape[1]):
        u, inverse = np.unique(new_keys[:, band], return_inverse=True)
        uniqs.append(u)
        inverses.append(inverse.reshape(-1))
    return uniqs, inverses, np.cumsum([0] + [len(u) for u in uniqs])


def _rows_in_buckets(uniqs: list[np.ndarray], offsets: np.ndarray, blocks, start: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(row, bucket id) of every row below `start` whose band key is one of `uniqs` (bucket ids as
    `_new_buckets` gives them), in row order (a row's bands in band order), from `blocks` ((keys, row of each: -1
    or ≥ start for rows to skip), in any order): a filter on the keys' top bits, then a search per band. A drop's
    buckets are looked up in the line's keys (one pass over them), never the line's keys sorted per band."""
    nb = len(uniqs)
    if not start or not offsets[-1]:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bits = int(min(24, max(12, np.ceil(np.log2(offsets[-1] * 64)))))  # about 1 old key in 64 passes the filter
    table = np.zeros(1 << bits, bool)
    shift = np.uint64(64 - bits)
    table[(np.concatenate(uniqs) >> shift).astype(np.intp)] = True
    xs, bids = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for block, rows in blocks:
        flat = np.ascontiguousarray(block).reshape(-1)
        cand = np.flatnonzero(table[(flat >> shift).astype(np.intp)])  # row-major: rows, then bands, in order
        x = rows[cand // nb]
        ok = (x >= 0) & (x < start)
        cand, x = cand[ok], x[ok]
        band = cand % nb
        bid = np.full(len(cand), -1, np.int64)
        for k in np.unique(band).tolist():
            sel = np.flatnonzero(band == k)
            want = flat[cand[sel]]
            at = np.minimum(np.searchsorted(uniqs[k], want), len(uniqs[k]) - 1)
            hit = uniqs[k][at] == want
            bid[sel[hit]] = at[hit] + offsets[k]
        found = bid >= 0
        xs.append(x[found])
        bids.append(bid[found])
    old_x, old_bid = np.concatenate(xs), np.concatenate(bids)
    by_row = np.argsort(old_x, kind="stable")  # blocks come in piece order: callers want row order
    return old_x[by_row], old_bid[by_row]


def _rows_by_lookup(uniqs: list[np.ndarray], offsets: np.ndarray, pieces: list[tuple[np.ndarray, np.ndarray]],
                    start: int) -> tuple[np.ndarray, np.ndarray]:
    """`_rows_in_buckets` from each older piece's sorted band keys (`pieces`: (visited row of each of its rows, its
    `band_lookup`)): every bucket's key searched in each piece, so a drop costs its keys times the pieces times a
    log, whatever the pieces' sizes. Where a lookup names a row or band it cannot hold (a damaged file that passed
    its shape check) the match is dropped, never an index out of range."""
    nb = len(uniqs)
    if not start or not offsets[-1]:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    query = np.concatenate(uniqs)  # a bucket's id is its place here (offsets[band] + its rank in the band)
    query_band = np.repeat(np.arange(nb), [len(u) for u in uniqs])
    xs, bids, bands = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for at, lookup in pieces:
        lo = np.searchsorted(lookup[0], query, "left")
        count = np.searchsorted(lookup[0], query, "right") - lo
        total = int(count.sum())
        if not total:
            continue
        q = np.repeat(np.arange(len(query)), count)
        pos = np.repeat(lo, count) + np.arange(total) - np.repeat(np.cumsum(count) - count, count)
        flat = lookup[1][pos].astype(np.int64)
        row, band = flat // nb, flat % nb
        ok = (flat >= 0) & (row < len(at)) & (band == query_band[q])
        row, q, band = row[ok], q[ok], band[ok]
        x = at[row]
        ok = (x >= 0) & (x < start)
        xs.append(x[ok])
        bids.append(q[ok])
        bands.append(band[ok])
    x, bid, band = np.concatenate(xs), np.concatenate(bids), np.concatenate(bands)
    # Row order, a row's bands in band order: as `_rows_in_buckets` gives them. One sort of (row, band) as one
    # code, stably (the same order as a lexsort of the two, which measured 1.7x slower on 300,000 pairs).
    order = np.argsort(x * nb + band, kind="stable")
    return x[order], bid[order]


def _older_rows(line: _Line, uniqs: list[np.ndarray], offsets: np.ndarray, start: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(row, bucket id) of every visited row below `start` in one of the buckets `uniqs`: searched in the older
    pieces' sorted keys where each has them cached, else one scan of their keys."""
    lookups = line.older_lookups(start)
    if lookups is not None:
        return _rows_by_lookup(uniqs, offsets, lookups, start)
    return _rows_in_buckets(uniqs, offsets, line.key_blocks(start, _KEY_BLOCK), start)


def _visit_line_buckets(new_keys: np.ndarray, older: Callable, start: int, kept_by: np.ndarray
                        ) -> tuple[np.ndarray, list[list[int]], dict[int, list[int]]]:
    """What the greedy pass needs of the LSH buckets to visit rows `start`… (`new_keys`: their band keys, in
    order): the rows to visit (those sharing a band bucket with another row), each one's bucket per band (ids
    unique across bands; -1 where no other row is in it: a bucket of its own never has a kept row to compare
    with), and per bucket the kept rows before `start` in it (the earliest _BUCKET_KEPT, in row order). Only the
    buckets of rows from `start` on are numbered: the rows before are looked up in them (`older(uniqs, offsets)`:
    `_older_rows`), so a drop onto a long line costs a search of the line's sorted keys, never a sort of them per
    band."""
    nb = new_keys.shape[1]
    uniqs, inverses, offsets = _new_buckets(new_keys)
    counts = np.concatenate([np.bincount(inv, minlength=len(u)) for u, inv in zip(uniqs, inverses)]
                            ) if nb else np.zeros(0, np.int64)
    old_x, old_bid = older(uniqs, offsets)
    counts += np.bincount(old_bid, minlength=len(counts))
    bucket = np.stack([inv + offsets[k] for k, inv in enumerate(inverses)], axis=1) if nb else \
        np.zeros((len(new_keys), 0), np.int64)
    shared = counts[bucket] > 1
    visit = np.flatnonzero(shared.any(axis=1))
    mine_of = np.where(shared[visit], bucket[visit], -1).tolist()
    kept: dict[int, list[int]] = {}
    if len(visit):
        # A bucket an old row shares with a new one holds two rows, so every such bucket is one a visited row has.
        mine = kept_by[old_x] < 0
        for x, bid in zip(old_x[mine].tolist(), old_bid[mine].tolist()):
            got = kept.setdefault(bid, [])
            if len(got) < _BUCKET_KEPT:
                got.append(x)
    return visit + start, mine_of, kept


def _first_of_each(code: np.ndarray, head: int) -> np.ndarray:
    """`np.unique(code, return_index=True)[1]`: where each distinct code first is, in the codes' order. When the
    first `head` codes are sorted and distinct already (the previous pass's pairs, in its row order: a drop's pass
    keeps them as they were) only the rest is sorted and merged in, not the whole line's pairs again."""
    old, new = code[:head], code[head:]
    if len(old) > 1 and not bool(np.all(old[1:] > old[:-1])):
        return np.unique(code, return_index=True)[1]
    values, at = np.unique(new, return_index=True)
    if len(old):
        found = old[np.minimum(np.searchsorted(old, values), len(old) - 1)] == values  # judged before: theirs first
        values, at = values[~found], at[~found]
    return np.insert(np.arange(head), np.searchsorted(old, values), at + head)


def decide(line: _Line, threshold: float, text_of: Callable[[int, int], str] | None, shingle_chars: int,
           previous: Decisions | None = None, stats: DecideStats | None = None) -> Decisions:
    """Which rows of the line are near-duplicates, visited in order: a row is removed when it is a near-duplicate
    (`pair_similarity` at least the threshold) of an earlier row that is kept; it names the most similar such row
    (then the earliest). So every removed document has a near-duplicate in what is kept, and no two kept documents
    are near-duplicates (of those LSH makes candidates: rows sharing a band bucket).

    A row is only ever compared with the kept rows of its buckets (`_BUCKET_KEPT` of each): a cluster of k
    near-copies costs k - 1 comparisons with the one it keeps, not k² / 2, and the pass is linear in the corpus
    whatever its clusters. A row's decision depends on the rows before it only, so with `previous` (the decisions
    of a pass over some of the same documents) the rows up to the first that differs from previous's order keep
    their decisions as they were, and pairs judged before are not judged again: a drop whose documents come after
    the line's (a later corpus path) costs its own rows' comparisons only."""
    stats = stats if stats is not None else DecideStats()
    n = len(line)
    names = line.names
    kept_by = np.full(n, -1, np.int64)
    similarity = np.zeros(n, np.float32)
    memo: dict[tuple[int, int], float] = {}
    pairs_a: list[np.ndarray] = []
    pairs_b: list[np.ndarray] = []
    pairs_s: list[np.ndarray] = []
    start = 0
    previous_used = previous is not None and len(previous.names) and previous.names.dtype.kind == names.dtype.kind
    if previous_used:
        m = min(n, len(previous.names))
        differ = np.flatnonzero(previous.names[:m] != names[:m])
        start = int(differ[0]) if len(differ) else m
        kept_by[:start] = previous.kept_by[:start]
        similarity[:start] = previous.similarity[:start]
        a, b = (_rows_now(names, previous.names, rows, start) for rows in (previous.pair_a, previous.pair_b))
        both = (a >= 0) & (b >= 0)
        a, b, s = np.minimum(a[both], b[both]), np.maximum(a[both], b[both]), previous.pair_sim[both]
        pairs_a.append(a)
        pairs_b.append(b)
        pairs_s.append(s.astype(np.float32))
        later = b >= start
        memo = dict(zip(zip(a[later].tolist(), b[later].tolist()), s[later].tolist()))
    stats.reused_rows = start
    if n - start and n > 1:
        rows, mine_of, kept = _visit_line_buckets(line.keys_of(np.arange(start, n)),
                                                  lambda u, o: _older_rows(line, u, o, start), start, kept_by)
        stats.visited = len(rows)
        cache: dict[int, np.ndarray] = {}
        new_a: list[int] = []
        new_b: list[int] = []
        new_s: list[float] = []
        for x, bids in zip(rows.tolist(), mine_of):
            candidates: set[int] = set()
            for bid in bids:
                if bid >= 0:
                    mine = kept.get(bid)
                    if mine:
                        candidates.update(mine)
            if candidates:
                c = sorted(candidates)
                sims = [memo.get((a, x)) for a in c]
                todo = [k for k, v in enumerate(sims) if v is None]
                stats.remembered += len(c) - len(todo)
                if todo:
                    ca = np.array([c[k] for k in todo], np.int64)
                    got = pair_similarity(line, ca, np.full(len(ca), x, np.int64), threshold, text_of,
                                          shingle_chars, cache).tolist()
                    stats.judged += len(todo)
                    for k, v in zip(todo, got):
                        sims[k] = v
                    new_a += ca.tolist()
                    new_b += [x] * len(ca)
                    new_s += got
                best = max(range(len(c)), key=lambda k: (sims[k], -c[k]))
                if sims[best] >= threshold:
                    kept_by[x], similarity[x] = c[best], sims[best]
                    continue
            for bid in bids:
                if bid >= 0:
                    mine = kept.setdefault(bid, [])
                    if len(mine) < _BUCKET_KEPT:
                        mine.append(x)
        pairs_a.append(np.array(new_a, np.int64))
        pairs_b.append(np.array(new_b, np.int64))
        pairs_s.append(np.array(new_s, np.float32))
    cat = lambda xs, t: np.concatenate(xs).astype(t) if xs else np.zeros(0, t)  # noqa: E731
    a, b, s = cat(pairs_a, np.int64), cat(pairs_b, np.int64), cat(pairs_s, np.float32)
    if len(a):  # each pair once (a pair judged before may be judged again when its row was re-visited)
        first = _first_of_each(a * n + b, len(pairs_a[0]) if previous_used else 0)
        a, b, s = a[first], b[first], s[first]
    return Decisions(names, kept_by, similarity, a, b, s)


def near_duplicates(parts: Sequence[tuple[Sequence[str], np.ndarray]], ranks: Sequence[int], threshold: float,
                    num_perm: int, text_of: Callable[[int, int], str] | None = None, shingle_chars: int = 5,
                    ) -> list[NearDuplicate]:
    """`near_duplicate_decisions` without the decisions."""
    return near_duplicate_decisions(parts, ranks, threshold, num_perm, text_of, shingle_chars)[0]


def near_duplicate_decisions(parts: Sequence[tuple[Sequence[str], np.ndarray]], ranks: Sequence[int],
                             threshold: float, num_perm: int, text_of: Callable[[int, int], str] | None = None,
                             shingle_chars: int = 5, keys: Sequence[np.ndarray] | None = None,
                             previous: Decisions | None = None, stats: DecideStats | None = None,
                             ids: Sequence[np.ndarray | None] | None = None,
                             lookups: Sequence[np.ndarray | None] | None = None
                             ) -> tuple[list[NearDuplicate], Decisions]:
    """Which rows of the pieces `parts` ([(doc_ids, signatures)]: ids as strings or a pyarrow column, signatures
    possibly memory-mapped; `keys` their band keys) repeat an earlier document, and the decisions (for the next
    pass: `previous`). Documents are visited by (rank of their part, doc_id): the line's older files have the
    lower ranks, so a document is only ever removed for a kept one that came before it, and what was kept stays
    kept when a drop joins. An exact copy of a document seen before (the same doc_id) is the exact dedup's, not
    counted here. `text_of(part, row)`: the text, to check candidates on their exact Jaccard (`VERIFY_MARGIN`).
    `ids`: each part's `sortable_ids` where cached, `lookups` its `band_lookup` (`_Line`)."""
    line = _Line(parts, lambda p: ranks[p], threshold, num_perm, keys, ids, lookups)
    found = decide(line, threshold, text_of, shingle_chars, previous, stats)
    out = [NearDuplicate(line.where(b), line.doc_id(b), line.where(a), line.doc_id(a), float(found.similarity[b]))
           for b, a in zip(np.flatnonzero(found.kept_by >= 0).tolist(), found.kept_by[found.kept_by >= 0].tolist())]
    return out, found


def line_pass(parts: Sequence[tuple[Sequence[str], np.ndarray]], ranks: Sequence[int], threshold: float,
              num_perm: int, text_of: Callable[[int, int], str] | None, shingle_chars: int,
              keys: Sequence[np.ndarray] | None, previous: Decisions | None, stats: DecideStats | None,
              samples: int, ids: Sequence[np.ndarray | None] | None = None,
              lookups: Sequence[np.ndarray | None] | None = None) -> tuple[np.ndarray, list[NearDuplicate], Decisions]:
    """`near_duplicate_decisions` for load: the doc_ids removed, as the line's names (`sortable_ids`: uint64 for
    load's ids, sorted and distinct; no Python object per removed document, which on a line of 16x copies was
    most of a drop's pass), and the first `samples` removals described."""
    line = _Line(parts, lambda p: ranks[p], threshold, num_perm, keys, ids, lookups)
    found = decide(line, threshold, text_of, shingle_chars, previous, stats)
    removed = np.flatnonzero(found.kept_by >= 0)
    if line.names.dtype == np.uint64:
        # Distinct already (a row per doc_id), and in runs sorted already (the line's names are sorted within
        # each rank): a stable sort merges the runs (timsort), where a quicksort sorted every id again.
        ids = np.sort(line.names[removed], kind="stable")
    else:  # some ids not load's (a tool's, a test's): the names are strings only where all were; read them back
        got: list = []
        for p in np.unique(line.part[removed]).tolist():
            rows, column = line.row[removed[line.part[removed] == p]], parts[p][0]
            got += column.take(rows).to_pylist() if hasattr(column, "take") else [column[r] for r in rows.tolist()]
        ids = np.unique(np.array(got, dtype=str)) if got else np.zeros(0, str)
    described = [NearDuplicate(line.where(b), line.doc_id(b), line.where(a), line.doc_id(a),
                               float(found.similarity[b]))
                 for b, a in zip(removed[:samples].tolist(), found.kept_by[removed[:samples]].tolist())]
    return ids, described, found


def _cross_candidates(line: _Line, older: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i an `older` row and j another, sharing a band bucket (each j with at most _BUCKET_KEPT of the
    older rows of a bucket, the earliest): sorted by (j, i), distinct. The older rows come first in the line's
    order; only the other rows' buckets are numbered and the older rows are looked up in them
    (`_older_rows`): a drop's gate searches the line's sorted keys (or reads them once), never sorts them per band."""
    n, start = len(line), int(np.count_nonzero(older))
    if not bool(older[:start].all()):
        raise ValueError("_cross_candidates: the older rows must come first in the line's order")
    if n == start or not start:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    uniqs, inverses, offsets = _new_buckets(line.keys_of(np.arange(start, n)))
    old_x, old_bid = _older_rows(line, uniqs, offsets, start)
    by_bucket = np.lexsort((old_x, old_bid))  # per bucket its older rows, earliest first
    old_x, old_bid = old_x[by_bucket], old_bid[by_bucket]
    first = np.searchsorted(old_bid, old_bid, "left")
    keep = np.arange(len(old_bid)) - first < _BUCKET_KEPT
    old_x, old_bid = old_x[keep], old_bid[keep]
    codes = []
    for k, inverse in enumerate(inverses):
        bid = inverse + offsets[k]
        lo = np.searchsorted(old_bid, bid, "left")
        count = np.searchsorted(old_bid, bid, "right") - lo
        if not count.sum():
            continue
        j = np.repeat(np.arange(start, n), count)
        offsets_in = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        codes.append(j * n + old_x[np.repeat(lo, count) + offsets_in])
    code = np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)
    return code % n, code // n


def drop_matches(line_parts: Sequence[tuple[Sequence[str], np.ndarray]],
                 drop_parts: Sequence[tuple[Sequence[str], np.ndarray]], threshold: float, num_perm: int,
                 text_of: Callable[[int, int], str] | None = None, shingle_chars: int = 5,
                 keys: Sequence[np.ndarray] | None = None, ids: Sequence[np.ndarray | None] | None = None,
                 lookups: Sequence[np.ndarray | None] | None = None) -> list[tuple[str, str, float]]:
    """(drop doc_id, line doc_id, similarity) for each drop document near a document the line already has
    (exact copies included: the drop gate counts both as duplicates). Pairs are decided as load decides them
    (`near_pairs`; `text_of(part, row)` over the line's parts, then the drop's; `keys`: their band keys, in the same
    order; `ids` their cached `sortable_ids` and `lookups` their `band_lookup`, likewise). Only pairs of a drop
    document and a line document are judged: the cost grows with the drop."""
    parts = [*line_parts, *drop_parts]
    line = _Line(parts, lambda p: int(p >= len(line_parts)), threshold, num_perm, keys, ids, lookups)
    # A doc_id the line has is visited in a line piece (they come first), so a visited row is the line's exactly
    # when its piece is.
    in_line = line.part < len(line_parts)
    i, j = _cross_candidates(line, in_line)
    i, j, sim = near_pairs(line, i, j, threshold, text_of, shingle_chars)
    by = np.lexsort((i, -sim, j))  # per drop document, the most similar line document first (then the earliest)
    i, j, sim = i[by], j[by], sim[by]
    first = np.ones(len(j), bool)
    first[1:] = j[1:] != j[:-1]
    matches = [(line.doc_id(b), line.doc_id(a), s) for a, b, s in zip(i[first].tolist(), j[first].tolist(),
                                                                        sim[first].tolist())]
    # A drop document that is itself a line document (an exact copy) matches it with similarity 1.
    line_names = line.names[in_line]  # sorted: the line's rows come first, by doc_id (`_Line`)
    copies = []
    for ids, _ in drop_parts:
        names = sortable_ids(ids)
        if names.dtype != line_names.dtype:  # load's ids (uint64) met others (strings): both as strings
            names, line_names = (hex_ids(x) if x.dtype == np.uint64 else x for x in (names, line_names))
            line_names = np.sort(line_names)
        at = np.minimum(np.searchsorted(line_names, names), max(len(line_names) - 1, 0))
        hit = line_names[at] == names if len(line_names) else np.zeros(len(names), bool)
        as_list = ids.to_pylist() if hasattr(ids, "to_pylist") else list(ids)
        copies += [(d, d, 1.0) for d in dict.fromkeys(d for d, h in zip(as_list, hit.tolist()) if h)]
    return copies + matches
