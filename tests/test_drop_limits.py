"""A drop can fail; its line cannot: readers bound memory by bytes (the 6 KB parquet bomb, CSV rows of millions of
fields), drops over drops.max_files/max_bytes/max_depth are rejected before anything is read, a drop that never
settles is left out and then rejected, and any error while gating a drop rejects it. The fast tests gate drops
directly; the slow one takes every case through `cpt retrain --drop`, each followed by a good drop that trains."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks.core.config.data import DropsConfig
from tasks.core.manifest import DigestMemo
from tasks.core.root import open_root
from tasks.line import lines
from tasks.line.drop_gate import drop_census, gate_drops

from helpers import ROOT, sample_texts, write_jsonl

OLD = time.time() - 3600


def settle(folder: Path) -> Path:
    for f in [folder, *folder.rglob("*")]:
        os.utime(f, (OLD, OLD), follow_symlinks=False)
    return folder


def good_drop(folder: Path, start: int, n: int = 30) -> Path:
    write_jsonl(folder / "a.jsonl", [{"content": t} for t in sample_texts()[start:start + n]])
    return settle(folder)


def parquet_bomb(path: Path) -> Path:
    """The issue's bomb: a dictionary-encoded column holding one 56 MB value in 4,096 rows, ~6 KB on disk."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    value = "가" * (56_000_000 // 3)
    column = pa.DictionaryArray.from_arrays(pa.array(np.zeros(4096, dtype=np.int32)), pa.array([value]))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"content": column}), path, compression="zstd", dictionary_pagesize_limit=1 << 30,
                   store_schema=False)  # no Arrow schema: a reader that does not ask for a dictionary gets strings
    return path


def wide_csv(path: Path, fields: int = 3_000_000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("content,n\n혈압은 아침과 저녁에 잰다.,1\n" + "ab," * fields + "x\n다음 문서,2\n")
    return path


def remove_deep(top: Path) -> None:
    """shutil.rmtree without recursion (it recurses once per level: pytest's own clean-up of a 1,800-level tree
    raises RecursionError)."""
    stack = [str(top)]
    while stack:
        try:
            entries = list(os.scandir(stack[-1]))
        except FileNotFoundError:
            stack.pop()
            continue
        subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        for e in entries:
            if not e.is_dir(follow_symlinks=False):
                os.unlink(e.path)
        if subdirs:
            stack += subdirs
        else:
            os.rmdir(stack.pop())


@pytest.fixture
def deep_trees():
    made: list[Path] = []
    yield made
    for top in made:
        remove_deep(top)


def deep_tree(top: Path, depth: int) -> Path:
    """A folder `depth` levels deep (short names: 1,800 levels stay under PATH_MAX) with a good file at the bottom."""
    here = str(top)
    os.makedirs(here, exist_ok=True)
    for _ in range(depth):  # one level at a time: os.makedirs and Path.mkdir recurse once per level
        here += "/d"
        os.mkdir(here)
    with open(here + "/a.jsonl", "w", encoding="utf-8") as f:
        f.write('{"content": "깊은 곳의 문서"}\n')
    return top


# --------------------------------------------------------------------------------------------- readers


BOMB_READ = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]) << 20, int(sys.argv[2]) << 20))
    from tasks.core.config.data import CorpusConfig
    from tasks.data.readers import read_corpus_file
    out = list(read_corpus_file(Path(sys.argv[1]), CorpusConfig(paths=["x"])))
    print(len(out), type(out[-1]).__name__, out[-1].source, getattr(out[-1], "reason", ""))
""")


@pytest.mark.slow  # a child process under its own address-space limit
def test_the_parquet_bomb_is_a_reject_naming_its_row_and_column_under_a_2_gib_address_space(tmp_path):
    """Read in a child limited to 2 GiB of address space (the issue's run died at 16 GiB): the first 56 MB value is
    a document, the second row is the reject, the other 4,094 rows are never decoded."""
    bomb = parquet_bomb(tmp_path / "bomb.parquet")
    assert bomb.stat().st_size < 10_000
    out = subprocess.run([sys.executable, "-c", BOMB_READ, str(bomb), "2048"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    count, kind, source, reason = out.stdout.strip().split(" ", 3)
    assert (count, kind, source) == ("2", "Reject", f"{bomb}:2")
    assert "field 'content'" in reason and "decompression bomb" in reason and "100x its" in reason


def test_parquet_batches_are_cut_by_decoded_bytes_and_dictionaries_stay_dictionaries(tmp_path, monkeypatch):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    import tasks.data.readers as readers
    from tasks.core.config.data import CorpusConfig
    from tasks.data.arrow import parquet_plan

    monkeypatch.setattr(readers, "_PARQUET_BATCH_BYTES", 1 << 20)
    texts = [("문서 %d " % i) * 40_000 for i in range(6)]  # ~400 KB each: 2 a batch of 1 MiB
    pq.write_table(pa.table({"content": pa.array(texts, pa.large_string())}), tmp_path / "big.parquet")
    meta = pq.read_metadata(tmp_path / "big.parquet")
    dictionary, rows, _ = parquet_plan(meta, ["content"], readers._PARQUET_BATCH, readers._PARQUET_BATCH_BYTES)
    assert rows == 2
    values = pa.DictionaryArray.from_arrays(pa.array(np.arange(300, dtype=np.int32) % 3),
                                            pa.array(["하나", "둘", "셋"]))
    pq.write_table(pa.table({"content": values}), tmp_path / "dict.parquet")
    dictionary, rows, _ = parquet_plan(pq.read_metadata(tmp_path / "dict.parquet"), ["content"], readers._PARQUET_BATCH,
                                    readers._PARQUET_BATCH_BYTES)
    assert dictionary == ["content"] and rows == readers._PARQUET_BATCH
    got = [r.text for r in readers.read_corpus_file(tmp_path / "big.parquet", CorpusConfig(paths=["x"]))]
    assert got == [t.strip() for t in texts] or got == texts


def test_a_parquet_value_over_the_document_limit_is_a_reject_by_row_and_column_never_decoded(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.core.config.data import CorpusConfig
    from tasks.data.readers import read_corpus_file

    values = pa.DictionaryArray.from_arrays(pa.array(np.array([0, 1, 0], dtype=np.int32)),
                                            pa.array(["짧은 문서", "x" * 20_000]))
    pq.write_table(pa.table({"content": values}), tmp_path / "d.parquet")
    out = list(read_corpus_file(tmp_path / "d.parquet", CorpusConfig(paths=["x"], max_document_bytes=10_000)))
    assert [type(o).__name__ for o in out] == ["Record", "Reject", "Record"]
    assert out[1].source.endswith("d.parquet:2") and "field 'content' is 20000 bytes" in out[1].reason


@pytest.mark.slow  # a child process under its own address-space limit
def test_a_csv_row_of_millions_of_fields_is_a_reject_and_memory_stays_small(tmp_path):
    csv = wide_csv(tmp_path / "wide.csv")
    code = textwrap.dedent("""
        import resource, sys
        from pathlib import Path
        from tasks.core.config.data import CorpusConfig
        from tasks.data.readers import read_corpus_file
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = list(read_corpus_file(Path(sys.argv[1]), CorpusConfig(paths=["x"], on_bad_record="skip")))
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
        print(grew, [type(o).__name__ for o in out], out[1].source, out[1].reason)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(csv)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grew, rest = out.stdout.split(" ", 1)
    assert "['Record', 'Reject']" in rest and f"{csv}:3" in rest and "over 10000 fields" in rest
    assert int(grew) < 150  # MiB; the csv module alone would hold ~3 million strings (~150 MB) for the row


# ------------------------------------------------------------------------------------ the census


def test_the_census_stops_at_each_limit_and_names_it(tmp_path, monkeypatch, deep_trees):
    many = tmp_path / "many"
    for i in range(12):
        write_jsonl(many / f"f{i}.jsonl", [{"content": "x"}])
    assert "drops.max_files=10" in drop_census(str(many), DropsConfig(max_files=10))
    assert "drops.max_bytes=100" in drop_census(str(many), DropsConfig(max_bytes=100))
    assert drop_census(str(many), DropsConfig()) is None

    deep = deep_tree(tmp_path / "deep", 1800)
    deep_trees.append(deep)
    calls = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: calls.append(p) or real(p))
    why = drop_census(str(deep), DropsConfig(max_depth=32))
    assert "drops.max_depth=32" in why and "holds no" not in why
    assert len(calls) <= 34  # the walk stopped at the limit: 1,800 levels were never listed


def test_a_drop_turned_symlink_is_rejected_and_excludes_nothing_of_the_line(tmp_path):
    from tasks.core.config.tree import validate_config
    from tasks.line.sources import line_sources

    corpus = good_drop(tmp_path / "corpus", 0)
    drop = good_drop(tmp_path / "drops" / "d", 40)
    os.rename(drop, tmp_path / "drops" / "gone")
    drop.symlink_to(corpus)  # swapped for a link to the line's own corpus after its gate
    assert "is a symlink now" in drop_census(str(drop), DropsConfig())
    config = validate_config({"corpus": {"paths": [str(corpus)]}, "model": {"id": "m"}})
    state = lines.LineState(line="l", drops=[lines.Drop(path=str(drop), status="rejected")])
    fingerprint, configured = line_sources(config, state)
    assert configured == [corpus / "a.jsonl"] and [i["path"] for i in fingerprint.items] == [str(corpus / "a.jsonl")]


# ------------------------------------------------------------------------------------ the gate


@pytest.fixture
def line(tmp_path, tiny_model):
    """gate_drops on a small line with the real profile (no Prefect): returns gate(config overrides) and the
    root; drops are announced with `announce`."""
    from tasks.core.config.tree import validate_config

    corpus = good_drop(tmp_path / "corpus", 0, 60)
    root = open_root(tmp_path / "artifacts")

    def gate(**drops):
        config = validate_config({"corpus": {"paths": [str(corpus)]}, "model": {"id": str(tiny_model)},
                                  "drops": drops})
        return gate_drops(config, root, "l", 60, DigestMemo(root), logging.getLogger("test"))

    def status():
        return {d.path: (d.status, d.reason) for d in lines.read_line(root, "l").drops}

    return type("Line", (), {"gate": staticmethod(gate), "root": root, "status": staticmethod(status),
                             "announce": staticmethod(lambda p: lines.announce(root, "l", p).path)})


def test_every_error_while_gating_rejects_only_its_drop(line, tmp_path, monkeypatch, deep_trees):
    import tasks.data.readers as readers

    real = readers.READERS[".jsonl"]

    def fragile(f, name, cfg):
        if "/oom/" in name:
            raise MemoryError()
        if "/deep-json/" in name:
            raise RecursionError("maximum recursion depth exceeded")
        if "/bug/" in name:
            raise KeyError("a reader's bug")
        yield from real(f, name, cfg)

    monkeypatch.setitem(readers.READERS, ".jsonl", fragile)
    import tasks.line.drop_gate as drop_gate

    listing = drop_gate.drop_files

    def flaky_listing(path):  # an error before the drop's content is known (no fingerprint to record)
        if "/flaky" in path:
            raise RuntimeError("the listing broke")
        return listing(path)

    monkeypatch.setattr(drop_gate, "drop_files", flaky_listing)
    drops = {name: line.announce(good_drop(tmp_path / "in" / name, 60 + 10 * i, 10))
             for i, name in enumerate(("oom", "deep-json", "bug", "flaky"))}
    drops["bomb"] = line.announce(parquet_bomb(tmp_path / "in" / "bomb" / "b.parquet").parent)
    drops["wide"] = line.announce(wide_csv(tmp_path / "in" / "wide" / "w.csv").parent)
    deep_trees.append(deep_tree(tmp_path / "in" / "deep", 1800))
    drops["deep"] = line.announce(deep_trees[-1])
    drops["good"] = line.announce(good_drop(tmp_path / "in" / "good", 120))
    for name in ("bomb", "wide"):  # (the deep one is refused before its files' ages are looked at)
        settle(tmp_path / "in" / name)
    out = line.gate(max_depth=32)
    status = line.status()
    assert status[drops["good"]] == ("active", "")
    assert set(out["rejected"]) == {p for n, p in drops.items() if n != "good"}
    assert "MemoryError" in status[drops["oom"]][1]
    assert "RecursionError: maximum recursion depth exceeded" in status[drops["deep-json"]][1]
    assert "KeyError" in status[drops["bug"]][1] and "RuntimeError: the listing broke" in status[drops["flaky"]][1]
    assert "b.parquet:2: field 'content'" in status[drops["bomb"]][1]
    assert "w.csv:3: malformed CSV: a record of over 10000 fields" in status[drops["wide"]][1]
    assert "drops.max_depth=32" in status[drops["deep"]][1]
    again = line.gate(max_depth=32)  # the next run: rejected before, they stop nothing (the line trains on)
    assert not again["rejected"] and line.status() == status


def test_a_drop_turned_symlink_after_its_gate_is_rejected_by_the_gate(line, tmp_path):
    drop = good_drop(tmp_path / "in" / "d", 60)
    path = line.announce(drop)
    line.gate()
    assert line.status()[path][0] == "active"
    drop.rename(tmp_path / "in" / "d.old")
    drop.symlink_to(good_drop(tmp_path / "elsewhere" / "d", 100))
    out = line.gate()
    assert out["rejected"] == [path] and "is now a symlink" in line.status()[path][1]


def test_a_drop_that_never_settles_is_left_out_then_rejected(line, tmp_path):
    drop = tmp_path / "in" / "never"
    good_drop(drop, 60)
    (drop / "_WRITING").touch()
    path = line.announce(drop)
    out = line.gate(max_pending_hours=1)
    assert out["left_out"] == [path] and not out["rejected"] and line.status()[path][0] == "pending"
    with lines.updating(line.root, "l") as state:  # two hours later
        state.find(path).history[-1]["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 7200))
    out = line.gate(max_pending_hours=1)
    status, reason = line.status()[path]
    assert status == "rejected" and "drops.max_pending_hours=1" in reason and path not in out["left_out"]
    later = line.gate(max_pending_hours=1)  # the marker is still there: rejected it stays, and says nothing more
    assert not later["left_out"] and not later["unsettled"] and not later["rejected"]
    assert line.status()[path] == (status, reason)


# ------------------------------------------------------------------------ through `cpt retrain --drop`


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_every_bad_drop_through_cpt_retrain_then_a_good_drop_trains(tmp_path, tiny_model, monkeypatch, capsys,
                                                                   deep_trees):
    """Each case as a producer delivers it, announced with `cpt retrain --drop`: the drop is rejected with its
    reason (or, one that never settles, left out while the line trains on the rest, then rejected), the command
    succeeds, and the next good drop trains."""
    import json

    import yaml

    import tasks.data.readers as readers
    from flows.cli import main

    real = readers.READERS[".jsonl"]

    def fragile(f, name, cfg):  # "whatever the reader": errors no reader catches
        if "/oom/" in name:
            raise MemoryError()
        if "/recursion/" in name:
            raise RecursionError("maximum recursion depth exceeded")
        yield from real(f, name, cfg)

    monkeypatch.setitem(readers.READERS, ".jsonl", fragile)
    corpus = good_drop(tmp_path / "corpus", 0, 60)
    cfg = tmp_path / "line.yaml"
    cfg.write_text(yaml.safe_dump({
        "corpus": {"paths": [str(corpus)]}, "model": {"id": str(tiny_model)}, "split": {"validation_fraction": 0.1},
        "chunk": {"max_seq_length": 64, "overlap": 16}, "gate": {"enabled": False},
        "train": {"max_steps": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                  "eval_steps": 1, "save_steps": 1, "logging_steps": 1, "early_stopping_patience": None},
        "evaluate": {"max_eval_rows": 4},
        "drops": {"max_files": 20, "max_bytes": "20MB", "max_depth": 32, "max_pending_hours": 1}}))
    artifacts = tmp_path / "artifacts"
    summary = tmp_path / "s.json"

    def retrain(drop: Path | None) -> dict:
        args = ["retrain", "-c", str(cfg), "--line", "l", "--artifacts", str(artifacts), "--summary", str(summary)]
        assert main([*args, *(["--drop", str(drop)] if drop else [])]) == 0
        capsys.readouterr()
        return json.loads(summary.read_text())

    def reason(result: dict, drop: Path) -> str:
        return next(d for d in result["drops"] if d["path"] == str(drop))["reason"]

    incoming = tmp_path / "incoming"
    many = incoming / "many"
    for i in range(25):
        write_jsonl(many / f"f{i}.jsonl", [{"content": f"문서 {i}"}])
    big = incoming / "big"
    write_jsonl(big / "a.jsonl", [{"content": "가" * 1_000_000}] * 8)  # 24 MB
    cases = {
        "bomb": (settle(parquet_bomb(incoming / "bomb" / "b.parquet").parent), "decompression bomb"),
        "wide": (settle(wide_csv(incoming / "wide" / "w.csv").parent), "a record of over 10000 fields"),
        "many": (settle(many), "drops.max_files=20"),
        "big": (settle(big), "drops.max_bytes=20000000"),
        "deep": (deep_tree(incoming / "deep", 1800), "drops.max_depth=32"),  # removed by deep_trees
        "oom": (good_drop(incoming / "oom", 60, 10), "MemoryError"),
        "recursion": (good_drop(incoming / "recursion", 70, 10), "RecursionError: maximum recursion depth"),
    }
    deep_trees.append(incoming / "deep")
    assert retrain(None)["trained"]
    start = 80
    for name, (drop, words) in cases.items():
        bad = retrain(drop)
        assert not bad["trained"] and bad["reason"] == "drop-rejected", name
        assert words in reason(bad, drop), (name, reason(bad, drop))
        good = good_drop(incoming / f"good-after-{name}", start, 20)
        start += 20
        after = retrain(good)
        assert after["trained"] and after["reason"] == "changed", name
        assert {d["path"]: d["status"] for d in after["drops"]}[str(good)] == "active"

    never = good_drop(incoming / "never", start, 20)
    (never / "_WRITING").touch()  # its producer died mid-write
    pending = retrain(never)
    assert not pending["trained"] and pending["reason"] == "unsettled"
    good = good_drop(incoming / "good-while-pending", start + 20, 20)
    meanwhile = retrain(good)  # the line trains on everything else
    assert meanwhile["trained"] and meanwhile["left_out"] == [str(never)]
    with lines.updating(open_root(artifacts), "l") as state:  # two hours on
        state.find(never).history[-1]["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 7200))
    later = retrain(None)
    assert not later["trained"] and "drops.max_pending_hours=1" in reason(later, never)
    last = retrain(good_drop(incoming / "good-at-last", start + 40, 20))
    assert last["trained"]
