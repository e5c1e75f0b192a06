"""Past one machine: the data stages' pieces on a separately started Dask cluster (a scheduler and two workers,
each with its own scratch folder, sharing only the object store), against the sequential path."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run_flow as run
from helpers import new_bucket, s3_env, sample_texts, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKER_MEMORY = "2GiB"  # dask restarts a worker past it, and a restarted worker fails the piece it held
# What a worker may peak at while it builds these pieces: half its limit, so the assertion fails before Dask acts
# on the worker's memory itself (it pauses a worker at 80% of its limit and restarts it at 95%); a bound at the
# limit could never fail, the worker being restarted first. Measured in the 2-core sandbox: ~400 MiB each,
# imports included.
PEAK_BOUND = 1024**3


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path, s3_endpoint):
    from prefect.settings import get_current_settings

    port = _port()
    # The same environment as this process: the suite imports its test modules from tests/, and whatever of
    # them the run's context refers to must import on the scheduler and the workers too.
    env = {**os.environ, **s3_env(s3_endpoint), "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "PREFECT_API_URL": str(get_current_settings().api.url or ""),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    scratches = []
    for i in range(2):
        scratch = tmp_path / f"worker-{i}"
        scratches.append(scratch)
        procs.append(subprocess.Popen(
            [str(BIN / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1", "--nworkers", "1",
             "--memory-limit", WORKER_MEMORY, "--local-directory", str(scratch / "dask"), "--no-dashboard",
             "--name", f"w{i}"],
            env={**env, "CPT_SCRATCH": str(scratch / "mirrors"), "CPT_CACHE_HOME": str(scratch / "cache")},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    address = f"tcp://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            client = Client(address, timeout=5)
            client.wait_for_workers(2, timeout=60)
            break
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    try:
        yield address, client, scratches
    finally:
        client.close()
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_a_separate_dask_cluster_gives_the_sequential_keys_and_outputs(tmp_path, tiny_model, cluster, s3_endpoint,
                                                                         monkeypatch):
    """Two workers with their own scratch folders and nothing but the bucket in common build the per-file pieces;
    every stage's key and content is the sequential run's, and each worker's peak memory stays under a bound set
    well below the limit it runs under."""
    from tasks.core.manifest import read_manifest

    address, client, scratches = cluster
    texts = sample_texts(120)
    corpus = tmp_path / "corpus"
    for i in range(4):
        write_jsonl(corpus / f"part-{i}.jsonl", [{"content": t} for t in texts[i::4]])
    config = {"corpus": {"paths": [str(corpus)]}, "model": {"id": str(tiny_model)},
              "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 64, "overlap": 16}}

    _, sequential = run(config, tmp_path / "sequential")
    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "flow-scratch"))
    bucket = new_bucket(s3_endpoint)
    _, fanned = run(config, f"s3://{bucket}/team", runtime__task_runner="dask", runtime__dask_address=address)

    assert [(s["name"], s["key"]) for s in fanned["stages"]] == [(s["name"], s["key"]) for s in sequential["stages"]]

    def content(stage) -> str:
        output = stage["output"]
        if output.startswith("s3://"):  # the flow host's mirror holds what it used
            found = list((tmp_path / "flow-scratch").rglob(f"cache/{stage['name']}/{stage['key']}"))
            assert found, f"{stage['name']} is not in the flow host's mirror"
            output = str(found[0])
        return read_manifest(Path(output)).content

    assert [content(s) for s in fanned["stages"]] == [content(s) for s in sequential["stages"]]
    # The pieces were built on the workers (their own mirrors hold them), not in the flow's process.
    built_there = [p for s in scratches for p in (s / "mirrors").rglob("cache/load-file/*/_COMPLETE")]
    assert built_there, "no load piece was built on a worker"
    # Each worker's peak resident set, in bytes (Linux reports KiB); a lambda travels by value, a function of
    # this module would need the workers to import the tests.
    peaks = client.run(lambda: __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024)
    assert len(peaks) == 2
    from dask.utils import parse_bytes

    assert PEAK_BOUND <= 0.5 * parse_bytes(WORKER_MEMORY)  # the bound stays one Dask's limit cannot hide
    assert max(peaks.values()) < PEAK_BOUND, {w: f"{p / 2**20:.0f} MiB" for w, p in peaks.items()}
