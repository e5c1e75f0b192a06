"""The Prefect server a local run uses: `cpt server start` keeps one in the background that runs find (and that
keeps running until `cpt server stop`); without one, a temporary server ends with its run, even a killed one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import local_server

ROOT = Path(__file__).resolve().parents[1]
CPT = str(Path(sys.executable).parent / "cpt")


@pytest.fixture
def homes(tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("CPT_FIND_MAKE_SERVER", "0")  # a developer's own `make server` is not this test's
    return tmp_path


def gone(pid: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


def test_a_state_file_naming_another_process_or_prefect_home_is_not_a_server(homes):
    state = local_server.state_file()
    state.parent.mkdir(parents=True)
    mine = {"pid": os.getpid(), "api_url": "http://127.0.0.1:9/api", "prefect_home": local_server._prefect_home()}
    state.write_text(json.dumps(mine))
    assert local_server.read_state() is None  # pytest is no Prefect server: never signalled, never used
    assert local_server.stop_server() is None and not state.exists()
    state.write_text("{not json")
    assert local_server.read_state() is None


@pytest.mark.slow
def test_cpt_server_start_is_found_by_runs_and_stops_when_asked(homes):
    env = {**os.environ}
    up = subprocess.run([CPT, "server", "start", "--port", "0"], env=env, capture_output=True, text=True,
                        timeout=180)
    assert up.returncode == 0, up.stderr
    state = local_server.read_state()
    try:
        assert state and "until `cpt server stop`" in up.stdout and state["ui_url"] in up.stdout
        found = local_server.run_server()
        assert (found.kind, found.api_url, found.process) == ("cpt server", state["api_url"], None)
        assert os.environ["PREFECT_API_URL"] == state["api_url"]
        again = subprocess.run([CPT, "server", "start"], env=env, capture_output=True, text=True, timeout=60)
        assert "already running" in again.stdout and local_server.read_state()["pid"] == state["pid"]
        assert subprocess.run([CPT, "server", "status"], env=env, capture_output=True).returncode == 0
    finally:
        down = subprocess.run([CPT, "server", "stop"], env=env, capture_output=True, text=True, timeout=60)
    assert "stopped" in down.stdout and gone(state["pid"])
    assert subprocess.run([CPT, "server", "status"], env=env, capture_output=True).returncode == 3
    os.environ.pop("PREFECT_API_URL", None)


CHILD = """
import os, sys, time
from flows.local_server import run_server
s = run_server()
s.ready()
print(s.kind, s.process.pid, flush=True)
if sys.argv[1] == "hang":
    time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exit", "killed"])
def test_a_temporary_server_ends_with_its_run(homes, how):
    child = subprocess.Popen([sys.executable, "-c", CHILD, "hang" if how == "killed" else "exit"], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    kind, pid = child.stdout.readline().split()
    assert kind == "temporary"
    if how == "killed":
        child.send_signal(signal.SIGKILL)  # no atexit: the kernel's parent-death signal ends the server
    child.wait(timeout=60)
    assert gone(int(pid)), "the temporary server outlived its run"
