"""The fence of the build in progress: whether this host still holds the lock its output is published under.

A store lock is a lease (tasks/core/objectstore.py). When it lapses (a renewal failed for longer than the lease,
or a newer holder took the key) another host may be building the same key: this host must stop, not only
refrain from publishing, or an hours-long training run goes on spending a GPU on an output nobody will take.
The lock owns a Fence and marks it lost; the build reads the fence of the block it runs in (`fenced`), at the
points where stopping is cheap (between pieces, while it waits on a training child), and anything that runs
for long registers how to stop it (`on_lost(proc.kill)`).

A local root's locks are flocks that cannot lapse: no fence is set there and `current()` never fails.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator


class LockLost(RuntimeError):
    """This host's lease ran out (a renewal failed for longer than the lease) or a newer holder took the lock:
    whatever it was building must not be published."""


class Fence:
    """Set once, never cleared: a lease that lapsed is not taken back (another host may hold it now)."""

    def __init__(self, name: str = ""):
        self.name = name
        self.parent: Fence | None = None  # the fence of an enclosing build (a stage around its pieces)
        self._lost = threading.Event()
        self._why = ""
        self._mutex = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    @property
    def lost(self) -> bool:
        return self._lost.is_set() or (self.parent is not None and self.parent.lost)

    def lose(self, why: str) -> None:
        with self._mutex:
            if self._lost.is_set():
                return
            self._why = why
            self._lost.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            with contextlib.suppress(Exception):  # stopping one thing must not keep the others running
                fn()

    def check(self) -> None:
        """Raise LockLost if this fence or an enclosing one is lost."""
        if self._lost.is_set():
            raise LockLost(self._why)
        if self.parent is not None:
            self.parent.check()

    def on_lost(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call `fn` (from the lock's renewal thread) when this fence or an enclosing one is lost; at once if it
        already is. Returns a function that unregisters it."""
        fences = []
        f: Fence | None = self
        while f is not None:
            fences.append(f)
            f = f.parent
        for f in fences:
            with f._mutex:
                if not f._lost.is_set():
                    f._callbacks.append(fn)
                    continue
            fn()
            break

        def forget() -> None:
            for f in fences:
                with f._mutex, contextlib.suppress(ValueError):
                    f._callbacks.remove(fn)

        return forget


_NEVER = Fence("local")
_CURRENT: contextvars.ContextVar[Fence] = contextvars.ContextVar("cpt_fence", default=_NEVER)


def current() -> Fence:
    """The fence of the innermost build running in this context (one that is never lost outside any)."""
    return _CURRENT.get()


def check() -> None:
    current().check()


@contextlib.contextmanager
def fenced(fence: Fence) -> Iterator[Fence]:
    """Run a build under `fence`, inside whatever fence encloses it."""
    outer = _CURRENT.get()
    if outer is not _NEVER and fence is not outer:
        fence.parent = outer
    token = _CURRENT.set(fence)
    try:
        yield fence
    finally:
        _CURRENT.reset(token)
