"""Which Prefect server a local `cpt run` talks to, found or started before Prefect is imported.

In order: PREFECT_API_URL when the user set it (Prefect's own rule); the server `cpt server start` keeps in the
background (its UI at its URL), found from the state file it writes; `make server`'s at 127.0.0.1:4200 when it
answers as a Prefect server; else a temporary server for this run only, as Prefect's own: the same uvicorn
command, no UI, stopped when the run ends (and by the kernel if the run is killed), so no process outlives a run
the user did not ask for. The temporary server is started at once (before Prefect and the stages are imported,
the corpus fingerprinted and the tokenizer loaded: about 2 s a run that Prefect's own starts after), and waited
for just before the flow's first call to it.

Only the standard library is imported here: this runs before anything else a run needs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

MAKE_SERVER_URL = "http://127.0.0.1:4200/api"  # the Makefile's `make server`, Prefect's default port
STATE_NAME = "server.json"


def _cache_dir() -> Path:
    from tasks.core.paths import user_cache_dir  # stdlib only

    return user_cache_dir()


def _prefect_home() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("PREFECT_HOME", "~/.prefect")))


def healthy(api_url: str, timeout: float = 0.5) -> bool:
    """Whether a Prefect API answers at `api_url` (its /health says true)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200 and r.read().strip() == b"true"
    except (OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_prefect_server(pid: int) -> bool:
    """Whether process `pid` is a `prefect server start` (a pid reused by another program is never signalled)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _alive(pid)  # no /proc (macOS): the state file is all there is
    return any(b"prefect" in part for part in cmdline) and b"server" in cmdline


# ------------------------------------------------------------------------------------- `cpt server`


def state_file() -> Path:
    return _cache_dir() / STATE_NAME


def read_state() -> dict | None:
    """The state `cpt server start` wrote, when its server still runs under this PREFECT_HOME; None otherwise."""
    try:
        state = json.loads(state_file().read_text())
        pid, url = int(state["pid"]), str(state["api_url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if state.get("prefect_home") != _prefect_home() or not _alive(pid) or not _is_prefect_server(pid):
        return None
    return {**state, "pid": pid, "api_url": url}


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(host: str = "127.0.0.1", port: int = 4200, timeout: float = 120.0) -> dict:
    """`prefect server start` in the background, in its own session (it outlives this shell, as asked), its log
    beside the state file; returns its state once it answers. A server already started is returned as it is."""
    state = read_state()
    if state is not None:
        return {**state, "already": True}
    if port == 0:
        port = _free_port(host)
    prefect = Path(sys.executable).parent / "prefect"
    command = [str(prefect) if prefect.exists() else sys.executable, *([] if prefect.exists() else ["-m", "prefect"]),
               "server", "start", "--host", host, "--port", str(port)]
    folder = _cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "server.log"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED",
                                                                              "false")}
    env.pop("PREFECT_API_URL", None)
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    api_url = f"http://{host}:{port}/api"
    deadline = time.monotonic() + timeout
    while not healthy(api_url):
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited ({proc.returncode}): see {log}")
        if time.monotonic() > deadline:
            _stop_group(proc.pid)
            raise RuntimeError(f"the Prefect server did not answer at {api_url} in {timeout:.0f} s: see {log}")
        time.sleep(0.2)
    state = {"pid": proc.pid, "api_url": api_url, "ui_url": f"http://{host}:{port}", "log": str(log),
             "prefect_home": _prefect_home(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, state_file())
    return state


def _stop_group(pid: int, wait: float = 10.0) -> None:
    """SIGTERM to the process group `pid` leads (the server and the workers it started), SIGKILL after `wait`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child (started by another `cpt server start`)
                done = 0 if _alive(pid) else pid
            if done == pid or not _alive(pid):
                return
            time.sleep(0.1)


def stop_server() -> dict | None:
    """Stop the server `cpt server start` started; returns its state, or None when none was running."""
    state = read_state()
    if state is not None:
        _stop_group(state["pid"])
    state_file().unlink(missing_ok=True)
    return state


# ------------------------------------------------------------------------------------- a run's server


@dataclass
class RunServer:
    """The Prefect API a run uses: `kind` is "env" (PREFECT_API_URL as given), "cpt server", "make server" or
    "temporary" (started for this run, stopped by `close`)."""
    kind: str
    api_url: str | None = None
    ui_url: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0

    def ready(self) -> None:
        """Wait for a temporary server to answer (a found one answered already)."""
        if self.process is None:
            return
        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))
        deadline = self.started + timeout
        while not healthy(self.api_url, timeout=1.0):
            if self.process.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the temporary Prefect server did not answer at {self.api_url} in {timeout:.0f} s")
            time.sleep(0.05)

    def close(self) -> None:
        if self.process is None:
            return
        proc, self.process = self.process, None
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def describe(self) -> str:
        if self.kind == "temporary":
            return (f"Prefect: a temporary server for this run ({self.api_url}, no UI, stopped when the run ends); "
                    "`cpt server start` keeps one running with its UI, and runs then start at once")
        if self.kind == "env":
            return f"Prefect: the server at PREFECT_API_URL ({self.api_url})"
        return (f"Prefect: the running {self.kind} at {self.ui_url} (its UI shows this run; it keeps running after "
                "the run" + ("; `cpt server stop` stops it)" if self.kind == "cpt server" else ")"))


def _die_with_parent() -> None:
    """In the temporary server's process: the kernel ends it when the run's process dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def temporary_server() -> RunServer:
    """Prefect's temporary server, started now: the command Prefect's SubprocessASGIServer runs (uvicorn on
    `prefect.server.api.server:create_app`, ephemeral, no UI) on a free port of 127.0.0.1."""
    import importlib.util

    spec = importlib.util.find_spec("prefect")
    app_dir = str(Path(spec.origin).parent.parent)
    port = _free_port("127.0.0.1")
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]
    linux = sys.platform.startswith("linux")
    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent if linux else None)
    import atexit

    server = RunServer("temporary", f"http://127.0.0.1:{port}/api", None, proc, time.monotonic())
    atexit.register(server.close)
    return server


def run_server() -> RunServer:
    """The server this run will use (see the module's docstring); PREFECT_API_URL is set to it for Prefect."""
    given = os.environ.get("PREFECT_API_URL")
    if given:
        return RunServer("env", given)
    state = read_state()
    if state is not None and healthy(state["api_url"]):
        found = RunServer("cpt server", state["api_url"], state.get("ui_url"))
    elif os.environ.get("CPT_FIND_MAKE_SERVER", "1") != "0" and healthy(MAKE_SERVER_URL, timeout=0.3):
        found = RunServer("make server", MAKE_SERVER_URL, MAKE_SERVER_URL.removesuffix("/api"))
    else:
        found = temporary_server()
    os.environ["PREFECT_API_URL"] = found.api_url
    if found.kind == "temporary":
        os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI: no "View at" link to a page that is not there
    return found
