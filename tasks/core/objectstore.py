"""The artifacts root in an object store (`s3://bucket/prefix`, `gs://…`, any fsspec URL), through fsspec.

The store is the truth; each host works in a local mirror of it (tasks/core/root.py decides where, on each
host, and is the only code that talks to a `Store`). This module knows entries only by their manifests.

- An entry is published to the store as its files first and its manifest object (`_COMPLETE`) last. A reader
  trusts an entry only when the manifest exists and every file it lists is there with its size (and every
  entry it refers to is complete): a writer killed mid-upload leaves objects nobody reads, and the next
  builder of that key deletes them before it uploads.
- One build per key across hosts: a lease lock made of the store's own conditional writes (create-if-absent,
  the S3 `If-None-Match: *` put). See `Lock`.
- A missing local copy is fetched on first read (`fetch_entry`), its references first; a local entry the store
  lacks (a host killed between its local publish and its upload) is uploaded on its next lookup.

Credentials and the endpoint come from the environment as the store's own library reads them (for S3 the
standard AWS variables, `AWS_ENDPOINT_URL` included) or, when `$CPT_STORE_BLOCK` names one, from a Prefect
Secret block holding the fsspec storage options as JSON. Never from the config file; never logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from tasks.core.paths import temp_beside
from tasks.core.fence import LockLost  # noqa: F401 - LockLost is raised to callers of this module
from tasks.core.signing import Unsigned, keys_from_env
from tasks.core.manifest import (MANIFEST, RECORDS_DIR, StageOutput, arrow_problem, entry_rel, parse_manifest,
                                 remove_entry_dir, safe_relpath, verified_manifest)
from tasks.core.store_lock import LOCK_TIMEOUT, Lock, LockTimeout  # noqa: F401 - the store's lease lock

class DamagedEntry(OSError):
    """A file fetched from the store is not the one its manifest recorded (size or digest)."""


def split_url(value: str) -> tuple[str, str] | None:
    """(scheme, path) of a URL, None for a plain path. A one-letter scheme is a Windows drive, not a URL."""
    scheme, sep, rest = value.partition("://")
    if sep and scheme.isalnum() and len(scheme) > 1:
        return scheme.lower(), rest
    return None


def storage_options() -> dict[str, Any]:
    """fsspec storage options from a Prefect Secret block named by $CPT_STORE_BLOCK, else none (the store's
    library then reads the environment)."""
    name = os.environ.get("CPT_STORE_BLOCK")
    if not name:
        return {}
    from prefect.blocks.system import Secret

    value = Secret.load(name).get()
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"CPT_STORE_BLOCK: the Secret block {name!r} must hold a JSON object of storage options")
    return value


class Store:
    """One object-store root: the fsspec filesystem, the bucket/prefix path in it, and the local mirror."""

    def __init__(self, url: str, local: Path, on_wait=None, on_damage=None):
        import fsspec

        self.url = url.rstrip("/")
        self.local = local
        # Called with a sentence when a lock is held elsewhere and this host waits, or an entry is found
        # damaged (the run's logger).
        self.on_wait = on_wait or (lambda msg: None)
        # Called with a sentence when an object is found damaged, forged or unsigned (a warning, once per object).
        said: set[str] = set()
        damage = on_damage or self.on_wait
        self.on_damage = lambda msg: None if msg in said else (said.add(msg), damage(msg))
        scheme, rest = split_url(self.url)
        # Listings are never cached: another host's upload must be seen on the next look.
        # A filesystem of its own (not fsspec's shared instance): it reads the environment as it is now.
        self.fs = fsspec.filesystem(scheme, use_listings_cache=False, skip_instance_cache=True, **storage_options())
        self.base = rest.strip("/")
        self.lease = float(os.environ.get("CPT_STORE_LEASE_SECONDS", "60"))
        # The keys this host signs with and trusts (tasks/core/signing.py); none: objects are plain and unchecked.
        self.keys = keys_from_env()

    def __repr__(self) -> str:
        return f"Store({self.url})"

    def remote(self, rel: str) -> str:
        """The object key of `rel` under the root's prefix. `rel` is a relative name whose every part is a real
        name (`safe_relpath`): on a store that keeps `//` literally (AWS S3, GCS, moto), `cache//tmp/x` would be
        a key of its own, and joined to the mirror an absolute path."""
        return f"{self.base}/{safe_relpath(rel)}"

    # --------------------------------------------------------------------------------- entries

    def listing(self, rel: str) -> dict[str, int]:
        """Every object under `rel/`, relative name -> size. A name that would leave the folder it is copied to
        (`..`, an absolute or empty part: object keys are any strings) is left out: it is never part of an
        entry, never fetched, never deleted by a relative path."""
        prefix = self.remote(rel)
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for name, info in found.items():
            if name.startswith(prefix + "/") and info.get("type", "file") == "file":
                try:
                    out[safe_relpath(name[len(prefix) + 1:])] = int(info.get("size") or 0)
                except ValueError:
                    continue
        return out

    def scan(self, rel: str = "") -> dict[str, tuple[int, float | None]]:
        """Every object under `rel` (the whole root by default): relative name -> (size, last modified as a
        timestamp, None where the store does not say). One listing; names that would leave the root are left out."""
        prefix = self.remote(rel) if rel else self.base
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for name, info in found.items():
            if not name.startswith(self.base + "/") or info.get("type", "file") != "file":
                continue
            try:
                out[safe_relpath(name[len(self.base) + 1:])] = (int(info.get("size") or 0), _modified(info))
            except ValueError:
                continue
        return out

    def stamp(self, rel: str) -> float | None:
        """When the object `rel` was last written; None when it does not exist."""
        try:
            info = self.fs.info(self.remote(rel))
        except FileNotFoundError:
            return None
        return _modified(info) or 0.0

    def read_manifest_object(self, rel: str) -> StageOutput | None:
        """The manifest object of `rel` parsed (ValueError when it does not parse or, with signing on, is not
        signed by a trusted key for that place: Unsigned; None when absent)."""
        place = f"{rel}/{MANIFEST}"
        try:
            data = self.fs.cat_file(self.remote(place))
        except FileNotFoundError:
            return None
        return parse_manifest(self.keys.open(place, data))

    # ------------------------------------------------------------------------------ sealed objects

    def write_sealed(self, rel: str, data: bytes) -> None:
        """Write the object `rel`, signed when this host signs (tasks/core/signing.py)."""
        self.fs.pipe_file(self.remote(rel), self.keys.seal(rel, data))

    def read_sealed(self, rel: str) -> bytes | None:
        """The object `rel` (its payload), None when absent; Unsigned when this host verifies and no trusted
        key signed it for that place."""
        try:
            data = self.fs.cat_file(self.remote(rel))
        except FileNotFoundError:
            return None
        return self.keys.open(rel, data)

    def manifest(self, rel: str) -> StageOutput | None:
        """The manifest of the entry at `rel` in the store, parsed as its stage's type and checked to be that
        entry's own; None when there is none, or when it is not one (logged: a damaged or forged entry)."""
        entry_rel(rel)
        try:
            manifest = self.read_manifest_object(rel)
        except Unsigned as e:
            self.on_damage(f"store: {self.url}/{rel}: not trusted ({e}); it is a miss and will be rebuilt")
            return None
        except ValueError as e:
            self.on_damage(f"store: {self.url}/{rel}: its manifest is unreadable ({str(e).splitlines()[0][:200]}); "
                         "it is a miss and will be rebuilt")
            return None
        if manifest is not None and manifest.path != rel:
            self.on_damage(f"store: {self.url}/{rel}: its manifest is that of another entry ({manifest.path}); "
                         "it is a miss and will be rebuilt")
            return None
        return manifest

    def complete(self, rel: str):
        """The manifest of a complete entry in the store (every listed file there with its size, every entry
        it refers to complete), else None."""
        manifest = self.manifest(rel)
        if manifest is None:
            return None
        present = self.listing(rel)
        for name, size in manifest.files.items():
            if present.get(name) != size:
                return None
        if manifest.deps and not all(self._each(lambda dep: self.complete(dep) is not None, manifest.deps)):
            return None
        return manifest

    def _each(self, fn, items: list) -> list:
        """fn over items, up to 16 at a time: each check is a request or two whose time is the store's latency,
        and an entry may refer to thousands of per-file pieces."""
        if len(items) < 2:
            return [fn(x) for x in items]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(16, len(items)), thread_name_prefix="cpt-store") as pool:
            return list(pool.map(fn, items))

    def fetch_entry(self, rel: str, only: list[str] | None = None):
        """Copy a complete entry (its references first) into the mirror; returns its manifest, None if the
        store has no complete entry. `only` copies just those files, for a reader that needs no more (the
        copy is then left without a manifest: a later full fetch completes it). `rel` is an entry's place
        (`entry_rel`), checked before anything is written or moved aside."""
        entry_rel(rel)
        manifest = self.complete(rel)
        if manifest is None:
            return None
        final = self.local / rel
        if only is not None:
            final.mkdir(parents=True, exist_ok=True)
            for name in only:
                target = final / safe_relpath(name)
                if name in manifest.files and not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = temp_beside(target, ".part")
                    try:
                        self._copy_verified(rel, name, tmp, manifest)
                    except DamagedEntry as e:
                        tmp.unlink(missing_ok=True)
                        self.on_damage(f"store: {e}; discarding {self.url}/{rel}, it will be rebuilt")
                        self.delete(rel)
                        return None
                    os.replace(tmp, target)
            return manifest
        missing = [d for d in manifest.deps if verified_manifest(self.local / d, self.local, quiet=True) is None]
        if any(got is None for got in self._each(self.fetch_entry, missing)):
            return None  # a referenced piece was damaged (and discarded): this entry is not complete either
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            names = sorted(manifest.files)
            for name in names:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            self._each(lambda n: self._copy_verified(rel, n, tmp / n, manifest), names)
            (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
            install(tmp, final)
        except DamagedEntry as e:
            # Never a silent reuse: the entry is discarded in the store (manifest first), so the next lookup is
            # a miss and it is rebuilt.
            self.on_damage(f"store: {e}; discarding {self.url}/{rel}, it will be rebuilt")
            self.delete(rel)
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return manifest

    def _copy_verified(self, rel: str, name: str, target: Path, manifest) -> None:
        """One object copied to `target`, hashed as it streams (blake2b-128, as recorded at publish); a size or
        digest other than the manifest's raises DamagedEntry, and so does an Arrow file that is not a valid IPC
        file or stream (checked whole before any reader maps it: offsets and lengths are memory addresses)."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        size = 0
        with self.fs.open(self.remote(f"{rel}/{name}"), "rb") as src, open(target, "wb") as dst:
            while block := src.read(1 << 20):
                h.update(block)
                dst.write(block)
                size += len(block)
        if size != manifest.files.get(name):
            raise DamagedEntry(f"{self.url}/{rel}/{name} has {size} bytes, its manifest says {manifest.files.get(name)}")
        expected = manifest.digests.get(name)
        if expected is not None and h.hexdigest() != expected:
            raise DamagedEntry(f"{self.url}/{rel}/{name} does not have the content it was published with")
        if name.endswith(".arrow"):
            why = arrow_problem(target)
            if why is not None:
                raise DamagedEntry(f"{self.url}/{rel}/{name} is not a valid Arrow file ({why})")

    def upload_entry(self, rel: str, local_dir: Path, manifest, lock: Lock | None = None) -> None:
        """Publish a local entry: leftovers under its prefix removed, its files, then its manifest, last.
        The caller holds the key's `lock`: it is checked to be still the current holder before the leftovers
        are deleted and before the manifest is written (fencing: a holder whose lease ran out deletes nothing a
        newer holder wrote and publishes nothing)."""
        if lock is not None:
            # Deleting needs the lease to hold until the deletes are done: with renewals working every lease/3,
            # at least two thirds of it is left; less means renewals are failing, and a newer holder may be
            # about to write here. (A file this holder overwrites after losing the lease is caught anyway: its
            # digest no longer matches the newer manifest, so readers discard the entry and rebuild it.)
            lock.check(margin=self.lease / 3)
        leftovers = [self.remote(f"{rel}/{n}") for n in self.listing(rel)]
        if leftovers:
            self.fs.rm(leftovers)
        names = sorted(manifest.files)
        if names:
            self.fs.put([str(local_dir / n) for n in names], [self.remote(f"{rel}/{n}") for n in names])
        if lock is not None:
            lock.check()
        self.write_sealed(f"{rel}/{MANIFEST}", manifest.model_dump_json(indent=2).encode())

    def delete(self, rel: str) -> None:
        """Remove an entry or a folder: its manifest first, so no reader trusts what remains."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.remote(f"{rel}/{MANIFEST}"))
        names = [self.remote(f"{rel}/{n}") for n in self.listing(rel)]
        if names:
            self.fs.rm(names)

    # ------------------------------------------------------------------------------ plain files

    def get(self, rel: str, local: Path) -> bool:
        """Copy one object (a state file: small) to `local` (atomically); False, and `local` removed, when the
        store has none. With signing on, one that no trusted key signed for `rel` raises Unsigned (the local
        copy is left as it was: a state file is never replaced by one a writer without the key made)."""
        data = self.read_sealed(rel)
        if data is None:
            local.unlink(missing_ok=True)
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(local, ".get")
        tmp.write_bytes(data)
        os.replace(tmp, local)
        return True

    def put(self, local: Path, rel: str) -> None:
        self.write_sealed(rel, local.read_bytes())

    def put_dir(self, local: Path, rel: str, marker: bytes | None = None) -> None:
        """Upload a folder's files; with `marker`, a `_COMPLETE` object holding it last (a reader checks for it)."""
        files = [p for p in sorted(local.rglob("*")) if p.is_file()]
        if files:
            self.fs.put([str(p) for p in files], [self.remote(f"{rel}/{p.relative_to(local).as_posix()}")
                                                   for p in files])
        if marker is not None:
            self.write_sealed(f"{rel}/{MANIFEST}", marker)

    def read(self, rel: str) -> bytes | None:
        """The object `rel` (a checkpoint's marker): its payload, None when absent or, with signing on, not
        signed by a trusted key for that place (logged)."""
        try:
            return self.read_sealed(rel)
        except Unsigned as e:
            self.on_damage(f"store: {self.url}/{rel}: not trusted ({e}); not read")
            return None

    def get_dir(self, rel: str, local: Path) -> int:
        names = [n for n in self.listing(rel) if n != MANIFEST]
        for name in names:
            (local / name).parent.mkdir(parents=True, exist_ok=True)
        if names:
            self.fs.get([self.remote(f"{rel}/{n}") for n in names], [str(local / n) for n in names])
        return len(names)

    # ----------------------------------------------------------------------------------- verify

    def verify(self, full: bool = False, discard: bool = False):
        """Every entry prefix under `cache/` in the store: yields (rel, why it cannot be trusted, or None).
        An entry is damaged when a listed file is missing or of another size, a referenced entry is not
        complete, or (with `full`) a file's bytes are not the ones published; a prefix without a manifest is
        an upload cut short, unless its lock is held (being built now: skipped). With `discard`, what cannot
        be trusted is deleted (under the key's lock), so the next run rebuilds it."""
        base = self.remote("cache")
        entries: dict[str, dict[str, int]] = {}
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            found = {}
        for name, info in found.items():
            parts = name[len(base) + 1:].split("/", 2)
            if len(parts) == 3 and parts[0] != RECORDS_DIR:
                try:  # an object whose key is no entry's place (`cache//x`, `..`) belongs to no entry
                    rel = entry_rel(f"cache/{parts[0]}/{parts[1]}")
                    safe_relpath(parts[2])
                except ValueError:
                    continue
                entries.setdefault(rel, {})[parts[2]] = int(info.get("size") or 0)
        manifests, unread = {}, {}
        for rel, files in entries.items():
            if MANIFEST in files:
                try:
                    manifest = self.read_manifest_object(rel)
                except Unsigned as e:
                    unread[rel] = f"not trusted: {e}"
                    continue
                except (FileNotFoundError, ValueError):
                    continue
                if manifest is not None and manifest.path == rel:
                    manifests[rel] = manifest
                elif manifest is not None:
                    unread[rel] = f"its manifest is that of another entry ({manifest.path})"
        for rel, files in sorted(entries.items()):
            manifest = manifests.get(rel)
            if MANIFEST not in files:
                why = "no manifest: an upload cut short"
            elif manifest is None:
                why = unread.get(rel, "its manifest is unreadable")
            else:
                why = next((f"{n} is missing" if n not in files else f"{n} has {files[n]} bytes, the manifest "
                            f"says {size}" for n, size in manifest.files.items() if files.get(n) != size), None)
                why = why or next((f"it refers to {d}, which is not complete" for d in manifest.deps
                                   if d not in manifests), None)
                if why is None and full:  # blake2b-128, as manifest.hash_file recorded at publish
                    why = next((f"{n} does not have the content it was published with"
                                for n, digest in manifest.digests.items() if self._digest(f"{rel}/{n}") != digest),
                               None)
            if why is None:
                yield rel, None
                continue
            lock = Lock(self, rel)
            if not lock.acquire(wait=False):
                continue  # being built right now: not damage
            try:
                if discard:
                    self.delete(rel)
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(self.remote(f"cache/{RECORDS_DIR}/{rel.rsplit('/', 1)[-1]}"))
            finally:
                lock.release()
            yield rel, why

    def _digest(self, rel: str) -> str:
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        with self.fs.open(self.remote(rel), "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    # ------------------------------------------------------------------------------------- lock

    def lock(self, name: str, done=None) -> Lock:
        return Lock(self, name, done)


def _modified(info: dict) -> float | None:
    """An fsspec listing's last-modified time as a timestamp (s3fs: LastModified; others: mtime, updated...)."""
    for k in ("LastModified", "last_modified", "mtime", "updated", "modified", "created"):
        value = info.get(k)
        if value is None or value == "":
            continue
        if hasattr(value, "timestamp"):
            return value.timestamp()
        try:
            return float(value)
        except (TypeError, ValueError):
            from datetime import datetime

            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return None


def install(tmp: Path, final: Path) -> None:
    """Move a finished temp dir into place; debris at `final` (a folder without a manifest) is moved aside
    first. If another process installed a complete copy meanwhile, ours is dropped."""
    if (final / MANIFEST).is_file():
        return
    if final.exists():
        remove_entry_dir(final)
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / MANIFEST).is_file():
            raise
