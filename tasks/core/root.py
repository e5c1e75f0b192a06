"""The artifacts root: the one object that knows where outputs live, built once per run and passed down.

`open_root(--artifacts or $CPT_ARTIFACTS)` gives
- an `ArtifactsRoot`: a local folder (`./artifacts` by default; a `file://` URL is its path), or
- a `StoreRoot`: an object store (`s3://bucket/prefix`, any fsspec URL) that is the truth every host shares,
  worked through a local mirror on each host, `<scratch>/<scheme>/<bucket>/<prefix>` (`$CPT_SCRATCH`, else
  `<user cache>/scratch`), computed on the host that uses it.

They answer the same questions — where an entry is (fetching it if this host lacks it), whether it is complete,
how to publish one, where the Prefect records and the state files are and how they are shared — so no other
module asks which kind of root it has. A root travels as its URL or path: pickled to a Dask worker or named in
a training child's spec, it is opened again there, with that host's own mirror.
"""

from __future__ import annotations

import contextlib
import os
import types
from pathlib import Path

from tasks.core.config.base import ConfigError
from tasks.core.entries import build_and_publish, key_lock, local_entries, try_key_lock
from tasks.core.fence import fenced
from tasks.core.locks import check_conditional_create, read_holder, write_holder
from tasks.core.manifest import (MANIFEST, RECORDS_DIR, StageOutput, entry_of, entry_rel, read_manifest,
                                 remove_entry_dir, safe_relpath, verified_manifest)
from tasks.core.objectstore import Lock, Store, split_url
from tasks.core.paths import scratch_home, temp_beside


def mirror_path(url: str) -> Path:
    scheme, rest = split_url(url)
    parts = [p for p in rest.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"{url!r}: an object-store root needs a bucket (and optionally a prefix)")
    return scratch_home().joinpath(scheme, *parts)


def check_url(url: str, where: str) -> None:
    """A clear error for a scheme fsspec does not know, or whose library is not installed, naming `where`."""
    import fsspec
    from fsspec.registry import known_implementations

    scheme = split_url(url)[0]
    if scheme not in known_implementations and scheme not in fsspec.registry:
        raise ConfigError(f"{where}: {url!r}: {scheme}:// is not a storage fsspec knows")
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        raise ConfigError(f"{where}: {url!r} needs a library that is not installed ({e})") from None
    try:
        mirror_path(url)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def open_root(value: str | Path | None = None, where: str | None = None) -> ArtifactsRoot:
    """The artifacts root `value` names, else $CPT_ARTIFACTS, else ./artifacts. `where` names the setting in
    errors (default: --artifacts for an explicit value, else CPT_ARTIFACTS)."""
    if isinstance(value, ArtifactsRoot):
        return value
    where = where or ("--artifacts" if value else "CPT_ARTIFACTS")
    text = str(value or os.environ.get("CPT_ARTIFACTS") or "artifacts")
    url = split_url(text)
    if url is not None and url[0] != "file":
        check_url(text, where)
        return StoreRoot(text)
    return ArtifactsRoot(Path(url[1] if url else text).resolve())


class EntryUnavailable(FileNotFoundError):
    """An entry a reader needs is not complete (in the store, or here): deleted by garbage collection, or found
    damaged and discarded. `rel` names it, so the run can rebuild it (flows/continued_pretraining.py)."""

    def __init__(self, message: str, rel: str = ""):
        super().__init__(message)
        self.rel = rel


def touch(directory: Path) -> None:
    """Mark an entry used now (its folder's mtime): garbage collection deletes the least recently used first."""
    with contextlib.suppress(OSError):
        os.utime(directory)


def _scan_local(top: Path, prefix: str) -> dict[str, tuple[int, float | None]]:
    out: dict[str, tuple[int, float | None]] = {}
    start = top / prefix if prefix else top
    for dirpath, _, filenames in os.walk(start):
        here = Path(dirpath)
        for name in filenames:
            with contextlib.suppress(OSError):
                st = (here / name).lstat()
                out[(here / name).relative_to(top).as_posix()] = (st.st_size, st.st_mtime)
    return out


class ArtifactsRoot:
    """A local artifacts root. Entries at `cache/<stage>/<key>/`, Prefect records at `cache/_records/<key>`,
    state files under `state/`, run summaries under `runs/`, train work folders under `work/`."""

    url: str | None = None

    def __init__(self, local: Path):
        self.local = Path(local)

    # ------------------------------------------------------------------------------- identity

    @property
    def spec(self) -> str:
        """What opens this root again in another process or on another host."""
        return str(self.local)

    def __reduce__(self):
        return open_root, (self.spec,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __str__(self) -> str:
        return self.spec

    def __eq__(self, other) -> bool:
        return isinstance(other, ArtifactsRoot) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    # -------------------------------------------------------------------------------- entries

    def path(self, rel: str) -> Path:
        """`rel` under this host's copy of the root, as it is (nothing fetched)."""
        return self.local / safe_relpath(rel)

    def cache_dir(self, stage: str, key: str) -> Path:
        return self.local / entry_of(stage, key)

    @property
    def records_dir(self) -> Path:
        """Where Prefect keeps its result records (what makes a task Cached): the stages' result storage."""
        return self.local / "cache" / RECORDS_DIR

    # `entry` and `file` take only an entry's place, `cache/<stage>/<key>` (`entry_rel`), and a file name inside
    # it: whatever a manifest or a record says, nothing outside the root's cache is fetched, written or read.

    def entry(self, rel: str) -> Path:
        """An entry's folder, complete on this host (EntryUnavailable when it is not: garbage collection may have
        deleted it since it was looked up)."""
        directory = self.local / entry_rel(rel)
        if not (directory / MANIFEST).is_file():
            raise EntryUnavailable(f"{directory} is not a complete entry (deleted, or found damaged and discarded): "
                                   "the next run rebuilds it", rel)
        touch(directory)
        return directory

    def file(self, rel: str, name: str) -> Path:
        return self.local / entry_rel(rel) / safe_relpath(name)

    def location(self, rel: str) -> str:
        """Where an entry (or a folder of the root) lives, for people: here, a local folder. Fetches nothing."""
        return str(self.local / safe_relpath(rel))

    def published(self, stage: str, key: str) -> StageOutput | None:
        """The manifest of the entry of `key` if it is published and undamaged (a cache lookup), else None."""
        manifest = verified_manifest(self.cache_dir(stage, key), self.local)
        if manifest is not None:
            touch(self.cache_dir(stage, key))
        return manifest

    def complete(self, stage: str, key: str) -> bool:
        return self.published(stage, key) is not None

    def publish(self, stage: str, key: str, build) -> tuple[StageOutput, bool]:
        """The entry of `key`: the published one if complete, else `build(tmp)` published atomically. Builds of
        one key are serialised: a second process waits, then takes what the first published. Returns
        (manifest, whether this call built it)."""
        final = self.cache_dir(stage, key)
        with key_lock(final.parent, key):
            existing = verified_manifest(final, self.local)
            if existing is not None:
                touch(final)
                return existing, False
            return build_and_publish(self.local, final, stage, key, build), True

    # ------------------------------------------------------------------------- Prefect records

    # Prefect decides "Cached" by reading the record named by the key, with the serializer the record itself
    # names (a pickle one runs code). So a record is never taken from anywhere: each host writes its own, from
    # the verified manifest, before Prefect looks (tasks/core/stage.py), and none is shared through a store.

    def discard_record(self, key: str) -> None:
        with contextlib.suppress(OSError):
            (self.records_dir / key).unlink()

    # ------------------------------------------------------------------------------ state files

    @contextlib.contextmanager
    def locked_state(self, rel: str, read):
        """Lock the state file `rel`, yield `read()`, and write it back atomically (temp file + rename) when the
        block ends without error: a killed writer leaves the old state or the new one, and concurrent writers
        lose nothing. flock is released by the kernel if the holder dies."""
        path = self.local / rel
        with self.exclusive(rel) as held:
            self._pull(rel, path)
            state = read()
            yield state
            held.check()  # a lease lost (or lapsing) meanwhile: another host may hold the state; nothing written
            tmp = temp_beside(path, name=path.stem)
            tmp.write_text(state.model_dump_json(indent=2), encoding="utf-8")
            self._push(tmp, rel)
            os.replace(tmp, path)

    @contextlib.contextmanager
    def exclusive(self, rel: str, waiting: str = ""):
        """Hold `rel` alone: across processes here (flock, released by the kernel if the holder dies) and, on a
        store root, across hosts (the store's lease lock). `waiting` is logged when someone else holds it."""
        import fcntl

        path = self.local / f"{safe_relpath(rel)}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting:
                    from tasks.core.report import run_logger

                    run_logger().info("%s", waiting)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if waiting:  # a lock others wait for (a line's run): say who holds it and since when (`holder`)
                write_holder(fd)
            with self._state_lock(rel) as held:
                # Fenced like a build: a store lease that lapses stops what runs under it (fence.check at the
                # points where stopping is cheap; a training child is killed), and nothing is written back.
                with fenced(held.fence):
                    yield held
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def holder(self, rel: str) -> dict | None:
        """Who holds `exclusive(rel)` on this host now ({pid, host, since}, or {} when it did not say), or None
        when nobody does. Asks the kernel, so a holder that died holds nothing whatever its note says."""
        import fcntl

        path = self.local / f"{safe_relpath(rel)}.lock"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return read_holder(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def _state_lock(self, rel: str):
        """A lock across hosts (a store's lease; yields it: its `fence` and `check()`); here none is needed: the
        fence of whatever encloses the block."""
        from tasks.core import fence

        current = fence.current()
        return contextlib.nullcontext(types.SimpleNamespace(fence=current, check=current.check))

    def _pull(self, rel: str, path: Path) -> None:
        """Bring a file of the root up to date on this host (nothing to do on a local root)."""

    def _push(self, path: Path, rel: str) -> None:
        """Share a file written on this host (nothing to do on a local root)."""

    def fetch_state(self, rel: str) -> Path:
        """A state file of the root, up to date on this host."""
        path = self.local / rel
        self._pull(rel, path)
        return path

    def save_file(self, rel: str) -> None:
        """Share a file written under the root on this host (a run summary)."""
        self._push(self.local / rel, rel)

    # ---------------------------------------------------------------------------- verification

    def verify(self, full: bool = False, discard: bool = False):
        """Every published entry: yields (where, why it is damaged or None). Sizes (and the entries it refers
        to) always, contents too with `full`. With `discard`, a damaged entry is removed with its result record,
        so the next run rebuilds it."""
        for entry, why in local_entries(self.local, full):
            if why is not None and discard:
                self.discard_entry(entry)
            yield entry.relative_to(self.local).as_posix(), why

    def discard_entry(self, entry: Path) -> None:
        """Remove a damaged local entry (moved aside first, so no reader sees it half-deleted) and its record."""
        remove_entry_dir(entry)
        self.discard_record(entry.name)

    # ------------------------------------------------------------------------- shared work folders

    # A training's checkpoints, copied where a training killed on this host can be resumed on another. A local
    # root has no other copy: there is nothing to copy, and nothing is found.

    def upload_dir(self, local: Path, rel: str, marker: bytes | None = None) -> None:
        pass

    def read_remote(self, rel: str) -> bytes | None:
        return None

    def remote_files(self, rel: str) -> dict[str, int]:
        return {}

    def download_dir(self, rel: str, local: Path) -> int:
        return 0

    def remove_remote(self, rel: str) -> None:
        pass

    # ------------------------------------------------------------------ what is on it, and removing it

    # Garbage collection (tasks/core/inventory.py lists, tasks/line/retention.py decides) asks the root what it
    # holds and has it delete: the root alone knows how a delete is made safe beside running work.

    def scan(self, prefix: str = "") -> dict[str, tuple[int, float | None]]:
        """Every file of the root under `prefix` (the store's objects on an object-store root): rel -> (bytes,
        last modified, or None when the storage does not say)."""
        return _scan_local(self.local, prefix)

    def scan_local(self, prefix: str = "") -> dict[str, tuple[int, float | None]]:
        """Every file of this host's copy of the root under `prefix` (the mirror on an object-store root)."""
        return _scan_local(self.local, prefix)

    def manifest_of(self, rel: str) -> StageOutput | None:
        """An entry's manifest as published (nothing fetched but the manifest), None if there is none."""
        return read_manifest(self.local / rel)

    def touched(self, rel: str) -> float | None:
        """When an entry was last used on this host (looked up, read or published), if this host knows."""
        with contextlib.suppress(OSError):
            return (self.local / rel).stat().st_mtime
        return None

    def delete_entry(self, rel: str, complete: bool = True, seen: float | None = None) -> str | None:
        """Delete the cache entry `rel` unless it is being built or published now, or was used since `seen` (when
        garbage collection looked). Readers lose it first: its Prefect record, then its manifest and files at
        once (the folder is renamed aside), then the bytes. `complete`: it had a manifest when looked at (one
        gone since was deleted by another collector: not twice). None when this call deleted it, else why not."""
        key = rel.rstrip("/").rsplit("/", 1)[-1]
        final = self.local / rel
        with try_key_lock(final.parent, key) as free:
            if not free:
                return "being built or published now"
            if not final.is_dir() or (complete and not (final / MANIFEST).is_file()):
                return "already gone"
            if seen is not None and (ArtifactsRoot.touched(self, rel) or 0) > seen + 1:
                return "used since garbage collection looked"
            self.discard_record(key)
            remove_entry_dir(final)
        return None

    def delete_tree(self, rel: str, lock: tuple[str, str] | None = None) -> str | None:
        """Delete a folder of the root that is not an entry (a work folder, a run summary); `lock` = (stage, key)
        whose build uses it: skipped while that build runs. None when deleted, else why not."""
        folder = self.local / rel
        guard = try_key_lock(self.local / "cache" / lock[0], lock[1]) if lock else contextlib.nullcontext(True)
        with guard as free:
            if not free:
                return "its build is running"
            if not folder.exists():
                return "already gone"
            remove_entry_dir(folder)
        return None

    def delete_local_copy(self, rel: str) -> str | None:
        """This host's copy of an entry (a mirror's, on an object-store root; the entry itself on a local one)."""
        return ArtifactsRoot.delete_entry(self, rel, complete=False)

    def remove_file(self, rel: str) -> None:
        """A plain file of the root (a hold, a Prefect record), here and in the store."""
        with contextlib.suppress(OSError):
            (self.local / rel).unlink()


class StoreRoot(ArtifactsRoot):
    """An object-store root: the store decides what is complete; entries are uploaded files first and manifest
    last under the key's lease lock (one build per key across hosts) and fetched on first read; records, state
    files and run summaries are copied both ways."""

    def __init__(self, url: str):
        from tasks.core.signing import keys_from_env

        self.url = url.rstrip("/")
        super().__init__(mirror_path(self.url))
        self.local.mkdir(parents=True, exist_ok=True)
        self._store: Store | None = None
        keys_from_env()  # a key setting that cannot be read is said now, naming the variable

    @property
    def spec(self) -> str:
        return self.url

    @property
    def store(self) -> Store:
        if self._store is None:  # made on first use: opening a root costs no request
            from tasks.core.report import run_logger

            store = Store(self.url, self.local, on_wait=lambda msg: run_logger().info("%s", msg),
                          on_damage=lambda msg: run_logger().warning("%s", msg))
            check_conditional_create(store)
            self._store = store
        return self._store

    # -------------------------------------------------------------------------------- entries

    def entry(self, rel: str) -> Path:
        directory = self.local / entry_rel(rel)
        if verified_manifest(directory, self.local, quiet=True) is None:
            with key_lock(directory.parent, directory.name):
                if verified_manifest(directory, self.local, quiet=True) is None \
                        and self.store.fetch_entry(rel) is None:
                    raise EntryUnavailable(f"{self.url}/{rel} is not complete in the store (deleted, or found damaged "
                                           "and discarded): the next run rebuilds it", rel)
        touch(directory)
        return directory

    def file(self, rel: str, name: str) -> Path:
        path = self.local / entry_rel(rel) / safe_relpath(name)
        if not path.is_file():
            self.store.fetch_entry(rel, only=[name])
        return path

    def location(self, rel: str) -> str:
        return f"{self.url}/{safe_relpath(rel)}"

    def _dep_manifest(self, rel: str) -> StageOutput | None:
        """An entry's manifest from the mirror, else from the store (built by another host, never fetched here)."""
        return read_manifest(self.local / rel) or self.store.manifest(rel)

    def published(self, stage: str, key: str) -> StageOutput | None:
        """Complete in the store (the truth every host shares: a local copy the store lacks is uploaded by the
        rerun this miss causes)."""
        manifest = self.store.complete(f"cache/{stage}/{key}")
        if manifest is not None:
            touch(self.cache_dir(stage, key))  # this host's copy, if it has one: the mirror's LRU
        return manifest

    def publish(self, stage: str, key: str, build) -> tuple[StageOutput, bool]:
        """The store decides: a complete entry there is fetched; else one host takes the key's lock and builds,
        others wait and fetch what it publishes."""
        final = self.cache_dir(stage, key)
        rel = final.relative_to(self.local).as_posix()
        store = self.store
        with key_lock(final.parent, key):
            existing = verified_manifest(final, self.local)
            if existing is not None:
                if store.complete(rel) is None:  # published here, never uploaded (killed in between), or deleted there
                    lock = store.lock(rel, done=lambda: store.complete(rel) is not None)
                    with lock as held:
                        if held:
                            store.upload_entry(rel, final, existing, lock)
                return existing, False
            while True:
                fetched = store.fetch_entry(rel)  # a damaged one is discarded there: None, and rebuilt below
                if fetched is not None:
                    return fetched, False
                lock = store.lock(rel, done=lambda: store.complete(rel) is not None)
                with lock as held:
                    if held:
                        with fenced(lock.fence):  # the build stops when the lease lapses
                            manifest = build_and_publish(self.local, final, stage, key, build,
                                                         manifest_of=self._dep_manifest)
                        store.upload_entry(rel, final, manifest, lock)  # fenced: LockLost publishes nothing
                        return manifest, True
                # Another host published it while we waited: loop to fetch it (or build, if it was deleted).

    # ------------------------------------------------------------------------- Prefect records

    def discard_record(self, key: str) -> None:
        super().discard_record(key)
        # Records of earlier versions were shared through the store; one left there is removed, never read.
        with contextlib.suppress(FileNotFoundError):
            self.store.fs.rm_file(self.store.remote(f"cache/{RECORDS_DIR}/{key}"))

    # ------------------------------------------------------------------------------ state files

    @contextlib.contextmanager
    def _state_lock(self, rel: str):
        """The store's lease lock of `rel` (writers on other hosts), held."""
        lock = self.store.lock(rel)
        with lock:
            yield lock

    def _pull(self, rel: str, path: Path) -> None:
        from tasks.core.signing import Unsigned

        try:
            self.store.get(rel, path)  # removed here if gone there
        except Unsigned as e:
            raise Unsigned(f"{self.url}/{rel}: {e}: not used (CPT_STORE_TRUSTED_KEYS names the keys trusted); "
                           "restore it from a host that signs, or remove it") from None

    def _push(self, path: Path, rel: str) -> None:
        self.store.put(path, rel)

    # ---------------------------------------------------------------------------- verification

    def verify(self, full: bool = False, discard: bool = False):
        """This host's mirror, then the store, which is what every host trusts."""
        yield from super().verify(full, discard)
        for rel, why in self.store.verify(full=full, discard=discard):
            yield f"{self.url}/{rel}", why

    # ------------------------------------------------------------------------- shared work folders

    def upload_dir(self, local: Path, rel: str, marker: bytes | None = None) -> None:
        self.store.put_dir(local, rel, marker=marker)

    def read_remote(self, rel: str) -> bytes | None:
        return self.store.read(rel)

    def remote_files(self, rel: str) -> dict[str, int]:
        return self.store.listing(rel)

    def download_dir(self, rel: str, local: Path) -> int:
        return self.store.get_dir(rel, local)

    def remove_remote(self, rel: str) -> None:
        self.store.delete(rel)

    # ------------------------------------------------------------------ what is on it, and removing it

    def scan(self, prefix: str = "") -> dict[str, tuple[int, float | None]]:
        return self.store.scan(prefix)

    def manifest_of(self, rel: str) -> StageOutput | None:
        return self.store.manifest(rel) if not (self.local / rel / MANIFEST).is_file() else read_manifest(self.local / rel)

    def touched(self, rel: str) -> float | None:
        return None  # a store keeps no access time: use is read from run summaries and holds

    def delete_entry(self, rel: str, complete: bool = True, seen: float | None = None) -> str | None:
        """In the store, under the key's lease lock (taken only if free: a host building or uploading the key
        holds it), so two collectors on two hosts never both delete it and none deletes what is being built;
        then this host's copy. `seen`: the manifest's last-modified time when the collector looked (a newer one
        was rebuilt since: kept)."""
        key = rel.rstrip("/").rsplit("/", 1)[-1]
        store = self.store
        lock = store.lock(rel)
        if not lock.acquire(wait=False):
            return "being built or published now (its store lock is held)"
        try:
            if complete:
                stamp = store.stamp(f"{rel}/{MANIFEST}")
                if stamp is None:
                    return "already gone"
                if seen is not None and stamp > seen + 1:
                    return "rebuilt since garbage collection looked"
            elif not store.listing(rel):
                return "already gone"
            self.discard_record(key)
            store.delete(rel)  # its manifest first: no reader trusts what remains
        finally:
            lock.release()
        ArtifactsRoot.delete_entry(self, rel, complete=False)
        return None

    def delete_tree(self, rel: str, lock: tuple[str, str] | None = None) -> str | None:
        held = None
        if lock:
            held = self.store.lock(f"cache/{lock[0]}/{lock[1]}")
            if not held.acquire(wait=False):
                return "its build is running (its store lock is held)"
        try:
            if not self.store.listing(rel) and not (self.local / rel).exists():
                return "already gone"
            self.store.delete(rel)
            ArtifactsRoot.delete_tree(self, rel, lock)
        finally:
            if held is not None:
                held.release()
        return None

    def remove_file(self, rel: str) -> None:
        super().remove_file(rel)
        with contextlib.suppress(FileNotFoundError):
            self.store.fs.rm_file(self.store.remote(rel))

