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
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tasks.core.fence import Fence, LockLost  # noqa: F401 - LockLost is raised to callers of this module
from tasks.core.signing import Unsigned, keys_from_env
from tasks.core.manifest import (MANIFEST, RECORDS_DIR, StageOutput, arrow_problem, entry_rel, parse_manifest,
                                 remove_entry_dir, safe_relpath, verified_manifest)

LOCK_TIMEOUT = float(os.environ.get("CPT_STORE_LOCK_TIMEOUT_SECONDS", str(24 * 3600)))


class DamagedEntry(OSError):
    """A file fetched from the store is not the one its manifest recorded (size or digest)."""


class LockTimeout(TimeoutError):
    """Waited longer than CPT_STORE_LOCK_TIMEOUT_SECONDS for another holder."""


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
                    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
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
        tmp = local.with_name(f".{local.name}.{os.getpid()}.get")
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


class Lock:
    """A lease lock made of conditional creates, across hosts. Holders are generations under
    `locks/<name>/`: `g-00000001`, `g-00000002`, …; the highest one is the lock. Taking it = creating the next
    generation with create-if-absent, which exactly one contender wins; allowed when the highest one says it
    was released or its lease ran out (its holder died: a SIGKILL, a lost host). The holder renews its lease
    from a thread every lease/3 and marks it released on exit. Generations only grow, so a decision made on a
    stale listing can only lose the create, never take a lock someone holds.

    Used as `with store.lock(name, done) as held:`; `done()` is polled while waiting (the entry another host
    builds is published): then `held` is False and nothing was taken.

    Fenced: the holder knows until when its lease surely holds (the last renewal that succeeded, plus the
    lease); `check()` raises LockLost once that time has passed or a newer generation exists, and the publisher
    checks before it deletes or writes a manifest. The clock assumption: hosts agree on time to within a small
    fraction of the lease (NTP gives milliseconds; the default lease is 60 s)."""

    def __init__(self, store: Store, name: str, done=None, timeout: float | None = None):
        safe_relpath(name)  # a lock's name is a relative name under `locks/`, checked before any request
        self.store, self.name, self.done = store, name, done
        self.prefix = store.remote(f"locks/{name}")
        self.gen: int | None = None
        self.valid_until = 0.0
        self.timeout = LOCK_TIMEOUT if timeout is None else timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreadable: dict[int, float] = {}  # generation -> when its body was first seen not to parse
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # Lost once the lease surely lapsed: the build running under it stops (tasks/core/fence.py).
        self.fence = Fence(name)

    def _generations(self) -> list[int]:
        try:
            names = self.store.fs.ls(self.prefix, detail=False)
        except FileNotFoundError:
            return []
        gens = []
        for n in names:
            base = n.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith("g-") and base[2:].isdigit():
                gens.append(int(base[2:]))
        return sorted(gens)

    def _path(self, gen: int) -> str:
        return f"{self.prefix}/g-{gen:08d}"

    def _body(self, expires: float) -> bytes:
        return json.dumps({"owner": self.owner, "expires": expires}).encode()

    def _free(self, gen: int) -> bool:
        try:
            body = json.loads(self.store.fs.cat_file(self._path(gen)))
            return float(body.get("expires", 0)) < time.time()
        except FileNotFoundError:
            return True  # pruned: a newer generation exists or is being created
        except (ValueError, TypeError, AttributeError):
            # Being written, or garbage: a body that still does not parse one lease after it was first seen
            # counts as expired (a writer takes milliseconds, and nobody waits for a lock forever).
            first = self._unreadable.setdefault(gen, time.time())
            return time.time() - first > self.store.lease

    def acquire(self, poll: float = 0.5, wait: bool = True) -> bool:
        """Take the lock; False if `done()` came true first, or (with `wait=False`) if it is held. Waiting longer
        than the timeout raises LockTimeout naming the holder."""
        said = False
        started = time.monotonic()
        while True:
            if self.done is not None and self.done():
                return False
            gens = self._generations()
            top = gens[-1] if gens else 0
            free = top == 0 or self._free(top)
            if not free and not wait:
                return False
            if not free and not said:
                self.store.on_wait(f"store: {self.store.url}/{self.name} is being built by {self._holder(top)}; "
                                   "waiting for it")
                said = True
            if not free and time.monotonic() - started > self.timeout:
                raise LockTimeout(f"store: {self.store.url}/{self.name} has been held by {self._holder(top)} for "
                                  f"over {self.timeout:.0f} s (CPT_STORE_LOCK_TIMEOUT_SECONDS)")
            if free:
                asked = time.time()
                try:
                    self.store.fs.pipe_file(self._path(top + 1), self._body(asked + self.store.lease),
                                            mode="create")
                except FileExistsError:
                    continue  # another contender won this generation
                except OSError:
                    # Some servers (SeaweedFS) answer the refused create with a bare 412 that s3fs does not map to
                    # FileExistsError: if the generation exists now, another contender won it.
                    if self.store.fs.exists(self._path(top + 1)):
                        continue
                    raise
                self.gen = top + 1
                self.valid_until = asked + self.store.lease
                for old in gens[:-1]:  # keep the listing short; the top one is what everyone reads
                    with contextlib.suppress(FileNotFoundError):
                        self.store.fs.rm_file(self._path(old))
                self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease-{self.name}")
                self._thread.start()
                if self.done is not None and self.done():  # published between our look and our create
                    self.release()
                    return False
                return True
            time.sleep(poll)

    def _holder(self, gen: int) -> str:
        with contextlib.suppress(Exception):
            return json.loads(self.store.fs.cat_file(self._path(gen)))["owner"]
        return "another run"

    def _renew(self) -> None:
        while not self._stop.wait(self.store.lease / 3):
            asked = time.time()
            if asked >= self.valid_until:
                # The lease lapsed: another host may hold the lock now. Renewing would take it back from
                # under them; this holder stays lost (check() raises) and publishes nothing.
                why = (f"store: the lease of {self.store.url}/{self.name} lapsed (its renewal failed for longer "
                       "than the lease): another host may be building it; this run stops and publishes nothing")
                self.store.on_wait(why)
                self.fence.lose(why)
                return
            try:
                self.store.fs.pipe_file(self._path(self.gen), self._body(asked + self.store.lease))
                self.valid_until = asked + self.store.lease
            except Exception as e:  # retried on the next tick; check() says when the slack is gone
                self.store.on_wait(f"store: renewing the lease of {self.store.url}/{self.name} failed "
                                   f"({type(e).__name__}); {max(self.valid_until - time.time(), 0):.0f} s left")

    def check(self, margin: float = 0.0) -> None:
        """Raise LockLost unless this holder's lease surely still holds (for `margin` seconds more: what the next
        step may take) and no newer generation exists."""
        if self.gen is None:
            raise LockLost(f"store: {self.store.url}/{self.name} is not held")
        if time.time() + margin >= self.valid_until:
            self.fence.lose(f"store: the lease of {self.store.url}/{self.name} ran out or is about to (its renewal "
                            "failed): "
                            "another host may be building it; nothing is published")
        else:
            gens = self._generations()
            if gens and gens[-1] != self.gen:
                self.fence.lose(f"store: {self.store.url}/{self.name} was taken by a newer holder "
                                f"({self._holder(gens[-1])}); nothing is published")
        self.fence.check()

    def release(self) -> None:
        if self.gen is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(Exception):
            self.store.fs.pipe_file(self._path(self.gen), self._body(0.0))
        self.gen = None

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


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
