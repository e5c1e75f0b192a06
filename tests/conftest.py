"""Shared fixtures: a tiny tokenizer/model built locally once per session, a Prefect harness started once,
and per-test artifacts roots so caches never leak between tests."""

from __future__ import annotations

import json
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

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CORPUS = ROOT / "samples" / "medical_ko.jsonl"
SHARED_CORPORA = ROOT.parent / "shared" / "corpora"


def sample_texts(n: int | None = None) -> list[str]:
    lines = SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()
    return [json.loads(x)["content"] for x in lines[:n] if x.strip()]


def shared_corpus(name: str) -> Path:
    path = SHARED_CORPORA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared/corpora is not beside this checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Tokenizer (BPE, BOS first like Llama/Gemma) + 2-layer Llama saved with save_pretrained."""
    from tasks.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", sample_texts(), vocab_size=512)


@pytest.fixture(scope="session")
def no_bos_tokenizer_dir(tmp_path_factory) -> Path:
    """A GPT-2-like tokenizer: no BOS even when asked for special tokens."""
    from tasks.tiny_model import train_tokenizer

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


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def touched_entries(artifacts: Path) -> list[str]:
    """Cache entries holding files their manifest does not list (something wrote into them after publish)."""
    from tasks.cache import MANIFEST, read_manifest

    bad = []
    for manifest_file in (artifacts / "cache").glob(f"*/*/{MANIFEST}"):
        entry = manifest_file.parent
        listed = set(read_manifest(entry).files) | {MANIFEST}
        extra = {p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file()} - listed
        if extra:
            bad.append(f"{entry.relative_to(artifacts)}: {sorted(extra)}")
    return bad


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


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment a worker of an object-store root gets: the standard AWS variables and the endpoint."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1"}


def new_bucket(endpoint: str) -> str:
    import uuid

    import s3fs

    name = f"cpt-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint},
                      skip_instance_cache=True).mkdir(name)
    return name
