"""The build scope of a run: pieces built under the same scope count as "read in this run" wherever they were
built (the retrain flow's drop gate builds a drop's pieces, and the pipeline it then runs reuses them). A
context variable, so a scope follows the run's threads; fan-out carries it to other processes by value.

Also the pieces a stage's build took (built or reused), so its manifest can name the ones it was made from
without reading them afterwards (`StageOutput.pieces`: garbage collection keeps them with the output)."""

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


_TAKEN: contextvars.ContextVar[list | None] = contextvars.ContextVar("cpt_pieces_taken", default=None)


@contextlib.contextmanager
def taking_pieces():
    """Collect, in the list yielded, every piece `note_piece` names within the block (a stage's build)."""
    taken: list[str] = []
    token = _TAKEN.set(taken)
    try:
        yield taken
    finally:
        _TAKEN.reset(token)


def note_piece(rel: str) -> None:
    taken = _TAKEN.get()
    if taken is not None:
        taken.append(rel)
