"""Near-duplicates across a line's drops are removed (the older document kept, stably), the drop gate counts
them, settings never re-read files and off changes nothing; decontamination keeps held-out text out of training."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pyarrow as pa
import pytest

from helpers import sample_texts, write_jsonl
from tasks.data import contamination as ct, minhash as mh, shingles as sh
from tasks.data import near_pass as npass
from tasks.data.arrow import read_arrow
from tasks.core.config.data import CorpusConfig, DecontaminateConfig, NearDedupConfig, ShuffleConfig, SplitConfig
from tasks.core.root import open_root
from tasks.data.records import doc_id_of

ON = {"near_dedup": {"enabled": True}}


def reexport(text: str, i: int) -> str:
    """The same document exported again: a new date line and other line wrapping."""
    return f"(2027-0{1 + i % 9}-1{i % 10} 재배포)\n" + "\n".join(textwrap.wrap(text, 37 + i % 7))


def run_load(artifacts, paths, **corpus):
    from tasks.data.files import fingerprint_corpus
    from tasks.load import load, load_inputs

    cfg = CorpusConfig(paths=[str(p) for p in paths], **corpus)
    sources = fingerprint_corpus(cfg)
    return load.fn(**load_inputs(cfg, sources), artifacts=str(artifacts))


def kept_ids(artifacts, docs) -> set[str]:
    return set(docs.index(open_root(artifacts), ["doc_id"]).column("doc_id").to_pylist())


@pytest.fixture
def texts():
    return sample_texts()


def test_a_reexport_is_found_and_the_older_document_kept(texts):
    originals = texts[:30]
    copies = [reexport(t, i) for i, t in enumerate(originals[:10])]
    sig = lambda ts: mh.signatures(ts, 128, 5, 1)  # noqa: E731
    # The re-exports have the smaller doc_ids and come first in the list: still the older part (rank 0) wins.
    ids = [f"z{i:02d}" for i in range(30)], [f"a{i:02d}" for i in range(10)]
    found = npass.near_duplicates([(ids[1], sig(copies)), (ids[0], sig(originals))], [1, 0], 0.8, 128)
    assert sorted(d.doc_id for d in found) == ids[1]
    assert all(d.kept_doc_id == "z" + d.doc_id[1:] for d in found)


def test_a_reexported_drop_is_removed_in_load_and_a_kept_document_stays_kept(tmp_path, texts):
    art = tmp_path / "art"
    write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"content": t} for t in texts[:100]])
    # Drop 1: 20 re-exports of old documents and 20 new ones; drop 2: re-exports of drop 1's new ones.
    write_jsonl(tmp_path / "d1" / "d.jsonl", [{"content": reexport(t, i)} for i, t in enumerate(texts[:20])]
                + [{"content": t} for t in texts[100:120]])
    write_jsonl(tmp_path / "d2" / "d.jsonl", [{"content": reexport(t, i + 3)} for i, t in enumerate(texts[100:120])]
                + [{"content": t} for t in texts[120:130]])
    first = run_load(art, [tmp_path / "corpus"], **ON)
    second = run_load(art, [tmp_path / "corpus", tmp_path / "d1"], **ON)
    third = run_load(art, [tmp_path / "corpus", tmp_path / "d1", tmp_path / "d2"], **ON)
    assert second.counts["near_duplicates"] >= 19  # ≥ 95% of the planted re-exports
    said = second.summary(open_root(art))[0][1]
    assert f"{second.counts['near_duplicates']} near-duplicates" in said, said  # the stage's log line says so
    assert third.counts["near_duplicates"] - second.counts["near_duplicates"] >= 19
    assert {p.name.split("/")[-2]: p.near_duplicates for p in third.parts}["d2"] >= 19
    for before, after in ((first, second), (second, third)):
        assert kept_ids(art, before) <= kept_ids(art, after)  # a document kept once is kept in the next run
    assert third.meta.near_duplicate_samples[0]["kept"]["text"]


def test_settings_never_reread_files_and_off_is_todays_output(tmp_path, texts):
    art = tmp_path / "art"
    write_jsonl(tmp_path / "c" / "a.jsonl", [{"content": t} for t in texts[:40]] +
                [{"content": reexport(t, i)} for i, t in enumerate(texts[:5])])
    off = run_load(art, [tmp_path / "c"], near_dedup={"enabled": False})
    default_off = run_load(art, [tmp_path / "c"], near_dedup={"enabled": False, "threshold": 0.5})
    assert default_off.key == off.key and default_off.content == off.content  # off: no setting enters a key
    on = run_load(art, [tmp_path / "c"], **ON)
    other = run_load(art, [tmp_path / "c"], near_dedup={"enabled": True, "threshold": 0.7})
    assert on.counts["files_read"] == 0 and other.counts["files_read"] == 0  # the pieces are reused
    assert len({off.content, on.content, other.content}) == 3
    assert on.counts["near_duplicates"] == 5 and "near_duplicates" not in off.counts
    assert on.counts["documents"] == off.counts["documents"] - 5


def test_the_drop_gate_rejects_a_reexported_drop_as_duplicates(tmp_path, texts, tiny_model):
    from tasks.core.config.tree import validate_config
    from tasks.core.manifest import hash_file
    from tasks.line.drop_gate import near_duplicate_pairs, profile_drop
    from tasks.data.files import resolve_corpus_files
    from tasks.tokenize import resolve_tokenizer

    write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"content": t} for t in texts[:80]])
    drop = write_jsonl(tmp_path / "drop" / "d.jsonl", [{"content": reexport(t, i)} for i, t in enumerate(texts[:40])]
                       + [{"content": t} for t in texts[80:84]])
    cfg = validate_config({"corpus": {"paths": [str(tmp_path / "corpus")], **ON}, "model": {"id": str(tiny_model)},
                           "push": {"name": "m"}})
    profile = profile_drop([drop], resolve_corpus_files(cfg.corpus), cfg, resolve_tokenizer(cfg.model),
                           open_root(tmp_path / "art"), hash_file)
    assert profile["duplicates_in_line"] == 0 and profile["near_duplicates"] >= 38
    assert not profile["passed"] and "near-duplicates" in "; ".join(profile["reasons"])
    pairs = near_duplicate_pairs(str(drop.parent), profile)
    assert "| similarity | drop | line |" in pairs and "재배포" in pairs
    samples = profile["near_duplicate_samples"]  # each side's text, read from the tables the gate opened once
    assert samples and all(s["drop"]["text"] and s["line"]["text"] for s in samples)
    assert all("재배포" in s["drop"]["text"] and "재배포" not in s["line"]["text"] for s in samples)


def shuffle_with(tmp_path, texts, held_out_texts=None, enabled=True):
    from tasks.held_out import held_out
    from tasks.shuffle import shuffle

    art = tmp_path / "art"
    docs = run_load(art, [write_jsonl(tmp_path / "c" / "a.jsonl", [{"content": t} for t in texts])])
    general = run_load(art, [write_jsonl(tmp_path / "g" / "g.jsonl", [{"content": t} for t in held_out_texts])]) \
        if held_out_texts else None
    held = held_out.fn(general=general, tasks=[], task_files=None, artifacts=str(art)) if general else None
    out = shuffle.fn(shuffle=ShuffleConfig(decontaminate=DecontaminateConfig(enabled=enabled)),
                     split=SplitConfig(validation_fraction=0.2), docs=docs, held_out=held, artifacts=str(art))
    root = open_root(art)
    table = docs.documents(root)
    text_of = dict(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()))
    split = {s: [text_of[d] for d in read_arrow(out.split_file(root, s)).column("doc_id").to_pylist()]
             for s in ("train", "validation")}
    return out, split


def test_a_planted_validation_paragraph_never_reaches_training(tmp_path, texts):
    base = texts[:120]
    _, split = shuffle_with(tmp_path / "probe", base, enabled=False)
    paragraph = split["validation"][0]
    # Training documents quoting the validation paragraph inside other text (re-wrapped, in a longer one).
    planted = [f"{texts[200 + i]}\n\n" + "\n".join(textwrap.wrap(paragraph, 30 + i)) + f"\n\n{texts[210 + i]}"
               for i in range(3)]
    english = "the quick brown fox jumps over the lazy dog while the band plays a slow waltz in the park tonight"
    general = [f"An evaluation passage: {english}."]
    out, split = shuffle_with(tmp_path / "run", base + planted + [f"Some notes. {english.upper()} and more."],
                              held_out_texts=general)
    assert paragraph in split["validation"]  # validation is never changed
    assert not any(paragraph[:60] in " ".join(t.split()) for t in split["train"])
    assert not set(planted) & set(split["train"])
    in_validation = len(set(planted) & set(split["validation"]))  # a planted document may draw validation itself
    assert out.counts["decontaminated_by_validation_split"] >= 3 - in_validation > 0
    assert out.counts["decontaminated_by_evaluate_general_corpus"] == 1
    assert not any("quick brown fox" in t.lower() for t in split["train"])


def test_decontamination_off_is_todays_split(tmp_path, texts):
    from tasks.shuffle import shuffle

    art = tmp_path / "art"
    docs = run_load(art, [write_jsonl(tmp_path / "c" / "a.jsonl", [{"content": t} for t in texts[:50]])])
    a = shuffle.fn(shuffle=ShuffleConfig(), split=SplitConfig(validation_fraction=0.2), docs=docs, artifacts=str(art))
    b = shuffle.fn(shuffle=ShuffleConfig(decontaminate=DecontaminateConfig(min_words=20)),
                   split=SplitConfig(validation_fraction=0.2), docs=docs, artifacts=str(art))
    assert a.key == b.key and "decontaminated" not in a.counts


def test_contamination_index_finds_spans_of_the_configured_length_only():
    index = ct.ContaminationIndex(min_words=13, min_chars=50)
    words = [f"w{i}" for i in range(40)]
    index.add(" ".join(words), "validation split")
    for start in range(0, 20):
        assert index.match("x y " + " ".join(words[start:start + 13]) + " z") == "validation split", start
    assert index.match(" ".join(words[5:10]) + " q " + " ".join(words[10:15])) is None
    korean = "가나다라마바사아자차카타파하" * 6
    index.add(korean, "validation split")
    assert index.match("앞부분 " + korean[7:57] + " 뒷부분") == "validation split"
    assert index.match("앞부분 " + korean[7:27] + " 뒷부분") is None


def test_near_dedup_config_is_checked():
    from tasks.core.config.base import ConfigError
    from tasks.core.config.tree import load_config

    with pytest.raises(ConfigError, match="corpus.near_dedup.threshold"):
        load_config(None, ["corpus.paths=[a]", "model.id=m", "corpus.near_dedup.threshold=1.5"])
    assert NearDedupConfig(enabled=False).key_material() == {"enabled": False}
    assert "near_dedup" not in CorpusConfig(near_dedup={"enabled": False}).key_material()  # off: the keys of before
    assert NearDedupConfig().enabled  # on by default (bench.near_dedup: under half the cold load's seconds)
    assert "decontaminate" not in ShuffleConfig().key_material()


def edited(text: str, rng: np.random.Generator, share: float) -> str:
    """`text` with about `share` of its characters replaced, in runs of 8."""
    chars = list(text)
    for start in rng.choice(len(chars) - 8, int(len(chars) * share / 8), replace=False):
        chars[start:start + 8] = rng.choice(list("가나다라마바사아자차카타파하"), 8)
    return "".join(chars)


def test_pairs_below_the_threshold_are_not_near_duplicates(texts):
    """Candidates LSH proposes are verified on the signatures: pairs of J 0.5-0.7 (some of which share a band:
    the bands favour recall) are not near-duplicates at 0.8."""
    rng = np.random.default_rng(0)
    docs = [" ".join(texts[i:i + 3]) for i in range(0, 240, 3)]
    far = [edited(d, rng, 0.17) for d in docs]
    jac = [mh.exact_jaccard(sh.shingles(a, 5), sh.shingles(b, 5)) for a, b in zip(docs, far)]
    assert 0.5 < min(jac) and max(jac) < 0.7
    ids = [f"a{i:03d}" for i in range(len(docs))], [f"b{i:03d}" for i in range(len(docs))]
    parts = [(ids[0], mh.signatures(docs, 128, 5, 1)), (ids[1], mh.signatures(far, 128, 5, 1))]
    found = npass.near_duplicates(parts, [0, 1], 0.8, 128)
    assert not found, [(d.doc_id, jac[int(d.doc_id[1:])]) for d in found]


def test_with_the_texts_candidates_are_checked_on_their_exact_jaccard(texts):
    """Pairs of J 0.69-0.77: MinHash's estimate puts some at ≥ 0.8, the exact check on the shingles none."""
    rng = np.random.default_rng(0)
    docs = [" ".join(texts[i:i + 3]) for i in range(0, 240, 3)]
    far = [edited(d, rng, 0.12) for d in docs]
    jac = [mh.exact_jaccard(sh.shingles(a, 5), sh.shingles(b, 5)) for a, b in zip(docs, far)]
    assert 0.65 < min(jac) and max(jac) < 0.78
    ids = [f"a{i:03d}" for i in range(len(docs))], [f"b{i:03d}" for i in range(len(docs))]
    parts = [(ids[0], mh.signatures(docs, 128, 5, 1)), (ids[1], mh.signatures(far, 128, 5, 1))]
    assert npass.near_duplicates(parts, [0, 1], 0.8, 128)  # the estimate alone errs here
    assert not npass.near_duplicates(parts, [0, 1], 0.8, 128, lambda p, r: (docs, far)[p][r], 5)


# Texts that meet at their edges with whitespace (a batch hashes them in one row), other Unicode spaces, a text
# shorter than the n-gram, İ (lower-cases to two characters), a final Σ, compatibility characters (ㆍ, ？, ①) and
# a Hangul syllable followed by a trailing consonant jamo (NFKC composes them into one syllable).
EDGES = ["  앞 공백과 뒤 공백  ", "\n\n둘째\t문서\u3000끝\n", "ab", "", "   ", "x\u2028y\x1c z\x85w",
         "İSTANBUL ΟΔΟΣ ＡＢＣ？", "법률ㆍ시행령 ① 가\u11a8", "e\u0301 \u00a8 ﬁ", "a\x00b  c", "마지막"]


def test_batched_shingling_is_normalise_then_character_ngrams(texts):
    """Texts are shingled in batches on their code points; each text's shingles are still exactly those of
    `normalise` (NFKC, lower-case, str.split's whitespace) and its own: nothing of a neighbour in the batch."""
    batch = EDGES + texts[:40]
    cps, lens = sh.normalised_codepoints(batch)
    ends = np.cumsum(lens)
    got = [cps[e - m:e].tobytes().decode("utf-32-le") for e, m in zip(ends.tolist(), lens.tolist())]
    assert got == [sh.normalise(t) for t in batch]
    for t in batch:
        if sh.normalise(t):
            assert len(np.unique(sh.shingle_hashes(t, 5))) == len(sh.shingles(t, 5)), t
    one_by_one = np.concatenate([mh.signatures([t], 64, 5, 1) for t in batch])
    assert np.array_equal(mh.signatures(batch, 64, 5, 1), one_by_one)


def test_the_band_choice_is_datasketchs():
    from datasketch.lsh import _optimal_param

    for num_perm in (64, 128):
        for threshold in (0.5, 0.7, 0.8, 0.9):
            assert mh.bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.1, 0.9)


def test_every_member_of_a_band_bucket_is_paired_with_those_before_it():
    """Candidates of a bucket of k documents: every pair (up to _BUCKET_PAIRS before each), not only neighbours."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**32, (3, 128), dtype=np.uint32)
    sigs = rng.integers(0, 2**32, (12, 128), dtype=np.uint32)
    for row, source in ((1, 0), (4, 0), (7, 0), (9, 0), (2, 1), (11, 1)):
        sigs[row] = base[source]
        sigs[row, 120:] = rng.integers(0, 2**32, 8, dtype=np.uint32)  # the same but for the last band's rows
    i, j, sim = mh.similar_pairs(sigs, 0.8)
    assert sorted(zip(i.tolist(), j.tolist())) == [(1, 4), (1, 7), (1, 9), (2, 11), (4, 7), (4, 9), (7, 9)]
    assert np.allclose(sim, 120 / 128)


def test_gram_hashes_are_the_polynomial_of_each_window_across_blocks():
    # Prefixes are computed a block at a time: windows across a block's edge, and longer than a block, too.
    v = np.random.default_rng(0).integers(1, 1 << 20, size=3 * ct._BLOCK).astype(np.uint64)
    starts = np.array([0, 5, ct._BLOCK - 6, ct._BLOCK, 2 * ct._BLOCK + 7])
    ends = starts + np.array([ct._BLOCK + 9, 10, 12, 3, 100])
    m = ct._GRAM_MULT
    for s, e, h in zip(starts, ends, ct._window_hashes(v, starts, ends)):
        ref = 0
        for x in v[s:e].tolist():
            ref = (ref * m + x) % (1 << 64)
        assert int(h) == ref, (s, e)


def test_a_planted_task_document_never_reaches_training(tmp_path, texts):
    """A local lm-eval task (cpt make-cloze-task's YAML + JSON lines) is read from its data file: a training
    document quoting one of its sentences is removed and counted under the task's name."""
    from tasks.core.config.model import EvaluateConfig
    from tasks.evaluate import task_fingerprint, write_cloze_task
    from tasks.held_out import held_out
    from tasks.shuffle import shuffle

    yaml_file = write_cloze_task(texts[250:290], tmp_path / "tasks", "planted_cloze", n=20)
    items = [json.loads(x) for x in (tmp_path / "tasks" / "planted_cloze.jsonl").read_text().splitlines()]
    quoted = max((c for it in items for c in it["choices"]), key=len)
    assert len(quoted) >= 60
    planted = f"{texts[200]}\n{quoted}\n{texts[201]}"
    art = tmp_path / "art"
    docs = run_load(art, [write_jsonl(tmp_path / "c" / "a.jsonl", [{"content": t} for t in texts[:120] + [planted]])])
    tasks = [str(yaml_file)]
    held = held_out.fn(general=None, tasks=tasks, task_files=task_fingerprint(EvaluateConfig(tasks=tasks)),
                       artifacts=str(art))
    assert held.counts["documents_from_evaluate_tasks_planted_cloze"] == len(items)
    assert held.counts["tasks_not_checked"] == 0
    out = shuffle.fn(shuffle=ShuffleConfig(decontaminate=DecontaminateConfig(enabled=True)),
                     split=SplitConfig(validation_fraction=0.1), docs=docs, held_out=held, artifacts=str(art))
    root = open_root(art)
    table = docs.documents(root)
    text_of = dict(zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()))
    train = [text_of[d] for d in read_arrow(out.split_file(root, "train")).column("doc_id").to_pylist()]
    validation = [text_of[d] for d in read_arrow(out.split_file(root, "validation")).column("doc_id").to_pylist()]
    assert planted not in train
    if planted not in validation:  # a planted document may draw validation itself: never changed
        assert out.counts["decontaminated_by_evaluate_tasks_planted_cloze"] >= 1
    # The task's content is the held-out stage's, and so in shuffle's key: an edited task data file is another
    # key; decontamination off, none of it is.
    data = tmp_path / "tasks" / "planted_cloze.jsonl"
    data.write_text(data.read_text() + json.dumps({**items[0], "context": "새 문항의 문맥입니다."}) + "\n")
    edited = held_out.fn(general=None, tasks=tasks, task_files=task_fingerprint(EvaluateConfig(tasks=tasks)),
                         artifacts=str(art))
    assert edited.content != held.content
    cfg = ShuffleConfig(decontaminate=DecontaminateConfig(enabled=True))
    keys = {shuffle.fn(shuffle=c, split=SplitConfig(validation_fraction=0.1), docs=docs, held_out=h,
                       artifacts=str(art)).key for c, h in ((cfg, held), (cfg, edited))}
    assert len(keys) == 2


@pytest.mark.slow  # lm-eval's TaskManager indexes its registry (15-20 s)
def test_a_task_whose_data_is_not_at_hand_is_reported_not_checked(tmp_path, texts):
    from tasks.held_out import held_out

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "remote.yaml").write_text(
        "task: remote_only\ndataset_path: cpt-test-org/no-such-dataset\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n"
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    out = held_out.fn(general=None, tasks=[str(tmp_path / "t" / "remote.yaml")], task_files=None,
                      artifacts=str(tmp_path / "art"))
    assert out.counts["tasks_not_checked"] == 1 and "remote_only" in out.meta.tasks_not_checked
    assert any("remote_only" in line and "NOT checked" in line for _, line in out.summary(open_root(tmp_path / "art")))


def test_reordered_paths_over_the_same_files_change_the_keep_choice_and_the_key(tmp_path, texts):
    """Which copy is kept follows corpus.paths' order (the line's older entry): the same files listed the other
    way round keep the other copy, under another key, never the cached choice of the first order."""
    art = tmp_path / "art"
    write_jsonl(tmp_path / "a" / "a.jsonl", [{"content": t} for t in texts[:30]])
    write_jsonl(tmp_path / "b" / "b.jsonl", [{"content": reexport(t, i)} for i, t in enumerate(texts[:10])])
    ab = run_load(art, [tmp_path / "a", tmp_path / "b"], **ON)
    ba = run_load(art, [tmp_path / "b", tmp_path / "a"], **ON)
    assert ab.key != ba.key and ab.content != ba.content
    originals = {doc_id_of(t) for t in texts[:10]}
    assert not originals - kept_ids(art, ab)  # a first: its documents kept
    assert originals & kept_ids(art, ba) == set()  # b first: its re-exports kept, a's originals removed
    assert ab.counts["near_duplicates"] == ba.counts["near_duplicates"] >= 9


def test_side_by_side_grams_hash_as_every_gram_does():
    """A training text's check takes grams side by side (a reshape); they must equal the held-out side's
    grams at those positions, in both units."""
    text = sh.normalise(" ".join(sample_texts()[:3]) + " the quick brown fox jumps over the lazy dog " * 5)
    cps = ct._codes(text)
    for unit, g in (("c", 25), ("w", 6)):
        every = ct._gram_hashes(cps, unit, g)
        assert np.array_equal(ct._gram_hashes(cps, unit, g, g), every[::g]), unit


def test_decontamination_in_small_batches_removes_the_same_rows(texts):
    """Training texts are checked a batch at a time: every batch size removes the same rows, counted alike."""
    from tasks.shuffle import decontaminate

    held = [(texts[300], "evaluate.general_corpus"), (texts[301], "evaluate.tasks t")]
    train = list(texts[:60])
    for i, src in ((5, 300), (33, 301), (59, 300)):
        train[i] = f"{train[i]}\n{texts[src][10:100]}"
    rows = np.arange(60)[::-1].copy()  # rows in another order than the texts': the batch offsets must hold
    cfg = DecontaminateConfig(enabled=True)
    results = [decontaminate(rows, train.__getitem__, np.array([], np.int64), held, cfg, batch_chars=b)
               for b in (1 << 24, 1, 700)]
    for keep, matched in results:
        assert sorted(set(range(60)) - set(keep.tolist())) == [5, 33, 59]
        assert matched == {"evaluate.general_corpus": 2, "evaluate.tasks t": 1}
        assert keep.tolist() == [r for r in rows.tolist() if r not in (5, 33, 59)]  # the order kept


def _numpy_hashes(batch, n):
    cps, lens = sh.normalised_codepoints(batch)
    return sh._hash_batch(cps, lens, n), lens


@pytest.fixture
def native():
    """tasks/_shingle.c, built by the install where a C compiler is at hand (CI exports CPT_REQUIRE_NATIVE=1,
    so there it must be)."""
    import os

    mod = sh._native()
    if mod is None:
        assert not os.environ.get("CPT_REQUIRE_NATIVE"), "tasks._shingle was not built (pip install -e . builds it)"
        pytest.skip("tasks._shingle not built (no C compiler at install): the numpy path is used and tested")
    return mod


def _awkward_texts() -> list[str]:
    """Every BMP character the fold table does not map to itself (expansions, compatibility forms, capitals,
    what NFKC may compose: each such text goes to Python), each between neighbours it could combine with."""
    strict = sh._fold_table()[0]
    odd = [chr(c) for c in range(0x10000) if strict[c] != c and not 0xD800 <= c < 0xE000]
    around = ["a", "가", "ᄀ", "\u0301", " ", "Σ", "e", "ㄱ"]
    return ["".join(f"{around[i % len(around)]}{ch}{around[(i * 3 + 1) % len(around)]}{ch} "
                    for i, ch in enumerate(odd[k:k + 40])) for k in range(0, len(odd), 40)]


def test_the_c_kernel_hashes_exactly_what_the_numpy_path_does(native, texts):
    """The one compiled piece gives the same hashes, lengths and signatures as normalise's numpy path, on the
    edge texts, real corpus text, and every character its table folds, whatever it sits beside; from Python
    strings and from Arrow's UTF-8 (chunked, sliced, large_string, nulls as empty texts)."""
    # Sequences NFKC composes across characters: compatibility and conjoining jamo (L + V, LV + T), a letter and
    # its marks in another order, Indic vowel signs that are starters, expansions before a mark.
    composing = ["ㄱㅏ", "각", "각", "가ㄱㅏㅇ", "ㅎㅏㄴ", "e\u0301", "ö\u0323", "Å\u0301 x", "\u0b47\u0b3e",
                 "\u09c7\u09be", "ΣΑ Σ. σ", "ΟΔΟΣ ΚΑΙ", "ﬁ\u0301", "㎡\u0301", "\u1100\u1161\u11a8\u11a8"]
    batches = [EDGES, composing, texts[:60], _awkward_texts(),
               ["\U0001F600 x 𝐀𝐁 \U00011099\U000110BA ㎡㎢ ™ ﷺ Σσς"]]
    for batch in batches:
        for n in (1, 3, 5, 9):
            h, lens = sh._shingle_batch(batch, n)
            want, want_lens = _numpy_hashes(batch, n)
            assert np.array_equal(lens, want_lens) and np.array_equal(h, want), (n, batch[:2])
            arrow_h, arrow_lens = sh._shingle_batch(pa.array(batch), n)
            assert np.array_equal(arrow_lens, want_lens) and np.array_equal(arrow_h, want)
    as_list = texts[:30] + texts[35:75]
    for kind in (pa.string(), pa.large_string()):
        column = pa.chunked_array([pa.array(texts[:30], kind), pa.array(texts[30:80], kind).slice(5, 40)])
        assert np.array_equal(mh.signatures(column, 64, 5, 1), mh.signatures(as_list, 64, 5, 1))
    with_null = pa.array(["가나다라마", None, "abc def"])
    assert np.array_equal(mh.signatures(with_null, 64, 5, 1), mh.signatures(["가나다라마", "", "abc def"], 64, 5, 1))


def test_the_fold_table_is_normalise_on_texts_of_its_own_characters(native):
    """Where the table folds a character on its own (no Python), a text of such characters in any order is
    normalised exactly as `normalise` does: NFKC composes nothing across them and lower-casing needs no
    context. Random texts over every such BMP character, the awkward ones (mapped, expanded) over-weighted."""
    import random

    strict = sh._fold_table()[0]
    simple = [c for c in range(0x10000) if strict[c] != sh._COMPLEX]
    mapped = [chr(c) for c in simple if strict[c] != c]
    simple = [chr(c) for c in simple]
    rng = random.Random(7)
    batch = ["".join(rng.choice(mapped if rng.random() < 0.5 else simple) for _ in range(rng.randint(1, 30)))
             for _ in range(3000)]
    h, lens = sh._shingle_batch(batch, 3)
    assert (lens >= 0).all()
    want, want_lens = _numpy_hashes(batch, 3)
    assert np.array_equal(lens, want_lens) and np.array_equal(h, want)


def test_without_the_c_kernel_signatures_are_the_same(texts, monkeypatch):
    """An install without a C compiler takes the numpy path: the same signatures, so the same cached pieces."""
    column = pa.array(texts[:50])
    fast = mh.signatures(column, 64, 5, 1)
    monkeypatch.setattr(sh, "_native", lambda: None)
    monkeypatch.setattr(mh, "_native", lambda: None)  # minhash holds its own reference
    assert np.array_equal(mh.signatures(column, 64, 5, 1), fast)
    assert np.array_equal(mh.signatures(texts[:50], 64, 5, 1), fast)


class _Watched:
    """Signatures that say how many rows any one read took, and refuse to be read whole."""

    def __init__(self, sigs: np.ndarray):
        self.sigs, self.widest = sigs, 0

    def reshape(self, *shape):
        return self

    def __len__(self) -> int:
        return len(self.sigs)

    def __getitem__(self, k):
        out = self.sigs[k]
        self.widest = max(self.widest, len(out))
        return out

    def __array__(self, *a, **k):
        raise AssertionError("the whole signature matrix was read")


def test_the_lsh_reads_signatures_a_block_at_a_time_and_ids_from_arrow(tmp_path, monkeypatch):
    """A line's signatures stay in their (memory-mapped) files: band keys and candidate checks read a block of
    rows at a time, never the whole matrix; ids come as load's Arrow columns. The same removals as with the
    signatures in memory and the ids as strings."""
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2 ** 32, size=(3000, 64), dtype=np.uint32)
    parts = []
    for p in range(3):
        sig = rng.integers(0, 2 ** 32, size=(3000, 64), dtype=np.uint32)
        if p:
            sig[:300] = base[:300]
            sig[:300, :3] = rng.integers(0, 2 ** 32, size=(300, 3), dtype=np.uint32)  # J ≈ 0.95
        else:
            sig = base
        ids = [f"{int(x):016x}" for x in rng.integers(0, 2 ** 63, size=3000)]
        np.save(tmp_path / f"{p}.npy", sig)
        parts.append((ids, sig))
    want = npass.near_duplicates(parts, [0, 1, 2], 0.8, 64)
    assert len(want) == 600
    monkeypatch.setattr(mh, "_BLOCK", 500)
    watched = [_Watched(np.load(tmp_path / f"{p}.npy", mmap_mode="r")) for p in range(3)]
    got = npass.near_duplicates([(pa.array(ids), w) for (ids, _), w in zip(parts, watched)], [0, 1, 2], 0.8, 64)
    assert got == want
    assert all(0 < w.widest <= 500 for w in watched)
    line = [(pa.array(parts[0][0]), watched[0])]
    drop = [(pa.array(parts[1][0][:400] + parts[0][0][:5]), _Watched(np.load(tmp_path / "1.npy")[:405]))]
    matches = npass.drop_matches(line, drop, 0.8, 64)
    assert matches == npass.drop_matches([(parts[0][0], base)], [(parts[1][0][:400] + parts[0][0][:5],
                                                              np.load(tmp_path / "1.npy")[:405])], 0.8, 64)
    assert len(matches) == 305 and matches[0][2] == 1.0  # 300 near copies, 5 exact ones first


def test_sortable_ids_keep_the_strings_order():
    ids = [f"{x:016x}" for x in np.random.default_rng(1).integers(0, 2 ** 63, size=500)] + ["0" * 16, "f" * 16]
    for given in (ids, pa.array(ids), pa.chunked_array([pa.array(ids[:100]), pa.array(ids[100:])])):
        got = mh.sortable_ids(given)
        assert got.dtype == np.uint64 and np.argsort(got, kind="stable").tolist() == sorted(range(len(ids)),
                                                                                           key=ids.__getitem__)
    other = ["b", "a", "ABCDEF0123456789", "abcdef012345678g"]
    assert mh.sortable_ids(other).tolist() == other and mh.sortable_ids(pa.array(other)).tolist() == other


def test_the_fold_table_is_kept_per_machine_and_checked(tmp_path, monkeypatch):
    """The table is built once a machine and read back after its digest is checked: a damaged or altered file
    is built again, never used."""
    monkeypatch.setenv("CPT_CACHE_HOME", str(tmp_path))
    built = sh._build_fold_table()

    def fresh():
        sh._fold_table.cache_clear()
        return sh._fold_table()

    try:
        first = fresh()
        (path,) = tmp_path.glob("fold-table-*.npz")
        again = fresh()
        assert all(np.array_equal(a, b) for t in (first, again) for a, b in zip(built, t))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(data)
        assert all(np.array_equal(a, b) for a, b in zip(built, fresh()))
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        arrays["strict"] = arrays["strict"].copy()
        arrays["strict"][ord("a")] = ord("b")  # altered, its digest left as it was
        np.savez(path, **arrays)
        assert fresh()[0][ord("a")] == ord("a")
    finally:
        sh._fold_table.cache_clear()


def test_a_changed_threshold_recomputes_no_signature(tmp_path):
    """Signatures depend on the permutations, the shingle length and the seed, not on the threshold: tuning it
    re-bands the cached signatures (a new load key), it never computes one again; a new seed does."""
    from tasks.core.config.data import NearDedupConfig
    from tasks.core.root import open_root
    from tasks.data.near_pieces import signature_piece
    from tasks.data.pieces import load_file_cached

    root = open_root(tmp_path / "artifacts")
    f = tmp_path / "a.jsonl"
    f.write_text("\n".join(json.dumps({"content": f"문서 {i}: 고혈압 환자의 식이 요법과 운동에 관한 안내입니다."})
                           for i in range(20)) + "\n", encoding="utf-8")
    from tasks.core.manifest import hash_file

    corpus = CorpusConfig(paths=[str(f)])
    piece, _ = load_file_cached({"path": str(f), "digest": hash_file(f), "bytes": f.stat().st_size}, corpus, root)
    first, reused_first = signature_piece(piece, NearDedupConfig(threshold=0.8), root)
    again, reused = signature_piece(piece, NearDedupConfig(threshold=0.6), root)
    assert not reused_first and first.key == again.key and reused  # the same entry, taken as it was
    other, reused_other = signature_piece(piece, NearDedupConfig(threshold=0.8, seed=7), root)
    assert other.key != first.key and not reused_other


def test_load_and_the_drop_gate_agree_at_the_thresholds_edge():
    """Pairs whose MinHash estimate and exact Jaccard fall on either side of the threshold: load's near-dedup and
    the drop gate's count decide each the same way (both by `near_pairs`: the exact Jaccard within the margin)."""
    rng = np.random.default_rng(3)
    words = [f"w{k:03d}" for k in range(400)]
    base = " ".join(rng.choice(words, 120))
    threshold, num_perm = 0.8, 32
    over = under = None  # (estimate >= t > exact) and (exact >= t > estimate)
    for trial in range(4000):
        tokens = base.split()
        for _ in range(int(rng.integers(1, 20))):
            tokens[int(rng.integers(len(tokens)))] = str(rng.choice(words))
        variant = " ".join(tokens)
        x, y = sh.shingles(base, 5), sh.shingles(variant, 5)
        exact = len(x & y) / len(x | y)
        sigs = mh.signatures([base, variant], num_perm, 5, trial)
        est = mh.estimated_jaccard(sigs[0], sigs[1])
        if over is None and est >= threshold > exact >= threshold - mh.VERIFY_MARGIN:
            over = (variant, trial)
        if under is None and exact >= threshold > est >= threshold - mh.VERIFY_MARGIN:
            under = (variant, trial)
        if over and under:
            break
    assert over and under, "no pair at the threshold's edge was found: the test would prove nothing"
    for (variant, seed), want in ((over, False), (under, True)):
        texts = [[base], [variant]]
        parts = [(["a"], mh.signatures([base], num_perm, 5, seed)), (["b"], mh.signatures([variant], num_perm, 5, seed))]
        text_of = lambda p, r: texts[p][r]  # noqa: E731
        loaded = npass.near_duplicates(parts, [0, 1], threshold, num_perm, text_of, 5)
        gated = npass.drop_matches(parts[:1], parts[1:], threshold, num_perm, text_of, 5)
        assert (len(loaded) == 1) == want and (len(gated) == 1) == want


def test_sortable_ids_take_load_ids_only():
    """An Arrow column is read as integers only when every id is 16 lower-case hex digits (load's `doc_id_of`):
    an id of another length, an upper-case digit, a non-hex letter, a multi-byte character, a space or a newline
    anywhere keeps the whole column as strings, in the strings' order."""
    load_ids = [f"{x:016x}" for x in range(5)]
    for odd in ["0" * 15, "0" * 17, "A" * 16, "g" * 16, "é" * 8, "0" * 15 + "\n", " " + "0" * 15]:
        column = pa.array(load_ids + [odd])
        assert mh.sortable_ids(column).tolist() == load_ids + [odd], odd
    assert mh.sortable_ids(pa.array(load_ids)).dtype == np.uint64
