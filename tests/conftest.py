"""Shared fixtures: a tiny tokenizer/model built locally once per session, a Prefect harness started once,
an S3 server, and per-test artifacts roots so caches never leak between tests. Plain helpers are in
tests/helpers.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CPT_NO_PROGRESS", "1")
# The user-level cache (tokenizer profiles) of this test session, not the developer's.
os.environ.setdefault("CPT_CACHE_HOME", __import__("tempfile").mkdtemp(prefix="cpt-test-home-"))

from helpers import sample_texts, unmarked_server_tests  # noqa: E402  (the environment is set first)


def pytest_collection_modifyitems(config, items):
    missing = unmarked_server_tests(items)
    if missing:
        raise pytest.UsageError("these tests start a server or a flow but are not marked slow (add "
                                "@pytest.mark.slow): " + ", ".join(missing))


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


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1 for the session."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
