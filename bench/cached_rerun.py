"""What a fully cached `cpt run` costs over Prefect's own floor, against a running Prefect server.

Starts `prefect server start` on 127.0.0.1 (SQLite in a temp PREFECT_HOME), then, each as a fresh process:
- the floor: a skeleton flow of 10 cached no-op tasks (Prefect's INPUTS cache policy, results persisted), the
  same number of task runs as a cpt run;
- `cpt run` of a small config (the bundled sample corpus, the tiny model, 2 training steps) whose every stage
  is Cached.
Each is run once to fill its cache, then `--repeat` times timed; the medians are compared. Goal: at most 1 s apart.

    .venv/bin/python bench/cached_rerun.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

SKELETON = '''
import sys
from pathlib import Path
from prefect import flow, task
from prefect.cache_policies import INPUTS

@task(cache_policy=INPUTS, persist_result=True, result_serializer="json", result_storage=Path(sys.argv[1]))
def noop(i: int) -> int:
    return i

@flow
def skeleton():
    for i in range(10):
        noop(i)

skeleton()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return wall


def prefect_env(d: Path, port: int) -> dict[str, str]:
    return {**os.environ, "PREFECT_HOME": str(d / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_LOGGING_LEVEL": "WARNING",
            "CPT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}


def start_prefect_server(env: dict[str, str], port: int) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:port, returned once it answers."""
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                sys.exit("the Prefect server did not start in 120 s")
            time.sleep(0.5)


def small_config(d: Path) -> Path:
    """The bundled sample corpus, a tiny model built here, 2 training steps."""
    import yaml

    from tasks.ml.tiny_model import build_tiny_model, read_texts

    corpus = ROOT / "samples" / "medical_ko.jsonl"
    build_tiny_model(d / "model", read_texts(corpus), vocab_size=1024)
    config = d / "config.yaml"
    config.write_text(yaml.safe_dump({
        "corpus": {"paths": [str(corpus)]}, "model": {"id": str(d / "model")},
        "chunk": {"max_seq_length": 128, "overlap": 16},
        "train": {"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                  "eval_steps": 2, "save_steps": 2, "early_stopping_patience": None},
        "evaluate": {"max_eval_rows": 8}, "push": {"name": "bench"},
    }))
    return config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        port = free_port()
        env = prefect_env(d, port)
        server = start_prefect_server(env, port)
        try:
            config = small_config(d)
            skeleton = d / "skeleton.py"
            skeleton.write_text(SKELETON)
            floor_cmd = [sys.executable, str(skeleton), str(d / "skeleton-results")]
            cpt_cmd = [str(BIN / "cpt"), "run", "-c", str(config), "--artifacts", str(d / "artifacts"),
                       "--summary", str(d / "summary.json")]
            timed(floor_cmd, env)
            cold = timed(cpt_cmd, env)
            floor, cached = [], []
            for _ in range(args.repeat):  # interleaved, so drift on the machine hits both alike
                floor.append(timed(floor_cmd, env))
                cached.append(timed(cpt_cmd, env))
                states = {s["state"] for s in json.loads((d / "summary.json").read_text())["stages"]}
                if states != {"Cached"}:
                    sys.exit(f"the rerun was not fully cached: {states}")
        finally:
            server.terminate()
            server.wait(timeout=30)

    f, c = statistics.median(floor), statistics.median(cached)
    print(f"Prefect server on 127.0.0.1; each run a fresh process; {args.repeat} timed runs each, interleaved; "
          f"{os.cpu_count()} cores")
    print(f"skeleton flow, 10 cached no-op tasks: median {f:.2f} s  (runs: {', '.join(f'{x:.2f}' for x in floor)})")
    print(f"cpt run, every stage Cached:          median {c:.2f} s  (runs: {', '.join(f'{x:.2f}' for x in cached)})")
    print(f"cpt run, cold (same config):          {cold:.2f} s")
    print(f"\ncached cpt run - skeleton = {c - f:+.2f} s (goal: at most 1 s); ratio {c / f:.2f}x the floor")


if __name__ == "__main__":
    main()
