"""Kept models: each lineage's promoted models under a prefix of their own, `kept/<lineage>/<model digest>/`,
beside the cache and never part of it — no cache eviction, `cpt cache verify --discard` or damage handling
touches it — so a lineage can always be continued and gated against its promoted model, whatever happened to the
train entry that produced it.

A kept model is its files and a marker (`.kept.json` here, `_COMPLETE` in the store) listing each file with its size and content digest (and the
model digest they make); on an object-store root it is uploaded files first and marker last (signed when the
host signs, tasks/core/signing.py) and fetched on a host that lacks it. Every read checks the files against the
marker and the model digest against the promotion record: bytes that are not the promoted ones are never used.
The promotions state names a model by its digest; where it is kept is derived from that, never stored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from tasks.core.manifest import MANIFEST, hash_file
from tasks.core.root import ArtifactsRoot
from tasks.ml.modeling import model_digest, model_files

KEPT = "kept"
LOCAL_MARKER = ".kept.json"  # the marker beside the files here (hidden: not a model file); `_COMPLETE` in the store
_DIGEST = re.compile(r"[0-9a-f]{32}")


def kept_rel(lineage: str, digest: str) -> str:
    """`kept/<lineage>/<digest>`: a lineage name (one folder name) and a model digest (blake2b-128 hex)."""
    from tasks.line.promotions import state_file

    state_file(lineage)  # the lineage's name rule
    if not _DIGEST.fullmatch(digest or ""):
        raise ValueError(f"{digest!r} is not a model digest")
    return f"{KEPT}/{lineage}/{digest}"


def _marker(folder: Path, digest: str, file_digest=hash_file) -> bytes:
    files = {p.relative_to(folder).as_posix(): [p.stat().st_size, file_digest(p)] for p in model_files(folder)}
    return json.dumps({"model_digest": digest, "files": files}, indent=2).encode()


def _damage(folder: Path, marker: bytes | None, digest: str, file_digest=hash_file) -> str | None:
    """Why the copy at `folder` is not the kept model `digest` its marker describes, or None."""
    try:
        doc = json.loads(marker or b"")
        files = {str(k): (int(v[0]), str(v[1])) for k, v in doc["files"].items()}
        if doc["model_digest"] != digest:
            return f"its marker names model {str(doc['model_digest'])[:16]}"
    except (ValueError, KeyError, TypeError, IndexError):
        return "its marker is missing or unreadable"
    present = {p.relative_to(folder).as_posix() for p in model_files(folder)} if folder.is_dir() else set()
    if present != set(files):
        return "its files are not the ones its marker lists"
    for name, (size, d) in files.items():
        path = folder / name
        if path.stat().st_size != size or file_digest(path) != d:
            return f"{name} is not the file it was kept with"
    if model_digest(folder, file_digest) != digest:
        return "its files do not make the promoted model"
    return None


def keep(root: ArtifactsRoot, lineage: str, source: Path, digest: str, file_digest=hash_file) -> Path:
    """Keep the model at `source` (whose digest must be `digest`) as `lineage`'s: copied under the kept prefix
    here (atomically) and to the store. Returns the kept folder."""
    rel = kept_rel(lineage, digest)
    final = root.path(rel)
    if _damage(final, _read_local(final), digest, file_digest) is None:
        if not root.read_remote(f"{rel}/{MANIFEST}") and root.url:
            root.upload_dir(final, rel, marker=_read_local(final))
        return final
    if model_digest(source, file_digest) != digest:
        raise ValueError(f"{source}: not the model {digest[:16]} (its files changed)")
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    marker = _marker(tmp, digest)
    (tmp / LOCAL_MARKER).write_bytes(marker)
    _install(tmp, final)
    root.upload_dir(final, rel, marker=marker)  # files, then the (signed) marker; nothing on a local root
    return final


def kept_model(root: ArtifactsRoot, lineage: str, digest: str, file_digest=hash_file) -> Path | None:
    """The kept copy of the promoted model `digest` of `lineage`, checked against its marker and digest: this
    host's copy, else the store's fetched (and checked) into it; None when there is none that checks out."""
    rel = kept_rel(lineage, digest)
    final = root.path(rel)
    if _damage(final, _read_local(final), digest, file_digest) is None:
        return final
    marker = root.read_remote(f"{rel}/{MANIFEST}")  # None on a local root, or when not signed by a trusted key
    if marker is None:
        return None
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        root.download_dir(rel, tmp)
        if _damage(tmp, marker, digest) is not None:
            return None
        (tmp / LOCAL_MARKER).write_bytes(marker)
        _install(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prune(root: ArtifactsRoot, lineage: str, wanted: set[str]) -> list[str]:
    """Remove `lineage`'s kept models whose digest is not in `wanted` (the last promoted one and the models its
    record names); returns the digests removed."""
    folder = root.path(f"{KEPT}/{kept_rel(lineage, '0' * 32).split('/')[1]}")
    removed = []
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    names |= {n.split("/", 1)[0] for n in root.remote_files(f"{KEPT}/{lineage}")}
    for name in sorted(names):
        if _DIGEST.fullmatch(name) and name not in wanted:
            shutil.rmtree(folder / name, ignore_errors=True)
            root.remove_remote(kept_rel(lineage, name))
            removed.append(name)
    return removed


def _read_local(folder: Path) -> bytes | None:
    try:
        return (folder / LOCAL_MARKER).read_bytes()
    except OSError:
        return None


def _install(tmp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
