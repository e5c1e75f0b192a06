"""The process's long-lived objects out of the cyclic garbage collector's way.

A run's process holds ~550k objects once Prefect, pydantic and the flow's modules are imported. Python's full
collection (generation 2) walks every one of them: ~0.1 s a time on this 2-core machine, more as torch and
transformers add theirs, and it fires whenever enough new objects have survived — in the middle of whichever
stage is running (measured: one in a drop's load stage, 0.11-0.13 s of its 0.22; five in evaluate-base). Those
objects (modules, classes, settings, the config) live as long as the process, so walking them finds nothing.
`gc.freeze()` moves what is alive now into the permanent generation, which no collection walks; what is freed
by reference counting is freed as before, and objects made later are collected as before.
"""

from __future__ import annotations

import gc


_FROZEN = False


def freeze_long_lived() -> None:
    """Leave every object alive now out of later full collections (`gc.freeze`), once per process: at the start
    of its first flow, the imports done and no data read yet. A cycle alive but unreachable when frozen is never
    collected, so a later flow in the same process (a test session, a served flow) freezes nothing more: what
    the runs before it left would stay for good."""
    global _FROZEN
    if not _FROZEN:
        _FROZEN = True
        gc.freeze()
