"""Drops are never lost (flows/drops.py): `cpt emit-drop` returns only once the server has the event, and fails
saying so when it cannot; the scan registers and trains a settled drop whose announcement never arrived."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, sample_texts, write_jsonl
from tasks.core.config.tree import validate_config
from tasks.core.root import open_root
from tasks.line import lines

OLD = time.time() - 3600


def settled_drop(folder, texts):
    write_jsonl(folder / "part-0.jsonl", [{"content": t} for t in texts])
    for f in folder.rglob("*"):
        os.utime(f, (OLD, OLD))
    return folder


def emit(path, api_url: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.run([sys.executable, "-m", "flows.cli", "emit-drop", str(path), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def dead_api() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api"  # nothing listens there once the socket is closed


def test_an_event_the_server_accepted_but_never_stored_is_sent_again_then_fails(tmp_path, monkeypatch):
    """The issue's lost drop: the events client took the event (no error) and the server never stored it. Only
    asking the server for it by id tells; a sent event is not an announced one. Nothing is started: the events
    client and the API client are fakes."""
    import prefect.client.orchestration as orchestration
    import prefect.events.clients as clients
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.announce import AnnounceFailed, announce

    sent, stored = [], []

    class Events:  # accepts every event, as Prefect's client does while its websocket still buffers
        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        async def emit(self, event):
            sent.append(event.id)

    class Page:
        def __init__(self, events):
            self.events = events

    class Api:
        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        async def read_events(self, filter, limit):
            return Page([e for e in stored if e.id in filter.id.id])

    monkeypatch.setattr(clients, "get_events_client", lambda **kw: Events())
    monkeypatch.setattr(orchestration, "get_client", lambda **kw: Api())
    drop = settled_drop(tmp_path / "d1", sample_texts(3))
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with pytest.raises(AnnounceFailed, match="NOT announced") as failed:
            announce(drop, attempts=2, confirm_seconds=0.2, backoff=0.0, say=lambda m: None)
        assert "has not stored it" in str(failed.value)
        assert len(sent) == 2 and sent[0] == sent[1]  # the same event again: the server keeps one

        class Storing(Events):
            async def emit(self, event):
                sent.append(event.id)
                stored.append(event)

        monkeypatch.setattr(clients, "get_events_client", lambda **kw: Storing())
        event, attempt = announce(drop, attempts=2, confirm_seconds=0.2, backoff=0.0, say=lambda m: None)
        assert attempt == 1 and [e.id for e in stored] == [event.id]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_emit_drop_returns_once_the_server_has_the_event(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.settings import PREFECT_API_URL

    drop = settled_drop(tmp_path / "drops" / "d1", sample_texts(5))
    out = emit(drop, PREFECT_API_URL.value())
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"emitted corpus.drop.landed for {drop}" in out.stdout and "the server has it" in out.stdout
    event_id = out.stdout.split("(")[1].split(")")[0]
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=EventFilter(event=EventNameFilter(name=["corpus.drop.landed"])), limit=50)
    assert [str(e.id) for e in page.events if e.payload.get("path") == str(drop)] == [event_id]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_drop_whose_event_was_lost_is_trained_by_the_next_scan(tmp_path, tiny_model):
    """The server is down when the producer announces: emit-drop says the drop is not announced and exits 1;
    the next scan finds the settled drop under drops.roots, registers it as its event would have, and trains."""
    from flows.drops import scan_drops

    texts = sample_texts()
    write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"content": t} for t in texts[:120]])
    roots = tmp_path / "drops"
    drop = settled_drop(roots / "2026-11-25", texts[120:160])
    out = emit(drop, dead_api(), "--attempts", "2", "--confirm-seconds", "1")
    assert out.returncode == 1 and "the drop is NOT announced" in out.stderr, out.stdout + out.stderr
    assert "attempt 1/2 not confirmed" in out.stderr

    config = validate_config({
        "corpus": {"paths": [str(tmp_path / "corpus")]}, "model": {"id": str(tiny_model)},
        "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 96, "overlap": 16},
        "train": {"max_steps": 2, "per_device_train_batch_size": 8, "eval_steps": 2, "save_steps": 2,
                  "logging_steps": 1, "early_stopping_patience": None},
        "evaluate": {"max_eval_rows": 8}, "drops": {"roots": [str(roots)]}})
    for f in (tmp_path / "corpus").rglob("*"):
        os.utime(f, (OLD, OLD))
    (roots / "2026-11-26").mkdir()  # being written: an empty folder, and one marked as being written
    settled_drop(roots / "2026-11-27", texts[160:170])
    (roots / "2026-11-27" / "_WRITING").touch()
    artifacts = tmp_path / "artifacts"
    first = scan_drops(config=config, line="scan", settle_seconds=60, artifacts=str(artifacts))
    assert first["announced"] == [str(drop)]
    assert first["retrain"]["trained"] is True and first["retrain"]["reason"] == "changed"
    state = lines.read_line(open_root(artifacts), "scan")
    assert [(d.path, d.status, d.announced_by) for d in state.drops] == [(str(drop), "active", "event")]
    assert state.last_training["drops"] == [str(drop)]
    again = scan_drops(config=config, line="scan", settle_seconds=60, artifacts=str(artifacts))
    assert again == {"announced": [], "retrain": None}  # nothing new, nothing run
