"""The slow mark's guard: a test not marked `slow` that starts a child process, a server or a Prefect flow fails,
naming what it started.

`make test-fast` (`-m "not slow"`) is the inner loop and must start none of them. A list of fixture names cannot
keep that promise (a test can run `cpt retrain` in a subprocess, or call a flow, with no fixture at all), so the
guard watches the calls every such start goes through, in this process, while the test runs:

- child processes: `subprocess.Popen` (asyncio's subprocesses go through it too), multiprocessing's spawn and
  forkserver (`multiprocessing.util.spawnv_passfds`), `os.fork` and `os.forkpty` (multiprocessing's fork),
  `os.posix_spawn[p]`, `os.system`;
- servers: `socket.listen` (a server in a thread of this process; one in a child is already a child process);
- Prefect: `prefect.flow_engine.run_flow` (what every flow call runs) and `prefect.task_engine.run_task` (a task
  called outside `.fn`, which talks to the API). They are wrapped when Prefect imports them, so a session that
  never imports Prefect pays nothing for it.

A start is reported to the innermost `watching()` block. The hooks below open one around every fixture's setup
and one around each phase (setup, call, teardown) of a test without the mark. What a fixture's setup started is
remembered by the fixture's name and passed to the block around it, so a session fixture set up once (a server)
still fails every unmarked test that uses it, whichever test happened to set it up.

tests/conftest.py imports the hooks; `python -m pytest -p slow_guard` loads them into any other suite (the
guard's own test in tests/test_layout.py runs one that way).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import multiprocessing.util
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# The open watching() blocks, innermost last; each collects descriptions of what was started inside it.
_watchers: list[list[str]] = []
# Fixture name -> what its latest setup started, for the tests that use it after it was set up (a session fixture).
FIXTURE_STARTS: dict[str, list[str]] = {}
MARK = "__slow_guard__"  # set on every wrapper, so tests can check the guard sits on each entry point


def report(what: str) -> None:
    if _watchers:
        _watchers[-1].append(what)


@contextmanager
def watching() -> Iterator[list[str]]:
    """Collect what is started inside the block (and not inside a block opened within it)."""
    seen: list[str] = []
    _watchers.append(seen)
    try:
        yield seen
    finally:
        # By identity: two blocks' lists may be equal.
        del _watchers[max(i for i, w in enumerate(_watchers) if w is seen)]


def _command(args) -> str:
    if isinstance(args, (str, bytes, os.PathLike)):
        args = [args]
    text = " ".join("python" if str(a) == sys.executable else os.fsdecode(a) for a in args)  # read, not pasted
    return text if len(text) <= 160 else text[:157] + "..."


def _wrap(owner, name: str, describe) -> None:
    """Replace `owner.name` with a function that reports `describe(*args, **kwargs)`, then calls the original."""
    real = getattr(owner, name)
    if getattr(real, MARK, False):
        return

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        try:
            what = describe(*args, **kwargs)
        except Exception:  # noqa: BLE001  a description must never break the call it describes
            what = f"{getattr(owner, '__name__', owner)}.{name}(...)"
        report(what)
        return real(*args, **kwargs)

    setattr(wrapper, MARK, True)
    setattr(owner, name, wrapper)


def _listening(sock, *_):
    try:
        where = sock.getsockname()
    except OSError:
        where = "?"
    if isinstance(where, tuple):
        where = f"{where[0]}:{where[1]}"
    return f"a server (a socket listening on {where or 'an unnamed address'})"


def _wrap_flow_engine(module) -> None:
    _wrap(module, "run_flow", lambda flow=None, *a, **k: f"a Prefect flow run ({getattr(flow, 'name', flow)})")


def _wrap_task_engine(module) -> None:
    _wrap(module, "run_task",
          lambda task=None, *a, **k: f"a Prefect task run outside .fn ({getattr(task, 'name', task)})")


_ON_IMPORT = {"prefect.flow_engine": _wrap_flow_engine, "prefect.task_engine": _wrap_task_engine}


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Wraps Prefect's engine entry points as their modules are imported (they are imported lazily, at the first
    flow or task call)."""

    def find_spec(self, name, path=None, target=None):
        if name not in _ON_IMPORT:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_wrap(module):
            exec_module(module)
            _ON_IMPORT[name](module)

        spec.loader.exec_module = exec_then_wrap
        return spec


def install() -> None:
    """Put the watch on every entry point above (once per process; idempotent)."""
    _wrap(subprocess.Popen, "_execute_child", lambda self, args, *a, **k: f"a child process `{_command(args)}`")
    _wrap(multiprocessing.util, "spawnv_passfds",
          lambda path, args, passfds: f"a child process (multiprocessing) `{_command(args)}`")
    _wrap(os, "fork", lambda: "a forked child process (os.fork)")
    _wrap(os, "forkpty", lambda: "a forked child process (os.forkpty)")
    for name in ("posix_spawn", "posix_spawnp"):
        _wrap(os, name, lambda path, argv, *a, _n=name, **k: f"a child process (os.{_n}) `{_command(argv)}`")
    _wrap(os, "system", lambda command: f"a child process (os.system) `{_command(['sh', '-c', command])}`")
    _wrap(socket.socket, "listen", _listening)
    if not any(isinstance(f, _WrapOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _WrapOnImport())
    for name, wrap in _ON_IMPORT.items():
        if name in sys.modules:
            wrap(sys.modules[name])


def verdict(nodeid: str, started: list[str]) -> str | None:
    """The failure message for an unmarked test that started `started` (None if it started nothing)."""
    unique = list(dict.fromkeys(started))
    if not unique:
        return None
    shown = "\n  ".join(unique[:6]) + (f"\n  ... and {len(unique) - 6} more" if len(unique) > 6 else "")
    return (f"{nodeid} is not marked slow but started:\n  {shown}\n"
            "`make test-fast` starts no server, flow or child process: mark the test @pytest.mark.slow "
            "(or make it start nothing).")


# ------------------------------------------------------------------------------------------- the hooks


def pytest_configure(config):
    install()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    started: list[str] = []
    try:
        with watching() as started:
            return (yield)
    finally:
        # The latest setup counts: a function-scoped fixture is set up again for each test that uses it.
        FIXTURE_STARTS[fixturedef.argname] = started
        if started:
            for what in started:  # to the test phase around this setup (a fixture asked for during the call too)
                report(f"{what} (in fixture {fixturedef.argname!r})")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _watched(item, fixtures=True))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _watched(item, fixtures=False))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _watched(item, fixtures=False))


def _watched(item, fixtures: bool):
    if item.get_closest_marker("slow") is not None:
        return (yield)
    error = result = None
    with watching() as started:
        try:
            result = yield
        except KeyboardInterrupt:
            raise  # an interrupted session is not a test failure
        except BaseException as e:  # noqa: BLE001  the phase's own outcome (a failure, a skip) is kept as the cause
            error = e
    if fixtures:  # what the test's fixtures started, now or when an earlier test set them up
        started += [f"{what} (in fixture {name!r})" for name in item.fixturenames
                    for what in FIXTURE_STARTS.get(name, ())]
    message = verdict(item.nodeid, started)
    if message:
        raise pytest.fail.Exception(message, pytrace=False) from error
    if error is not None:
        raise error
    return result
