"""The object store's lease lock (tasks/core/objectstore.py's `Store.lock`): conditional creates across hosts,
renewed from a thread, fenced (tasks/core/fence.py)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from tasks.core.fence import Fence, LockLost

LOCK_TIMEOUT = float(os.environ.get("CPT_STORE_LOCK_TIMEOUT_SECONDS", str(24 * 3600)))


class LockTimeout(TimeoutError):
    """Waited longer than CPT_STORE_LOCK_TIMEOUT_SECONDS for another holder."""


def _relative_name(name: str) -> str:
    """tasks.core.manifest.safe_relpath's rule (not imported: the lock sits below the manifest types, one import
    layer less): a relative path with no absolute, empty, `.` or `..` part, no backslash or NUL."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name or name.startswith("/") \
            or any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"{name!r} is not a relative path inside its folder")
    return name


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

    def __init__(self, store, name: str, done=None, timeout: float | None = None):
        _relative_name(name)  # a lock's name is a relative name under `locks/`, checked before any request
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
