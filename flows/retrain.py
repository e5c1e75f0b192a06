"""Retrain when the corpus changed: fingerprint the corpus (and the drop that triggered the run) by content,
compare with the fingerprint of the last successful training of this line, and run the pipeline only if it
differs. Scheduled (nightly) and event-triggered (a drop landed) deployments both run this flow.

A drop that is still being written must not be trained on. The rule: a folder that holds a `_WRITING` file is
being written; otherwise every corpus file must be older than `settle_seconds` (its last modification), and
every file is hashed again by the load stage, which fails if it changed since fingerprinting. A producer that
can should write into a temp name (`.name`, `*.part`, `*.tmp` are never read) and rename, or emit the
`corpus.drop.landed` event when done (`cpt emit-drop PATH`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.continued_pretraining import continued_pretraining
from tasks.cache import DigestMemo, artifacts_root
from tasks.config import CptConfig, load_config
from tasks.load import fingerprint_corpus, resolve_corpus_files
from tasks.report import markdown_artifact, run_logger

WRITING_MARKER = "_WRITING"


def state_path(root: Path, line: str) -> Path:
    return root / "state" / f"retrain-{line}.json"


def unsettled_files(files: list[Path], settle_seconds: float, now: float | None = None) -> list[str]:
    """Files modified less than `settle_seconds` ago, and folders marked as being written."""
    now = time.time() if now is None else now
    busy = sorted({str(f.parent) for f in files if (f.parent / WRITING_MARKER).exists()})
    busy += [f"{f} (modified {now - f.stat().st_mtime:.0f}s ago)" for f in files
             if now - f.stat().st_mtime < settle_seconds]
    return busy


def with_drop(config: CptConfig, drop: str | None) -> CptConfig:
    """The config with the drop folder among the corpus paths (if no path already covers it)."""
    if not drop:
        return config
    drop_path = Path(drop).resolve()
    covered = any(drop_path == Path(p).resolve() or Path(p).resolve() in drop_path.parents for p in config.corpus.paths
                  if not any(ch in p for ch in "*?["))
    if covered:
        return config
    corpus = config.corpus.model_copy(update={"paths": [*config.corpus.paths, str(drop_path)]})
    return config.model_copy(update={"corpus": corpus})


@flow(name="retrain-on-drop", log_prints=True)
def retrain(
    config: CptConfig | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    drop: str | None = None,
    line: str = "default",
    settle_seconds: float = 60.0,
    force: bool = False,
    artifacts: str | None = None,
) -> dict[str, Any]:
    """Train `config` (or the YAML at `config_file` + `overrides`) if its corpus changed since the last successful
    training of `line`. `drop` adds a landed drop folder to the corpus."""
    log = run_logger()
    if config is None:
        if not config_file:
            raise ValueError("give config or config_file")
        config = load_config(config_file, overrides or [])
    config = with_drop(config, drop)
    root = artifacts_root(artifacts)

    busy = unsettled_files(resolve_corpus_files(config.corpus), settle_seconds)
    if busy:
        msg = f"drop still being written, not training now: {', '.join(busy[:5])}"
        log.warning("retrain: %s", msg)
        markdown_artifact(f"# Retrain skipped\n\n{msg}\n", "retrain-decision", "Why this run did not train")
        return {"trained": False, "reason": "unsettled", "files": busy}

    digests = DigestMemo(root)
    fingerprint = fingerprint_corpus(config.corpus, digest=digests.digest)
    digests.save()
    state_file = state_path(root, line)
    last = json.loads(state_file.read_text()) if state_file.exists() else None
    if last and last["corpus"] == fingerprint.digest and not force:
        msg = (f"corpus unchanged since the last successful training ({last['flow_run']}, "
               f"fingerprint {fingerprint.digest[:12]}, {len(fingerprint.items)} files): nothing to train")
        log.info("retrain: %s", msg)
        markdown_artifact(f"# Retrain skipped\n\n{msg}\n", "retrain-decision", "Why this run did not train")
        return {"trained": False, "reason": "unchanged", "fingerprint": fingerprint.digest}

    log.info("retrain: corpus fingerprint %s (%d files) differs from the last training (%s); running the pipeline",
             fingerprint.digest[:12], len(fingerprint.items), last["corpus"][:12] if last else "none")
    summary = continued_pretraining(config=config, artifacts=str(root))
    state_file.parent.mkdir(parents=True, exist_ok=True)
    record = {"corpus": fingerprint.digest, "files": len(fingerprint.items), "flow_run": flow_run.name,
              "pipeline_run": summary["flow_run"], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = state_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, state_file)
    markdown_artifact(f"# Retrained\n\nCorpus fingerprint `{fingerprint.digest}` ({len(fingerprint.items)} files); "
                      f"pipeline run `{summary['flow_run']}`.\n", "retrain-decision", "What this run trained on")
    return {"trained": True, "fingerprint": fingerprint.digest, "summary": summary}
