"""Locks that must exclude: a store's conditional create, checked before its locks are trusted, and the note a
local lock's holder leaves (who holds a line's run, and since when).

Kept apart from tasks/core/root.py, which takes these locks, and from tasks/core/objectstore.py, whose lease
locks rest on the conditional create probed here.
"""

from __future__ import annotations

import contextlib
import os

from tasks.core.config.base import ConfigError

UNSAFE_STORE = "CPT_STORE_WITHOUT_CONDITIONAL_CREATE"
_PROBED: dict[str, bool] = {}  # store URL -> whether it refused a second create (once per process)


def refuses_second_create(store) -> bool:
    """Whether the store refuses a second create-if-absent of one key (the S3 `If-None-Match: *` put the locks
    are made of): one object created twice under `locks/`, then removed."""
    import uuid

    key = store.remote(f"locks/_probe-{uuid.uuid4().hex}")
    store.fs.pipe_file(key, b"1", mode="create")
    try:
        try:
            store.fs.pipe_file(key, b"2", mode="create")
        except FileExistsError:
            return True
        except OSError:  # SeaweedFS's bare 412: refused, if the first object is still what is there
            return store.fs.cat_file(key) == b"1"
        return False
    finally:
        with contextlib.suppress(Exception):
            store.fs.rm_file(key)


def check_conditional_create(store) -> None:
    """Once per process and store: the store must refuse a second create of one key, or two hosts could hold
    one lock and build one key (or run one line) at once. A store that does not is refused, unless
    $CPT_STORE_WITHOUT_CONDITIONAL_CREATE=1 says to go on without that guarantee (then it is said, every run)."""
    if store.url not in _PROBED:
        _PROBED[store.url] = refuses_second_create(store)
    if _PROBED[store.url]:
        return
    why = (f"{store.url}: this store accepted a second create of one object (S3 If-None-Match: *, fsspec "
           "mode='create'), so its locks do not exclude: two hosts could build one key or run one line at once")
    if os.environ.get(UNSAFE_STORE) == "1":
        from tasks.core.report import run_logger

        run_logger().warning("%s; going on because %s=1: one build per key is NOT guaranteed", why, UNSAFE_STORE)
        return
    raise ConfigError(f"{why}. Use a store that honours conditional writes, or set {UNSAFE_STORE}=1 to run "
                      "without that guarantee (one host at a time)")


def write_holder(fd: int) -> None:
    """Say in the lock file `fd` who holds it and since when (`ArtifactsRoot.holder` reads it)."""
    import json
    import socket
    import time

    note = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, note, 0)


def read_holder(fd: int) -> dict:
    """The holder's note, read as data: a number and two short strings, or nothing."""
    import json

    try:
        note = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return {"pid": int(note["pid"]), "host": str(note["host"])[:255], "since": float(note["since"])}
    except (ValueError, KeyError, TypeError):
        return {}
