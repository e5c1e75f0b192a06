"""Garbage collection on the real S3 server (SeaweedFS) with hosts that share no disk: two collectors on two hosts
at once, beside a run in flight on a third, delete nothing live and nothing twice; each host's mirror is pruned
of what the store no longer has and down to $CPT_SCRATCH_MAX_BYTES, its release folder kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from helpers import ROOT, new_bucket, s3_env, sample_texts, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def collector(scratch, env: dict, url: str, *extra: str) -> subprocess.Popen:
    """`cpt cache gc` as another host runs it: its own process and scratch folder, everything reclaimable."""
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "cache", "gc", "--json", "--artifacts", url,
                             "--set", "retention.max_bytes=0", "--set", "retention.min_age=0", *extra],
                            cwd=ROOT, env={**os.environ, **env, "CPT_SCRATCH": str(scratch)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


def test_two_collectors_on_two_hosts_beside_a_run_in_flight(tmp_path, tiny_model, s3_endpoint, monkeypatch):
    import tasks.train
    from flows.retrain import retrain
    from helpers import run_flow
    from tasks.core.config.retention import RetentionConfig
    from tasks.core.config.tree import validate_config
    from tasks.core.root import open_root

    env = s3_env(s3_endpoint)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "host-a"))
    url = f"s3://{new_bucket(s3_endpoint)}/cpt"
    texts = sample_texts()
    write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"content": t} for t in texts[:60]])
    raw = {"corpus": {"paths": [str(tmp_path / "corpus")]}, "model": {"id": str(tiny_model)},
           "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 64, "overlap": 16},
           "train": {"max_steps": 1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                     "eval_steps": 1, "save_steps": 1, "early_stopping_patience": None},
           "evaluate": {"max_eval_rows": 4}, "push": {"name": "line-model"},
           "gate": {"max_validation_increase": 0.5}, "retention": {"after_retrain": False}}
    config = validate_config(raw)
    old = os.path.getmtime(tmp_path / "corpus" / "a.jsonl") - 3600
    os.utime(tmp_path / "corpus" / "a.jsonl", (old, old))

    first = retrain(config=config, line="L", settle_seconds=60, artifacts=url)  # host a: the line's first night
    assert first["trained"]
    _, other = run_flow(raw, url, until="chunk", chunk__max_seq_length=48)  # garbage: a config tried once

    # Host a, in flight: a drop trains; its training waits until both collectors are done.
    drop = tmp_path / "drops" / "d1"
    write_jsonl(drop / "a.jsonl", [{"content": t} for t in texts[120:160]])
    os.utime(drop / "a.jsonl", (old, old))
    training, release = threading.Event(), threading.Event()
    real_train = tasks.train.train_model

    def held_train(*a, **k):
        training.set()
        assert release.wait(600)
        return real_train(*a, **k)

    monkeypatch.setattr(tasks.train, "train_model", held_train)
    results = {}
    run = threading.Thread(target=lambda: results.update(second=retrain(
        config=config, drop=str(drop), line="L", settle_seconds=60, artifacts=url)))
    run.start()
    try:
        assert training.wait(600), "the run never reached its training"
        b, c = (collector(tmp_path / f"host-{h}", env, url) for h in "bc")  # at once, on two hosts
        reports = [finished(b), finished(c)]
    finally:
        release.set()
        run.join(600)
    second = results["second"]
    assert second["trained"]

    deleted = [{r["rel"] for r in rep["deleted"] if r["kind"] == "entry"} for rep in reports]
    assert not deleted[0] & deleted[1]  # nothing twice
    gone = deleted[0] | deleted[1]
    assert {f"cache/chunk/{s['key']}" for s in other["stages"] if s["name"] == "chunk"} <= gone  # the garbage went
    in_flight = {f"cache/{s['key'].rsplit('-', 1)[0]}/{s['key']}" for s in second["pipeline"]["stages"] if s.get("key")}
    assert not in_flight & gone  # nothing the run in flight used
    # Nothing live is gone, nothing is half-deleted: every entry of the line's last run is complete in the store.
    store = open_root(url).store
    assert all(store.complete(rel) is not None for rel in in_flight)
    assert not [w for w, why in open_root(url).verify() if why is not None]
    forced = retrain(config=config, line="L", settle_seconds=60, artifacts=url, force=True)  # the next run
    assert {s["state"] for s in forced["pipeline"]["stages"]} == {"Cached"}

    # Host a's mirror: copies of what the store no longer has go; then down to its budget; its release stays.
    mirror = open_root(url).local
    stale = [rel for rel in gone if (mirror / rel / "_COMPLETE").is_file()]
    assert stale
    monkeypatch.setenv("CPT_SCRATCH_MAX_BYTES", "1")
    from tasks.line.retention import collect

    report = collect(open_root(url), RetentionConfig(min_age=0))
    pruned = {r["rel"] for r in report["mirror"]["deleted"]}
    assert set(stale) <= pruned and not any((mirror / rel).exists() for rel in stale)
    assert not list((mirror / "cache").glob("*/*/_COMPLETE"))  # every copy went (a fetch makes it again)
    assert (mirror / "models" / "line-model" / "config.json").is_file()
