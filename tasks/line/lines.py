"""Training lines: the durable state of one retraining line (the gate a drop passes is tasks/line/drop_gate.py).

A line (`cpt retrain --line L`) trains on the configured corpus plus every drop registered to it. Its state,
`<artifacts>/state/lines/<L>.json`, lists the drops (path, content fingerprint, counts, status and the history
of each status change) and the fingerprint of its last successful training. Every change is a locked
read-modify-write of the whole file, written to a temp file and renamed into place: a killed run leaves the
old state or the new one, never half of one, and `cpt drops --remove` beside a running retrain loses nothing.

Statuses: `pending` (announced, still being written), `active` (passed the gate: trained on), `rejected` (failed
the gate; the reason is kept; re-checked when its content changes), `removed` (retired by hand). A drop also
records who announced it (`announced_by`: `shell` for `cpt retrain --drop`, `event` for a run an event started),
since a drop an event announced is untrusted input (tasks/line/drop_gate.py `refusal`).

Nothing here imports Prefect, torch or transformers: `cpt drops` answers at once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.core.config.base import name_problem
from tasks.core.manifest import combine_digests, safe_relpath
from tasks.core.root import ArtifactsRoot

DropStatus = Literal["pending", "active", "rejected", "removed"]
DropSource = Literal["shell", "event"]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def real_path(value: str) -> str:
    """`value` if it is an absolute, normalised path (no `.`, `..` or empty part), else ValueError: a drop's
    place as it was resolved when it was announced or gated."""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or \
            os.path.normpath(value) != value or value.startswith("//"):
        raise ValueError(f"{value!r} is not an absolute, normalised path")
    return value


class DropFile(BaseModel):
    """One file of a drop as the gate read it: its name inside the drop ('' for a drop that is one file), its
    content digest (blake2b-128, the corpus fingerprint's) and its size."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    rel: str
    digest: str
    bytes: int

    @field_validator("rel")
    @classmethod
    def _inside(cls, v: str) -> str:
        return v if v == "" else safe_relpath(v)


class DropIdentity(BaseModel):
    """What the gate let through (or turned away): the drop's real path when it was gated and exactly the files
    it read there. Every later read of the drop takes these files from this path, no symlink followed, each
    checked against its digest as it is read (tasks.data.opening); exclusions use these files, never the path
    resolved again."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    files: list[DropFile]

    @field_validator("path")
    @classmethod
    def _real(cls, v: str) -> str:
        return real_path(v)

    def file_path(self, f: DropFile) -> str:
        return f"{self.path}/{f.rel}" if f.rel else self.path

    def paths(self) -> set[str]:
        return {self.file_path(f) for f in self.files}

    @property
    def digest(self) -> str:
        """The content fingerprint of the drop (the multiset of its files' digests, as fingerprint_files)."""
        return combine_digests([("file", d) for d in sorted(f.digest for f in self.files)])

    @classmethod
    def of(cls, path: str, items: list[dict[str, Any]]) -> DropIdentity:
        """The identity of a drop at its real `path` from its listed files (fingerprint items: real paths)."""
        files = []
        for item in items:
            p = str(item["path"])
            rel = "" if p == path else os.path.relpath(p, path)
            files.append(DropFile(rel=rel, digest=item["digest"], bytes=item["bytes"]))
        return cls(path=path, files=sorted(files, key=lambda f: f.rel))


class Drop(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    status: DropStatus
    identity: DropIdentity | None = Field(None, description="What the gate read (its real path and files with "
                                          "their digests): what is trained, and what is excluded.")
    fingerprint: str = ""
    files: int = 0
    documents: int = 0
    tokens: int = 0
    registered_at: str = ""
    reason: str = ""
    profile: dict[str, Any] = {}
    announced_by: DropSource = Field("shell", description="Who announced it: a shell (cpt retrain --drop, trusted) "
                                     "or an event (untrusted: refused outside drops.roots, and while it is empty).")
    history: list[dict[str, str]] = Field(default_factory=list, description="Every status change: at, status, why.")
    outcome: str = Field("", description="What became of the last run that trained on it: released, not promoted "
                         "by the gate, or trained but not released (and why).")

    def set_status(self, status: DropStatus, why: str) -> None:
        self.status = status
        self.history.append({"at": now_iso(), "status": status, "why": why})

    def listing(self) -> dict[str, Any]:
        """What `cpt drops --json` prints per drop."""
        return self.model_dump(include={"path", "fingerprint", "files", "documents", "tokens", "registered_at",
                                        "status", "reason", "history", "announced_by", "outcome"})


class LineState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    line: str
    drops: list[Drop] = []
    last_training: dict[str, Any] | None = None

    def find(self, path: str | Path) -> Drop | None:
        """The drop recorded at `path` as written (made absolute, not resolved: a drop whose path is now a
        symlink is still found by it), else at `path` resolved."""
        literal = os.path.abspath(os.fspath(path))
        found = next((d for d in self.drops if d.path == literal), None)
        if found is None:
            resolved = str(Path(path).resolve())
            found = next((d for d in self.drops if d.path == resolved), None)
        return found

    def active_paths(self) -> list[str]:
        return [d.path for d in self.drops if d.status == "active"]

    def inactive_paths(self) -> list[str]:
        """Drops not trained on (excluded even under a configured folder), less those refused for where they lie
        or who announced them: they never were the line's, and what their path holds, if anything, is the
        configured corpus's own (an event naming a corpus folder cannot take it out of the line)."""
        return [d.path for d in self.drops if d.status != "active" and not d.profile.get("refused")]


def state_file(line: str) -> str:
    """The line's state file, relative to the root."""
    if why := name_problem(line):  # the one rule of folder names, the same as push.name's
        raise ValueError(f"line: {line!r} is not a valid line name: {why}")
    return f"state/lines/{line}.json"


def run_lock(line: str) -> str:
    """What a run of the line holds while it runs (relative to the root): one run per line at a time. The name
    is checked first (`state_file`'s rule), before any lock is taken with it."""
    state_file(line)
    return f"state/lines/{line}.run"


def read_line(root: ArtifactsRoot, line: str, fetch: bool = True) -> LineState:
    rel = state_file(line)
    # The root's copy is the state (on an object-store root another host may have changed it).
    path = root.fetch_state(rel) if fetch else root.path(rel)
    try:
        return LineState.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        # A line last trained before lines kept drops: take its last training, so it does not retrain.
        try:
            old = json.loads(root.path(f"state/retrain-{line}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        return LineState(line=line, last_training=old)
    except ValueError as e:
        raise ValueError(f"{path}: not a valid line state ({e}); fix or remove it") from None


def updating(root: ArtifactsRoot, line: str):
    """Lock the line, yield its state, write it back atomically when the block ends without error."""
    return root.locked_state(state_file(line), lambda: read_line(root, line, fetch=False))


def announce(root: ArtifactsRoot, line: str, drop: str | Path, source: DropSource = "shell") -> Drop:
    """Note an announced drop as pending unless it is known with an active or rejected verdict (the gate then
    looks again only if its content changed). A removed drop announced again is pending again, recorded.
    `source` is who announces it; a drop an event announced that a shell announces again is the shell's."""
    path = str(Path(drop).resolve())
    by = "by an event" if source == "event" else "at a shell"
    with updating(root, line) as state:
        entry = state.find(path)
        if entry is None:
            entry = Drop(path=path, status="pending", registered_at=now_iso(), announced_by=source)
            entry.history.append({"at": entry.registered_at, "status": "pending", "why": f"announced {by}"})
            state.drops.append(entry)
        elif entry.status == "removed":
            entry.announced_by = source
            entry.set_status("pending", f"announced again {by} after removal")
        elif source == "shell" and entry.announced_by == "event":
            entry.announced_by = "shell"
            entry.history.append({"at": now_iso(), "status": entry.status, "why": "announced again at a shell"})
        return entry


def remove(root: ArtifactsRoot, line: str, drop: str | Path, why: str = "removed by hand") -> Drop:
    """Retire the drop recorded at `drop` (the path as it was announced: found even if it is now a symlink)."""
    path = os.path.abspath(os.fspath(drop))
    with updating(root, line) as state:
        entry = state.find(drop)
        if entry is None:
            known = ", ".join(d.path for d in state.drops) or "none"
            raise KeyError(f"line {line!r} has no drop {path} (its drops: {known})")
        if entry.status != "removed":
            entry.set_status("removed", why)
        return entry


def record_verdict(root: ArtifactsRoot, line: str, path: str, fingerprint: str, profile: dict[str, Any],
                   gated: DropStatus, identity: DropIdentity | None = None) -> Drop | None:
    """The gate's verdict on a drop: active (registered) or rejected with the reasons — recorded only if the
    drop's status is still `gated`, the one it had when the gate read it (checked under the line's lock): a
    drop removed meanwhile (`cpt drops --remove` while the gate ran) stays removed. None: not recorded.
    `identity`: what the gate read (a verdict given without reading anything keeps the one recorded before)."""
    with updating(root, line) as state:
        entry = state.find(path)
        if entry is None or entry.status != gated:
            return None
        if identity is not None:
            entry.identity = identity
        elif profile["passed"]:
            raise ValueError(f"drop {path}: a drop passes the gate only with the identity of what was read")
        entry.fingerprint = fingerprint
        entry.profile = profile
        entry.files, entry.documents, entry.tokens = profile["files"], profile["documents"], profile["tokens"]
        if profile["passed"]:
            entry.reason = ""
            entry.set_status("active", "passed the drop gate")
        else:
            entry.reason = "; ".join(profile["reasons"])
            entry.set_status("rejected", entry.reason)
        return entry


def record_training(root: ArtifactsRoot, line: str, record: dict[str, Any]) -> None:
    with updating(root, line) as state:
        state.last_training = record


def record_outcome(root: ArtifactsRoot, line: str, paths: list[str], outcome: str) -> None:
    """What became of a run that trained on the drops at `paths` (active ones): `run R: trained, released`, or
    `run R: trained, not released: <why>` when its push failed."""
    with updating(root, line) as state:
        for d in state.drops:
            if d.path in paths and d.status == "active":
                d.outcome = f"{now_iso()} {outcome}"
