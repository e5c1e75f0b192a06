"""Conflicts before compute (tasks/line/preflight.py): what would make a run fail after training is found by
`cpt validate` and before a run starts, with the fix in the message; and a corpus of its own is a lineage of its
own. None of these start a server or a flow."""

from __future__ import annotations

import json
import threading
import time

import pytest

from flows.cli import main
from helpers import write_jsonl
from tasks.core.config.tree import load_config
from tasks.core.root import open_root
from tasks.line import lines
from tasks.line.preflight import conflicts, derived_push_name, with_release_name
from tasks.line.promotions import claim_releases


def config(*overrides: str):
    return load_config(None, ["corpus.paths=[samples/medical_ko.jsonl]", "model.id=artifacts/models/tiny-ko",
                              *overrides])


def test_without_push_name_a_new_corpus_or_model_is_a_new_release_and_lineage():
    demo = with_release_name(config(), None).push.name
    assert demo == derived_push_name(config(), None) and demo.startswith("tiny-ko-cpt-medical_ko-")
    assert with_release_name(config(), None).push.name == demo  # the same config finds its release again
    mine = with_release_name(config('corpus.paths=["data/*.jsonl", "more/"]'), None).push.name
    assert mine.startswith("tiny-ko-cpt-data-more-") and mine != demo
    other_model = with_release_name(config("model.id=elsewhere/tiny-ko"), None).push.name
    assert other_model != demo  # the same last name, another model: the digest tells them apart
    assert with_release_name(config(), "demo").push.name == "tiny-ko-cpt-line-demo"  # a line's own
    assert with_release_name(config("push.name=chosen"), "demo").push.name == "chosen"
    assert with_release_name(config("push.repo_id=org/m"), None).push.name is None  # the Hub repo names it


def test_a_release_of_another_lineage_is_a_conflict_before_compute_with_the_fix(tmp_path, capsys):
    """The README's own path: make demo wrote models/tiny-ko-cpt as push.name's lineage; the line `demo` with the
    same push.name would have trained for 22 minutes, then failed at push."""
    root = open_root(tmp_path / "art")
    claim_releases(root, "name-tiny-ko-cpt", ["models/tiny-ko-cpt"])
    found = conflicts(config("push.name=tiny-ko-cpt"), root, "demo")
    assert len(found) == 1 and "models/tiny-ko-cpt is written by runs with push.name 'tiny-ko-cpt'" in found[0]
    assert "--set push.name=tiny-ko-cpt-line-demo" in found[0]
    assert conflicts(config("push.name=tiny-ko-cpt"), root, None) == []  # its own lineage
    assert conflicts(config(), root, "demo") == []  # push.name unset: the line's own release
    assert conflicts(config("push.name=tiny-ko-cpt"), root, "demo", pushes=False) == []  # --until chunk
    # cpt validate says so (exit 2), and so does cpt run / retrain before any server starts, with --summary.
    args = ["--set", "corpus.paths=[samples/medical_ko.jsonl]", "--set", "model.id=example/tiny-ko",
            "--set", "push.name=tiny-ko-cpt", "--artifacts", str(tmp_path / "art")]
    assert main(["validate", *args, "--line", "demo"]) == 2
    assert "would fail after training" in capsys.readouterr().err
    assert main(["retrain", *args, "--line", "demo", "--summary", str(tmp_path / "s.json")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--set push.name=tiny-ko-cpt-line-demo" in err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["trained"] is False and summary["reason"] == "conflict" and "RunConflict" in summary["error"]
    assert not (tmp_path / "art" / "cache").exists()  # nothing was computed


def test_a_line_lock_held_too_long_is_a_conflict_and_a_short_hold_is_waited_for(tmp_path):
    root = open_root(tmp_path / "art")
    held, release = threading.Event(), threading.Event()

    def holder():
        with root.exclusive(lines.run_lock("demo"), "waiting"):
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        held.wait(10)
        assert conflicts(config(), root, "demo", now=time.time() + 60) == []  # a run is on the line: wait for it
        found = conflicts(config(), root, "demo", now=time.time() + 30 * 3600)
        assert len(found) == 1 and "has been held by pid" in found[0] and "for 30.0 h" in found[0]
        assert "kill" in found[0]
        assert conflicts(config(), root, None, now=time.time() + 30 * 3600) == []  # a run of no line
    finally:
        release.set()
        t.join()
    assert conflicts(config(), root, "demo", now=time.time() + 30 * 3600) == []  # released: nothing to wait for


def test_a_release_folder_that_cannot_be_written_is_a_conflict(tmp_path):
    root = open_root(tmp_path / "art")
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "models").write_text("not a folder")
    found = conflicts(config("push.name=x"), root, None)
    assert len(found) == 1 and "is a file where the release folder" in found[0]
    (tmp_path / "art" / "models").unlink()
    (tmp_path / "art" / "models").mkdir()
    (tmp_path / "art" / "models" / "x").write_text("a file")
    assert "is a file: move it away" in conflicts(config("push.name=x"), root, None)[0]


@pytest.mark.slow  # the fake Hub is a server on 127.0.0.1
def test_a_hub_repo_needs_a_token_that_may_write_there(tmp_path, monkeypatch):
    from fake_hub import FakeHub, online

    root = open_root(tmp_path / "art")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    found = conflicts(config("push.repo_id=alice/m"), root, None)
    assert len(found) == 1 and "no token to upload with: export HF_TOKEN" in found[0]
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    with FakeHub(user="alice") as hub:
        online(monkeypatch, hub.url)
        assert conflicts(config("push.repo_id=alice/m"), root, None) == []
        found = conflicts(config("push.repo_id=bob/m"), root, None)
        assert len(found) == 1 and "belongs to 'alice', who may not write to 'bob'" in found[0]
        assert conflicts(config("push.repo_id=bob/m"), root, None, hub=False) == []  # not asked: no claim


def test_a_sources_config_derives_its_release_name_from_its_domain_source():
    """With `sources` (no `corpus`), the name comes from the first source's paths: two lines of work on other
    domains are two releases, never one name derived from an empty corpus."""
    def sources(domain: str):
        return load_config(None, ["model.id=artifacts/models/tiny-ko", f"sources=[{{name: domain, paths: [{domain}],"
                                  " weight: 0.7}, {name: news, paths: [data/news], weight: 0.3}]"])

    law, bills = (with_release_name(sources(p), None).push.name for p in ("data/law", "data/bills"))
    assert law.startswith("tiny-ko-cpt-law-") and bills.startswith("tiny-ko-cpt-bills-") and law != bills
