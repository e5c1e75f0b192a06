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

from tasks import evaluate as evaluate_stage
from tasks import gate as gate_stage
from tasks import promotion
from tasks import push as push_stage
from tasks import token_stats as token_stats_stage
from tasks import train as train_stage
from tasks.cache import (DigestMemo, Fingerprint, StageOutput, artifacts_root, build_scope, records_dir, save_file,
                         share_record,
                         stage_key, store_url, was_built)
from tasks.chunk import chunk
from tasks.fanout import one_runner_per_run
from tasks.config import CorpusConfig, CptConfig, SplitConfig
from tasks.gate import gate
from tasks.evaluate import evaluate, evaluate_base
from tasks.load import fingerprint_corpus, load
from tasks.modeling import resolve_model
from tasks.push import push
from tasks.replay import mix, replay_overlap
from tasks.report import markdown_artifact, markdown_table, run_logger
from tasks.shuffle import shuffle
from tasks.token_stats import token_stats
from tasks.tokenize import prefetch_profile, resolve_tokenizer, tokenize
from tasks.train import train

StageName = Literal["load", "shuffle", "tokenize", "token-stats", "chunk", "evaluate-base", "train", "evaluate",
                    "gate", "push"]


# Stages whose outputs have Prefect artifacts. The flow makes them after every call, computed or cached:
# a cached task does not re-create its own artifacts, and every run should show what it produced.
SHOW = {"token-stats": token_stats_stage.show, "train": train_stage.show, "evaluate": evaluate_stage.show,
        "gate": gate_stage.show, "push": push_stage.show}


class StageRunner:
    """Calls stage tasks with the pinned result storage and records what each call did."""

    def __init__(self, artifacts: Path, until: str | None):
        self.artifacts = artifacts
        self.until = until
        self.stages: list[dict[str, Any]] = []
        self.stopped = False

    def __call__(self, stage_task, label: str | None = None, force: bool = False, **inputs) -> StageOutput | None:
        """`label` names a second use of a stage (replay-load, evaluate-reference) in the summary and the UI;
        `force` runs it even after `until` (the replay data belongs to the data stages)."""
        if self.stopped and not force:
            return None
        started = time.perf_counter()
        entry: dict[str, Any] = {"name": label or stage_task.name}
        self.stages.append(entry)
        options = {"result_storage": records_dir(self.artifacts)}
        if label:
            options["task_run_name"] = label
        state = stage_task.with_options(**options)(**inputs, artifacts=str(self.artifacts), return_state=True)
        entry.update(state=state.name, seconds=round(time.perf_counter() - started, 3))
        out: StageOutput = state.result()  # raises the stage's own error on failure
        share_record(self.artifacts, out.key)
        entry.update(key=out.key, output=out.location(self.artifacts), counts=out.counts,
                     built=was_built(out.key))
        links = {} if label else out.links(str(self.artifacts))
        if links:
            entry["links"] = links
        if stage_task.name in SHOW and not label:
            SHOW[stage_task.name](out, str(self.artifacts))
        if stage_task.name == self.until and not label:
            self.stopped = True
        return out

    def skip(self, name: str, why: str) -> None:
        self.stages.append({"name": name, "state": "Skipped", "seconds": 0.0, "key": "", "counts": {}, "reason": why})


@flow(name="continued-pretraining", log_prints=True)
def continued_pretraining(
    config: CptConfig,
    until: StageName | None = None,
    artifacts: str | None = None,
    line: str | None = None,
) -> dict[str, Any]:
    """Continued pretraining of `config.model.id` on `config.corpus`; `until` stops after that stage. `line` is
    the retraining line this run belongs to (cpt retrain sets it): its promotions and drops."""
    root = artifacts_root(artifacts)
    run = StageRunner(root, until)
    log = run_logger()
    summary: dict[str, Any] = {"flow_run": flow_run.name, "artifacts": str(root), "store": store_url(root),
                               "until": until, "line": line,
                               "config": config.model_dump(mode="json"), "stages": run.stages, "warnings": []}
    digests = DigestMemo(root)
    lineage = promotion.lineage_of(line, config.push.name)
    # Pieces built in this run count as read/tokenized/chunked by it; inside a retrain run (whose drop gate
    # builds the drop's pieces first) this joins the retrain run's scope.
    # One task runner for the run's fanned-out pieces (runtime.task_runner), started only if a stage needs it.
    with build_scope(str(flow_run.id)), one_runner_per_run(config.runtime):
        try:
            sources = fingerprint_corpus(config.corpus, digest=digests.digest)
            tokenizer = resolve_tokenizer(config.model, digest=digests.digest)
            digests.save()
            if until not in ("load", "shuffle"):  # the probe of a new tokenizer overlaps load and shuffle
                prefetch_profile(tokenizer, root, config.model.trust_remote_code)

            docs = run(load, corpus=config.corpus, sources=sources, files=[i["path"] for i in sources.items],
                       runtime=config.runtime)
            split = run(shuffle, shuffle=config.shuffle, split=config.split, docs=docs)
            tokens = run(tokenize, tokenize=config.tokenize, tokenizer=tokenizer, docs=docs,
                         trust_remote_code=config.model.trust_remote_code, runtime=config.runtime)
            run(token_stats, token_stats=config.token_stats, chunk=config.chunk, tokens=tokens, split=split)
            chunks = run(chunk, chunk=config.chunk, tokens=tokens, split=split, runtime=config.runtime)

            train_chunks, replay = chunks, None
            if config.replay.active and (not run.stopped or until == "chunk"):
                train_chunks, replay = replay_stages(run, config, tokenizer, chunks, digests, summary)

            if not run.stopped:
                base_model = resolve_model(config.model, digest=digests.digest)
                general = (fingerprint_corpus(CorpusConfig(paths=config.evaluate.general_corpus), digest=digests.digest)
                           if config.evaluate.general_corpus else None)
                promos = promotion.read_promotions(root, lineage)
                # What this training is, less the weights it starts from: how a rerun recognises its own result.
                identity = stage_key("train-identity", {"train": config.train, "model": config.model,
                                                        "base": base_model, "chunk": config.chunk,
                                                        "chunks": train_chunks})
                parent_model, parent, note = promotion.choose_parent(
                    config.train.init, promos, base_model, config.model.id, identity, root, digests.digest)
                log.info("train: %s", note)
                summary["parent"] = promotion.without_location(parent)
                # The base model is measured first: its numbers are there even if training is stopped.
                eval_inputs = dict(evaluate=config.evaluate, model=config.model, chunk=config.chunk, chunks=chunks,
                                   general_corpus=general)
                base_eval = run(evaluate_base, base_model=base_model, **eval_inputs)
                trained = run(train, train=config.train, model=config.model, base_model=parent_model,
                              chunk=config.chunk, chunks=train_chunks, parent=parent)
                evaluation = run(evaluate, trained=trained, base_eval=base_eval, **eval_inputs)

                decision = ref_eval = reference = None
                if config.gate.enabled and not run.stopped:
                    ref_model, ref_record, note = promotion.choose_reference(
                        promos, trained.model_digest, root, digests.digest)
                    log.info("gate: %s", note)
                    reference = (promotion.describe("base", base_model, config.model.id) if ref_model is None
                                 else promotion.describe("promoted", ref_model, config.model.id, ref_record))
                    ref_eval = base_eval if ref_model is None else run(
                        evaluate_base, "evaluate-reference", base_model=ref_model, **eval_inputs)
                    decision = run(gate, gate=config.gate, evaluation=evaluation, reference_eval=ref_eval,
                                   base_eval=base_eval, trained=trained, reference_kind=reference["kind"])
                    summary["gate"] = dict(decision.counts)

                if not run.stopped and decision is not None and not decision.promoted:
                    # Refused: the release folder and the Hub stay as they were.
                    run.skip("push", f"gate refused: {decision.counts['reason']}")
                elif not run.stopped:
                    lineage_doc = card_lineage(config, root, line, base_model, parent, sources, replay, train_chunks,
                                               trained, evaluation, base_eval, ref_eval, decision)
                    pushed = run(push, push=config.push, base_model_id=config.model.id, trained=trained,
                                 evaluation=evaluation, docs=docs, corpus=sources, config=config,
                                 decision=decision, lineage=lineage_doc)
                    restored = push_stage.ensure_release(pushed, trained, str(root), digests.digest)
                    if restored:
                        run.stages[-1]["release_restored"] = restored
                    if lineage and decision is not None:
                        promotion.record_promotion(root, lineage, promotion.promotion_record(
                            trained, pushed, decision, identity, parent, reference, str(flow_run.name)))
                digests.save()
            summary["status"] = "Completed"
        except BaseException as e:
            summary["status"] = "Failed"
            summary["error"] = f"{type(e).__name__}: {e}"
            raise
        finally:
            write_summary(summary, root)
    return summary


def replay_stages(run: StageRunner, config: CptConfig, tokenizer: Fingerprint, chunks: StageOutput,
                  digests: DigestMemo, summary: dict[str, Any]) -> tuple[StageOutput, Fingerprint]:
    """Replay text through the same cached stages as the corpus (all of it for training), then the mix stage:
    the training set with replay. Also warns when the general evaluation corpus shares documents with it."""
    replay_corpus = config.replay.corpus(config.corpus)
    replay = fingerprint_corpus(replay_corpus, digest=digests.digest)
    digests.save()
    docs = run(load, "replay-load", True, corpus=replay_corpus, sources=replay,
               files=[i["path"] for i in replay.items], runtime=config.runtime)
    split = run(shuffle, "replay-shuffle", True, shuffle=config.shuffle, split=SplitConfig(validation_fraction=0.0),
                docs=docs)
    tokens = run(tokenize, "replay-tokenize", True, tokenize=config.tokenize, tokenizer=tokenizer, docs=docs,
                 trust_remote_code=config.model.trust_remote_code, runtime=config.runtime)
    replay_chunks = run(chunk, "replay-chunk", True, chunk=config.chunk, tokens=tokens, split=split,
                        runtime=config.runtime)
    mixed = run(mix, "mix", True, replay=config.replay, shuffle=config.shuffle, chunks=chunks,
                replay_chunks=replay_chunks)
    if config.evaluate.general_corpus:
        shared, total = replay_overlap(config.evaluate.general_corpus, docs, str(run.artifacts))
        if shared:
            msg = (f"replay: {shared} of the {total} documents of evaluate.general_corpus are also in replay.paths: "
                   "the general perplexity (the forgetting measure) is contaminated; hold them out of the replay text")
            run_logger().warning(msg)
            summary["warnings"].append(msg)
    return mixed, replay


def card_lineage(config: CptConfig, root: Path, line: str | None, base_model: Fingerprint, parent: dict[str, Any],
                 sources: Fingerprint, replay: Fingerprint | None, train_chunks: StageOutput, trained: StageOutput,
                 evaluation: StageOutput, base_eval: StageOutput, ref_eval: StageOutput | None,
                 decision: StageOutput | None) -> dict[str, Any]:
    """What the model card says about where the weights come from (no paths that move with the artifacts)."""
    from tasks import lines

    drops = ([{"path": d.path, "fingerprint": d.fingerprint} for d in lines.read_line(root, line).drops
              if d.status == "active"] if line else [])
    e = evaluation.counts

    def ppl(out: StageOutput | None, name: str):
        return None if out is None else out.counts.get(f"{name}_perplexity")

    return {
        "model_digest": trained.model_digest,
        "base": {"id": config.model.id, "digest": base_model.digest},
        "parent": promotion.without_location(parent),
        "corpus": sources.digest,
        "drops": drops,
        "replay": {"fraction": config.replay.fraction, "paths": config.replay.paths,
                   "fingerprint": replay.digest if replay else None,
                   "share": train_chunks.counts.get("replay_share", 0.0)},
        "evaluation": {"validation_base": ppl(base_eval, "validation"), "validation_reference": ppl(ref_eval, "validation"),
                       "validation_new": e.get("validation_perplexity_after"),
                       "general_base": ppl(base_eval, "general"), "general_reference": ppl(ref_eval, "general"),
                       "general_new": e.get("general_perplexity_after")},
        "gate": None if decision is None else {k: decision.counts[k] for k in ("promoted", "reason", "reference")},
    }


def write_summary(summary: dict[str, Any], root: Path) -> Path:
    run_dir = root / "runs" / str(summary["flow_run"])
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    save_file(root, path)
    rows = [{"stage": s["name"], "state": s.get("state", "?"), "seconds": s.get("seconds"),
             "key": s.get("key", "")} for s in summary["stages"]]
    # Cached tasks do not re-create their own artifacts, so the run's overview is made here, every run.
    markdown_artifact(f"# Run summary: {summary['status']}\n\n{markdown_table(rows)}\n\n"
                      f"Artifacts: `{summary.get('store') or root}`\n", "run-summary", "Stages of this run: Completed or Cached")
    run_logger().info("summary: %s", path)
    return path

