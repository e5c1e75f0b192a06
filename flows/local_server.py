"""Which Prefect server a local `cpt run` talks to, found or started before Prefect is imported.

In order: PREFECT_API_URL when the user set it (Prefect's own rule); the server cpt keeps in the background (its
UI at its URL), found from the state file it writes; `make server`'s at 127.0.0.1:4200 when it answers as a
Prefect server; else one is started. By default (`CPT_SERVER=keep`) that is a kept server: started in the
background by the first run, with its UI, used by later runs (a cached run then costs its imports and API calls,
not a server's start), and stopped by itself once no run has used it for `CPT_SERVER_IDLE_MINUTES` (30) — the
run says so, and how to stop it now (`cpt server stop`). `CPT_SERVER=temporary` gives each run its own server
instead, as Prefect's own: no UI, stopped when the run ends (and by the kernel if the run is killed). Either is
started at once (before Prefect and the stages are imported, the corpus fingerprinted and the tokenizer loaded),
and waited for just before the flow's first call to it.

A kept server knows it is idle from a lock file: each run holds a shared lock on it for its whole life (the
kernel drops it when the run ends, however it ends) and touches it when it starts and ends; the server's
supervisor (`python -m flows.local_server serve`, the leader of the server's process group) stops the server only
when it can take the lock exclusively and the file was last touched more than the idle time ago — never under a
run, however long it trains.

Only the standard library is imported here: this runs before anything else a run needs.
"""

from __future__ import annotations

import fcntl
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
USERS_NAME = "server.users"  # runs hold a shared lock on it; its mtime is the last run's start or end
DEFAULT_IDLE_MINUTES = 30.0
MODES = ("keep", "temporary")
_SERVER_ENV = {"PATH", "HOME", "USER", "LANG", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "CPT_CACHE_HOME",
               "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE"}


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
    if b"flows.local_server" in cmdline and b"serve" in cmdline:  # the supervisor of a kept server
        return True
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


def server_mode() -> str:
    """`CPT_SERVER`: "keep" (the default: a run with no server starts one that later runs reuse) or "temporary"."""
    mode = os.environ.get("CPT_SERVER", "keep").strip().lower() or "keep"
    if mode not in MODES:
        raise ValueError(f"CPT_SERVER={os.environ['CPT_SERVER']!r}: expected one of {', '.join(MODES)}")
    return mode


def idle_seconds() -> float:
    """`CPT_SERVER_IDLE_MINUTES` (default 30) in seconds: how long a kept server waits for the next run."""
    raw = os.environ.get("CPT_SERVER_IDLE_MINUTES", "")
    try:
        minutes = float(raw) if raw.strip() else DEFAULT_IDLE_MINUTES
    except ValueError:
        raise ValueError(f"CPT_SERVER_IDLE_MINUTES={raw!r}: expected a number of minutes") from None
    if not minutes > 0:
        raise ValueError(f"CPT_SERVER_IDLE_MINUTES={raw!r}: expected more than 0 (`cpt server start` keeps one "
                         "until `cpt server stop`)")
    return minutes * 60


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _write_state(state: dict) -> None:
    from tasks.core.paths import temp_beside  # stdlib only

    tmp = temp_beside(state_file())
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, state_file())


def _spawn(host: str, port: int, idle: float | None) -> dict:
    """The supervisor of a Prefect server (`serve` below) in its own session, so the server outlives this run
    as asked; its log beside the state file. Returns the state written (the server may not answer yet)."""
    if port == 0:
        port = _free_port(host)
    folder = _cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "server.log"
    # The server outlives the run: it gets what Prefect and this module read, not the run's credentials (a hub
    # token, a bucket's keys) to hold for hours.
    env = {k: v for k, v in os.environ.items() if k in _SERVER_ENV or k.startswith(("PREFECT_", "LC_", "XDG_"))}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "flows.local_server", "serve", host, str(port)]
    with open(log, "wb") as out:  # this server's output only: a season of restarts never grows it
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + 10
    while not _is_prefect_server(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # until its exec: before, /proc shows this process's command, and a run would not know it
    state = {"pid": proc.pid, "api_url": f"http://{host}:{port}/api", "ui_url": f"http://{host}:{port}",
             "log": str(log), "prefect_home": _prefect_home(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "idle_seconds": idle}
    _write_state(state)
    return state


class _Locked:
    """An exclusive lock on `<cache>/server.lock` while a server is looked for and started: two runs starting
    at once start one server."""

    def __enter__(self):
        folder = _cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(folder / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _wait_healthy(state: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not healthy(state["api_url"]):
        if not _alive(state["pid"]):
            raise RuntimeError(f"the Prefect server exited: see {state['log']}")
        if time.monotonic() > deadline:
            _stop_group(state["pid"])
            raise RuntimeError(f"the Prefect server did not answer at {state['api_url']} in {timeout:.0f} s: see "
                               f"{state['log']}")
        time.sleep(0.1)


def start_server(host: str = "127.0.0.1", port: int = 4200, timeout: float = 120.0) -> dict:
    """`cpt server start`: a server kept until `cpt server stop`; returns its state once it answers. A server
    already running is returned as it is, and kept from now on even if a run had started it to stop when idle."""
    with _Locked():
        state = read_state()
        if state is not None:
            if state.get("idle_seconds") is not None:
                _write_state({**state, "idle_seconds": None})  # its supervisor reads this on its next look
            state = {**state, "idle_seconds": None, "already": True}
        else:
            state = _spawn(host, port, None)
    _wait_healthy(state, timeout)
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
    """`cpt server stop`: stop the server cpt keeps (started by `cpt server start` or by a run); returns its
    state, or None when none was running."""
    with _Locked():
        state = read_state()
        if state is not None:
            _stop_group(state["pid"])
        state_file().unlink(missing_ok=True)
    return state


def server_command(args) -> int:
    """`cpt server start|stop|status`."""
    if args.server_command == "start":
        try:
            state = start_server(port=args.port)
        except RuntimeError as e:
            print(f"cpt: server: {e}", file=sys.stderr)
            return 1
        print(f"Prefect server {'already running' if state.get('already') else 'started'} (pid {state['pid']}): UI "
              f"at {state['ui_url']}, API {state['api_url']}; `cpt run` uses it from now on. It keeps running in "
              f"the background (log: {state['log']}) until `cpt server stop`.")
        return 0
    if args.server_command == "stop":
        state = stop_server()
        print(f"Prefect server (pid {state['pid']}, {state['ui_url']}) stopped" if state else
              "no Prefect server kept by cpt is running")
        return 0
    state = read_state()
    if state is None:
        print("no Prefect server kept by cpt is running: the next `cpt run` starts one (CPT_SERVER=temporary: "
              "a temporary one for each run)")
        return 3
    up = healthy(state["api_url"], timeout=2.0)
    idle = state.get("idle_seconds")
    until = (f"stops itself after {float(idle) / 60:g} idle minutes" if idle is not None else
             "kept until `cpt server stop`")
    print(f"Prefect server pid {state['pid']} since {state['started_at']}: UI at {state['ui_url']}, API "
          f"{state['api_url']} ({'answering' if up else 'NOT answering'}; {until}); log {state['log']}")
    return 0 if up else 1


# ------------------------------------------------------------------------------------- the kept server itself


def _users_file() -> Path:
    return _cache_dir() / USERS_NAME


def hold_server() -> int:
    """In a run: a shared lock on the users file for the run's whole life (its descriptor is never closed; the
    kernel releases it when the process ends), and the file touched now and at exit: a kept server is never
    stopped under a run, and waits its idle time from the last run's end."""
    import atexit

    folder = _cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    users = _users_file()
    fd = os.open(users, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a supervisor is stopping its server, then finds none
    os.utime(users)
    atexit.register(lambda: os.utime(users) if users.exists() else None)
    return fd


def _idle_for(idle: float) -> bool:
    """Whether the users file was last touched more than `idle` seconds ago (the caller holds it exclusively: no
    run holds it now)."""
    try:
        return time.time() - _users_file().stat().st_mtime > idle
    except FileNotFoundError:
        return True


def serve(host: str, port: int) -> int:
    """The supervisor of a kept server (its process group's leader): runs `prefect server start` as its child,
    and stops it when the server has been idle for the time the state file gives (None: never; `cpt server
    start` sets that on a server a run started). A SIGTERM to the group (`cpt server stop`) ends both."""
    prefect = Path(sys.executable).parent / "prefect"
    command = [str(prefect) if prefect.exists() else sys.executable, *([] if prefect.exists() else ["-m", "prefect"]),
               "server", "start", "--host", host, "--port", str(port)]
    # The kernel ends the Prefect server when its supervisor dies, however (SIGKILL, the OOM killer, a `kill` of
    # its pid alone): nothing is left serving with no supervisor to stop it when idle or when asked.
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                             preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    me, born, mine = os.getpid(), time.monotonic(), False
    while True:
        try:
            state = json.loads(state_file().read_text())
        except (OSError, ValueError):
            state = {}
        mine = mine or state.get("pid") == me
        if state.get("pid") != me and (mine or time.monotonic() - born > 60):
            break  # stopped by `cpt server stop`, or replaced (its starter writes the state just after this starts)
        idle = state.get("idle_seconds") if state.get("pid") == me else None
        poll = 5.0 if idle is None else max(0.5, min(30.0, float(idle) / 4))
        try:
            child.wait(timeout=poll)
            break  # the server exited by itself (its log says why)
        except subprocess.TimeoutExpired:
            pass
        if idle is None:
            continue
        users = os.open(_users_file(), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a run is using the server
            if not _idle_for(float(idle)):
                continue
            print(f"cpt: no run for {float(idle) / 60:g} minutes: stopping the Prefect server", flush=True)
            with _Locked():
                try:
                    if json.loads(state_file().read_text()).get("pid") == me:
                        state_file().unlink()
                except (OSError, ValueError):
                    pass
            _end(child)  # still holding the users lock: a run arriving now waits, then starts a server of its own
            return 0
        finally:
            os.close(users)
    _end(child)
    return 0


def _end(child: subprocess.Popen, wait: float = 15.0) -> None:
    """SIGTERM to a child, SIGKILL after `wait` seconds."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# ------------------------------------------------------------------------------------- a run's server


@dataclass
class RunServer:
    """The Prefect API a run uses: `kind` is "env" (PREFECT_API_URL as given), "cpt server" (kept in the
    background; `new` when this run started it), "make server" or "temporary" (started for this run,
    stopped by `close`)."""
    kind: str
    api_url: str | None = None
    ui_url: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0
    state: dict | None = field(default=None, repr=False)
    new: bool = False

    def ready(self) -> None:
        """Wait for the server to answer (one found answering is not asked again)."""
        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))
        if self.state is not None and (self.new or not healthy(self.api_url)):
            _wait_healthy(self.state, max(timeout, 120.0))  # a first start with its UI takes longer
        if self.process is None:
            return
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
        _end(proc, wait=5)

    def heartbeats(self) -> bool:
        """Whether the flow sends Prefect's run heartbeats by default. They serve one thing: an automation the
        user made on the server ("no heartbeat for N s: mark the run Crashed"). A temporary server ends with its
        run, so nothing there can ever see one stop; a server cpt started has no automation unless the user made
        one, and then sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY (which always wins: flows/cli.py). Off, a run also
        skips the heartbeat thread's join at its end (up to 1 s: it sleeps in one-second steps)."""
        return self.kind not in ("temporary", "cpt server")

    def describe(self) -> str:
        if self.kind == "temporary":
            return (f"Prefect: a temporary server for this run ({self.api_url}, no UI, stopped when the run ends; "
                    "CPT_SERVER=temporary); without it a run keeps one with its UI for later runs")
        if self.kind == "env":
            return f"Prefect: the server at PREFECT_API_URL ({self.api_url})"
        if self.kind == "make server":
            return f"Prefect: the running make server at {self.ui_url} (its UI shows this run)"
        idle = (self.state or {}).get("idle_seconds")
        until = ("it stops itself after " f"{float(idle) / 60:g} idle minutes, or now with `cpt server stop`"
                 if idle is not None else "it keeps running until `cpt server stop`")
        if self.new:
            return (f"Prefect: started a local server for this and later runs, its UI at {self.ui_url} (log: "
                    f"{self.state['log']}). It keeps running in the background: {until}. CPT_SERVER=temporary "
                    "gives each run its own server instead")
        return f"Prefect: the running cpt server at {self.ui_url} (its UI shows this run; {until})"


def _die_with_parent() -> None:
    """In a server's process (a run's temporary one, a kept one's under its supervisor): the kernel ends it when
    the process that started it dies, even by SIGKILL."""
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


def _kept_port() -> int:
    """`CPT_SERVER_PORT`, else Prefect's 4200 when free (the UI where Prefect's docs say), else any free port."""
    raw = os.environ.get("CPT_SERVER_PORT", "").strip()
    if raw:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"CPT_SERVER_PORT={raw!r}: expected a port number (0: any free port)") from None
    return 4200 if _port_free("127.0.0.1", 4200) else 0


def run_server() -> RunServer:
    """The server this run will use (see the module's docstring); PREFECT_API_URL is set to it for Prefect."""
    given = os.environ.get("PREFECT_API_URL")
    if given:
        return RunServer("env", given)
    mode = server_mode()
    idle = idle_seconds() if mode == "keep" else None
    hold_server()  # before the state is read: a supervisor stopping its server now finishes first
    state = read_state()
    if state is not None:  # answering, or still starting (a run started it a moment ago): ready() waits
        found = RunServer("cpt server", state["api_url"], state.get("ui_url"), state=state)
    elif os.environ.get("CPT_FIND_MAKE_SERVER", "1") != "0" and healthy(MAKE_SERVER_URL, timeout=0.3):
        found = RunServer("make server", MAKE_SERVER_URL, MAKE_SERVER_URL.removesuffix("/api"))
    elif mode == "keep":
        with _Locked():  # two runs starting at once start one server
            state = read_state()
            new = state is None
            if new:
                state = _spawn("127.0.0.1", _kept_port(), idle)
        found = RunServer("cpt server", state["api_url"], state["ui_url"], state=state, new=new)
    else:
        found = temporary_server()
    os.environ["PREFECT_API_URL"] = found.api_url
    if found.kind == "temporary":
        os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI: no "View at" link to a page that is not there
    return found


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    sys.exit(serve(sys.argv[2], int(sys.argv[3])))
