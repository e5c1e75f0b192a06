"""Retraining on corpus drops: unchanged corpus → nothing trained; a new drop → trained; a drop still being
written → not trained."""

import json
import os
import time

import pytest

from conftest import sample_texts, write_jsonl
from flows.retrain import WRITING_MARKER, unsettled_files, with_drop
from tasks.config import validate_config


@pytest.fixture
def drops(tmp_path):
    texts = sample_texts()
    root = tmp_path / "drops"
    write_jsonl(root / "2026-11-01" / "part-0.jsonl", [{"content": t} for t in texts[:150]])
    write_jsonl(root / "2026-11-08" / "part-0.jsonl", [{"content": t} for t in texts[150:250]])
    old = time.time() - 3600
    for f in root.rglob("*.jsonl"):
        os.utime(f, (old, old))
    return root


@pytest.fixture
def config(drops, tiny_model):
    return validate_config({
        "corpus": {"paths": [str(drops)]}, "model": {"id": str(tiny_model)},
        "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 96, "overlap": 16},
        "train": {"max_steps": 4, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                  "eval_steps": 2, "save_steps": 4, "logging_steps": 2, "packing": True},
        "push": {"name": "retrained"},
    })


def test_unsettled_files_and_writing_marker(tmp_path):
    f = write_jsonl(tmp_path / "d" / "a.jsonl", [{"content": "x"}])
    assert unsettled_files([f], settle_seconds=60)  # just written
    assert not unsettled_files([f], settle_seconds=60, now=time.time() + 120)
    (tmp_path / "d" / WRITING_MARKER).touch()
    assert unsettled_files([f], settle_seconds=0, now=time.time() + 120) == [str(tmp_path / "d")]


def test_with_drop_adds_only_uncovered_folders(config, drops, tmp_path):
    assert with_drop(config, str(drops / "2026-11-08")).corpus.paths == config.corpus.paths
    elsewhere = tmp_path / "incoming" / "d1"
    assert with_drop(config, str(elsewhere)).corpus.paths == [*config.corpus.paths, str(elsewhere.resolve())]


@pytest.mark.usefixtures("prefect_harness")
def test_retrain_only_when_the_corpus_changed(config, drops, artifacts):
    from flows.retrain import retrain

    first = retrain(config=config, artifacts=str(artifacts), settle_seconds=60)
    assert first["trained"] and first["summary"]["status"] == "Completed"
    state = json.loads((artifacts / "state" / "retrain-default.json").read_text())
    assert state["corpus"] == first["fingerprint"] and state["files"] == 2

    again = retrain(config=config, artifacts=str(artifacts), settle_seconds=60)
    assert again == {"trained": False, "reason": "unchanged", "fingerprint": first["fingerprint"]}

    # A new drop that is still being written is not trained on…
    new = write_jsonl(drops / "2026-11-15" / "part-0.jsonl", [{"content": t} for t in sample_texts()[250:]])
    waiting = retrain(config=config, artifacts=str(artifacts), settle_seconds=60)
    assert waiting["trained"] is False and waiting["reason"] == "unsettled"
    assert any(str(new) in f for f in waiting["files"])

    # …and once it has settled (or its producer announced it), it is.
    old = time.time() - 3600
    os.utime(new, (old, old))
    third = retrain(config=config, drop=str(drops / "2026-11-15"), artifacts=str(artifacts), settle_seconds=60)
    assert third["trained"] and third["fingerprint"] != first["fingerprint"]
    assert json.loads((artifacts / "state" / "retrain-default.json").read_text())["files"] == 3
