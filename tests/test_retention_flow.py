"""Garbage collection beside the real flows (slow: each test runs the pipeline): GC never makes a line's next run
recompute; a build whose input vanished rebuilds it; every retrain run collects after itself unless told not to."""

from __future__ import annotations

import pytest

from tasks.core.config.retention import RetentionConfig
from tasks.core.root import open_root
from tasks.line.retention import collect

from helpers import sample_texts, write_jsonl
from test_retrain import config, corpus, new_file_counts, texts, write_docs  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def states(result) -> dict[str, str]:
    return {s["name"]: s["state"] for s in result["pipeline"]["stages"]}


def test_gc_never_makes_the_next_nightly_run_recompute(config, texts, tmp_path, artifacts):
    from flows.retrain import retrain

    def run(drop=None, **kw):
        return retrain(config=config, drop=str(drop) if drop else None, line="gc", settle_seconds=60,
                       artifacts=str(artifacts), **kw)

    off = config.model_copy(update={"retention": RetentionConfig(after_retrain=False)})
    first = retrain(config=off, line="gc", settle_seconds=60, artifacts=str(artifacts))
    assert first["trained"] and "gc" not in first
    second = run(write_docs(tmp_path / "drops" / "d1" / "a.jsonl", texts[120:160]))
    assert second["trained"] and second["gc"]["deleted"] == []  # after each run; min_age (1 h) keeps all of today

    report = collect(open_root(artifacts), RetentionConfig(max_bytes=0, min_age=0, keep_releases=1))
    deleted = {r["rel"] for r in report["deleted"]}
    first_load = next(s for s in first["pipeline"]["stages"] if s["name"] == "load")["key"]
    assert f"cache/load/{first_load}" in deleted and report["bytes_after"] < report["bytes_before"]

    forced = run(force=True)  # the next run, nothing changed: every lookup hits
    # Every lookup hits: nothing is computed again (a push the gate refused, as it did the run before, is Skipped).
    ran = {n: s for n, s in states(forced).items() if not (n == "push" and s == "Skipped")}
    assert set(ran.values()) == {"Cached"}, states(forced)
    later = run(write_docs(tmp_path / "drops" / "d2" / "a.jsonl", texts[160:200]))  # a new drop: only it is read
    assert later["trained"] and new_file_counts(later) == (1, 1, 1)


def test_a_build_whose_input_vanished_rebuilds_it(tmp_path, tiny_model, monkeypatch):
    """A collector deleting an entry between its lookup and its hold (here: at the hold): the next stage finds it
    gone, the runner makes it again, and the run completes."""
    from helpers import run_flow
    from tasks.core import holds

    write_jsonl(tmp_path / "c" / "a.jsonl", [{"content": t} for t in sample_texts(60)])
    config = {"corpus": {"paths": [str(tmp_path / "c")]}, "model": {"id": str(tiny_model)},
              "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 64, "overlap": 16}}
    artifacts = tmp_path / "artifacts"
    real_add, gone = holds.RunHold.add, []

    def collected_at_once(self, rel):
        if rel.startswith("cache/tokenize/") and not gone:
            gone.append(rel)
            open_root(artifacts).delete_entry(rel)
        return real_add(self, rel)

    monkeypatch.setattr(holds.RunHold, "add", collected_at_once)
    _, summary = run_flow(config, artifacts, until="chunk")
    stages = {s["name"]: s for s in summary["stages"]}
    assert gone and stages["token-stats"]["rebuilt"] == gone and summary["status"] == "Completed"
    assert (artifacts / gone[0] / "_COMPLETE").is_file()
