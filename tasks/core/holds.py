"""Holds: the entries a running build uses, so that garbage collection on any host never deletes them under it.

A run writes `state/holds/<run>.json` (shared through the store on an object-store root): who holds, until when
(renewed from a thread every lease/3) and every entry it has looked up so far (the flow adds each stage's output
as the stage returns; what an entry refers to is held with it). Garbage collection keeps everything a hold
names while the hold's lease runs. A run killed without cleanup stops renewing: its hold lapses after the lease
(`CPT_HOLD_LEASE_SECONDS`, default 10 minutes) and the next collection removes the file.

An entry is used before it is held (the lookup comes first): what was looked up moments ago is protected by
`retention.min_age`, and a build whose input vanished anyway rebuilds it (flows/continued_pretraining.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from tasks.core.paths import temp_beside
from tasks.core.manifest import safe_relpath

HOLDS = "state/holds"


def lease_seconds() -> float:
    return float(os.environ.get("CPT_HOLD_LEASE_SECONDS", "600"))


class Hold(BaseModel):
    """A hold as written: data read back from a shared root, so every name in it stays inside the root."""

    model_config = ConfigDict(extra="forbid")
    run: str
    owner: str
    started: float
    expires: float
    entries: list[str] = []

    @field_validator("entries")
    @classmethod
    def _inside(cls, v: list[str]) -> list[str]:
        return [safe_relpath(e) for e in v]

    def live(self, now: float | None = None) -> bool:
        return self.expires > (time.time() if now is None else now)


class RunHold:
    """`with RunHold(root, run) as hold: ... hold.add(rel)`: holds `rel` (and what it refers to) until the block
    ends, or until the lease lapses if this process dies."""

    def __init__(self, root, run: str):
        self.root = root
        self.rel = f"{HOLDS}/{safe_relpath(run)}-{uuid.uuid4().hex[:8]}.json"
        self.hold = Hold(run=run, owner=f"{socket.gethostname()}:{os.getpid()}", started=time.time(),
                         expires=0.0, entries=[])
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        with self._lock:
            self.hold.expires = time.time() + lease_seconds()
            path = self.root.path(self.rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_beside(path)
            tmp.write_text(self.hold.model_dump_json(), encoding="utf-8")
            os.replace(tmp, path)
            self.root.save_file(self.rel)

    def _renew(self) -> None:
        while not self._stop.wait(lease_seconds() / 3):
            with contextlib.suppress(Exception):  # tried again next tick; the lease leaves two more
                self._write()

    def add(self, rel: str) -> None:
        if rel in self.hold.entries:
            return
        self.hold.entries.append(safe_relpath(rel))
        self._write()

    def __enter__(self) -> RunHold:
        self._write()
        self._thread = threading.Thread(target=self._renew, daemon=True, name="cpt-hold")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(Exception):
            self.root.remove_file(self.rel)


def read_holds(root, files: dict[str, Any] | None = None) -> dict[str, Hold | None]:
    """Every hold on the root: rel -> the hold, or None for a file that does not parse (left to lapse: it is
    removed once older than a lease). `files`: the root's scan of HOLDS, if the caller has it."""
    files = root.scan(HOLDS) if files is None else {k: v for k, v in files.items() if k.startswith(HOLDS + "/")}
    out: dict[str, Hold | None] = {}
    for rel in files:
        if not rel.endswith(".json") or rel.rsplit("/", 1)[-1].startswith("."):
            continue
        try:
            out[rel] = Hold.model_validate(json.loads(root.fetch_state(rel).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            out[rel] = None
    return out
