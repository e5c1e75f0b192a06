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
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from tasks.core.paths import temp_beside

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


# The one shape of an entry's place in a root: `cache/<stage>/<key>`, a stage name and a key made of these
# characters (no `..`, no leading dot or underscore: `_records`, `.tmp-…` and `.lock-…` are not entries).
_STAGE = r"[a-z0-9][a-z0-9_-]*"
_KEY = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_ENTRY_REL = re.compile(rf"cache/({_STAGE})/({_KEY})")


def entry_rel(rel: str) -> str:
    """`rel` if it is an entry's place under a root, `cache/<stage>/<key>`, else ValueError. Every root and store
    call that reads, writes or deletes an entry checks it first: a name from a manifest, a record or a listing
    that is anything else (an absolute path, `cache//tmp/x`, `..`) is never joined to a folder."""
    if not isinstance(rel, str) or not _ENTRY_REL.fullmatch(rel) or ".." in rel:
        raise ValueError(f"{rel!r} is not an entry of the cache (cache/<stage>/<key>)")
    return rel


def entry_of(stage: str, key: str) -> str:
    """The place of the entry `key` of `stage` (checked like `entry_rel`)."""
    return entry_rel(f"cache/{stage}/{key}")


def piece_key(stage: str):
    """A validator of a key that must name an entry of `stage` (a piece an output refers to by key alone)."""

    def check(v: str) -> str:
        if not isinstance(v, str) or not v.startswith(f"{stage}-"):
            raise ValueError(f"{v!r} is not a key of {stage}")
        entry_of(stage, v)
        return v

    return check


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

    # A manifest may come from a store anyone with write access can fill: its own place is exactly
    # `cache/<stage>/<key>` and every entry it refers to is one too (`entry_rel`), every file name stays inside
    # the entry, or the manifest does not parse (a damaged entry). What an output type adds (its `meta`) is
    # typed by that type, and any piece it names is found by key under `deps` (tasks.core.manifest.entry_of).
    @field_validator("path")
    @classmethod
    def _path_inside(cls, v: str) -> str:
        return entry_rel(v)

    @field_validator("deps", "pieces")
    @classmethod
    def _deps_inside(cls, v: list[str]) -> list[str]:
        return [entry_rel(d) for d in v]

    @model_validator(mode="after")
    def _path_is_its_key(self):
        if self.path != f"cache/{self.stage}/{self.key}":
            raise ValueError(f"an entry of {self.stage} {self.key} lives at cache/{self.stage}/{self.key}, "
                             f"not {self.path}")
        return self

    def refers(self, rel: str) -> str:
        """`rel` (an entry this output names by key) if it is one of its deps, else ValueError: a piece is read
        only where the verified deps say the output's pieces are."""
        if rel not in self.deps:
            raise ValueError(f"{self.path} names {rel}, which is not one of the entries it refers to")
        return rel

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


class OutputMeta(BaseModel):
    """The typed `meta` of an output type: each type declares its fields (`meta: LoadMeta`), so a manifest with
    a field it does not know, or of another type, does not parse and its entry is damaged. Nothing in it is a
    path: a piece it refers to is named by key, and found at `entry_of(stage, key)` among the output's deps."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class NoMeta(OutputMeta):
    """The meta of an output whose files and counts say everything."""


class PieceMeta(OutputMeta):
    # The build scope (a run) that built the piece: whether a run read the file itself (tasks.core.scope).
    scope: str | None = None


class Piece(StageOutput):
    """A per-file piece of a stage (publish_piece): its files and counts, and the scope that built it."""

    meta: PieceMeta = PieceMeta()


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
        tmp = temp_beside(self.path)
        tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)  # concurrent runs may lose each other's entries, never corrupt the file
        self.changed = False


# ------------------------------------------------------------------------------ typed manifests

_OUTPUT_TYPES: dict[str, type[StageOutput]] = {}  # stage (or piece) name -> the manifest type it publishes


def register_output(stage: str, output: type[StageOutput]) -> None:
    """Declare the manifest type of `stage`'s entries (the stage decorator and each piece kind do): every
    manifest of that stage is parsed as that type, its typed fields included, wherever it is read."""
    _OUTPUT_TYPES[stage] = output


def output_type(stage: str) -> type[StageOutput]:
    return _OUTPUT_TYPES.get(stage, StageOutput)


def parse_manifest(data: str | bytes) -> StageOutput:
    """A manifest's bytes as the type its stage publishes (plain JSON first: nothing in it names a class to
    build); ValueError when it is not one (a damaged entry)."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("stage"), str):
        raise ValueError("not a manifest")
    return output_type(doc["stage"]).model_validate(doc)


def as_output(manifest: StageOutput, output: type[StageOutput]) -> StageOutput:
    """`manifest` as `output` (already one when its stage registered the type); ValueError if it is not one."""
    if isinstance(manifest, output):
        return manifest
    return output.model_validate(manifest.model_dump())


# --------------------------------------------------------------------------------- entry folders


class UnreadableManifest(ValueError):
    """A manifest file that is there but is not a manifest of its entry (a damaged or forged entry)."""


def load_manifest(directory: Path) -> StageOutput | None:
    """The manifest in `directory`: None when there is none, UnreadableManifest when the file is there but
    does not parse as its stage's type (or names another place than `directory`'s)."""
    try:
        data = (directory / MANIFEST).read_bytes()
    except OSError:
        return None
    try:
        return parse_manifest(data)
    except ValueError as e:
        raise UnreadableManifest(f"{directory}: its manifest is unreadable ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return " ".join(text[:3])[:300] if text else type(e).__name__


def read_manifest(directory: Path) -> StageOutput | None:
    try:
        return load_manifest(directory)
    except UnreadableManifest:
        return None


def misplaced(directory: Path, manifest: StageOutput, base: Path) -> str | None:
    """Why `manifest` is not the manifest of the entry at `directory` (one copied from another key), or None."""
    try:
        rel = directory.relative_to(base).as_posix()
    except ValueError:
        rel = None
    return None if rel == manifest.path else f"its manifest is that of another entry ({manifest.path})"


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
        why = misplaced(base / dep, dep_manifest, base) or damage(base / dep, dep_manifest, base)
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


def arrow_problem(path: Path) -> str | None:
    """Why `path` is not a valid Arrow IPC file or stream (every batch validated in full), or None."""
    import pyarrow as pa

    try:
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            batches = iter(pa.ipc.open_stream(pa.memory_map(str(path))))
        for batch in batches:
            batch.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


def verified_manifest(directory: Path, base: Path, quiet: bool = False) -> StageOutput | None:
    """The manifest of a complete, undamaged entry, else None (and a damaged entry is logged by name)."""
    try:
        manifest = load_manifest(directory)
    except UnreadableManifest as e:
        if not quiet:
            from tasks.core.report import run_logger

            run_logger().warning("cache: %s; rebuilding it", e)
        return None
    if manifest is None:
        return None
    why = misplaced(directory, manifest, base) or damage(directory, manifest, base)
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
