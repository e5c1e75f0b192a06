"""Per-file pieces run one after another, or as concurrent Prefect tasks on a task runner (`runtime`).

The load, tokenize and chunk stages each build one cached piece per source file. `map_pieces` runs a
module-level piece function over a list of calls: in the stage's own process (`sequential`), or submitted as
Prefect tasks to a ThreadPoolTaskRunner, a ProcessPoolTaskRunner or prefect-dask's DaskTaskRunner, so they show
in the UI as task runs and a Dask cluster can take them. A piece publishes itself atomically under its own key
and lock (tasks/core/stage.py), so where it ran never changes what it holds or what it is keyed by.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable
from typing import Any

from tasks.core import fence
from tasks.core.manifest import StageOutput
from tasks.core.scope import build_scope, current_scope, note_piece
from tasks.core.config.data import RuntimeConfig


def run_piece(fn: Callable, scope: str | None, kwargs: dict[str, Any]):
    """A piece in the build scope of the run that asked for it (another process has no context of its own)."""
    with build_scope(scope):
        return fn(**kwargs)


def task_runner(runtime: RuntimeConfig):
    workers = runtime.max_workers or os.cpu_count() or 1
    if runtime.task_runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if runtime.task_runner == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as e:  # pragma: no cover - a dependency of the project
        from tasks.core.config.base import ConfigError

        raise ConfigError(f"runtime.task_runner: dask needs prefect-dask ({e})") from None
    if runtime.dask_address:
        return DaskTaskRunner(address=runtime.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


class SharedRunner:
    """The task runner of one flow run, started by the first stage that fans out (a fully Cached run starts no
    pool or cluster) and shut down when the run ends: load, tokenize and chunk share one pool or Dask cluster
    and its warm workers instead of each starting its own."""

    def __init__(self, runtime: RuntimeConfig):
        self.runtime = runtime
        self.runner = None
        self.stack = contextlib.ExitStack()

    def get(self):
        if self.runner is None:
            self.runner = self.stack.enter_context(task_runner(self.runtime))
        return self.runner


_SHARED: contextvars.ContextVar[SharedRunner | None] = contextvars.ContextVar("cpt_shared_runner", default=None)


@contextlib.contextmanager
def one_runner_per_run(runtime: RuntimeConfig | None):
    """Within this block every `map_pieces` with this `runtime` submits to one task runner."""
    if runtime is None or runtime.task_runner == "sequential":
        yield
        return
    holder = SharedRunner(runtime)
    token = _SHARED.set(holder)
    try:
        yield
    finally:
        _SHARED.reset(token)
        holder.stack.close()


def runs_here(runtime: RuntimeConfig | None, n: int) -> bool:
    """Whether `map_pieces` runs `n` calls in this process (so a call may carry what cannot travel, such as a
    progress bar) rather than on a task runner."""
    return runtime is None or runtime.task_runner == "sequential" or n < 2


def map_pieces(fn: Callable, calls: list[dict[str, Any]], runtime: RuntimeConfig | None, name: str,
               on_done: Callable[[int, Any], None] | None = None) -> list:
    """[fn(**call) for call in calls], in order; `on_done(index, result)` as each finishes."""
    scope = current_scope()
    if runs_here(runtime, len(calls)):
        results = []
        for i, call in enumerate(calls):
            fence.check()  # the stage's own lease lapsed: the rest of its pieces are not its to build
            results.append(run_piece(fn, scope, call))
            if on_done:
                on_done(i, results[-1])
        return results
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    piece = task(run_piece, name=name, cache_policy=NO_CACHE, persist_result=False)
    shared = _SHARED.get()
    with (contextlib.nullcontext(shared.get()) if shared is not None and shared.runtime == runtime
          else task_runner(runtime)) as runner:
        futures = [runner.submit(piece.with_options(task_run_name=f"{name}-{i}"),
                                 {"fn": fn, "scope": scope, "kwargs": call}) for i, call in enumerate(calls)]
        results = []
        for i, future in enumerate(futures):
            results.append(future.result())
            taken = results[-1][0] if isinstance(results[-1], tuple) and results[-1] else results[-1]
            if isinstance(taken, StageOutput):  # published in another process: noted for the stage's manifest
                note_piece(taken.path)
            fence.check()
            if on_done:
                on_done(i, results[-1])
    return results
