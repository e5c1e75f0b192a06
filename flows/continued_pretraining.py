"""The continued-pretraining flow: reads top to bottom as the pipeline.

Each stage is a cached Prefect task (tasks/core/stage.py); the flow only wires manifests from one stage to the
next, times each call, and writes the run summary (stage | Completed or Cached | seconds | key | output).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.stages import PIPELINE, StageName, position
from tasks import evaluate as evaluate_stage
from tasks.chunk import chunk
from tasks.core.config.data import CorpusConfig, SplitConfig
from tasks.core.config.tree import CptConfig
from tasks.core.fanout import one_runner_per_run
from tasks.core.manifest import DigestMemo, Fingerprint, StageOutput
from tasks.core.report import markdown_artifact, markdown_table, run_logger
from tasks.core.root import ArtifactsRoot, open_root
from tasks.core.scope import build_scope
from tasks.core.stage import was_built
from tasks.evaluate import evaluate, evaluate_base
from tasks.gate import gate
from tasks.held_out import held_out as held_out_stage
from tasks.line.lineage import RunLineage
from tasks.data.files import fingerprint_corpus
from tasks.load import load, load_inputs
from tasks.ml.modeling import resolve_model, without_location
from tasks.push import HeadMoved, push
from tasks.mix import contamination_warnings, mix
from tasks.shuffle import shuffle
from tasks.token_stats import token_stats
from tasks.tokenize import prefetch_profile, resolve_tokenizer, tokenize
from tasks.train import train

class StageRunner:
    """Calls stage tasks with the pinned result storage and records what each call did. The pipeline's stages
    come in the order flows/stages.py lists them (a call out of that order fails: the list is the flow's order),
    and none runs after `until`."""

    def __init__(self, root: ArtifactsRoot, until: str | None):
        self.root = root
        self.until = position(until) if until else None
        self.stages: list[dict[str, Any]] = []
        self.reached = -1  # the position of the last pipeline stage called

    @property
    def stopped(self) -> bool:
        """Past `until`: the stage it names has run."""
        return self.until is not None and self.reached >= self.until

    def __call__(self, stage_task, label: str | None = None, force: bool = False, **inputs) -> StageOutput | None:
        """`label` names a second use of a stage (replay-load, evaluate-reference) in the summary and the UI;
        `force` runs it even after `until` (the replay data belongs to the data stages)."""
        name = stage_task.name
        if not label and name in PIPELINE:
            if position(name) <= self.reached:
                raise RuntimeError(f"the flow calls {name!r} after {PIPELINE[self.reached]!r}: flows/stages.py "
                                   "lists the pipeline's order, and the flow must follow it")
            if self.stopped:
                return None
            self.reached = position(name)
        elif self.stopped and not force:
            return None
        started = time.perf_counter()
        entry: dict[str, Any] = {"name": label or name}
        self.stages.append(entry)
        options = {"result_storage": self.root.records_dir}
        if label:
            options["task_run_name"] = label
        state = stage_task.with_options(**options)(**inputs, artifacts=self.root, return_state=True)
        entry.update(state=state.name, seconds=round(time.perf_counter() - started, 3))
        out: StageOutput = state.result()  # raises the stage's own error on failure
        entry.update(key=out.key, output=out.location(self.root), counts=out.counts,
                     built=was_built(out.key))
        if not label:
            links = out.links(self.root)
            if links:
                entry["links"] = links
            # Every call, computed or cached: a cached task does not re-create its own artifacts.
            out.show(self.root)
        return out

    def note(self, **facts: Any) -> None:
        """Facts about the last stage call, for the run summary (a release the run had to re-make)."""
        self.stages[-1].update({k: v for k, v in facts.items() if v})

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
    root = open_root(artifacts)
    run = StageRunner(root, until)
    summary: dict[str, Any] = {"flow_run": flow_run.name, "artifacts": str(root.local), "store": root.url,
                               "until": until, "line": line,
                               "config": config.model_dump(mode="json"), "stages": run.stages, "warnings": []}
    digests = DigestMemo(root)
    lineage = RunLineage(root, config, line, digests.digest)
    # Pieces built in this run count as read/tokenized/chunked by it; inside a retrain run (whose drop gate
    # builds the drop's pieces first) this joins the retrain run's scope.
    # One task runner for the run's fanned-out pieces (runtime.task_runner), started only if a stage needs it.
    with build_scope(str(flow_run.id)), one_runner_per_run(config.runtime):
        try:
            # A line's corpus is its configured files and its drops as the gate read them (tasks/line/sources.py).
            sources = line_corpus(root, config, line, digests) if line else \
                fingerprint_corpus(config.corpus, digest=digests.digest)
            tokenizer = resolve_tokenizer(config.model, digest=digests.digest)
            digests.save()
            if until not in ("load", "shuffle"):  # the probe of a new tokenizer overlaps load and shuffle
                prefetch_profile(tokenizer, root, config.model.trust_remote_code)

            docs = run(load, **load_inputs(config.corpus, sources), runtime=config.runtime)
            held_out = None
            if config.shuffle.decontaminate.enabled and not run.stopped:
                held_out = run(held_out_stage, None, True, **held_out_inputs(run, config, digests))
            split = run(shuffle, shuffle=config.shuffle, split=config.split, docs=docs, held_out=held_out)
            tokens = run(tokenize, tokenize=config.tokenize, tokenizer=tokenizer, docs=docs,
                         trust_remote_code=config.model.trust_remote_code, runtime=config.runtime)
            run(token_stats, token_stats=config.token_stats, chunk=config.chunk, tokens=tokens, split=split)
            chunks = run(chunk, chunk=config.chunk, tokens=tokens, split=split, runtime=config.runtime)

            train_chunks, replay = chunks, None
            if config.replay.active and (not run.stopped or until == "chunk"):
                replay_held = None if held_out is None else dict(
                    general=None, tasks=[], task_files=None, base=held_out, validation=split, docs=docs)
                train_chunks, replay = replay_stages(run, config, tokenizer, chunks, digests, summary, replay_held)

            if not run.stopped:
                base_model = resolve_model(config.model, digest=digests.digest)
                general = (fingerprint_corpus(CorpusConfig(paths=config.evaluate.general_corpus), digest=digests.digest)
                           if config.evaluate.general_corpus else None)
                parent_model, parent = lineage.choose_parent(base_model, train_chunks)
                summary["parent"] = without_location(parent)
                # The base model is measured first: its numbers are there even if training is stopped.
                eval_inputs = dict(evaluate=config.evaluate, model=config.model, chunk=config.chunk, chunks=chunks,
                                   general_corpus=general, task_files=evaluate_stage.task_fingerprint(config.evaluate))
                base_eval = run(evaluate_base, base_model=base_model, **eval_inputs)
                trained = run(train, train=config.train, model=config.model, base_model=parent_model,
                              chunk=config.chunk, chunks=train_chunks, parent=parent)
                evaluation = run(evaluate, trained=trained, base_eval=base_eval, **eval_inputs)

                decision = ref_eval = None
                if config.gate.enabled and not run.stopped:
                    ref_model = lineage.choose_reference(trained)
                    ref_eval = base_eval if ref_model is None else run(
                        evaluate_base, "evaluate-reference", base_model=ref_model, **eval_inputs)
                    decision = run(gate, gate=config.gate, evaluation=evaluation, reference_eval=ref_eval,
                                   base_eval=base_eval, trained=trained, reference_kind=lineage.reference_kind)
                    summary["gate"] = dict(decision.counts)

                if not run.stopped and decision is not None and not decision.promoted:
                    # Refused: the release folder and the Hub stay as they were.
                    run.skip("push", f"gate refused: {decision.counts['reason']}")
                elif not run.stopped:
                    with lineage.promoting(trained, decision) as refused:  # the lineage's lock, held around push
                        if refused:
                            run.skip("push", refused)
                        else:
                            try:
                                pushed = run(push, push=config.push, base_model_id=config.model.id,
                                             trained=trained, evaluation=evaluation, docs=docs, corpus=sources,
                                             config=config, decision=decision, hub_parent=lineage.hub_parent,
                                             lineage=lineage.card(sources, replay, train_chunks, trained, evaluation,
                                                                  base_eval, ref_eval, decision))
                            except HeadMoved as e:  # the Hub moved between the gate and the commit: refused
                                run.stages.pop()
                                run.skip("push", str(e))
                                summary["warnings"].append(str(e))
                            else:
                                run.note(release_restored=lineage.released(pushed, trained, decision,
                                                                           str(flow_run.name)))
                digests.save()
            summary["status"] = "Completed"
        except BaseException as e:
            summary["status"] = "Failed"
            summary["error"] = f"{type(e).__name__}: {e}"
            raise
        finally:
            write_summary(summary, root)
    return summary


def line_corpus(root: ArtifactsRoot, config: CptConfig, line: str, digests: DigestMemo) -> Fingerprint:
    from tasks.line.lines import read_line
    from tasks.line.sources import line_sources

    return line_sources(config, read_line(root, line), digests.digest)[0]


def held_out_inputs(run: StageRunner, config: CptConfig, digests: DigestMemo) -> dict[str, Any]:
    """The held-out stage's inputs: evaluate.general_corpus through the same cached load (general-load) and the
    evaluation tasks (their names, and the content of local task files)."""
    general = None
    if config.evaluate.general_corpus:
        general_cfg = CorpusConfig(paths=config.evaluate.general_corpus, on_bad_record="skip")
        general_fp = fingerprint_corpus(general_cfg, digest=digests.digest)
        general = run(load, "general-load", True, **load_inputs(general_cfg, general_fp), runtime=config.runtime)
    return dict(general=general, tasks=config.evaluate.tasks,
                task_files=evaluate_stage.task_fingerprint(config.evaluate))


def replay_stages(run: StageRunner, config: CptConfig, tokenizer: Fingerprint, chunks: StageOutput,
                  digests: DigestMemo, summary: dict[str, Any], held_inputs: dict[str, Any] | None = None
                  ) -> tuple[StageOutput, Fingerprint]:
    """Replay text through the same cached stages as the corpus (all of it for training), then the mix stage:
    the training set with replay. Also warns when the general evaluation corpus shares documents with it.
    `held_inputs` (decontamination on): the replay text, which reaches training too, is kept clear of the
    domain's held-out text and of its validation split (replay-held-out)."""
    replay_corpus = config.replay.corpus(config.corpus)
    replay = fingerprint_corpus(replay_corpus, digest=digests.digest)
    digests.save()
    docs = run(load, "replay-load", True, **load_inputs(replay_corpus, replay), runtime=config.runtime)
    held_out = run(held_out_stage, "replay-held-out", True, **held_inputs) if held_inputs else None
    split = run(shuffle, "replay-shuffle", True, shuffle=config.shuffle, split=SplitConfig(validation_fraction=0.0),
                docs=docs, held_out=held_out)
    tokens = run(tokenize, "replay-tokenize", True, tokenize=config.tokenize, tokenizer=tokenizer, docs=docs,
                 trust_remote_code=config.model.trust_remote_code, runtime=config.runtime)
    replay_chunks = run(chunk, "replay-chunk", True, chunk=config.chunk, tokens=tokens, split=split,
                        runtime=config.runtime)
    mixed = run(mix, "mix", True, replay=config.replay, shuffle=config.shuffle, chunks=chunks,
                replay_chunks=replay_chunks)
    if held_out is None:  # on, replay-shuffle removed those documents from the replay text (counted there)
        summary["warnings"] += contamination_warnings(config.evaluate.general_corpus, docs, run.root)
    return mixed, replay


def write_summary(summary: dict[str, Any], root: ArtifactsRoot) -> Path:
    rel = f"runs/{summary['flow_run']}/summary.json"
    path = root.path(rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    root.save_file(rel)
    rows = [{"stage": s["name"], "state": s.get("state", "?"), "seconds": s.get("seconds"),
             "key": s.get("key", "")} for s in summary["stages"]]
    # Cached tasks do not re-create their own artifacts, so the run's overview is made here, every run.
    markdown_artifact(f"# Run summary: {summary['status']}\n\n{markdown_table(rows)}\n\n"
                      f"Artifacts: `{summary.get('store') or root.local}`\n", "run-summary", "Stages of this run: Completed or Cached")
    run_logger().info("summary: %s", path)
    return path

