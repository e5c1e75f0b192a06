"""The Prefect server a local run uses: a run that finds none starts one that later runs find and that stops by
itself once idle, never under a run (the default); `cpt server start` keeps one until `cpt server stop`; with
CPT_SERVER=temporary, a temporary server ends with its run, even a killed one."""

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
    monkeypatch.setenv("CPT_SERVER", "temporary")
    monkeypatch.setenv("CPT_SERVER_PORT", "0")
    return tmp_path


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (a kept server: its supervisor and the Prefect server)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


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


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_kept_servers_prefect_process_ends_with_its_supervisor_however_it_ends(homes, sig):
    """`cpt server stop` ends the group; a supervisor killed on its own (by the OOM killer, or `kill PID` from the
    status line) must not leave the Prefect server it started running with nothing to stop it."""
    up = subprocess.run([CPT, "server", "start", "--port", "0"], env={**os.environ}, capture_output=True, text=True,
                        timeout=180)
    assert up.returncode == 0, up.stderr
    supervisor = local_server.read_state()["pid"]
    members = group_members(supervisor)
    try:
        server = [p for p in members if p != supervisor]
        assert supervisor in members and len(server) == 1
        os.kill(supervisor, sig)  # the supervisor alone, not its group
        assert gone(supervisor) and gone(server[0]), "the Prefect server outlived its supervisor"
    finally:
        for pid in group_members(supervisor):
            os.kill(pid, signal.SIGKILL)
        local_server.state_file().unlink(missing_ok=True)
    os.environ.pop("PREFECT_API_URL", None)


CHILD = """
import os, sys, time
from flows.local_server import run_server
while len(sys.argv) > 2 and not os.path.exists(sys.argv[2]):  # a start line: runs that start at once
    time.sleep(0.005)
s = run_server()
s.ready()
print(s.kind, s.process.pid if s.process else s.state["pid"], s.new, s.heartbeats(), sep="|", flush=True)
print(s.describe(), flush=True)
if sys.argv[1] == "hang":
    time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exit", "killed"])
def test_a_temporary_server_ends_with_its_run(homes, how):
    child = subprocess.Popen([sys.executable, "-c", CHILD, "hang" if how == "killed" else "exit"], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    kind, pid, _, heartbeats = child.stdout.readline().strip().split("|")
    assert (kind, heartbeats) == ("temporary", "False")
    if how == "killed":
        child.send_signal(signal.SIGKILL)  # no atexit: the kernel's parent-death signal ends the server
    child.wait(timeout=60)
    assert gone(int(pid)), "the temporary server outlived its run"


@pytest.mark.slow
def test_a_run_keeps_a_server_for_later_runs_that_stops_when_idle_and_never_under_a_run(homes, monkeypatch):
    monkeypatch.setenv("CPT_SERVER", "keep")
    monkeypatch.setenv("CPT_SERVER_IDLE_MINUTES", "0.05")  # 3 s
    monkeypatch.setenv("HF_TOKEN", "hf_not_for_the_server")  # a run's credential
    child = [sys.executable, "-c", CHILD]
    first = subprocess.run([*child, "exit"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr
    kind, pid, new, heartbeats = first.stdout.splitlines()[0].split("|")
    pid = int(pid)
    assert (kind, new, heartbeats) == ("cpt server", "True", "False")
    said = first.stdout.splitlines()[1]  # the run says one keeps running, for how long, and how to stop it
    assert "started a local server" in said and "stops itself after 0.05 idle minutes" in said
    assert "`cpt server stop`" in said and "CPT_SERVER=temporary" in said
    state = local_server.read_state()
    assert state and state["pid"] == pid and local_server.healthy(state["api_url"])
    for member in group_members(pid):  # the server outlives the run: it holds none of the run's credentials
        environ = Path(f"/proc/{member}/environ").read_bytes()
        assert b"hf_not_for_the_server" not in environ and b"PREFECT_HOME=" in environ
    try:
        # A run that holds the server far longer than its idle time: the server answers throughout.
        user = subprocess.Popen([*child, "hang"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        kind, again, new, _ = user.stdout.readline().strip().split("|")
        assert (kind, int(again), new) == ("cpt server", pid, "False")
        assert "the running cpt server" in user.stdout.readline()
        time.sleep(10)
        assert local_server.healthy(state["api_url"], timeout=5), "the kept server stopped under a run"
        user.send_signal(signal.SIGKILL)  # killed, no atexit: the kernel drops its lock; the idle time still counts
        user.wait(timeout=30)
        assert gone(pid, within=60), "the kept server did not stop once idle"
        assert not group_members(pid), "a process of the kept server outlived it"
        assert local_server.read_state() is None and not local_server.state_file().exists()
        # The next run finds none and starts a new one.
        third = subprocess.run([*child, "exit"], cwd=ROOT, capture_output=True, text=True, timeout=180)
        kind, pid, new, _ = third.stdout.splitlines()[0].split("|")
        assert (kind, new) == ("cpt server", "True")
        pid = int(pid)
    finally:
        subprocess.run([CPT, "server", "stop"], env={**os.environ}, capture_output=True, timeout=60)
    assert gone(pid) and not group_members(pid)


@pytest.mark.slow
def test_runs_starting_at_once_start_one_kept_server(homes, monkeypatch):
    monkeypatch.setenv("CPT_SERVER", "keep")
    go = homes / "go"
    runs = [subprocess.Popen([sys.executable, "-c", CHILD, "exit", str(go)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True) for _ in range(3)]
    time.sleep(5)  # all three imported and waiting
    go.touch()
    try:
        outs = [r.communicate(timeout=180)[0].splitlines()[0].split("|") for r in runs]
        assert len({o[1] for o in outs}) == 1 and sorted(o[2] for o in outs) == ["False", "False", "True"]
    finally:
        subprocess.run([CPT, "server", "stop"], env={**os.environ}, capture_output=True, timeout=60)


def test_the_server_settings_are_checked_before_anything_starts(homes, monkeypatch):
    for name, value, words in (("CPT_SERVER", "always", "expected one of keep, temporary"),
                               ("CPT_SERVER_IDLE_MINUTES", "soon", "a number of minutes"),
                               ("CPT_SERVER_IDLE_MINUTES", "0", "more than 0"),
                               ("CPT_SERVER_PORT", "http", "a port number")):
        monkeypatch.setenv("CPT_SERVER", "keep")
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=words):
            local_server.run_server()
        monkeypatch.delenv(name)
    assert not local_server.state_file().exists()


def test_runs_send_no_heartbeats_to_a_server_cpt_started_unless_the_user_set_them(monkeypatch):
    from prefect.settings import get_current_settings

    from flows.cli import _flow_settings
    from flows.local_server import RunServer

    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None
    for kind, expected in (("temporary", None), ("cpt server", None), ("env", default), ("make server", default)):
        with _flow_settings(RunServer(kind, "http://127.0.0.1:9/api")):
            assert get_current_settings().flows.heartbeat_frequency == expected, kind
    from prefect.settings import temporary_settings

    with temporary_settings(updates={"flows.heartbeat_frequency": 60}):  # the user's own setting (a profile's, an environment variable's) wins
        with _flow_settings(RunServer("cpt server", "http://127.0.0.1:9/api")):
            assert get_current_settings().flows.heartbeat_frequency == 60


@pytest.mark.slow
def test_cpt_run_as_shipped_keeps_its_server_and_the_next_run_finds_it(homes, monkeypatch, tiny_model):
    """The command a user types, with the default CPT_SERVER: the first `cpt run` starts the kept server and says
    so; the second finds it, says so, and is fully Cached; its flow runs show on that server."""
    monkeypatch.setenv("CPT_SERVER", "keep")
    corpus = homes / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"content": f"document {i}: " + "a few words of text " * 20}) + "\n"
                              for i in range(40)))
    command = [CPT, "run", "--set", f"corpus.paths=[{corpus}]", "--set", f"model.id={tiny_model}", "--until",
               "tokenize", "--artifacts", str(homes / "art"), "--summary", str(homes / "summary.json")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-3000:]
        state = local_server.read_state()
        assert state and "Prefect: started a local server" in first.stderr and state["ui_url"] in first.stderr
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"Prefect: the running cpt server at {state['ui_url']}" in second.stderr
        summary = json.loads((homes / "summary.json").read_text())
        assert {s["state"] for s in summary["stages"]} == {"Cached"}
        import urllib.request

        ask = urllib.request.Request(f"{state['api_url']}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(ask, timeout=10) as r:
            runs = {run["name"]: run["state_type"] for run in json.loads(r.read())}
        assert runs.get(summary["flow_run"]) == "COMPLETED" and len(runs) == 2
    finally:
        subprocess.run([CPT, "server", "stop"], env=env, capture_output=True, timeout=60)
    assert gone(state["pid"]) and not group_members(state["pid"])
