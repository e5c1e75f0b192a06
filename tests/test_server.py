"""Against a real local Prefect server started here: the UI in headless Chromium, concurrent and killed runs,
and the shipped prefect.yaml deployed with a process worker answering a corpus-drop event."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, new_bucket, s3_env, sample_texts, write_jsonl

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.api = f"{self.url}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api,
                    "PREFECT_UI_API_URL": self.api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "CPT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
        self.log = open(home / "server.log", "w")
        self.proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                      str(port)], env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"{self.api}/health", timeout=2).read() == b"true":
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")

    def post(self, path: str, body: dict) -> list | dict:
        req = urllib.request.Request(self.api + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        return json.load(urllib.request.urlopen(req, timeout=30))

    def get(self, path: str):
        return json.load(urllib.request.urlopen(self.api + path, timeout=30))

    def flow_run(self, name: str) -> dict:
        return self.post("/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})[0]

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("prefect-home"))
    yield s
    s.stop()


def cpt(server: Server, *args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env={**server.env, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **kwargs)


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture
def run_config(tmp_path, tiny_model):
    write_jsonl(tmp_path / "corpus.jsonl", [{"content": t} for t in sample_texts()])
    cfg = {"corpus": {"paths": [str(tmp_path / "corpus.jsonl")]}, "model": {"id": str(tiny_model)},
           "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 96, "overlap": 16},
           "train": {"max_steps": 24, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                     "learning_rate": 3e-3, "eval_steps": 4, "save_steps": 8, "logging_steps": 2, "packing": True},
           "evaluate": {"prompts": ["질문: 고혈압의 약물 치료는 어떻게 해야 하나요? \n답변:"],
                        "generation": {"max_new_tokens": 8}},
           "push": {"name": "served"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def summary_of(artifacts: Path, out: str) -> dict:
    name = next(line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("run "))
    return json.loads((artifacts / "runs" / name / "summary.json").read_text())


# ------------------------------------------------------------------------------------------- the UI


@pytest.fixture(scope="session")  # session: set up before the session's tiny model and the module's server
def browser() -> tuple[str, str]:
    """Debian's chromium and chromedriver, found before the server starts. Without them the UI test skips, saying
    why; where CI requires the browser (.ci/run sets CPT_REQUIRE_BROWSER=1 once it installed them) it fails."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        why = "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
        if os.environ.get("CPT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CPT_REQUIRE_BROWSER=1 but {why}: chromium {found[0]}, chromedriver {found[1]}")
        pytest.skip(why)
    return found


def chromium(browser: tuple[str, str]):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = browser
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1400,1600"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def wait_for(predicate, timeout: float = 30, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


def test_the_ui_shows_summary_stats_progress_loss_eval_and_model_for_a_cached_run(browser, server, run_config,
                                                                                   tmp_path):
    artifacts = tmp_path / "artifacts"
    finish(cpt(server, "run", "-c", str(run_config), "--artifacts", str(artifacts)))
    out = finish(cpt(server, "run", "-c", str(run_config), "--artifacts", str(artifacts)))
    summary = summary_of(artifacts, out)
    assert {s["state"] for s in summary["stages"]} == {"Cached"}
    fr = server.flow_run(summary["flow_run"])
    arts = {a["key"]: a for a in server.post("/artifacts/filter",
                                            {"artifacts": {"flow_run_id": {"any_": [fr["id"]]}}}) if a["key"]}

    driver = chromium(browser)
    try:
        driver.get(f"{server.url}/runs/flow-run/{fr['id']}")
        tab = wait_for(lambda: [e for e in driver.execute_script(
            "return Array.from(document.querySelectorAll('*')).filter("
            "e => e.children.length == 0 && e.textContent.trim() == 'Artifacts')")])
        assert tab, "the flow run page has no Artifacts tab"
        tab[0].click()
        keys = ("run-summary", "token-stats-histogram", "train-loss-curve", "eval-before-after", "model-location")
        body = wait_for(lambda: (t := driver.find_element("tag name", "body").text) and all(k in t for k in keys) and t)
        driver.save_screenshot(str(tmp_path / "flow-run-artifacts.png"))
        assert body, f"artifacts missing from the page: {driver.find_element('tag name', 'body').text[:2000]}"

        for key in ("token-stats-histogram", "train-loss-curve"):
            driver.get(f"{server.url}/artifacts/artifact/{arts[key]['id']}")
            width = wait_for(lambda: max([driver.execute_script("return arguments[0].naturalWidth", i)
                                          for i in driver.find_elements("tag name", "img")
                                          if (i.get_attribute("src") or "").startswith("data:image/")] or [0]))
            driver.save_screenshot(str(tmp_path / f"{key}.png"))
            assert width > 100, f"{key}: the image did not render"
        driver.get(f"{server.url}/artifacts/artifact/{arts['model-location']['id']}")
        assert wait_for(lambda: "served" in driver.find_element("tag name", "body").text)
    finally:
        driver.quit()


# ----------------------------------------------------------------------------------- reliability


def test_two_runs_of_one_config_at_once_train_once(server, run_config, tmp_path):
    artifacts = tmp_path / "artifacts"
    procs = [cpt(server, "run", "-c", str(run_config), "--artifacts", str(artifacts)) for _ in range(2)]
    outs = [finish(p) for p in procs]
    trained = [o for o in outs if "train: step=" in o]
    assert len(trained) == 1, "both runs trained"
    summaries = [summary_of(artifacts, o) for o in outs]
    keys = [{s["name"]: s["key"] for s in summary["stages"]} for summary in summaries]
    assert keys[0] == keys[1]
    assert len(list((artifacts / "cache" / "train").glob("train-*"))) == 1
    assert not list((artifacts / "cache").rglob(".tmp-*"))


def test_a_run_killed_with_sigkill_leaves_nothing_that_blocks_the_next(server, run_config, tmp_path):
    artifacts = tmp_path / "artifacts"
    cfg = yaml.safe_load(run_config.read_text())
    cfg["train"].update(max_steps=400, save_steps=8, eval_steps=8)
    run_config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    proc = cpt(server, "run", "-c", str(run_config), "--artifacts", str(artifacts))
    # Wait for a checkpoint the Trainer finished (trainer_state.json is its last file). Killing while the only
    # checkpoint is still being written must start over, which is right but not what this test is about; a
    # kill that cuts a later checkpoint short is still possible here and must resume from the finished one.
    def finished_checkpoints():
        found = []
        for state in (artifacts / "work" / "train").glob("*/checkpoints/checkpoint-*/trainer_state.json"):
            try:
                json.loads(state.read_text())
            except (OSError, ValueError):
                continue  # still being written
            found.append(state.parent)
        return found

    finished = wait_for(finished_checkpoints, timeout=300, every=0.2)
    assert finished, "training never checkpointed"
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, the accelerate launcher and the trainer, mid-step
    proc.wait()

    out = finish(cpt(server, "run", "-c", str(run_config), "--artifacts", str(artifacts)))
    train = next(s for s in summary_of(artifacts, out)["stages"] if s["name"] == "train")
    assert train["state"] == "Completed" and train["counts"]["resumed_from"].startswith("checkpoint-")
    assert train["counts"]["global_step"] == 400
    assert not list((artifacts / "cache").rglob(".tmp-*"))


# ------------------------------------------------------------------- deployments, worker and events


@pytest.fixture(scope="module")
def deployed(server, tmp_path_factory):
    """A copy of the checkout's tracked files with the tiny model made in it, its prefect.yaml deployed."""
    checkout = tmp_path_factory.mktemp("deploy") / "checkout"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for f in filter(None, files):
        dst = checkout / f.decode()
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f.decode(), dst)
    env = {**server.env, "CPT_HOME": str(checkout)}
    run = lambda *a, **k: subprocess.run(a, cwd=checkout, env=env, capture_output=True, text=True, **k)  # noqa: E731
    r = run(sys.executable, "-m", "flows.cli", "init-tiny-model", "artifacts/models/tiny-ko")
    assert r.returncode == 0, r.stdout + r.stderr
    for pool in ("cpt-process", "cpt-cpu", "cpt-gpu"):
        r = run(str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process")
        assert r.returncode == 0, r.stdout + r.stderr
    r = run(str(BIN / "prefect"), "--no-prompt", "deploy", "--all")
    assert r.returncode == 0, r.stdout + r.stderr
    return checkout, env, {d["name"]: d for d in server.post("/deployments/filter", {})}


def start_worker(pool: str, checkout: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool], cwd=checkout, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to a worker's process group; on a loaded machine a worker can take over 30 s to drain, and then it is
    killed: the test's verdict is what it asserted, not how fast a worker exits."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_shipped_deployments_retrain_on_a_drop_event(server, deployed, tmp_path):
    checkout, env, deployments = deployed
    artifacts = tmp_path / "artifacts"
    env = {**env, "CPT_ARTIFACTS": str(artifacts)}
    run = lambda *a, **k: subprocess.run(a, cwd=checkout, env=env, capture_output=True, text=True, **k)  # noqa: E731
    assert {"nightly-retrain", "on-drop", "pipeline", "preprocess", "train"} <= set(deployments)
    nightly = deployments["nightly-retrain"]
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    automations = server.post("/automations/filter", {})
    assert any("corpus.drop.landed" in json.dumps(a["trigger"]) for a in automations)

    worker = start_worker("cpt-process", checkout, env, tmp_path / "worker.log")
    try:
        drop = checkout / "data" / "drops" / "2026-11-25"  # under the deployments' drops.roots
        write_jsonl(drop / "part-0.jsonl", [{"content": f"새로 들어온 문서 {i}: " + "혈압약은 매일 같은 시간에 먹는다. " * 8}
                                            for i in range(30)])
        old = time.time() - 3600  # settled long ago
        os.utime(drop / "part-0.jsonl", (old, old))
        r = run(sys.executable, "-m", "flows.cli", "emit-drop", str(drop))
        assert r.returncode == 0 and "emitted corpus.drop.landed" in r.stdout, r.stdout + r.stderr

        dep_id = deployments["on-drop"]["id"]

        def finished():
            runs = server.post("/flow_runs/filter", {"deployments": {"id": {"any_": [dep_id]}}})
            return [fr for fr in runs if fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED")]

        done = wait_for(finished, timeout=400, every=2)
        assert done, f"no on-drop run finished; worker log:\n{(tmp_path / 'worker.log').read_text()[-3000:]}"
        assert done[0]["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
        assert done[0]["parameters"]["drop"] == str(drop)
        state = json.loads((artifacts / "state" / "lines" / "demo.json").read_text())
        assert state["last_training"]["files"] == 2  # the bundled corpus and the drop
        assert [(d["path"], d["status"]) for d in state["drops"]] == [(str(drop), "active")]
    finally:
        stop(worker)


def test_two_pools_one_store_preprocess_on_the_cpu_pool_then_train_on_the_gpu_pool(server, deployed, s3_endpoint,
                                                                                  tmp_path):
    """The README's two-pool layout as shipped: two workers that share no disk, one store."""
    checkout, env, deployments = deployed
    url = f"s3://{new_bucket(s3_endpoint)}/cpt"
    env = {**env, **s3_env(s3_endpoint), "CPT_ARTIFACTS": url}
    scratch = {pool: tmp_path / f"{pool}-scratch" for pool in ("cpt-cpu", "cpt-gpu")}
    workers = [start_worker(pool, checkout, {**env, "CPT_SCRATCH": str(scratch[pool])}, tmp_path / f"{pool}.log")
               for pool in scratch]
    config = {"corpus": {"paths": ["samples/medical_ko.jsonl"]}, "model": {"id": "artifacts/models/tiny-ko"},
              "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 96, "overlap": 16},
              "train": {"max_steps": 8, "per_device_train_batch_size": 8, "eval_steps": 4, "save_steps": 8,
                        "logging_steps": 2, "packing": True},
              "evaluate": {"prompts": ["질문: 고혈압의 약물 치료는 어떻게 해야 하나요? \n답변:"],
                           "generation": {"max_new_tokens": 8}},
              "push": {"name": "two-pool"}}
    logs = lambda: "\n".join(f"--- {p}\n" + (tmp_path / f"{p}.log").read_text()[-3000:] for p in scratch)  # noqa: E731
    try:
        r = subprocess.run([str(BIN / "prefect"), "deployment", "run", "continued-pretraining/preprocess",
                            "--params", json.dumps({"config": config, "until": "chunk"})],
                           cwd=checkout, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr

        def finished(name):
            runs = server.post("/flow_runs/filter", {"deployments": {"id": {"any_": [deployments[name]["id"]]}}})
            return [fr for fr in runs if fr["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED")]

        pre = wait_for(lambda: finished("preprocess"), timeout=300, every=2)
        assert pre and pre[0]["state"]["type"] == "COMPLETED", logs()
        done = wait_for(lambda: finished("train"), timeout=400, every=2)  # started by the automation
        assert done, f"the preprocess run's completion started no train run\n{logs()}"
        assert done[0]["state"]["type"] == "COMPLETED", logs()
        assert done[0]["parameters"]["config"] == config and done[0]["parameters"].get("until") is None
    finally:
        for w in workers:
            stop(w)

    def summary(pool, run):
        return {s["name"]: s["state"] for s in json.loads(
            next((scratch[pool] / "s3").rglob(f"runs/{run['name']}/summary.json")).read_text())["stages"]}

    assert summary("cpt-cpu", pre[0]) == dict.fromkeys(["load", "shuffle", "tokenize", "token-stats", "chunk"],
                                                       "Completed")
    gpu = summary("cpt-gpu", done[0])
    # The GPU host shares no disk with the CPU host: the data stages are Cached through the store alone.
    assert {k: gpu[k] for k in ("load", "shuffle", "tokenize", "token-stats", "chunk")} == dict.fromkeys(
        ["load", "shuffle", "tokenize", "token-stats", "chunk"], "Cached")
    assert {k: gpu[k] for k in ("evaluate-base", "train", "evaluate", "gate", "push")} == dict.fromkeys(
        ["evaluate-base", "train", "evaluate", "gate", "push"], "Completed")
    assert not list(scratch["cpt-cpu"].rglob("cache/train/train-*"))


def test_cpt_serve_registers_the_schedule_and_the_drop_trigger(server, run_config, tmp_path):
    proc = cpt(server, "serve", "-c", str(run_config), "--name", "served-retrain", "--cron", "0 3 * * *",
               "--artifacts", str(tmp_path / "artifacts"))
    try:
        def deployment():
            found = [d for d in server.post("/deployments/filter", {}) if d["name"] == "served-retrain"]
            return found[0] if found else None

        dep = wait_for(deployment, timeout=120)
        assert dep, proc.stdout.read() if proc.poll() is not None else "serve never registered its deployment"
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
        assert dep["parameters"]["config"]["corpus"]["paths"] == yaml.safe_load(run_config.read_text())["corpus"]["paths"]
        # serve registers the deployment first and its trigger's automation just after: wait for both.
        def drop_trigger():
            return [a for a in server.post("/automations/filter", {})
                    if "corpus.drop.landed" in json.dumps(a["trigger"]) and dep["id"] in json.dumps(a["actions"])]

        assert wait_for(drop_trigger, timeout=60), "serve registered no corpus.drop.landed trigger"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
