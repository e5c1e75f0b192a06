"""Near-dedup's pass is the same whole or incremental, and exactly its rule: a document is removed when it is a
near-duplicate of an earlier kept one sharing an LSH band with it. Checked against a brute-force computation of
that rule over every pair (and, on text whose pairs are far from the threshold, over every pair's exact Jaccard
with no LSH at all), on a corpus rich in near-duplicates: re-exports, chains of edits, clusters of tagged copies;
and files added one at a time, in several orders, give the whole-line pass's documents and counts."""

from __future__ import annotations

import json
import random
import shutil
import textwrap

import numpy as np
import pytest

from helpers import sample_texts, write_jsonl
from tasks.core.config.data import CorpusConfig
from tasks.core.root import open_root
from tasks.data import minhash as mh, shingles as sh
from tasks.data import near_pass as npass
from tasks.data.records import doc_id_of

T, PERM, N = 0.8, 128, 5


def reexport(text: str, i: int) -> str:
    return f"(2027-0{1 + i % 9}-1{i % 10} 재배포)\n" + "\n".join(textwrap.wrap(text, 37 + i % 7))


def edit(text: str, rng: random.Random, share: float) -> str:
    """`text` with about `share` of its words replaced: a step of a chain of edits."""
    words = text.split()
    for _ in range(max(1, int(len(words) * share))):
        words[rng.randrange(len(words))] = f"편집{rng.randrange(10_000)}"
    return " ".join(words)


def long_texts() -> list[str]:
    """The sample corpus's texts (about 200 characters each) joined three at a time: about 100 documents."""
    t = sample_texts()
    return [" ".join(t[k:k + 3]) for k in range(0, len(t) - 2, 3)]


def rich_corpus(seed: int = 0) -> list[str]:
    """Originals, re-exports of some, clusters of tagged copies (up to 12), and chains a -> b -> c where each step
    is near the last but the chain's ends are not: the case where the rule differs from taking clusters whole."""
    rng = random.Random(seed)
    base = long_texts()
    docs = list(base[:60])
    docs += [reexport(t, i) for i, t in enumerate(base[:15])]
    for k, t in enumerate(base[15:25]):
        docs += [f"[copy {c}] {t}" for c in range(2 + k)]
    for t in base[25:40]:
        a = t
        for _ in range(3):
            a = edit(a, rng, 0.04)
            docs.append(a)
    return docs


def reference(texts: list[str], order: list[int], sigs: np.ndarray, lsh: bool = True) -> set[int]:
    """The rule computed by brute force: visit `order`; a document is removed when some earlier kept document is a
    candidate of it (shares a band key; every pair, when not `lsh`) and their similarity is at least T: the
    signatures' agreement, or the exact Jaccard of their shingles (as strings) where that agreement is within
    VERIFY_MARGIN of T (always, when not `lsh`). Returns the removed documents."""
    b, r = mh.bands(T, PERM)
    keys = mh._band_keys(sigs, b, r)
    sets = {}

    def exact(i: int, j: int) -> float:
        for k in (i, j):
            if k not in sets:
                sets[k] = sh.shingles(texts[k], N)
        return len(sets[i] & sets[j]) / len(sets[i] | sets[j])

    def similarity(i: int, j: int) -> float:
        if not lsh:
            return exact(i, j)
        agree = float(np.mean(sigs[i] == sigs[j]))
        return exact(i, j) if T - mh.VERIFY_MARGIN <= agree < T + mh.VERIFY_MARGIN else agree

    kept, removed = [], set()
    for j in order:
        if any((not lsh or (keys[i] == keys[j]).any()) and similarity(i, j) >= T for i in kept):
            removed.add(j)
        else:
            kept.append(j)
    return removed


def visiting_order(ids: list[str], ranks: list[int]) -> list[int]:
    return sorted(range(len(ids)), key=lambda k: (ranks[k], ids[k]))


def test_the_pass_is_its_rule_computed_over_every_pair():
    texts = rich_corpus()
    ids = [doc_id_of(t) for t in texts]
    assert len(set(ids)) == len(ids)
    sigs = mh.signatures(texts, PERM, N, 1)
    # Three pieces, the first two older (rank 0) than the third.
    cut = [0, len(texts) // 3, 2 * len(texts) // 3, len(texts)]
    parts = [(ids[a:b], sigs[a:b]) for a, b in zip(cut, cut[1:])]
    ranks = [0, 0, 1]
    text_of = lambda p, r: texts[cut[p] + r]  # noqa: E731
    found = npass.near_duplicates(parts, ranks, T, PERM, text_of, N)
    doc_rank = [ranks[p] for p in range(3) for _ in range(cut[p + 1] - cut[p])]
    want = reference(texts, visiting_order(ids, doc_rank), sigs)
    assert len(want) > 80  # rich in near-duplicates: the comparison is not vacuous
    assert {d.doc_id for d in found} == {ids[k] for k in want}
    # The rule's guarantees: every removed document names a kept one at least T similar, kept before it.
    removed = {d.doc_id for d in found}
    assert all(d.kept_doc_id not in removed and d.similarity >= T for d in found)
    # A chain a -> b -> c: b is removed for a, and c, near b but not a, is kept (b is gone): clusters taken whole
    # (connected components) would have removed c for a document it is not near.
    chains_kept = [k for k in range(len(texts) - 45, len(texts)) if k not in want]
    assert chains_kept, "no chain kept a later link: the test does not tell the rule from components"


def test_on_text_far_from_the_threshold_the_pass_is_the_exact_jaccard_over_every_pair():
    """Tagged copies (J well above T) and different documents (well below): LSH finds every near pair, so the
    pass equals the rule computed on every pair's exact Jaccard, no LSH."""
    base = long_texts()[:40]
    texts = [f"[copy {c}] {t}" for k, t in enumerate(base) for c in range(1 + k % 6)]
    random.Random(1).shuffle(texts)
    ids = [doc_id_of(t) for t in texts]
    sigs = mh.signatures(texts, PERM, N, 1)
    found = npass.near_duplicates([(ids, sigs)], [0], T, PERM, lambda p, r: texts[r], N)
    want = reference(texts, visiting_order(ids, [0] * len(ids)), sigs, lsh=False)
    assert len(want) == len(texts) - len(base)
    assert {d.doc_id for d in found} == {ids[k] for k in want}


def test_a_cluster_costs_one_comparison_a_member():
    """k tagged copies of a document: k - 1 pairs judged (each with the kept one), not k (k - 1) / 2."""
    text = long_texts()[0]
    for k in (4, 16, 64):
        texts = [f"[copy {c}] {text}" for c in range(k)]
        stats = npass.DecideStats()
        found, _ = npass.near_duplicate_decisions([([doc_id_of(t) for t in texts], mh.signatures(texts, PERM, N, 1))],
                                               [0], T, PERM, lambda p, r: texts[r], N, stats=stats)
        assert len(found) == k - 1 and stats.judged == k - 1


def run_load(artifacts, paths, **corpus):
    from tasks.data.files import fingerprint_corpus
    from tasks.load import load, load_inputs

    cfg = CorpusConfig(paths=[str(p) for p in paths], near_dedup={"enabled": True}, **corpus)
    sources = fingerprint_corpus(cfg)
    return load.fn(**load_inputs(cfg, sources), artifacts=str(artifacts))


def outcome(artifacts, docs) -> tuple[set[str], dict]:
    kept = set(docs.index(open_root(artifacts), ["doc_id"]).column("doc_id").to_pylist())
    counts = {k: docs.counts[k] for k in ("documents", "duplicates", "near_duplicates")}
    return kept, counts


def write_files(folder, texts: list[str], n: int) -> list:
    size = -(-len(texts) // n)
    return [write_jsonl(folder / f"f{i:02d}.jsonl", [{"content": t} for t in texts[i * size:(i + 1) * size]])
            for i in range(n)]


@pytest.mark.parametrize("how", ["drops", "folder"])
def test_files_added_one_at_a_time_in_any_order_give_the_whole_lines_pass(tmp_path, how):
    """Files added one at a time (as drops: each a later corpus path; or into the folder the line reads), in
    three orders: after every addition the same documents and counts as the whole-line pass on a fresh cache;
    a drop reuses the decisions before it and judges only pairs that involve its own documents."""
    texts = rich_corpus(3)
    random.Random(4).shuffle(texts)
    files = write_files(tmp_path / "all", texts, 6)
    for trial, order in enumerate([list(range(6)), [5, 2, 0, 4, 1, 3], [3, 4, 5, 0, 1, 2]]):
        art = tmp_path / f"art-{trial}"
        folder = tmp_path / f"line-{trial}"
        paths = []
        previous_pairs = None
        for step, f in enumerate(order):
            if how == "drops":
                target = folder / f"drop-{step}" / files[f].name
                paths.append(target.parent)
            else:
                target = folder / files[f].name
                paths = [folder]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(files[f].read_bytes())
            got = run_load(art, paths)
            whole = run_load(tmp_path / f"whole-{trial}-{step}", paths)
            assert outcome(art, got) == outcome(tmp_path / f"whole-{trial}-{step}", whole), (order, step)
            passed = got.meta.near_dedup_pass
            if step:
                assert passed.previous, "the pass did not start from the line's decisions before the addition"
            state = np.load(open_root(art).entry([d for d in got.deps if "near-dedup-state" in d][0])
                            / "decisions.npz")
            names = [f"{int(x):016x}" for x in state["names"]]  # load's ids: 16 hex digits, kept as integers
            pairs = {(names[a], names[b]) for a, b in zip(state["pair_a"].tolist(), state["pair_b"].tolist())}
            if how == "drops" and previous_pairs is not None:
                new_ids = {doc_id_of(json.loads(line)["content"]) for line in target.read_text().splitlines()}
                new_pairs = pairs - previous_pairs
                assert passed.judged == len(new_pairs)
                assert all(a in new_ids or b in new_ids for a, b in new_pairs), \
                    "a drop judged a pair of two older documents"
                assert passed.reused_rows >= len(previous_names)
            previous_pairs, previous_names = pairs, names


def test_damaged_decisions_are_decided_again(tmp_path):
    """A decisions file damaged after its entry was verified (same size, other bytes) is never used: the pass
    decides again and load's output is the same."""
    texts = rich_corpus(5)
    write_files(tmp_path / "c", texts, 3)
    first = run_load(tmp_path / "art", [tmp_path / "c"])
    root = open_root(tmp_path / "art")
    (state,) = [d for d in first.deps if "near-dedup-state" in d]
    path = root.entry(state) / "decisions.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    from tasks.data import near_pieces

    assert near_pieces.near_pass.Decisions.load(path) is None
    import shutil

    shutil.rmtree(root.entry(first.path))  # load's own output gone: built again over the same decisions' key
    again = run_load(tmp_path / "art", [tmp_path / "c"])
    assert state in again.deps
    assert again.meta.near_dedup_pass.visited > 0  # decided again, not taken from the damaged file
    assert outcome(tmp_path / "art", again) == outcome(tmp_path / "art", first)


def visit_reference(keys: np.ndarray, start: int, kept_by: np.ndarray):
    """What the pass used to compute for rows `start`… from the whole line's buckets (`_Line.buckets`: a sort of
    every band's keys): rows to visit, each one's shared buckets, the kept rows before `start` per bucket. Buckets
    named by (band, key), so two numberings compare."""
    from types import SimpleNamespace

    bucket, shared = mh._Line.buckets(SimpleNamespace(keys=keys, b=keys.shape[1]))
    name = {int(bucket[x, k]): (k, int(keys[x, k])) for x in range(len(keys)) for k in range(keys.shape[1])}
    rows = np.flatnonzero(shared[start:].any(axis=1)) + start
    kept: dict = {}
    if start and len(rows):
        touched = np.unique(bucket[rows][shared[rows]])
        before = np.flatnonzero((kept_by[:start] < 0) & shared[:start].any(axis=1))
        hit = np.isin(bucket[before], touched) & shared[before]
        r, c = np.nonzero(hit)
        for x, bid in zip(before[r].tolist(), bucket[before][r, c].tolist()):
            mine = kept.setdefault(name[bid], [])
            if len(mine) < npass._BUCKET_KEPT:
                mine.append(x)
    mine_of = [[name[int(bucket[x, k])] if shared[x, k] else None for k in range(keys.shape[1])] for x in rows]
    return rows.tolist(), mine_of, kept


def visit_buckets(keys: np.ndarray, start: int, kept_by: np.ndarray):
    """`npass._visit_line_buckets` of a line whose band keys are one array (row x's keys: `keys[x]`)."""
    blocks = ((keys[lo:min(start, lo + 16)], np.arange(lo, min(start, lo + 16))) for lo in range(0, start, 16))
    return npass._visit_line_buckets(np.asarray(keys[start:]), lambda u, o: npass._rows_in_buckets(u, o, blocks, start),
                                     start, kept_by)


@pytest.mark.parametrize("spread", [3, 40, 2 ** 40])
def test_the_buckets_a_drop_visits_are_the_whole_lines(spread):
    """`_visit_line_buckets` (the rows from `start` on, the line's older rows only looked up in their buckets) gives the
    buckets, shared flags and kept rows the whole line's sort of every band gave, for every `start`: few distinct
    keys (big buckets, past _BUCKET_KEPT), many, and keys whose top bits collide."""
    rng = np.random.default_rng(spread)
    n, nb = 400, 5
    keys = rng.integers(0, spread, (n, nb)).astype(np.uint64)
    if spread == 40:
        keys = keys * np.uint64(0x9E3779B97F4A7C15)  # spread over the top bits the filter reads
    keys[250:300] = keys[150:200]  # whole rows repeated across the starts below (near-copies)
    kept_by = np.where(rng.random(n) < 0.5, -1, 0)
    for start in [0, 1, 17, 200, 399, 400]:
        rows, mine_of, kept = visit_buckets(keys, start, kept_by)
        name = {}
        for x, bids in zip(rows.tolist(), mine_of):
            for k, bid in enumerate(bids):
                if bid >= 0:
                    name[bid] = (k, int(keys[x, k]))
        got = (rows.tolist(), [[name.get(b) for b in bids] for bids in mine_of],
               {name[b]: v for b, v in kept.items()})
        assert got == visit_reference(keys, start, kept_by), start


def test_each_pair_once_is_numpys_unique():
    """`_first_of_each` (the previous pass's pairs kept sorted, the new ones merged in) gives np.unique's first
    indices: new pairs before, after, between and equal to old ones, repeated, and an unsorted head."""
    rng = np.random.default_rng(3)
    for trial in range(200):
        head = int(rng.integers(0, 30))
        old = np.unique(rng.integers(0, 60, head)) if trial % 5 else rng.integers(0, 60, head)
        code = np.concatenate([old, rng.integers(0, 60, int(rng.integers(0, 20)))]).astype(np.int64)
        got = npass._first_of_each(code, len(old))
        assert got.tolist() == np.unique(code, return_index=True)[1].tolist(), (code, len(old))


def test_ids_are_sorted_stably_whatever_their_spread():
    """`argsort_ids` is numpy's stable argsort: ids spread over 64 bits, all of one top 16 bits (the radix pass
    leaves them unsorted), repeated (ties by position), few, none, and strings."""
    rng = np.random.default_rng(5)
    cases = [rng.integers(0, 2 ** 64 - 1, 5000, dtype=np.uint64),
             (np.uint64(0xABCD) << np.uint64(48)) | rng.integers(0, 2 ** 40, 5000, dtype=np.uint64),
             rng.integers(0, 40, 5000).astype(np.uint64) << np.uint64(50),
             rng.integers(0, 2 ** 64 - 1, 50, dtype=np.uint64).repeat(60),
             rng.integers(0, 2 ** 64 - 1, 7, dtype=np.uint64), np.zeros(0, np.uint64),
             np.array([f"{x:x}" for x in rng.integers(0, 99, 2000)], dtype=str)]
    for k, ids in enumerate(cases):
        assert mh.argsort_ids(ids).tolist() == np.argsort(ids, kind="stable").tolist(), k


@pytest.mark.parametrize("kind", ["uint64", "str"])
def test_the_visiting_order_is_the_lexsorts(kind):
    """`_visiting_order` (unstable sorts, ties settled by position) gives what a stable lexsort by (rank, doc_id,
    position) and the first of each doc_id gave: ids repeated within and across pieces, ranks shared, out of order
    and far apart."""
    rng = np.random.default_rng(11)
    for trial in range(100):
        n = int(rng.integers(0, 300 if trial % 3 else 3000))  # past 1,024: `argsort_ids`' radix pass
        every = rng.integers(0, max(1, n // 3) if trial % 2 else 2 ** 62, n).astype(np.uint64)
        if kind == "str":
            every = np.array([f"{int(x):x}" for x in every], dtype=str)
        rank = rng.choice([0, 7, 3, 10 ** 6], n)
        order = np.lexsort((np.arange(n), every, rank))
        _, first = np.unique(every[order], return_index=True)
        assert mh._visiting_order(every, np.arange(n), rank).tolist() == order[np.sort(first)].tolist(), trial


@pytest.mark.parametrize("spread", [3, 2 ** 40])
def test_a_lines_buckets_read_from_its_pieces_are_those_of_its_keys_in_order(spread):
    """`decide` reads the older rows' band keys from their pieces, in piece order (`_Line.key_blocks`), not from
    the line's keys gathered into visiting order: the same rows, buckets and kept rows as `visit_buckets` over
    `line.keys`, with pieces whose rows interleave in visiting order, a doc_id in two pieces (one copy not
    visited), ranks out of piece order and blocks smaller than a piece."""
    rng = np.random.default_rng(spread)
    nb, sizes, ranks = 5, [70, 1, 120, 0, 45], [1, 0, 1, 2, 0]
    ids = [rng.choice(2 ** 20, k, replace=False).astype(np.uint64) for k in sizes]
    ids[2][:10] = ids[0][:10]  # the same documents in two pieces: visited once, in the lower-ranked one
    keys = [rng.integers(0, spread, (k, nb)).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) for k in sizes]
    keys[4][5:25] = keys[0][30:50]  # near-copies across pieces
    parts = [([f"{int(v):016x}" for v in x], np.zeros((len(x), 8), np.uint32)) for x in ids]
    line = mh._Line(parts, lambda p: ranks[p], T, 8, keys)
    assert line.names.tolist() == mh._Line(parts, lambda p: ranks[p], T, 8, keys, ids).names.tolist()
    line.b = nb
    # The same line with each piece's keys sorted (`band_lookup`, as the keys piece caches them): searched, not
    # scanned. One piece's lookup missing: scanned again (never half of each).
    searched = mh._Line(parts, lambda p: ranks[p], T, 8, keys, ids, [mh.band_lookup(k) for k in keys])
    partly = mh._Line(parts, lambda p: ranks[p], T, 8, keys, ids, [mh.band_lookup(k) for k in keys[:-1]] + [None])
    searched.b = partly.b = nb
    for start in [0, 1, 30, 100, len(line) - 1, len(line)]:
        kept_by = np.where(rng.random(len(line)) < 0.5, -1, 0)
        want = visit_buckets(line.keys, start, kept_by)
        for each in (line, searched, partly):
            got = npass._visit_line_buckets(each.keys_of(np.arange(start, len(each))),
                                            lambda u, o: npass._older_rows(each, u, o, start), start, kept_by)
            assert got[0].tolist() == want[0].tolist() and got[1] == want[1] and got[2] == want[2], start
        assert searched.older_lookups(start) is not None
    assert partly.older_lookups(len(line)) is None  # the piece without one holds visited rows: scanned


@pytest.mark.parametrize("spread", [3, 40, 2 ** 40])
def test_a_drops_buckets_searched_in_sorted_keys_are_those_the_scan_finds(spread):
    """`_rows_by_lookup` (a drop's bucket keys searched in each older piece's sorted keys) finds the rows and buckets
    `_rows_in_buckets` (one scan of the keys) finds, in the same order: big buckets, a key shared by two bands of
    one row and across pieces, visited rows out of piece order, rows not visited. A lookup that names rows or bands
    its piece cannot hold (damaged) gives fewer matches, never an index error."""
    rng = np.random.default_rng(spread)
    nb, sizes = 4, [90, 0, 60, 130]
    keys = [rng.integers(0, spread, (k, nb)).astype(np.uint64) for k in sizes]
    keys[2][:, 1] = keys[2][:, 0]  # one key in two bands of the same rows
    keys[3][10:40] = keys[0][:30]
    at = np.concatenate([rng.permutation(sum(sizes))])
    at[rng.random(len(at)) < 0.1] = -1  # a doc_id visited in another copy
    visited = np.split(at, np.cumsum(sizes)[:-1])
    new = rng.integers(0, spread, (25, nb)).astype(np.uint64)
    new[:5] = keys[3][30:35]
    uniqs, _, offsets = npass._new_buckets(new)
    for start in [0, 1, 50, 200, sum(sizes)]:
        want = npass._rows_in_buckets(uniqs, offsets, [(k, v) for k, v in zip(keys, visited)], start)
        got = npass._rows_by_lookup(uniqs, offsets, [(v, mh.band_lookup(k)) for k, v in zip(keys, visited)], start)
        assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist(), start
    assert len(want[0]) > 30
    damaged = [mh.band_lookup(k) for k in keys]
    for lookup in damaged:
        lookup[1, ::3] = np.uint64(2 ** 63 + 5)  # negative as an int64
        lookup[1, 1::3] = np.uint64(10 ** 9)  # past the piece's rows
    got = npass._rows_by_lookup(uniqs, offsets, [(v, lk) for v, lk in zip(visited, damaged)], sum(sizes))
    assert 0 < len(got[0]) < len(want[0])


def test_cached_ids_give_the_same_pass_and_bad_ones_are_not_read(tmp_path):
    """The pieces' ids cached with their band keys (a last column of the keys file) give the pass that the ids read
    from the pieces give; a keys file of another shape or kind is not read (keys from the signatures, ids from the
    doc_id column), and load's output stays the same."""
    from tasks.data import near_pieces

    texts = rich_corpus(6)
    write_files(tmp_path / "c", texts, 3)
    first = run_load(tmp_path / "art", [tmp_path / "c"])
    root = open_root(tmp_path / "art")
    cfg = CorpusConfig(paths=["x"], near_dedup={"enabled": True}).near_dedup
    b, _ = mh.bands(cfg.threshold, cfg.num_perm)
    keys = [d for d in first.deps if "near-dedup-keys" in d]
    sigs = [d for d in first.deps if "near-dedup-sig" in d]
    tables = [np.load(root.entry(k) / near_pieces.KEYS_FILE) for k in keys]
    assert keys and all(t.shape[1] == b + 1 for t in tables)
    parts = [([f"{int(x):016x}" for x in t[:, b]], np.load(root.entry(s) / near_pieces.SIGNATURES_FILE))
             for t, s in zip(tables, sigs)]
    args = ([0, 0, 1], T, PERM, None, N, None, None, None, 3)
    with_ids = npass.line_pass(parts, *args, ids=[t[:, b] for t in tables])
    without = npass.line_pass(parts, *args)
    assert with_ids[0].tolist() == without[0].tolist() and len(with_ids[0])
    assert with_ids[2].kept_by.tolist() == without[2].kept_by.tolist()

    from tasks.core.manifest import read_manifest

    entry = root.entry(keys[0])
    piece = read_manifest(entry)
    n = len(tables[0])
    got_keys, got_ids = near_pieces.keys_and_ids(piece, n, cfg, root)
    assert got_keys.shape == (n, b) and got_ids.tolist() == tables[0][:, b].tolist()
    assert near_pieces.keys_and_ids(piece, n + 1, cfg, root) == (None, None)  # not this piece's rows
    for bad in (tables[0].astype(np.int64), tables[0][:, :b - 1], tables[0][:, 0]):
        np.save(entry / near_pieces.KEYS_FILE, bad)
        assert near_pieces.keys_and_ids(piece, n, cfg, root) == (None, None)
    np.save(entry / near_pieces.KEYS_FILE, tables[0][:, :b])  # keys without ids: ids from the column
    got_keys, got_ids = near_pieces.keys_and_ids(piece, n, cfg, root)
    assert got_keys.shape == (n, b) and got_ids is None
    (entry / near_pieces.KEYS_FILE).write_bytes(b"not an array")
    assert near_pieces.keys_and_ids(piece, n, cfg, root) == (None, None)
    shutil.rmtree(root.entry(first.path))
    for k in keys:
        np.save(root.entry(k) / near_pieces.KEYS_FILE, np.zeros((3, 2), np.int64))
    state = [d for d in first.deps if "near-dedup-state" in d][0]
    shutil.rmtree(root.entry(state))  # decided again, over the unusable keys files
    again = run_load(tmp_path / "art", [tmp_path / "c"])
    assert again.meta.near_dedup_pass.visited > 0
    assert outcome(tmp_path / "art", again) == outcome(tmp_path / "art", first)


def test_a_lines_characters_are_summed_from_the_cached_counts_and_bad_files_are_not_read(tmp_path, monkeypatch):
    """Each piece's documents' characters and sorted band keys are cached with its band keys: load counts the kept
    documents' characters from them (no text read: counting from the texts is switched off here) and gets what the
    texts give; a characters or sorted-keys file of another shape or kind is not read (counted from the texts,
    scanned), and load's output stays the same."""
    import pyarrow.compute as pc

    from tasks.core.manifest import read_manifest
    from tasks.data import near_pieces, pieces
    from tasks.data.arrow import read_arrow
    from tasks.data.layout import piece_docs_file

    write_files(tmp_path / "c", rich_corpus(7), 3)

    def no_text_count(*_):
        raise AssertionError("characters counted from the texts")

    with monkeypatch.context() as m:
        m.setattr(pieces, "piece_characters", no_text_count)
        first = run_load(tmp_path / "art", [tmp_path / "c"])
    root = open_root(tmp_path / "art")
    texts = first.documents(root).column("text")
    assert first.counts["near_duplicates"] and first.counts["characters"] == sum(map(len, texts.to_pylist()))
    cfg = CorpusConfig(paths=["x"], near_dedup={"enabled": True}).near_dedup
    b, _ = mh.bands(cfg.threshold, cfg.num_perm)
    keys = [d for d in first.deps if "near-dedup-keys" in d]
    for k, part in zip(keys, first.parts):
        piece = read_manifest(root.entry(k))
        lookup, chars = (np.array(a) for a in near_pieces.lookup_and_characters(piece, part.documents, cfg, root))
        docs = read_arrow(piece_docs_file(root, part.rel))
        assert chars.tolist() == pc.utf8_length(docs.column("text")).to_pylist()
        band_keys = np.load(root.entry(k) / near_pieces.KEYS_FILE)[:, :b]
        assert lookup.shape == (2, part.documents * b) and bool(np.all(lookup[0][1:] >= lookup[0][:-1]))
        assert band_keys.reshape(-1)[lookup[1].astype(np.int64)].tolist() == lookup[0].tolist()
        assert near_pieces.lookup_and_characters(piece, part.documents + 1, cfg, root) == (None, None)
        for name, bad in ((near_pieces.CHARACTERS_FILE, chars.astype(np.int32)),
                          (near_pieces.LOOKUP_FILE, lookup[:, :-1])):
            np.save(root.entry(k) / name, bad)
        assert near_pieces.lookup_and_characters(piece, part.documents, cfg, root) == (None, None)
    shutil.rmtree(root.entry(first.path))
    shutil.rmtree(root.entry([d for d in first.deps if "near-dedup-state" in d][0]))
    again = run_load(tmp_path / "art", [tmp_path / "c"])  # counted from the texts, the line's keys scanned
    assert again.meta.near_dedup_pass.visited > 0
    assert outcome(tmp_path / "art", again) == outcome(tmp_path / "art", first)
    assert again.counts["characters"] == first.counts["characters"]


def cross_reference(line, older: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The drop gate's candidate pairs as they were computed: every band's older keys sorted, each other row's
    key searched in them, the earliest _BUCKET_KEPT older rows of its bucket taken."""
    old_rows, new_rows = np.flatnonzero(older), np.flatnonzero(~older)
    codes, n = [], len(line)
    for band in range(line.b):
        okeys = line.keys[old_rows, band]
        order = np.argsort(okeys, kind="stable")
        sorted_keys = okeys[order]
        nkeys = line.keys[new_rows, band]
        lo = np.searchsorted(sorted_keys, nkeys, "left")
        hi = np.minimum(np.searchsorted(sorted_keys, nkeys, "right"), lo + npass._BUCKET_KEPT)
        count = hi - lo
        j = np.repeat(new_rows, count)
        offsets = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        codes.append(j * n + old_rows[order[np.repeat(lo, count) + offsets]])
    code = np.unique(np.concatenate(codes))
    return code % n, code // n


@pytest.mark.parametrize("spread", [2, 30, 2 ** 40])
def test_the_drop_gates_candidates_are_those_of_the_lines_keys_sorted(spread):
    """`_cross_candidates` (the drop's buckets numbered, the line's keys looked up in them, piece by piece) gives
    the pairs the per-band sort of the line's keys gave: buckets far past _BUCKET_KEPT, few, many and none shared,
    line pieces interleaving in the line's order, a doc_id in two line pieces, a drop row that is a line row."""
    rng = np.random.default_rng(spread)
    nb, sizes = 4, [150, 3, 90, 40, 25]  # three line pieces, then two drop pieces
    ids = [rng.choice(2 ** 30, k, replace=False).astype(np.uint64) for k in sizes]
    ids[2][:8] = ids[0][:8]
    ids[4][:3] = ids[1][:3]  # in the line already: visited in the line's piece
    keys = [rng.integers(0, spread, (k, nb)).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) for k in sizes]
    keys[3][:10] = keys[0][20:30]
    parts = [([f"{int(v):016x}" for v in x], np.zeros((len(x), 8), np.uint32)) for x in ids]
    line = mh._Line(parts, lambda p: int(p >= 3), T, 8, keys)
    line.b = nb
    older = line.part < 3
    got, want = npass._cross_candidates(line, older), cross_reference(line, older)
    assert len(want[0]) and got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()


def test_a_drop_copy_of_a_line_document_is_found_whatever_the_ids_kind():
    """An exact copy is a match of similarity 1 when the line's ids are load's (integers) and when some are not
    (strings): a drop id as an integer is compared as its 16 hex digits, not as a decimal number."""
    rng = np.random.default_rng(2)
    sigs = rng.integers(0, 2 ** 32, (6, 64), dtype=np.uint32)
    hexes = [f"{int(x):016x}" for x in rng.integers(0, 2 ** 62, 4)]
    for line_ids in (hexes[:3], ["a-tool's-id", *hexes[1:3]]):
        line = [(line_ids, sigs[:3])]
        drop = [([hexes[2], hexes[3]], sigs[4:6])]  # the copy's signature unlike its line one's: found by its id
        got = npass.drop_matches(line, drop, 0.8, 64)
        assert got == [(hexes[2], hexes[2], 1.0)], (line_ids, got)
        # and the pass over line and drop visits that doc_id once, in the line's piece
        line_of = mh._Line([*line, *drop], lambda p: p, 0.8, 64)
        assert len(line_of) == 4 and line_of.part.tolist().count(1) == 1, line_of.names
