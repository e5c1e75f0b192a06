"""Training lines: drops in folders outside the corpus paths (as the on-drop deployment delivers them) are
gated, registered, read once, kept across nightly runs, removable; a rejected drop trains nothing."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tasks.core.manifest import read_manifest
from tasks.core.root import open_root

from helpers import sample_texts, write_jsonl
from tasks.line.drop_gate import WRITING_MARKER, check_profile, profile_drop, unsettled_files
from tasks.line import lines
from tasks.core.config.data import DropsConfig
from tasks.core.config.tree import validate_config

OLD = time.time() - 3600


def settle(folder):
    for f in folder.rglob("*"):
        os.utime(f, (OLD, OLD))
    return folder


def write_docs(path, texts):
    write_jsonl(path, [{"content": t} for t in texts])
    return settle(path.parent)


@pytest.fixture
def texts():
    return sample_texts()


@pytest.fixture
def corpus(tmp_path, texts):
    for i in range(3):
        write_jsonl(tmp_path / "corpus" / f"part-{i}.jsonl", [{"content": t} for t in texts[i * 40:(i + 1) * 40]])
    return settle(tmp_path / "corpus")


@pytest.fixture
def config(corpus, tiny_model):
    return validate_config({
        "corpus": {"paths": [str(corpus)]}, "model": {"id": str(tiny_model)},
        "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 96, "overlap": 16},
        "train": {"max_steps": 2, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                  "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "early_stopping_patience": None},
        "evaluate": {"max_eval_rows": 8},
        "push": {"name": "line-model"},
    })


def test_unsettled_files_and_writing_marker(tmp_path):
    f = write_jsonl(tmp_path / "d" / "a.jsonl", [{"content": "x"}])
    assert unsettled_files([f], settle_seconds=60)  # just written
    assert not unsettled_files([f], settle_seconds=60, now=time.time() + 120)
    (tmp_path / "d" / WRITING_MARKER).touch()
    assert unsettled_files([f], settle_seconds=0, now=time.time() + 120) == [str(tmp_path / "d")]


def test_check_profile_names_each_limit_it_breaks():
    base = {"records": 100, "documents": 90, "rejected": 0, "too_short": 0, "duplicates_in_line": 0,
            "median_tokens": 200.0, "line_median_tokens": 180.0}
    limits = DropsConfig()
    assert check_profile(base, limits) == []
    assert "drops.max_reject_share" in check_profile({**base, "rejected": 10}, limits)[0]
    assert "drops.max_too_short_share" in check_profile({**base, "too_short": 60}, limits)[0]
    assert "drops.max_duplicate_share" in check_profile({**base, "duplicates_in_line": 50}, limits)[0]
    assert "drops.median_tokens_ratio" in check_profile({**base, "median_tokens": 12.0}, limits)[0]
    assert "drops.min_documents" in check_profile({**base, "documents": 0, "records": 0}, limits)[0]


def test_line_state_is_written_whole_or_not_at_all(tmp_path):
    lines.announce(open_root(tmp_path), "l", tmp_path / "d1")
    before = open_root(tmp_path).path(lines.state_file("l")).read_text()
    with pytest.raises(RuntimeError):
        with lines.updating(open_root(tmp_path), "l") as state:
            state.drops.clear()
            raise RuntimeError("killed mid-update")
    assert open_root(tmp_path).path(lines.state_file("l")).read_text() == before
    assert [d.status for d in lines.read_line(open_root(tmp_path), "l").drops] == ["pending"]
    assert not list(open_root(tmp_path).path(lines.state_file("l")).parent.glob(".*.tmp"))


@pytest.mark.parametrize("content, on_bad_record, reason", [
    (b"", "skip", "records rejected"),                                         # empty file
    ('{"content": "좋은 문서"}\n'.encode() + b'{"content": "\xff\xfe"}\n', "fail", "invalid UTF-8"),
    ('{"text": "다른 필드"}\n'.encode() * 5, "skip", "records rejected"),       # wrong format
])
def test_gate_rejects_empty_misencoded_and_wrong_format_drops(tmp_path, config, corpus, content, on_bad_record,
                                                                reason):
    from tasks.core.manifest import hash_file
    from tasks.data.files import resolve_corpus_files
    from tasks.tokenize import resolve_tokenizer

    cfg = config.model_copy(update={"corpus": config.corpus.model_copy(update={"on_bad_record": on_bad_record})})
    (tmp_path / "drop").mkdir()
    (tmp_path / "drop" / "d.jsonl").write_bytes(content)
    profile = profile_drop([tmp_path / "drop" / "d.jsonl"], resolve_corpus_files(cfg.corpus), cfg,
                           resolve_tokenizer(cfg.model), open_root(tmp_path / "artifacts"), hash_file)
    assert not profile["passed"] and reason in "; ".join(profile["reasons"])


def test_the_gate_counts_line_duplicates_and_validation_texts_from_the_drops_side(tmp_path, config, corpus, texts):
    """The gate matches the drop's ids against the line's pieces in Arrow (no set of the line's ids): the counts are
    the set intersections, including a document two line files both hold and copies that differ in whitespace."""
    from tasks.core.manifest import hash_file
    from tasks.data.files import fingerprint_files, resolve_corpus_files
    from tasks.data.pieces import load_pieces, piece_ids
    from tasks.shuffle import validation_texts
    from tasks.tokenize import resolve_tokenizer

    # Half the texts in validation, so the drop's whitespace variants of line texts meet some of them.
    cfg = config.model_copy(update={"split": config.split.model_copy(update={"validation_fraction": 0.5})})
    write_docs(corpus / "part-3.jsonl", texts[0:5])  # in part-0 too: a line document two files hold
    drop = write_docs(tmp_path / "drop" / "d.jsonl",
                      texts[0:3] + texts[50:52] + [f"  {t}\n" for t in texts[60:80]] + texts[120:150])
    root = open_root(tmp_path / "artifacts")
    line_files = resolve_corpus_files(cfg.corpus)
    profile = profile_drop([drop / "d.jsonl"], line_files, cfg, resolve_tokenizer(cfg.model), root, hash_file)

    def ids(files):
        return piece_ids(root, [out for _, out, _ in load_pieces(fingerprint_files(files, hash_file).items,
                                                                  cfg.corpus, root)])

    (drop_ids, drop_norms), (line_ids, line_norms) = ids([drop / "d.jsonl"]), ids(line_files)
    expected = len(drop_norms & validation_texts(line_norms, cfg.shuffle, cfg.split))
    assert profile["duplicates_in_line"] == len(drop_ids & line_ids) == 5
    assert profile["validation_matches"] == expected and 0 < expected < 25
    assert profile["documents"] == 55 and profile["line_median_tokens"] and profile["median_tokens"]


def stage_counts(result):
    return {s["name"]: s["counts"] for s in result["pipeline"]["stages"]}


def new_file_counts(result):
    c = stage_counts(result)
    return c["load"]["files_read"], c["tokenize"]["files_tokenized"], c["chunk"]["files_chunked"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_line_keeps_its_drops_gates_them_and_reads_each_once(config, texts, tmp_path, artifacts, capsys):
    from flows.cli import main
    from flows.retrain import retrain

    def run(drop=None, **kw):
        return retrain(config=config, drop=str(drop) if drop else None, line="nightly", settle_seconds=60,
                       artifacts=str(artifacts), **kw)

    def listing():
        assert main(["drops", "--line", "nightly", "--json", "--artifacts", str(artifacts)]) == 0
        return {d["path"]: d for d in json.loads(capsys.readouterr().out)}

    first = run()
    assert first["trained"] and first["reason"] == "changed" and new_file_counts(first) == (3, 3, 3)

    # Three drops in three folders outside the corpus paths, as the on-drop deployment delivers them.
    d1 = write_docs(tmp_path / "incoming" / "2026-11-01" / "a.jsonl", texts[120:160])
    d2 = write_docs(tmp_path / "elsewhere" / "bad" / "b.jsonl", texts[0:30] + texts[160:165])  # mostly repeats
    d3 = tmp_path / "third" / "place" / "2026-11-15"
    write_docs(d3 / "c.jsonl", texts[165:200])
    write_docs(d3 / "d.jsonl", texts[200:240])

    one = run(d1)
    assert one["trained"] and new_file_counts(one) == (1, 1, 1)
    assert stage_counts(one)["load"]["documents"] == stage_counts(first)["load"]["documents"] + 40
    entry = listing()[str(d1)]
    assert entry["status"] == "active" and entry["files"] == 1 and entry["documents"] == 40 and entry["tokens"] > 0
    assert entry["fingerprint"] and entry["registered_at"] and entry["announced_by"] == "shell"

    nightly = run()  # no drop parameter: the line still has d1, so nothing changed
    assert nightly["trained"] is False and nightly["reason"] == "unchanged" and nightly["pipeline"] is None

    rejected = run(d2)
    assert rejected["trained"] is False and rejected["reason"] == "drop-rejected" and rejected["pipeline"] is None
    entry = listing()[str(d2)]
    assert entry["status"] == "rejected" and "already in the line" in entry["reason"]
    assert run()["reason"] == "unchanged"  # a rejected drop neither trains nor flips the nightly run

    three = run(d3)
    assert three["trained"] and new_file_counts(three) == (2, 2, 2)

    assert main(["drops", "--line", "nightly", "--remove", str(d1), "--artifacts", str(artifacts)]) == 0
    capsys.readouterr()
    assert listing()[str(d1)]["status"] == "removed"
    assert [h["status"] for h in listing()[str(d1)]["history"]] == ["pending", "active", "removed"]
    without = run()
    assert without["trained"] and new_file_counts(without) == (0, 0, 0)
    assert stage_counts(without)["load"]["documents"] == stage_counts(three)["load"]["documents"] - 40

    # The same path, corrected: passes the gate now.
    shutil.rmtree(d2)
    write_docs(d2 / "b.jsonl", texts[240:])
    fixed = run(d2)
    assert fixed["trained"] and new_file_counts(fixed) == (1, 1, 1)
    assert listing()[str(d2)]["status"] == "active"
    assert [d["status"] for d in fixed["drops"]] == ["removed", "active", "active"]

    # A deleted per-file piece is rebuilt (here while chunk settings change), never a crash.
    # (one the line's current tokenize output refers to: the cache also keeps the removed drop's pieces)
    tokenize_out = next(s for s in fixed["pipeline"]["stages"] if s["name"] == "tokenize")["output"]
    victim = artifacts / sorted(read_manifest(Path(tokenize_out)).deps)[0]
    shutil.rmtree(victim)
    cfg = config.model_copy(update={"chunk": config.chunk.model_copy(update={"max_seq_length": 80})})
    rebuilt = retrain(config=cfg, line="nightly", settle_seconds=60, artifacts=str(artifacts), force=True)
    states = {s["name"]: s["state"] for s in rebuilt["pipeline"]["stages"]}
    assert rebuilt["trained"] and states["tokenize"] == "Completed" and states["load"] == "Cached"
    assert stage_counts(rebuilt)["tokenize"]["files_tokenized"] == 1 and victim.is_dir()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_an_unsettled_drop_waits_and_a_later_nightly_run_takes_it(config, texts, tmp_path, artifacts):
    from flows.retrain import retrain

    assert retrain(config=config, line="l", artifacts=str(artifacts), settle_seconds=60)["trained"]
    drop = tmp_path / "landing" / "d"
    write_jsonl(drop / "a.jsonl", [{"content": t} for t in texts[120:150]])  # just written
    waiting = retrain(config=config, line="l", drop=str(drop), artifacts=str(artifacts), settle_seconds=60)
    assert waiting["trained"] is False and waiting["reason"] == "unsettled"
    assert [d["status"] for d in waiting["drops"]] == ["pending"]
    settle(drop)
    later = retrain(config=config, line="l", artifacts=str(artifacts), settle_seconds=60)  # no drop parameter
    assert later["trained"] and [d["status"] for d in later["drops"]] == ["active"]
    assert new_file_counts(later) == (1, 1, 1)


@pytest.mark.slow  # a whole `cpt retrain` (flow, training child) in a child process
def test_cli_retrain_summary_and_drops_listing(config, texts, tmp_path, artifacts, monkeypatch):
    """`cpt retrain --summary` in its own process, as the deployments and a user run it."""
    import subprocess
    import sys

    import yaml

    cfg_file = tmp_path / "line.yaml"
    cfg_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    drop = write_docs(tmp_path / "drops" / "x" / "a.jsonl", texts[120:160])
    env = {**os.environ, "CPT_ARTIFACTS": str(artifacts)}
    cmd = [sys.executable, "-m", "flows.cli"]
    out = subprocess.run([*cmd, "retrain", "-c", str(cfg_file), "--line", "cli", "--drop", str(drop), "--summary",
                          str(tmp_path / "s.json")], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["trained"] is True and summary["reason"] == "changed" and summary["line"] == "cli"
    assert [d["status"] for d in summary["drops"]] == ["active"] and summary["drops"][0]["path"] == str(drop)
    assert [s["name"] for s in summary["pipeline"]["stages"]][-1] == "push"
    listed = subprocess.run([*cmd, "drops", "--line", "cli"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "active" in listed.stdout and str(drop) in listed.stdout


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_drop_inside_a_configured_folder_is_gated_against_the_rest_of_the_line(config, corpus, texts, artifacts):
    from flows.retrain import retrain

    assert retrain(config=config, line="in", artifacts=str(artifacts), settle_seconds=60)["trained"]
    drop = write_docs(corpus / "2026-11-20" / "a.jsonl", texts[120:160])  # under corpus.paths
    result = retrain(config=config, line="in", drop=str(drop), artifacts=str(artifacts), settle_seconds=60)
    assert result["trained"] and [d["status"] for d in result["drops"]] == ["active"]
    assert result["drops"][0]["documents"] == 40 and new_file_counts(result) == (1, 1, 1)


# ------------------------------------------------- trust boundaries: nothing a drop sends escapes or blocks


@pytest.fixture
def gate_env(tmp_path, monkeypatch):
    """gate_drops on a line with a one-file corpus, its profile and tokenizer faked (fast): returns (gate(),
    announce(path, source), the root, the calls to drop_files)."""
    import tasks.line.drop_gate as drop_gate

    write_docs(tmp_path / "corpus" / "a.jsonl", ["문서 하나", "문서 둘"])
    root = open_root(tmp_path / "artifacts")
    listed, profiled = [], []

    def fake_profile(files, line_files, config, tokenizer, root, digest, skipped=()):
        profiled.append(files)
        return {"files": len(files), "records": 1, "documents": 1, "rejected": 0, "too_short": 0, "tokens": 1,
                "skipped": len(skipped), "skipped_files": list(skipped), "passed": True, "reasons": []}

    real_drop_files = drop_gate.drop_files
    monkeypatch.setattr(drop_gate, "profile_drop", fake_profile)
    monkeypatch.setattr(drop_gate, "resolve_tokenizer", lambda *a, **k: None)
    monkeypatch.setattr(drop_gate, "drop_files", lambda path: listed.append(path) or real_drop_files(path))

    def gate(**drops):
        import logging

        from tasks.core.manifest import DigestMemo

        config = validate_config({"corpus": {"paths": [str(tmp_path / "corpus")]}, "model": {"id": "unused"},
                                  "drops": drops})
        return drop_gate.gate_drops(config, root, "t", 0, DigestMemo(root), logging.getLogger("test"))

    def status():
        return {d.path: (d.status, d.reason) for d in lines.read_line(root, "t").drops}

    return types_namespace(gate=gate, root=root, listed=listed, profiled=profiled, status=status,
                           announce=lambda p, source="shell": lines.announce(root, "t", p, source).path)


def types_namespace(**kw):
    import types

    return types.SimpleNamespace(**kw)


def test_drops_outside_the_roots_are_rejected_before_anything_in_them_is_listed(tmp_path, gate_env):
    roots = tmp_path / "drops"
    ok = gate_env.announce(write_docs(roots / "ok" / "a.jsonl", ["새 문서"]), "event")
    write_docs(tmp_path / "elsewhere" / "x" / "a.jsonl", ["밖의 문서"])
    outside = gate_env.announce(tmp_path / "elsewhere" / "x")  # at a shell: roots bind it too
    everything = gate_env.announce("/", "event")
    (roots / "link").symlink_to(tmp_path / "elsewhere" / "x")
    via_link = gate_env.announce(roots / "link", "event")  # resolved when announced: it is outside
    the_root = gate_env.announce(roots, "event")
    out = gate_env.gate(roots=[str(roots)])
    assert gate_env.listed == [ok]  # `/`, the root and the others: nothing in them listed
    status = gate_env.status()
    assert status[ok] == ("active", "")
    assert via_link == outside and status[outside][0] == "rejected" and "outside drops.roots" in status[outside][1]
    assert status[everything] == ("rejected", f"outside drops.roots ({roots})")
    assert status[the_root] == ("rejected", f"{roots} is one of drops.roots, not a drop inside one")
    assert sorted(out["rejected"]) == sorted([outside, everything, the_root]) and not out["unsettled"]
    gate_env.listed.clear()
    again = gate_env.gate(roots=[str(roots)])  # the next run (nightly): they stay rejected, still unlisted
    assert not again["gated"] and gate_env.listed == [ok]


def test_an_event_drop_is_refused_while_roots_is_empty_and_stays_so_until_a_shell_takes_it(tmp_path, gate_env):
    by_event = gate_env.announce(write_docs(tmp_path / "in" / "e" / "a.jsonl", ["이벤트 문서"]), "event")
    by_shell = gate_env.announce(write_docs(tmp_path / "in" / "s" / "a.jsonl", ["셸 문서"]))
    gate_env.gate()
    status = gate_env.status()
    assert status[by_shell] == ("active", "")
    assert status[by_event][0] == "rejected"
    assert "announced by an event while drops.roots is empty" in status[by_event][1]
    assert by_event not in gate_env.listed
    assert not gate_env.gate()["gated"]  # a later run (a nightly, trusted) does not admit it
    assert gate_env.status()[by_event][0] == "rejected"
    gate_env.announce(by_event)  # announced again at a shell: the shell vouches for it
    assert [d.path for d, _ in gate_env.gate()["gated"]] == [by_event] and gate_env.status()[by_event][0] == "active"


def test_record_verdict_keeps_a_drop_removed_while_it_was_gated(tmp_path):
    root = open_root(tmp_path)
    path = lines.announce(root, "l", tmp_path / "d").path
    lines.remove(root, "l", path)  # `cpt drops --remove` while the gate profiles the drop
    profile = {"files": 1, "documents": 1, "tokens": 1, "passed": True, "reasons": []}
    assert lines.record_verdict(root, "l", path, "f" * 64, profile, gated="pending") is None
    entry = lines.read_line(root, "l").find(path)
    assert entry.status == "removed" and [h["status"] for h in entry.history] == ["pending", "removed"]
    assert entry.fingerprint == "" and entry.profile == {}
    lines.announce(root, "l", path)
    identity = lines.DropIdentity(path=path, files=[lines.DropFile(rel="a.jsonl", digest="f" * 32, bytes=1)])
    assert lines.record_verdict(root, "l", path, "f" * 64, profile, gated="pending", identity=identity).status == "active"
    assert lines.read_line(root, "l").find(path).identity == identity


def test_the_gate_does_not_revive_a_drop_removed_while_it_ran(tmp_path, gate_env, monkeypatch):
    import tasks.line.drop_gate as drop_gate

    drop = gate_env.announce(write_docs(tmp_path / "in" / "d" / "a.jsonl", ["문서"]))
    faked = drop_gate.profile_drop

    def removed_meanwhile(*a, **k):
        lines.remove(gate_env.root, "t", drop)
        return faked(*a, **k)

    monkeypatch.setattr(drop_gate, "profile_drop", removed_meanwhile)
    out = gate_env.gate()
    assert gate_env.status()[drop] == ("removed", "") and not out["rejected"]
    [(entry, profile)] = out["gated"]
    assert entry.status == "removed" and profile["not_recorded"]


def test_announced_by_the_parameter_or_an_automation(monkeypatch):
    import types

    import flows.retrain as retrain_module

    assert retrain_module.announced_by("event") == "event"
    assert retrain_module.announced_by("shell") == "shell"  # outside a run: no context
    run = lambda kind: types.SimpleNamespace(flow_run=types.SimpleNamespace(  # noqa: E731
        created_by=types.SimpleNamespace(type=kind) if kind else None))
    for kind, expected in (("AUTOMATION", "event"), ("DEPLOYMENT", "shell"), (None, "shell")):
        monkeypatch.setattr(retrain_module.FlowRunContext, "get", classmethod(lambda cls, k=kind: run(k)))
        assert retrain_module.announced_by("shell") == expected


def test_the_gate_artifact_names_what_was_skipped_and_the_rejects(monkeypatch):
    import flows.retrain as retrain_module

    shown = []
    monkeypatch.setattr(retrain_module, "markdown_artifact", lambda text, *a: shown.append(text))
    profile = {"passed": False, "reasons": ["3 of 10 records rejected"], "files": 2, "skipped": 1,
               "skipped_files": ["/d/notes.txt: a symlink out of the folder"],
               "reject_examples": ["/d/a.csv:3: malformed CSV: field larger than field limit (131072)"]}
    retrain_module.show_gate([(lines.Drop(path="/d", status="rejected"), profile)])
    assert "1: /d/notes.txt: a symlink out of the folder" in shown[0] and "/d/a.csv:3: malformed CSV" in shown[0]


def test_a_rejected_drop_path_is_excluded_literally(tmp_path):
    from tasks.line.sources import line_sources

    write_docs(tmp_path / "corpus" / "a.jsonl", ["문서"])
    write_docs(tmp_path / "corpus" / "d[1]" / "a.jsonl", ["거부된 문서"])
    write_docs(tmp_path / "corpus" / "d1" / "a.jsonl", ["다른 문서"])
    state = lines.LineState(line="l", drops=[lines.Drop(path=str(tmp_path / "corpus" / "d[1]"), status="rejected"),
                                             lines.Drop(path="/**", status="removed")])  # never a glob
    sources, _ = line_sources(validate_config({"corpus": {"paths": [str(tmp_path / "corpus")]},
                                               "model": {"id": "m"}}), state)
    assert [Path(i["path"]).parent.name for i in sources.items] == ["corpus", "d1"]  # never a glob


def test_the_drops_left_out_of_a_run_are_not_in_its_corpus(tmp_path):
    """The gate leaves out of a run the drops it could not gate now (still being written, an infrastructure
    error): an active drop named in `without` is out of the line's corpus like an inactive one, and the drops
    join the drop source's corpus (drops.source), not the first one."""
    from tasks.data.files import fingerprint_files
    from tasks.line.sources import line_sources

    for name in ("domain", "general", "d1", "d2"):
        write_docs(tmp_path / name / "a.jsonl", [f"{name} 문서"])
    config = validate_config({"model": {"id": "m"}, "drops": {"source": "general_ko"}, "sources": [
        {"name": "domain", "paths": [str(tmp_path / "domain")], "weight": 0.5},
        {"name": "general_ko", "paths": [str(tmp_path / "general")], "weight": 0.5}]})

    def active(name):
        path = str((tmp_path / name).resolve())
        return lines.Drop(path=path, status="active",
                          identity=lines.DropIdentity.of(path, fingerprint_files([Path(path) / "a.jsonl"]).items))

    state = lines.LineState(line="l", drops=[active("d1"), active("d2")])
    folders = lambda fp: sorted(Path(i["path"]).parent.name for i in fp.items)  # noqa: E731
    assert folders(line_sources(config, state)[0]) == ["d1", "d2", "general"]
    left_out = [str((tmp_path / "d2").resolve())]
    assert folders(line_sources(config, state, without=left_out)[0]) == ["d1", "general"]


def write_unreadable_files(folder, secret, good_first: bool):
    """One file of each kind a reader cannot take (and, outside the folder, a secret reached by a symlink from
    it, and a FIFO in it). Returns {file: (line, words of the reject)}. With `good_first`, the CSV holds one good
    row before its bad one."""
    folder.mkdir(parents=True, exist_ok=True)
    depth = 100_000
    (folder / "deep.jsonl").write_text('{"content": ' + "[" * depth + "]" * depth + "}\n")
    good = "content\n" + ("좋은 행 하나: 혈압은 아침과 저녁에 같은 자세로 잰다.\n" if good_first else "")
    (folder / "wide.csv").write_text(good + "x" * 140_000 + "\n")
    (folder / "broken.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 8 + b"PAR1")
    (folder / "mis.jsonl").write_bytes(b'{"content": "\xff\xfe"}\n')
    (folder / "huge.txt").write_text("가" * 4000)  # 12,000 bytes, over corpus.max_document_bytes=10000
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("aws_secret_access_key = do-not-read-this")
    (folder / "notes.txt").symlink_to(secret)
    os.mkfifo(folder / "pipe.jsonl")
    settle(folder)
    return {"deep.jsonl": (1, "nested too deeply"),
            "wide.csv": (3 if good_first else 2, "field larger than field limit"),
            "broken.parquet": (1, "unreadable parquet file"), "mis.jsonl": (1, "invalid UTF-8"),
            "huge.txt": (1, "over corpus.max_document_bytes=10000")}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_unreadable_files_and_paths_outside_the_roots_reject_their_drops_and_the_line_goes_on(
        config, tmp_path, artifacts, monkeypatch):
    """on_bad_record: fail. One run gates three drops: one of bad files (each named with its place), `/` and a
    folder outside drops.roots (refused, nothing in them listed), and trains the line on its corpus without them;
    the nightly run after finds nothing changed."""
    import tasks.data.files
    from flows.retrain import retrain

    roots = tmp_path / "drops"
    cfg = config.model_copy(update={
        "corpus": config.corpus.model_copy(update={"max_document_bytes": 10_000}),
        "drops": config.drops.model_copy(update={"roots": [str(roots)]})})
    bad = roots / "2026-12-01"
    expected = write_unreadable_files(bad, tmp_path / "home" / ".aws" / "credentials.txt", good_first=False)
    outside = write_docs(tmp_path / "elsewhere" / "x" / "a.jsonl", ["밖에서 온 문서"])
    lines.announce(open_root(artifacts), "trust", "/", "event")
    lines.announce(open_root(artifacts), "trust", outside)
    walked = []
    real_walk = os.walk
    monkeypatch.setattr(tasks.data.files.os, "walk", lambda top, **k: walked.append(str(top)) or real_walk(top, **k))

    rejected = retrain(config=cfg, drop=str(bad), drop_source="event", line="trust", settle_seconds=60,
                       artifacts=str(artifacts))
    assert rejected["trained"] and rejected["reason"] == "changed"  # a drop can fail; the line goes on
    assert sorted(rejected["rejected"]) == sorted(["/", str(outside), str(bad)])
    assert new_file_counts(rejected) == (3, 3, 3) and stage_counts(rejected)["load"]["documents"] == 120
    assert "/" not in walked and str(outside) not in walked
    drops = {d["path"]: d for d in rejected["drops"]}
    assert {p: d["status"] for p, d in drops.items()} == {"/": "rejected", str(outside): "rejected",
                                                           str(bad): "rejected"}
    assert "outside drops.roots" in drops["/"]["reason"] and "outside drops.roots" in drops[str(outside)]["reason"]
    for name, (line, words) in expected.items():
        assert f"{bad / name}:{line}: " in drops[str(bad)]["reason"], name
        assert words in drops[str(bad)]["reason"].split(f"{bad / name}:{line}: ")[1].split("(set corpus")[0], name
    profile = lines.read_line(open_root(artifacts), "trust").find(bad).profile
    assert profile["skipped"] == 2 and sorted(profile["skipped_files"]) == [
        f"{bad / 'notes.txt'}: a symlink out of the folder", f"{bad / 'pipe.jsonl'}: a FIFO, not a regular file"]

    nightly = retrain(config=cfg, line="trust", settle_seconds=60, artifacts=str(artifacts))
    assert not nightly["trained"] and nightly["reason"] == "unchanged"  # rejected before: stops nothing


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_bad_records_and_symlinks_out_of_a_drop_are_skipped_and_counted_and_an_event_drop_needs_roots(
        config, texts, tmp_path, artifacts):
    """on_bad_record: skip, drops.roots empty. A drop typed at a shell trains without its bad records (counted)
    and without what a symlink out of it points to; a drop an event announces is refused; the nightly run goes
    on."""
    import pyarrow as pa

    from flows.retrain import retrain

    cfg = config.model_copy(update={
        "corpus": config.corpus.model_copy(update={"max_document_bytes": 10_000, "on_bad_record": "skip"}),
        "drops": config.drops.model_copy(update={"max_reject_share": 0.2})})
    drop = tmp_path / "incoming" / "2026-12-02"
    write_docs(drop / "good.jsonl", texts[120:160])
    expected = write_unreadable_files(drop, tmp_path / "home" / ".aws" / "credentials.txt", good_first=True)

    first = retrain(config=cfg, drop=str(drop), line="skip", settle_seconds=60, artifacts=str(artifacts))
    assert first["trained"] and [d["status"] for d in first["drops"]] == ["active"]
    entry = lines.read_line(open_root(artifacts), "skip").find(drop)
    assert (entry.profile["rejected"], entry.profile["documents"], entry.profile["skipped"]) == (5, 41, 2)
    assert len(entry.profile["reject_examples"]) == 5
    for name, (line, words) in expected.items():
        assert any(r.startswith(f"{drop / name}:{line}: ") and words in r for r in entry.profile["reject_examples"])
    load = stage_counts(first)["load"]
    assert load["documents"] == 120 + 41 and load["rejected"] == 5
    load_out = next(s for s in first["pipeline"]["stages"] if s["name"] == "load")["output"]
    from tasks.data.pieces import entry_documents

    texts_read = entry_documents(Path(load_out), artifacts).column("text").to_pylist()
    assert not any("do-not-read-this" in t for t in texts_read)

    evil = write_docs(tmp_path / "anywhere" / "e" / "a.jsonl", texts[200:210])
    refused = retrain(config=cfg, drop=str(evil), drop_source="event", line="skip", settle_seconds=60,
                      artifacts=str(artifacts))
    assert refused["trained"] is False and refused["reason"] == "drop-rejected"
    assert "announced by an event while drops.roots is empty" in {d["path"]: d for d in refused["drops"]}[
        str(evil)]["reason"]

    nightly = retrain(config=cfg, line="skip", settle_seconds=60, artifacts=str(artifacts))
    assert nightly["trained"] is False and nightly["reason"] == "unchanged"


def test_no_rejected_drop_takes_the_configured_corpus_out_of_its_line(tmp_path):
    from tasks.line.sources import line_sources

    corpus = tmp_path / "corpus"
    write_docs(corpus / "a.jsonl", ["문서"])
    write_docs(corpus / "sub" / "b.jsonl", ["하위 폴더 문서"])
    write_docs(corpus / "bad" / "c.jsonl", ["거부된 문서"])
    config = validate_config({"corpus": {"paths": [str(corpus)]}, "model": {"id": "m"}})
    refused = {"passed": False, "reasons": ["outside drops.roots"], "refused": True}
    state = lines.LineState(line="l", drops=[
        lines.Drop(path=str(corpus / "sub"), status="rejected", profile=refused),  # an event naming a corpus folder
        lines.Drop(path="/", status="rejected", profile=refused),
        lines.Drop(path=str(tmp_path), status="removed"),  # holds the configured folder: excluding it would empty it
        lines.Drop(path=str(corpus), status="rejected"),  # is the configured folder
        lines.Drop(path=str(corpus / "bad"), status="rejected")])  # gated on its content inside the folder: out
    names = [Path(i["path"]).relative_to(corpus).as_posix() for i in line_sources(config, state)[0].items]
    assert names == ["a.jsonl", "sub/b.jsonl"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_one_run_per_line_the_second_waits_then_finds_its_work_done(config, artifacts):
    """Any two runs of one line (a schedule and an event, two deployments, a shell): the second waits for the
    first to finish, then sees the corpus unchanged since the first trained and trains nothing."""
    import threading

    from flows.retrain import retrain
    from tasks.core.root import open_root

    results = {}

    def run(name):
        results[name] = retrain(config=config, line="solo", settle_seconds=60, artifacts=str(artifacts))

    first = threading.Thread(target=run, args=("first",))
    first.start()
    lock = open_root(artifacts).path(lines.run_lock("solo") + ".lock")
    deadline = time.monotonic() + 60
    while not lock.exists() and time.monotonic() < deadline:  # the first run holds the line
        time.sleep(0.05)
    assert lock.exists() and first.is_alive(), "the first run never took the line's lock"
    run("second")
    first.join()
    assert results["first"]["trained"] and results["first"]["reason"] == "changed"
    assert not results["second"]["trained"] and results["second"]["reason"] == "unchanged"


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_run_that_fails_at_push_says_promoted_not_pushed_everywhere(config, texts, tmp_path, artifacts, monkeypatch,
                                                                     capsys):
    """Trained and promoted, then the upload fails: the gate artifact says "promoted, not pushed: <why>", the drop
    says it was trained but not released, the run shows the line's drops, and `--summary` holds the error; the
    terminal gets the message, not a traceback."""
    import yaml

    from fake_hub import FakeHub, online
    from flows.cli import main
    from helpers import flow_run_artifacts

    cfg = config.model_dump(mode="json")
    cfg["train"].update(max_steps=4, learning_rate=3e-3)
    cfg["push"].update(repo_id="test-user/line", retries=0)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    drop = write_docs(tmp_path / "drops" / "d1" / "a.jsonl", texts[120:160])
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with FakeHub(fail_commits=100) as hub:
        online(monkeypatch, hub.url, disable_xet=True)  # one commit, refused: PushFailed at once
        rc = main(["retrain", "-c", str(tmp_path / "c.yaml"), "--line", "pushfail", "--drop", str(drop),
                   "--artifacts", str(artifacts), "--summary", str(tmp_path / "s.json")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "retrain failed: push: uploading to test-user/line failed" in err and "Traceback" not in err
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["trained"] is True and result["released"] is False and result["reason"] == "failed"
    assert result["error"].startswith("PushFailed: push: uploading to test-user/line failed")
    assert result["outcome"].startswith("trained, promoted, not released: PushFailed")
    assert result["pipeline"]["gate"]["not_pushed"].startswith("PushFailed")
    [d] = lines.read_line(open_root(artifacts), "pushfail").drops
    assert d.status == "active" and "trained, promoted, not released: PushFailed" in d.outcome
    assert [r["outcome"] for r in result["drops"]] == [d.outcome]
    # The last gate artifact the run made (the API returns them in no set order): the push's failure re-shows it.
    gate = max((a for a in flow_run_artifacts(result["pipeline"]["flow_run"]) if a.key == "gate"),
               key=lambda a: a.created).data
    assert gate.startswith("# Promotion gate: promoted, not pushed: PushFailed")
    keys = {a.key for a in flow_run_artifacts(result["flow_run"])}
    assert {"line-drops", "retrain-decision"} <= keys


@pytest.mark.slow  # three `retrain` flows, two trainings
def test_a_nightly_run_retrains_when_the_replay_text_changed(config, texts, tmp_path, artifacts):
    """A line's fingerprint is every source it trains on: the replay text (a source drops do not join) replaced
    retrains the line the next night; unchanged, the night trains nothing."""
    from flows.retrain import retrain

    write_docs(tmp_path / "general" / "g.jsonl", [f"일반 문서 {i}: 오늘 날씨는 맑고 기온은 {i}도이다." for i in range(40)])
    replayed = config.model_copy(update={"replay": config.replay.model_copy(update={
        "paths": [str(tmp_path / "general")], "fraction": 0.25})})
    assert retrain(config=replayed, line="l", artifacts=str(artifacts), settle_seconds=60)["trained"]
    assert retrain(config=replayed, line="l", artifacts=str(artifacts), settle_seconds=60)["reason"] == "unchanged"
    write_docs(tmp_path / "general" / "g.jsonl", [f"일반 문서 {i}: 시장에는 사람이 많았고 버스는 {i}분마다 왔다."
                                                 for i in range(40)])
    night = retrain(config=replayed, line="l", artifacts=str(artifacts), settle_seconds=60)
    assert night["trained"] and night["reason"] == "changed"
