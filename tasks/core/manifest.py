"""What a cache entry is: its manifest (`StageOutput`, the small typed record stages pass to each other), the
content identity of inputs read from outside the cache (`Fingerprint`), and the digests both are made of.

An entry is a folder `<root>/cache/<stage>/<key>/` holding its files and, written last, its manifest
`_COMPLETE`: a folder without a readable manifest, or whose files are not the ones the manifest lists with their
sizes, is never trusted (`verified_manifest`). Everything here works on local folders; which root they belong
to, and whether an object store stands behind it, is tasks/core/root.py's business.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, field_validator

MANIFEST = "_COMPLETE"
RECORDS_DIR = "_records"
TMP_PREFIX = ".tmp-"


def safe_relpath(name: str) -> str:
    """`name` if it is a relative path that stays inside the folder it is joined to (no absolute path, no `..`,
    no empty or `.` part, no backslash or NUL), else ValueError. Names read from a manifest, a store listing or a
    state file are checked with it before anything is written, read or deleted at them."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name or name.startswith("/") \
            or any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"{name!r} is not a relative path inside its folder")
    return name


class ArtifactsRoot(Protocol):
    """What a manifest asks of the root it lives in (tasks/core/root.py's ArtifactsRoot, which builds on this
    module: the root is passed in, never imported)."""

    local: Path

    def entry(self, rel: str) -> Path: ...

    def file(self, rel: str, name: str) -> Path: ...

    def location(self, rel: str) -> str: ...


class Fingerprint(BaseModel):
    """Content identity of something read from outside the cache (corpus files, a tokenizer)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: str
    digest: str
    # Where the content was found; not part of any key, so moving a corpus does not invalidate it.
    location: str = ""
    items: list[dict[str, Any]] = []

    def key_material(self) -> dict[str, Any]:
        return {"kind": self.kind, "digest": self.digest}


class StageOutput(BaseModel):
    """The small manifest stages pass to each other: where the output is and what it holds."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    stage: str
    key: str
    path: str  # relative to the artifacts root, so the root can move with its cache
    counts: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    # What downstream keys see instead of `key` when set: an identity of the output's content that leaves out
    # what does not reach the stages below (the load stage's provenance paths), so moving a corpus keeps them
    # Cached.
    content: str = ""
    # Other cache entries this output refers to (relative paths): it is complete only while they are.
    deps: list[str] = []
    # Per-file pieces it was made from without reading them afterwards (a chunk output copies its pieces'
    # windows): not needed for it to be complete, but a rebuild with one more file looks each of them up again,
    # so garbage collection keeps them with it (tasks/line/retention.py).
    pieces: list[str] = []
    # Every file of the entry with its size, checked on read: a truncated or deleted file is a miss.
    files: dict[str, int] = {}
    # Every file's content digest (blake2b-128), checked by `cpt cache verify --full`.
    digests: dict[str, str] = {}

    # A manifest may come from a store anyone with write access can fill: every name in it must stay inside
    # the root (path, deps) or the entry (files, digests), or the manifest does not parse (a damaged entry).
    @field_validator("path")
    @classmethod
    def _path_inside(cls, v: str) -> str:
        return safe_relpath(v)

    @field_validator("deps", "pieces")
    @classmethod
    def _deps_inside(cls, v: list[str]) -> list[str]:
        return [safe_relpath(d) for d in v]

    @field_validator("files", "digests")
    @classmethod
    def _names_inside(cls, v: dict) -> dict:
        for name in v:
            safe_relpath(name)
        return v

    def dir(self, root: ArtifactsRoot) -> Path:
        """The entry's folder, complete: on an object-store root it is fetched into this host's mirror first."""
        return root.entry(self.path)

    def location(self, root: ArtifactsRoot) -> str:
        """Where the entry lives, for a log line: the store URL, else the local folder. Fetches nothing."""
        return root.location(self.path)

    def file(self, root: ArtifactsRoot, name: str) -> Path:
        """One file of the entry; on an object-store root only that file is fetched (a report reads a small
        file of an entry whose model it does not need)."""
        return root.file(self.path, name)

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        """(logging level, line) pairs the stage decorator logs after every call, computed or cached. Typed
        manifests say what their stage produced."""
        return []

    def links(self, root: ArtifactsRoot) -> dict[str, str]:
        """What a user opens of this output (name -> how), for the run summary and the CLI."""
        return {}

    def show(self, root: ArtifactsRoot) -> None:
        """Its Prefect artifacts (tables, plots), made by the flow after every call, computed or cached."""

    def key_material(self) -> dict[str, Any]:
        return {"stage": self.stage, "content": self.content} if self.content else {"stage": self.stage,
                                                                                      "key": self.key}


# ------------------------------------------------------------------------------------------- digests


def hash_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def combine_digests(parts: list[tuple[str, str]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, digest in parts:
        h.update(name.encode())
        h.update(b"\0")
        h.update(digest.encode())
        h.update(b"\n")
    return h.hexdigest()


class DigestMemo:
    """Content digests of files, remembered by (size, mtime_ns, inode) in `<root>/cache/_digests.json`:
    a rerun over an unchanged multi-GB corpus or model does not read it again, and any write to a file
    (which moves its mtime or size) makes it hashed anew — the rule make and rsync use."""

    def __init__(self, root: ArtifactsRoot):
        self.path = root.local / "cache" / "_digests.json"
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    def digest(self, path: str | Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self.entries.get(str(path))
        if entry and entry[:3] == stamp:
            return entry[3]
        value = hash_file(path)
        self.entries[str(path)] = [*stamp, value]
        self.changed = True
        return value

    def save(self) -> None:
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)  # concurrent runs may lose each other's entries, never corrupt the file
        self.changed = False


# --------------------------------------------------------------------------------- entry folders


def read_manifest(directory: Path) -> StageOutput | None:
    try:
        return StageOutput.model_validate_json((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def damage(directory: Path, manifest: StageOutput, base: Path) -> str | None:
    """Why a published entry cannot be trusted (a file missing or of another size, a referenced entry gone),
    or None. Sizes only: a stat per file, cheap enough for every cache lookup. `base` is the folder the
    manifest's references are relative to (the local root)."""
    for name, size in manifest.files.items():
        try:
            actual = (directory / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size}"
    for dep in manifest.deps:
        dep_manifest = read_manifest(base / dep)
        if dep_manifest is None:
            return f"it refers to {dep}, which is gone"
        why = damage(base / dep, dep_manifest, base)
        if why is not None:
            return f"it refers to {dep}, where {why}"
    return None


def content_damage(directory: Path, manifest: StageOutput) -> str | None:
    """`damage` by content: a file whose digest is not the one recorded at publish (a flipped bit keeps the
    size). Reads every byte: for `cpt cache verify --full`, not for every lookup."""
    for name, digest in manifest.digests.items():
        try:
            actual = hash_file(directory / name)
        except OSError:
            return f"{name} is missing"
        if actual != digest:
            return f"{name} does not have the content it was published with"
    return None


def verified_manifest(directory: Path, base: Path, quiet: bool = False) -> StageOutput | None:
    """The manifest of a complete, undamaged entry, else None (and a damaged entry is logged by name)."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    why = damage(directory, manifest, base)
    if why is not None:
        if not quiet:
            from tasks.core.report import run_logger

            run_logger().warning("cache: %s is damaged (%s); rebuilding it", directory, why)
        return None
    return manifest


def remove_entry_dir(entry: Path) -> None:
    """Delete an entry's folder: renamed aside first, so no reader sees it half-deleted, under a temp-build name
    of its key, so what a crash mid-delete leaves is removed by the next build of that key."""
    trash = entry.parent / f"{TMP_PREFIX}{entry.name}-{os.getpid()}-trash-{uuid.uuid4().hex[:8]}"
    os.replace(entry, trash)
    shutil.rmtree(trash, ignore_errors=True)
