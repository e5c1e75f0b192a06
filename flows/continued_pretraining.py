"""The continued-pretraining flow: reads top to bottom as the pipeline.

Each stage is a cached Prefect task (see tasks/cache.py); the flow only wires manifests from one stage to the
next, times each call, and writes the run summary (stage | Completed or Cached | seconds | key | output).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run

from tasks.cache import DigestMemo, StageOutput, artifacts_root, build_scope, records_dir
from tasks import evaluate as evaluate_stage
from tasks import push as push_stage
from tasks import token_stats as token_stats_stage
from tasks import train as train_stage
from tasks.chunk import chunk
from tasks.config import CorpusConfig, CptConfig
from tasks.evaluate import evaluate, evaluate_base
from tasks.load import fingerprint_corpus, load
from tasks.modeling import resolve_model
from tasks.push import push
from tasks.report import markdown_artifact, markdown_table, run_logger
from tasks.shuffle import shuffle
from tasks.token_stats import token_stats
from tasks.tokenize import resolve_tokenizer, tokenize
from tasks.train import train

StageName = Literal["load", "shuffle", "tokenize", "token-stats", "chunk", "train", "evaluate-base", "evaluate",
                    "push"]


# Stages whose outputs have Prefect artifacts. The flow makes them after every call, computed or cached:
# a cached task does not re-create its own artifacts, and every run should show what it produced.
SHOW = {"token-stats": token_stats_stage.show, "train": train_stage.show, "evaluate": evaluate_stage.show,
        "push": push_stage.show}


class StageRunner:
    """Calls stage tasks with the pinned result storage and records what each call did."""

    def __init__(self, artifacts: Path, until: str | None):
        self.artifacts = artifacts
        self.until = until
        self.stages: list[dict[str, Any]] = []
        self.stopped = False

    def __call__(self, stage_task, **inputs) -> StageOutput | None:
        if self.stopped:
            return None
        started = time.perf_counter()
        entry: dict[str, Any] = {"name": stage_task.name}
        self.stages.append(entry)
        state = stage_task.with_options(result_storage=records_dir(self.artifacts))(
            **inputs, artifacts=str(self.artifacts), return_state=True
        )
        entry.update(state=state.name, seconds=round(time.perf_counter() - started, 3))
        out: StageOutput = state.result()  # raises the stage's own error on failure
        entry.update(key=out.key, output=str(out.dir(self.artifacts)), counts=out.counts)
        if stage_task.name in SHOW:
            SHOW[stage_task.name](out, str(self.artifacts))
        if stage_task.name == self.until:
            self.stopped = True
        return out


@flow(name="continued-pretraining", log_prints=True)
def continued_pretraining(
    config: CptConfig,
    until: StageName | None = None,
    artifacts: str | None = None,
) -> dict[str, Any]:
    """Continued pretraining of `config.model.id` on `config.corpus`; `until` stops after that stage."""
    root = artifacts_root(artifacts)
    run = StageRunner(root, until)
    summary: dict[str, Any] = {"flow_run": flow_run.name, "artifacts": str(root), "until": until,
                               "config": config.model_dump(mode="json"), "stages": run.stages}
    digests = DigestMemo(root)
    # Pieces built in this run count as read/tokenized/chunked by it; inside a retrain run (whose drop gate
    # builds the drop's pieces first) this joins the retrain run's scope.
    with build_scope(str(flow_run.id)):
        try:
            sources = fingerprint_corpus(config.corpus, digest=digests.digest)
            tokenizer = resolve_tokenizer(config.model, digest=digests.digest)
            digests.save()

            docs = run(load, corpus=config.corpus, sources=sources, files=[i["path"] for i in sources.items])
            split = run(shuffle, shuffle=config.shuffle, split=config.split, docs=docs)
            tokens = run(tokenize, tokenize=config.tokenize, tokenizer=tokenizer, docs=docs,
                         trust_remote_code=config.model.trust_remote_code)
            run(token_stats, token_stats=config.token_stats, chunk=config.chunk, tokens=tokens, split=split)
            chunks = run(chunk, chunk=config.chunk, tokens=tokens, split=split)

            if not run.stopped:
                base_model = resolve_model(config.model, digest=digests.digest)
                general = (fingerprint_corpus(CorpusConfig(paths=config.evaluate.general_corpus), digest=digests.digest)
                           if config.evaluate.general_corpus else None)
                digests.save()
                # The base model is measured first: its numbers are there even if training is stopped.
                base_eval = run(evaluate_base, evaluate=config.evaluate, model=config.model, base_model=base_model,
                                chunk=config.chunk, chunks=chunks, general_corpus=general)
                trained = run(train, train=config.train, model=config.model, base_model=base_model,
                              chunk=config.chunk, chunks=chunks)
                evaluation = run(evaluate, evaluate=config.evaluate, model=config.model, trained=trained,
                                 chunk=config.chunk, chunks=chunks, general_corpus=general, base_eval=base_eval)
                run(push, push=config.push, base_model_id=config.model.id, trained=trained, evaluation=evaluation,
                    docs=docs, corpus=sources, config=config.model_dump(mode="json"))
            summary["status"] = "Completed"
        except BaseException as e:
            summary["status"] = "Failed"
            summary["error"] = f"{type(e).__name__}: {e}"
            raise
        finally:
            write_summary(summary, root)
    return summary


def write_summary(summary: dict[str, Any], root: Path) -> Path:
    run_dir = root / "runs" / str(summary["flow_run"])
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    rows = [{"stage": s["name"], "state": s.get("state", "?"), "seconds": s.get("seconds"),
             "key": s.get("key", "")} for s in summary["stages"]]
    # Cached tasks do not re-create their own artifacts, so the run's overview is made here, every run.
    markdown_artifact(f"# Run summary: {summary['status']}\n\n{markdown_table(rows)}\n\n"
                      f"Artifacts: `{root}`\n", "run-summary", "Stages of this run: Completed or Cached")
    run_logger().info("summary: %s", path)
    return path

