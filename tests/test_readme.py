"""The README's paths run as written: every shell block of its quick start, "Running on your corpus",
"Unattended" and "Two pools" sections, found by their headings (the text around them may move), is run command
by command, in order, in a copy of the checkout with a fresh artifacts root, as a user would type it: variables a
command exports and the folder it changes to carry on to the next. It ends with a drop trained and released by
the worker, and the two-pool pair's runs.

What the test adds, and why (nothing else is changed in a command):
- a free port instead of 4200 (the machine may run another server there) and PREFECT_HOME under tmp_path;
- `make test` is dry-run (`make -n test`): the suite cannot run itself from inside itself;
- a command that serves until stopped (`make server`, `... worker start`, `cpt server`) runs in the background,
  as in its own terminal, and the next one starts when it answers; all of them are stopped at the end;
- the user's corpus ("Running on your corpus" reads `data/*.jsonl` and `more/`): a JSON-lines file whose text is
  in a `text` field and a .txt file of paragraphs, the cases that section names;
- after `cpt emit-drop` and `prefect deployment run`, the flow runs they start are waited for and checked.
The checkout's copy uses this checkout's .venv (a symlink; `make`'s install step is up to date, checked first).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import ROOT, write_jsonl

pytestmark = pytest.mark.slow

SECTIONS = ("Quick start", "Running on your corpus", "Unattended", "Two pools")
SERVES = re.compile(r"^(make server|\S*prefect (server|worker) start|\S*cpt server)\b")


def section_blocks(readme: str, heading: str) -> list[list[str]]:
    """The ```bash blocks of the `## <heading…>` section, each as its commands (continuation lines joined)."""
    parts = re.split(r"^## ", readme, flags=re.M)
    [section] = [p for p in parts if p.startswith(heading)]
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        commands, pending = [], ""
        for line in body.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            line = pending + line
            pending = ""
            if line.strip() and not line.strip().startswith("#"):
                commands.append(line.strip())
        blocks.append(commands)
    assert blocks, f"README section {heading!r} has no bash block"
    return blocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_part(command: str) -> str:
    """The command without its trailing comment."""
    return " ".join(t for t in shlex.split(command, comments=True))


class Shell:
    """Runs commands one at a time with bash, carrying exported variables and the working folder, as a terminal
    session does; a command that serves until stopped runs in the background."""

    def __init__(self, cwd: Path, env: dict[str, str], logs: Path):
        self.cwd, self.env, self.logs = cwd, env, logs
        self.state = logs / "env.sh"
        self.state.write_text("")
        self.daemons: list[subprocess.Popen] = []
        self.transcript: list[str] = []

    def run(self, command: str, timeout: float = 1800) -> str:
        self.transcript.append(f"$ {command}")
        if SERVES.match(command_part(command)):
            return self._serve(command)
        where = self.logs / "cwd"
        script = (f"set -eo pipefail\nsource {shlex.quote(str(self.state))}\ncd {shlex.quote(str(self.cwd))}\n"
                  f"{command}\nexport -p > {shlex.quote(str(self.state))}\npwd > {shlex.quote(str(where))}\n")
        out = subprocess.run(["bash", "-c", script], env=self.env, capture_output=True, text=True, timeout=timeout)
        text = out.stdout + out.stderr
        self.transcript.append(text[-3000:])
        assert out.returncode == 0, f"README command failed ({out.returncode}): {command}\n{text[-6000:]}"
        self.cwd = Path(where.read_text().strip())
        return text

    def _serve(self, command: str) -> str:
        log = open(self.logs / f"daemon-{len(self.daemons)}.log", "w")
        script = f"source {shlex.quote(str(self.state))}\ncd {shlex.quote(str(self.cwd))}\nexec {command}\n"
        self.daemons.append(subprocess.Popen(["bash", "-c", script], env=self.env, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True))
        return ""

    def exported(self, name: str) -> str:
        out = subprocess.run(["bash", "-c", f"source {shlex.quote(str(self.state))}; printf %s \"${name}\""],
                             capture_output=True, text=True, env=self.env)
        return out.stdout

    def stop(self) -> None:
        for p in self.daemons:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.daemons:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def wait_for(predicate, timeout: float, what: str, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=30))


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"true"
    except OSError:
        return False


def runs_of(url: str, deployment: str) -> list[dict]:
    deps = [d for d in api(url, "/deployments/filter", {}) if d["name"] == deployment]
    if not deps:
        return []
    return api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deps[0]["id"]]}}})


def finished(url: str, deployment: str) -> list[dict]:
    return [r for r in runs_of(url, deployment) if r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED",
                                                                          "CANCELLED")]


def checkout_copy(dest: Path) -> Path:
    """The checkout's files as a clone has them (tracked and not ignored, with uncommitted edits), using this
    checkout's .venv; make's install step must find it up to date, never reinstall into it."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    old = (ROOT / ".venv" / ".installed").stat().st_mtime - 60
    for prerequisite in ("pyproject.toml", "setup.py", "tasks/_shingle.c"):
        os.utime(dest / prerequisite, (old, old))
    check = subprocess.run(["make", "-q", ".venv/.installed"], cwd=dest, capture_output=True)
    assert check.returncode == 0, "make would reinstall into this checkout's .venv: run `make install` first"
    return dest


def base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CPT_")) and k not in (
        "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90", HF_HUB_OFFLINE="1", CPT_NO_PROGRESS="1",
               CPT_CACHE_HOME=str(tmp_path / "cpt-cache"),
               # A run keeps its server as shipped (stopped by stop_kept_server), on a free port: 4200 is a
               # developer's, or another test's to find.
               CPT_SERVER_PORT="0")
    return env


def stop_kept_server(env: dict[str, str]) -> None:
    """`cpt server stop` for the server the README's first run kept (nothing of a test outlives it)."""
    subprocess.run([sys.executable, "-m", "flows.cli", "server", "stop"], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                   capture_output=True, timeout=60)


def test_the_readme_paths_run_as_written_and_end_with_a_drop_the_worker_trained(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    work = checkout_copy(tmp_path / "checkout")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**base_env(tmp_path), "PREFECT_PORT": str(port),
           # Two pools' bare `prefect` is a worker machine's installed one: here this checkout's.
           "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    logs = tmp_path / "logs"
    logs.mkdir()
    shell = Shell(work, env, logs)

    def adapt(command: str) -> str:
        command = command.replace("127.0.0.1:4200", f"127.0.0.1:{port}")
        return "make -n test" if command_part(command) == "make test" else command

    try:
        # Quick start, the checkout's block: `make demo` (and `make test`, dry-run).
        [demo_block, *_] = section_blocks(readme, "Quick start")
        demo = ""
        for command in demo_block:
            out = shell.run(adapt(command))
            if command_part(command) == "make demo":
                demo = out
        assert "run " in demo and ": Completed" in demo and "model: " in demo, demo[-3000:]
        assert "loss curve: " in demo and "gate: promoted" in demo, demo[-3000:]
        assert "Prefect: started a local server" in demo and "`cpt server stop`" in demo, demo[-3000:]
        demo_model = next(line.split("model: ", 1)[1].split(" (")[0] for line in demo.splitlines()
                          if line.startswith("model: "))

        # Running on your corpus: the user's corpus, then the section's commands.
        qa = [json.loads(x) for x in (ROOT / "samples" / "medical_qa_ko.jsonl").read_text().splitlines() if x]
        write_jsonl(work / "data" / "answers.jsonl", [{"id": i, "text": r["answer"]} for i, r in enumerate(qa[:30])])
        (work / "more").mkdir()
        (work / "more" / "questions.txt").write_text("\n\n".join(r["question"] for r in qa), encoding="utf-8")
        for block in section_blocks(readme, "Running on your corpus"):
            for command in block:
                out = shell.run(adapt(command))
        assert re.search(r"run \S+: Completed", out) and re.search(r"chunk\s+Completed", out), out[-3000:]
        assert "missing field" not in out and "few documents" not in out, out[-3000:]

        # Unattended: server, pool, deployments, worker, a drop and its announcement.
        for block in section_blocks(readme, "Unattended"):
            for command in block:
                shell.run(adapt(command))
                if command_part(command) == "make server":
                    wait_for(lambda: healthy(url), 180, "the Prefect server")
                if "worker start" in command_part(command):
                    pool = command_part(command).split("--pool ")[1].split()[0]
                    wait_for(lambda: api(url, f"/work_pools/{pool}/workers/filter", {}), 120, f"a {pool} worker")
        assert shell.exported("PREFECT_API_URL") == url
        done = wait_for(lambda: finished(url, "on-drop"), 2400, "the on-drop run", every=5)
        assert done[0]["state"]["type"] == "COMPLETED", (logs / "daemon-1.log").read_text()[-5000:]
        drop = str((work / "data" / "drops" / "2026-11-25").resolve())
        assert done[0]["parameters"]["drop"] == drop
        state = json.loads((work / "artifacts" / "state" / "lines" / "demo.json").read_text())
        [d] = state["drops"]
        assert (d["path"], d["status"]) == (drop, "active") and "trained, released" in d["outcome"]
        assert state["last_training"]["drops"] == [drop] and state["last_training"]["promoted"] is True
        release = work / "artifacts" / "models" / "tiny-ko-cpt-line-demo"
        assert (release / "README.md").is_file() and (release / "config.json").is_file()
        assert Path(demo_model).is_dir()  # the demo's own release is still there, another folder

        # Two pools: their own pools, deployments and workers; a preprocess run starts train.
        for block in section_blocks(readme, "Two pools"):
            for command in block:
                shell.run(adapt(command))
                if "worker start" in command_part(command):
                    pool = command_part(command).split("--pool ")[1].split()[0]
                    wait_for(lambda: api(url, f"/work_pools/{pool}/workers/filter", {}), 120, f"a {pool} worker")
        for name in ("preprocess", "train"):
            runs = wait_for(lambda: finished(url, name), 2400, f"the {name} run", every=5)
            assert runs[0]["state"]["type"] == "COMPLETED", name
    finally:
        shell.stop()
        stop_kept_server(env)
        (tmp_path / "transcript.txt").write_text("\n".join(shell.transcript))


def test_the_readme_install_outside_a_checkout_runs_as_written(tmp_path):
    """Quick start's second block: pip install into a fresh venv, `cpt init`, the tiny model and the demo run, in
    a folder that is not a checkout. `<this repository's URL>` is a clone of this checkout's files."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    [*_, block] = section_blocks(readme, "Quick start")
    assert any(c.startswith("pip install git+") for c in block), block
    repo = tmp_path / "repo"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "the checkout's files"]):
        subprocess.run([*git, *args], cwd=repo, check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    user = tmp_path / "home"
    user.mkdir()
    env = {**base_env(tmp_path), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    shell = Shell(user, env, tmp_path)
    try:
        for command in block:
            out = shell.run(command.replace("<this repository's URL>", f"file://{repo}"), timeout=3600)
    finally:
        stop_kept_server(env)
    assert shell.cwd == user / "my-cpt"
    assert "run " in out and "model: " in out and "gate: promoted" in out, out[-3000:]
    assert not (ROOT / "my-cpt").exists()
