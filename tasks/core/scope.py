"""The build scope of a run: pieces built under the same scope count as "read in this run" wherever they were
built (the retrain flow's drop gate builds a drop's pieces, and the pipeline it then runs reuses them). A
context variable, so a scope follows the run's threads; fan-out carries it to other processes by value."""

from __future__ import annotations

import contextlib
import contextvars

_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("cpt_build_scope", default=None)


def current_scope() -> str | None:
    return _SCOPE.get()


@contextlib.contextmanager
def build_scope(scope: str | None = None):
    """Open a build scope unless one is open already (a pipeline run inside a retrain run joins it)."""
    import uuid

    if _SCOPE.get() is not None:
        yield _SCOPE.get()
        return
    token = _SCOPE.set(scope or uuid.uuid4().hex)
    try:
        yield _SCOPE.get()
    finally:
        _SCOPE.reset(token)
