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
from tasks.drop_gate import WRITING_MARKER, check_profile, profile_drop, unsettled_files
from tasks.state import lines
from tasks.core.config import DropsConfig, validate_config

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
    from tasks.load import resolve_corpus_files
    from tasks.tokenize import resolve_tokenizer

    cfg = config.model_copy(update={"corpus": config.corpus.model_copy(update={"on_bad_record": on_bad_record})})
    (tmp_path / "drop").mkdir()
    (tmp_path / "drop" / "d.jsonl").write_bytes(content)
    profile = profile_drop([tmp_path / "drop" / "d.jsonl"], resolve_corpus_files(cfg.corpus), cfg,
                           resolve_tokenizer(cfg.model), open_root(tmp_path / "artifacts"), hash_file)
    assert not profile["passed"] and reason in "; ".join(profile["reasons"])


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
    assert entry["fingerprint"] and entry["registered_at"]

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
