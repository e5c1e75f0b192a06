"""Publishing entries into a local folder, atomically, and checking the ones there.

An entry is built in a `.tmp-<key>-<pid>-…` sibling and moved into place with `os.replace` once its manifest
(`_COMPLETE`) is written inside it: a folder without the manifest is never read. Builds of one key are
serialised across processes by a kernel lock (flock), which dies with its holder. The root
(tasks/core/root.py) decides when to build, when to fetch from a store and when to upload; this module only
does the local part.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import Any

from tasks.core import fence
from tasks.core.manifest import (MANIFEST, TMP_PREFIX, StageOutput, UnreadableManifest, combine_digests,
                                 content_damage, damage, hash_file, load_manifest, misplaced, output_type,
                                 read_manifest, remove_entry_dir)

# Counts that say how an output was built (what was reused from the cache), not what it holds.
PROVENANCE_COUNTS = frozenset({"files_read", "files_tokenized", "files_cached", "files_chunked", "files_measured"})
# Manifest fields that say where something is (they follow the key), not what it holds.
LOCATION_FIELDS = frozenset({"key", "path", "scope"})


def _without_locations(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_locations(v) for k, v in value.items() if k not in LOCATION_FIELDS}
    if isinstance(value, list):
        return [_without_locations(v) for v in value]
    return value


def content_digest(digests: dict[str, str], counts: dict[str, Any], meta: dict[str, Any], deps: list[str],
                   base: Path, manifest_of: Callable[[str], StageOutput | None] | None = None) -> str:
    """What an output holds, whatever key built it: its files' digests, the content of the entries it refers
    to, its counts and meta less provenance and locations. Downstream keys use this instead of the key, so a
    stage that reruns (a code version bump, a changed setting that turns out not to matter) and yields the same
    content leaves everything below it Cached: early cut-off."""
    parts = [(f"file:{name}", digest) for name, digest in sorted(digests.items())]
    for dep in deps:
        # A dependency built on another host (a Dask worker) may be in the store only: the root says where its
        # manifest is, so the content never depends on where a piece ran.
        manifest = manifest_of(dep) if manifest_of is not None else read_manifest(base / dep)
        parts.append(("dep", (manifest.content or manifest.key) if manifest else dep))
    parts.append(("counts", json.dumps({k: v for k, v in counts.items() if k not in PROVENANCE_COUNTS},
                                       sort_keys=True, default=str)))
    parts.append(("meta", json.dumps(_without_locations(meta), sort_keys=True, default=str)))
    return f"c-{combine_digests(parts)}"


def build_and_publish(base: Path, final: Path, stage: str, key: str, build,
                      manifest_of: Callable[[str], StageOutput | None] | None = None) -> StageOutput:
    """Run `build(tmp) -> (counts, meta[, {content, deps}])` and move its folder to `final` with its manifest.
    The caller holds the key's lock. On any exception the temp folder is removed and nothing is published."""
    remove_stale_builds(final.parent, key)
    tmp = final.parent / f"{TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        result = build(tmp)
        fence.check()  # a build whose lease lapsed meanwhile installs nothing, here or in the store
        counts, meta = result[:2]
        extra = result[2] if len(result) > 2 else {}  # content / deps, for outputs that have them
        paths = [f for f in sorted(tmp.rglob("*")) if f.is_file()]
        files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in paths}
        digests = {f.relative_to(tmp).as_posix(): hash_file(f) for f in paths}
        if "content" not in extra:
            extra = {**extra, "content": content_digest(digests, counts, meta, extra.get("deps", []), base,
                                                        manifest_of)}
        # Built as the stage's own manifest type: an output that does not fit its type fails here, at build.
        manifest = output_type(stage)(
            stage=stage, key=key, path=final.relative_to(base).as_posix(), counts=counts, meta=meta,
            files=files, digests=digests, **extra,
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
        if final.exists():
            # A directory without a manifest is debris (a partial copy, a deleted marker): move it away
            # first, because os.replace cannot overwrite a non-empty directory.
            remove_entry_dir(final)
        os.replace(tmp, final)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_builds(stage_root: Path, key: str) -> int:
    """Temp dirs of this key left by processes that no longer exist (SIGKILL, OOM, power loss)."""
    removed = 0
    if not stage_root.is_dir():
        return 0
    for d in stage_root.glob(f"{TMP_PREFIX}{key}-*"):
        try:
            pid = int(d.name[len(TMP_PREFIX) + len(key) + 1 :].split("-", 1)[0])
        except ValueError:
            pid = -1
        if pid == os.getpid() or pid < 0 or not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed


@contextlib.contextmanager
def key_lock(stage_root: Path, key: str):
    """An exclusive lock per stage key across processes. flock is released by the kernel when its holder dies,
    so a SIGKILLed run never leaves a lock that blocks the next one (the empty lock file stays, harmlessly)."""
    import fcntl

    stage_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(stage_root / f".lock-{key}", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def try_key_lock(stage_root: Path, key: str):
    """`key_lock` if free now: yields True holding it, or False (someone builds or publishes the key) at once."""
    import fcntl

    if not stage_root.is_dir():
        yield True  # nothing was ever built here: no lock to take, nothing to race with
        return
    fd = os.open(stage_root / f".lock-{key}", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def local_entries(base: Path, full: bool = False):
    """Every published entry under `base/cache`: yields (entry folder, why it is damaged or None). Sizes (and
    the entries it refers to) always, contents too with `full`."""
    for manifest_file in sorted((base / "cache").glob(f"*/*/{MANIFEST}")):
        entry = manifest_file.parent
        try:
            manifest = load_manifest(entry)
        except UnreadableManifest as e:
            manifest, why = None, str(e).split(": ", 1)[-1]
        if manifest is not None:
            why = misplaced(entry, manifest, base) or damage(entry, manifest, base) or \
                (content_damage(entry, manifest) if full else None)
        yield entry, why
