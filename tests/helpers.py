"""Helpers the tests share (plain functions and constants; the fixtures are in conftest.py)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

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


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def touched_entries(artifacts: Path) -> list[str]:
    """Cache entries holding files their manifest does not list (something wrote into them after publish)."""
    from tasks.core.manifest import MANIFEST, read_manifest

    bad = []
    for manifest_file in (artifacts / "cache").glob(f"*/*/{MANIFEST}"):
        entry = manifest_file.parent
        listed = set(read_manifest(entry).files) | {MANIFEST}
        extra = {p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file()} - listed
        if extra:
            bad.append(f"{entry.relative_to(artifacts)}: {sorted(extra)}")
    return bad


# The one identity the session's S3 server (conftest's s3_endpoint) accepts: SeaweedFS checks signatures, so a
# test that wants a secret of its own to look for (in summaries, logs) uses this one; it is new each session.
S3_KEY = "testing"
S3_SECRET = "secret-" + uuid.uuid4().hex


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment a worker of an object-store root gets: the standard AWS variables and the endpoint."""
    return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1"}


def new_bucket(endpoint: str) -> str:
    import s3fs

    name = f"cpt-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs={"endpoint_url": endpoint},
                      skip_instance_cache=True).mkdir(name)
    return name


def run_flow(config, artifacts, until="chunk", **overrides):
    """The pipeline in this process on `config` (a dict) with `section__field=value` overrides; returns
    ({stage: state}, the run summary)."""
    from flows.continued_pretraining import continued_pretraining
    from tasks.core.config.tree import validate_config

    cfg = json.loads(json.dumps(config))
    for dotted, value in overrides.items():
        section, field = dotted.split("__")
        cfg.setdefault(section, {})[field] = value
    summary = continued_pretraining(config=validate_config(cfg), artifacts=str(artifacts), until=until)
    return {s["name"]: s["state"] for s in summary["stages"]}, summary


def flow_run_artifacts(flow_run_name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterName,
    )

    with get_client(sync_client=True) as client:
        fr = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])))[0]
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id])))
    # Oldest first: a key shown twice (the gate's, re-shown when the push failed) ends with its latest version.
    return sorted(found, key=lambda a: a.created)


def flow_run_logs(flow_run_name: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        fr = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name])))[0]
        return [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id])))]


def chunk_entry_rows(output: str | Path, artifacts) -> dict[str, list[dict]]:
    """The chunk rows (input_ids, trained_from, doc_id, start) a chunk or mix entry folder (a summary's `output`)
    stands for, per split, read through the output's own methods."""
    from tasks.chunk import Chunks
    from tasks.core.manifest import read_manifest
    from tasks.core.root import open_root

    found = read_manifest(Path(output))  # typed by its stage: mix-sources' has its own meta
    chunks = found if isinstance(found, Chunks) else Chunks.model_validate(found.model_dump())
    root = open_root(artifacts)
    return {split: [r for b in chunks.row_batches(root, split) for r in b.to_pylist()]
            for split in ("train", "validation")}
