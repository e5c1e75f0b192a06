"""The continued-pretraining flow: reads top to bottom as the pipeline.

Each stage is a cached Prefect task (tasks/core/stage.py); the flow only wires manifests from one stage to the
next, times each call, and writes the run summary (stage | Completed or Cached | seconds | key | output).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.utilities.annotations import opaque

from flows.stages import PIPELINE, StageName, position
from tasks import evaluate as evaluate_stage

from tasks.chunk import chunk
from tasks.core.config.data import CorpusConfig
from tasks.core.config.sources import DataSource, MixShare
from tasks.core.config.tree import CptConfig
from tasks.core.fanout import one_runner_per_run
from tasks.core.heap import freeze_long_lived
from tasks.core.holds import RunHold
from tasks.core.manifest import DigestMemo, Fingerprint, StageOutput
from tasks.core.report import markdown_artifact, markdown_table, run_logger
from tasks.core.root import ArtifactsRoot, EntryUnavailable, open_root
from tasks.core.scope import build_scope
from tasks.core.stage import was_built
from tasks.evaluate import evaluate, evaluate_base
from tasks import gate as gate_stage
from tasks.gate import gate
from tasks.held_out import held_out as held_out_stage
from tasks.line.lineage import RunLineage
from tasks.line.preflight import check_before_compute, with_release_name
from tasks.data.files import fingerprint_corpus
from tasks.load import load, load_inputs
from tasks.ml.modeling import resolve_model, without_location
from tasks.mix import contamination_warnings, mix, mix_sources
from tasks.push import HeadMoved, push
from tasks.shuffle import shuffle
from tasks.token_stats import token_stats
from tasks.tokenize import prefetch_profile, resolve_tokenizer, tokenize
from tasks.train import anneal, train

def unwalked(value: Any) -> Any:
    """A stage input as the runner passes it: `opaque`, so that Prefect looks at the value itself (a manifest
    another task returned links the two task runs in the UI's graph) but walks nothing inside it (it visited
    every field of every config section and manifest twice per call: a few ms a stage, of a drop run's ~0.2 s of
    data stages). A list (mix's chunks of every source) is passed as a list of such values: each one linked."""
    if isinstance(value, (list, tuple)):
        return type(value)(opaque(v) for v in value)
    return opaque(value)


class StageRunner:
    """Calls stage tasks with the pinned result storage and records what each call did. The pipeline's stages
    come in the order flows/stages.py lists them (a call out of that order fails: the list is the flow's order),
    and none runs after `until`."""

    def __init__(self, root: ArtifactsRoot, until: str | None, hold: RunHold | None = None):
        self.root = root
        self.until = position(until) if until else None
        self.stages: list[dict[str, Any]] = []
        self.reached = -1  # the position of the last pipeline stage called
        # Every output this run has taken, held against garbage collection on any host until the run ends, and
        # the call that made it, to make it again if it vanishes all the same (collected between its lookup and
        # its hold, or by a collector that ignored the hold).
        self.hold = hold
        self.calls: dict[str, tuple[Any, dict[str, Any], dict[str, Any], StageOutput]] = {}

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
        try:
            state, out = self._call(stage_task, options, inputs, entry)
        finally:  # a failed stage too: the summary says which stage failed, and after how long
            entry["seconds"] = round(time.perf_counter() - started, 3)
        entry.update(state=state.name)
        entry.update(key=out.key, output=out.location(self.root), counts=out.counts,
                     built=was_built(out.key))
        if state.name == "Cached":  # its body did not run, so it logged nothing of its own
            run_logger().info("%s: Cached (%s)", entry["name"], out.key)
        if not label:
            links = out.links(self.root)
            if links:
                entry["links"] = links
            # Every call, computed or cached: a cached task does not re-create its own artifacts.
            out.show(self.root)
        return out

    def _call(self, stage_task, options: dict[str, Any], inputs: dict[str, Any], entry: dict[str, Any],
              retries: int = 3):
        """Run one stage task; returns (its state, its output), held. An input found gone while the stage ran
        (EntryUnavailable) is made again by the call that made it, and the stage runs again on it."""
        state = stage_task.with_options(**options)(**{k: unwalked(v) for k, v in inputs.items()},
                                                   artifacts=self.root, return_state=True)
        entry["state"] = state.name  # before its result is read: a failure raises there
        try:
            out: StageOutput = state.result()  # raises the stage's own error on failure
        except EntryUnavailable as e:
            producer = self._producer(e.rel)
            if producer is None or retries <= 0:
                raise
            task, p_options, p_inputs, old = producer
            run_logger().warning("%s: its input %s is gone (%s): making it again", stage_task.name, e.rel, e)
            _, new = self._call(task, p_options, p_inputs, {}, retries - 1)
            entry.setdefault("rebuilt", []).append(e.rel)
            inputs = {k: new if isinstance(v, StageOutput) and v.path == old.path else v for k, v in inputs.items()}
            return self._call(stage_task, options, inputs, entry, retries - 1)
        self.calls[out.path] = (stage_task, options, inputs, out)
        if self.hold is not None:
            self.hold.add(out.path)
        return state, out

    def _producer(self, rel: str):
        """The call of this run that made the entry `rel`, or an entry that refers to it."""
        return self.calls.get(rel) or next((c for c in self.calls.values() if rel in c[3].deps), None)

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
    left_out: list[str] | None = None,
) -> dict[str, Any]:
    """Continued pretraining of `config.model.id` on `config.sources` (or `config.corpus` + `config.replay`);
    `until` stops after that stage. `line` is the retraining line this run belongs to (cpt retrain sets it): its
    promotions and drops; `left_out`: drops of the line this run is taken without (the drop gate's: still being
    written, or not gated for an infrastructure error), as in the corpus fingerprint retrain compared."""
    freeze_long_lived()  # once per process: full collections mid-stage skip the imports (tasks/core/heap.py)
    root = open_root(artifacts)
    config = with_release_name(config, line)  # push.name unset: derived, so another corpus is another release
    hold = RunHold(root, str(flow_run.name))
    run = StageRunner(root, until, hold)
    summary: dict[str, Any] = {"flow_run": flow_run.name, "artifacts": str(root.local), "store": root.url,
                               "until": until, "line": line,
                               "config": config.model_dump(mode="json"), "stages": run.stages, "warnings": []}
    digests = DigestMemo(root)
    lineage = RunLineage(root, config, line, digests.digest)
    # Pieces built in this run count as read/tokenized/chunked by it; inside a retrain run (whose drop gate
    # builds the drop's pieces first) this joins the retrain run's scope.
    # One task runner for the run's fanned-out pieces (runtime.task_runner), started only if a stage needs it.
    with build_scope(str(flow_run.id)), one_runner_per_run(config.runtime), hold:
        try:
            # What would fail after training fails now, before any stage (tasks/line/preflight.py).
            check_before_compute(config, root, line, pushes=until in (None, "push"), lock=False)  # retrain holds it
            # A line's drops join its drop source (drops.source): that source's corpus is its configured files and
            # its drops as the gate read them, less those left out of this run (tasks/line/sources.py).
            drop_fp = line_corpus(root, config, line, digests, left_out) if line else None
            first = config.data_sources()[0]
            sources = drop_fp if drop_fp is not None and first.name == config.drop_source else \
                fingerprint_corpus(first.corpus, digest=digests.digest)
            tokenizer = resolve_tokenizer(config.model, digest=digests.digest)
            digests.save()
            if until not in ("load", "shuffle"):  # the probe of a new tokenizer overlaps load and shuffle
                prefetch_profile(tokenizer, root, config.model.trust_remote_code)

            # Every source through load … chunk (the first under the stage names), then the mix (flows/sources.py).
            data = source_stages(run, config, tokenizer, digests, sources, summary, until, drop_fp)
            docs, chunks, train_chunks = data.first.docs, data.first.chunks, data.train_chunks
            if data.first.split is not None and (few := data.first.split.few_documents()):
                summary["warnings"].append(few)  # every run: a Cached shuffle logs nothing

            if not run.stopped:
                base_model = resolve_model(config.model, digest=digests.digest)
                general = (fingerprint_corpus(CorpusConfig(paths=config.evaluate.general_corpus), digest=digests.digest)
                           if config.evaluate.general_corpus else None)
                parent_model, parent = lineage.choose_parent(base_model, train_chunks)
                summary["parent"] = without_location(parent)
                # The base model is measured first: its numbers are there even if training is stopped.
                eval_inputs = dict(evaluate=config.evaluate, model=config.model, chunk=config.chunk, chunks=chunks,
                                   general_corpus=general, task_files=evaluate_stage.task_fingerprint(config.evaluate),
                                   sources=data.validation_sets())
                base_eval = run(evaluate_base, base_model=base_model, **eval_inputs)
                eval_weights = {s.name: s.eval_weight for s in config.sources if s.eval_weight is not None}
                trained = run(train, train=config.train, model=config.model, base_model=parent_model,
                              chunk=config.chunk, chunks=train_chunks, parent=parent, warm_start=lineage.warm_start,
                              eval_weights=eval_weights)
                run_logger().info("train: parent: %s", lineage.parent_note)  # after "train: Cached (key)" if so
                release = trained
                if config.train.schedule == "stable_anneal" and trained is not None:
                    # The stable model stays the line's parent; the release is annealed from it.
                    lineage.note_stable(trained)
                    release = run(anneal, train=config.train, model=config.model, stable=trained, chunk=config.chunk,
                                  chunks=data.anneal_chunks or train_chunks, eval_weights=eval_weights,
                                  previous=lineage.previous_stables() if config.train.anneal == "average" else None)
                evaluation = run(evaluate, trained=release, base_eval=base_eval, **eval_inputs)

                decision = ref_eval = None
                if config.gate.enabled and not run.stopped:
                    ref_model = lineage.choose_reference(release)
                    summary["reference"] = without_location(lineage.reference)  # a model the next run looks up
                    ref_eval = base_eval if ref_model is None else run(
                        evaluate_base, "evaluate-reference", base_model=ref_model, **eval_inputs)
                    decision = run(gate, gate=config.gate, evaluation=evaluation, reference_eval=ref_eval,
                                   base_eval=base_eval, trained=release, reference_kind=lineage.reference_kind)
                    summary["gate"] = dict(decision.counts)

                if not run.stopped and decision is not None and not decision.promoted:
                    # Refused: the release folder and the Hub stay as they were.
                    run.skip("push", f"gate refused: {decision.counts['reason']}")
                elif not run.stopped:
                    try:
                        with lineage.promoting(release, decision) as refused:  # the lineage's lock, around push
                            if refused:
                                run.skip("push", refused)
                            else:
                                replay = next((r.fingerprint for r in data.runs if r.source.name == "replay"), None)
                                try:
                                    pushed = run(push, push=config.push, base_model_id=config.model.id,
                                                 trained=release, evaluation=evaluation, docs=docs, corpus=sources,
                                                 config=config, decision=decision, hub_parent=lineage.hub_parent,
                                                 lineage=lineage.card(sources, replay, train_chunks, release,
                                                                      evaluation, base_eval, ref_eval, decision,
                                                                      data.fingerprints()))
                                except HeadMoved as e:  # the Hub moved between the gate and the commit: refused
                                    run.stages.pop()
                                    run.skip("push", str(e))
                                    summary["warnings"].append(str(e))
                                else:
                                    run.note(release_restored=lineage.released(pushed, release, decision,
                                                                               str(flow_run.name)))
                    except Exception as e:  # promoted (or ungated) and trained, but not released: said as such
                        not_pushed(summary, decision, root, e)
                        raise
                digests.save()
            summary["status"] = "Completed"
        except BaseException as e:
            summary["status"] = "Failed"
            summary["error"] = f"{type(e).__name__}: {e}"
            with contextlib.suppress(AttributeError):
                e.cpt_summary = summary  # for the caller in this process (cpt run --summary, a retrain run)
            raise
        finally:
            write_summary(summary, root)
    return summary


def not_pushed(summary: dict[str, Any], decision, root: ArtifactsRoot, error: BaseException) -> None:
    """A model the gate promoted (or that had no gate) whose push failed: the summary and the gate's artifact say
    "promoted, not pushed: <why>", never "promoted" alone."""
    why = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    gate_summary = summary.setdefault("gate", {}) if decision is not None else summary.setdefault("push", {})
    gate_summary.update(pushed=False, not_pushed=why)
    run_logger().error("push: not pushed: %s", why)
    if decision is not None:
        gate_stage.show(decision, root, not_pushed=why)


# ---------------------------------------------------------------------------------------- the source loop
# Every training source through the same cached load → held-out → shuffle → tokenize → chunk stages, then the mix.
# The first source's calls carry the pipeline's stage names (token-stats too); every other source's are labelled
# `<name>-<stage>` and run even after `until` (they belong to the data stages). So `corpus` + `replay` runs exactly
# the calls it always ran (load … chunk, replay-load … replay-chunk, mix: the same keys, tests/test_legacy_keys.py),
# and a change to one source reruns its own calls and the mix, nothing of the others. With decontamination each
# source's training text is kept clear of the held-out text and of the validation splits of the sources before it
# (replay-held-out always was).


@dataclasses.dataclass
class SourceRun:
    """One source's outputs in this run."""

    source: DataSource
    fingerprint: Fingerprint
    docs: StageOutput | None = None
    held_out: StageOutput | None = None
    split: StageOutput | None = None
    chunks: StageOutput | None = None


@dataclasses.dataclass
class SourcesData:
    """What the data stages made: every source's outputs, the training set (the mix, or the first source's chunks
    alone) and the anneal branch's mixture (anneal.sources) when the config asks for one."""

    runs: list[SourceRun]
    train_chunks: StageOutput | None = None
    anneal_chunks: StageOutput | None = None

    @property
    def first(self) -> SourceRun:
        return self.runs[0]

    def validation_sets(self) -> dict[str, StageOutput]:
        """Every source with a validation set: its chunks (whose validation split evaluate scores), in order."""
        return {r.source.name: r.chunks for r in self.runs
                if r.chunks is not None and r.source.split.validation_fraction > 0}

    def fingerprints(self) -> dict[str, str]:
        return {r.source.name: r.fingerprint.digest for r in self.runs}


def line_corpus(root: ArtifactsRoot, config: CptConfig, line: str, digests: DigestMemo,
                left_out: list[str] | None = None) -> Fingerprint:
    """The line's drop-source corpus (tasks/line/sources.py), less the drops left out of this run."""
    from tasks.line.lines import read_line
    from tasks.line.sources import line_sources

    return line_sources(config, read_line(root, line), digests.digest, without=left_out)[0]


def general_held_out_inputs(run: StageRunner, config: CptConfig, digests: DigestMemo) -> dict[str, Any]:
    """The held-out stage's inputs: evaluate.general_corpus through the same cached load (general-load) and the
    evaluation tasks (their names, and the content of local task files)."""
    general = None
    if config.evaluate.general_corpus:
        general_cfg = CorpusConfig(paths=config.evaluate.general_corpus, on_bad_record="skip")
        general_fp = fingerprint_corpus(general_cfg, digest=digests.digest)
        general = run(load, "general-load", True, **load_inputs(general_cfg, general_fp), runtime=config.runtime)
    return dict(general=general, tasks=config.evaluate.tasks, task_files=evaluate_stage.task_fingerprint(config.evaluate))


def first_source(run: StageRunner, config: CptConfig, tokenizer: Fingerprint, digests: DigestMemo,
                 first: SourceRun) -> SourceRun:
    """The first source (the domain) under the pipeline's own stage names, token-stats included."""
    source = first.source
    first.docs = run(load, **load_inputs(source.corpus, first.fingerprint), runtime=config.runtime)
    if any(d.shuffle.decontaminate.enabled for d in config.data_sources()) and not run.stopped:
        first.held_out = run(held_out_stage, None, True, **general_held_out_inputs(run, config, digests))
    first.split = run(shuffle, shuffle=source.shuffle, split=source.split, docs=first.docs,
                      held_out=first.held_out if source.shuffle.decontaminate.enabled else None)
    tokens = run(tokenize, tokenize=config.tokenize, tokenizer=tokenizer, docs=first.docs,
                 trust_remote_code=config.model.trust_remote_code, runtime=config.runtime)
    run(token_stats, token_stats=config.token_stats, chunk=config.chunk, tokens=tokens, split=first.split)
    first.chunks = run(chunk, chunk=config.chunk, tokens=tokens, split=first.split, runtime=config.runtime)
    return first


def other_source(run: StageRunner, config: CptConfig, tokenizer: Fingerprint, digests: DigestMemo,
                 source: DataSource, before: SourceRun, summary: dict[str, Any],
                 fingerprint: Fingerprint | None = None) -> SourceRun:
    """A source after the first, labelled `<name>-<stage>`: its held-out text is the previous source's plus that
    source's validation split. `fingerprint`: its corpus when given (a line's drop source), else listed now."""
    label = source.stage_label
    this = SourceRun(source, fingerprint or fingerprint_corpus(source.corpus, digest=digests.digest))
    digests.save()
    this.docs = run(load, label("load"), True, **load_inputs(source.corpus, this.fingerprint), runtime=config.runtime)
    if before.held_out is not None:
        this.held_out = run(held_out_stage, label("held-out"), True, general=None, tasks=[], task_files=None,
                            base=before.held_out, validation=before.split, docs=before.docs)
    this.split = run(shuffle, label("shuffle"), True, shuffle=source.shuffle, split=source.split, docs=this.docs,
                     held_out=this.held_out if source.shuffle.decontaminate.enabled else None)
    tokens = run(tokenize, label("tokenize"), True, tokenize=config.tokenize, tokenizer=tokenizer, docs=this.docs,
                 trust_remote_code=config.model.trust_remote_code, runtime=config.runtime)
    this.chunks = run(chunk, label("chunk"), True, chunk=config.chunk, tokens=tokens, split=this.split,
                      runtime=config.runtime)
    if this.held_out is None or not source.shuffle.decontaminate.enabled:
        # Not decontaminated: at least say when the general evaluation text is in it (forgetting measured on text
        # the model trained on).
        summary["warnings"] += contamination_warnings(config.evaluate.general_corpus, this.docs, run.root)
    return this


def mix_of(run: StageRunner, config: CptConfig, runs: list[SourceRun], shares: list[MixShare],
           label: str) -> StageOutput:
    """The training set of `runs` at `shares`: the replay mix for `corpus` + `replay` (its stage and key as they
    always were), else mix-sources."""
    if not config.sources and label == "mix" and len(runs) == 2:
        return run(mix, "mix", True, replay=config.replay, shuffle=config.shuffle, chunks=runs[0].chunks,
                   replay_chunks=runs[1].chunks)
    mixed = run(mix_sources, label, True, shares=shares, seed=config.shuffle.seed, chunks=[r.chunks for r in runs])
    mixed.show(run.root)  # a labelled call's artifacts are not shown by the runner: the share table is the point
    return mixed


def anneal_shares(config: CptConfig, runs: list[SourceRun]) -> tuple[list[SourceRun], list[MixShare]]:
    by_name = {r.source.name: r for r in runs}
    chosen = [(by_name[a.name], MixShare(name=a.name, weight=a.weight, epochs=a.epochs))
              for a in config.anneal.sources]
    return [r for r, _ in chosen], [s for _, s in chosen]


def source_stages(run: StageRunner, config: CptConfig, tokenizer: Fingerprint, digests: DigestMemo,
                  first_fingerprint: Fingerprint, summary: dict[str, Any], until: str | None,
                  drop_fingerprint: Fingerprint | None = None) -> SourcesData:
    """Every source's data stages and the mix (and the anneal branch's mix). `drop_fingerprint`: the corpus of
    the source a line's drops join (config.drop_source), as the line trains on it."""
    sources = config.data_sources()
    data = SourcesData([first_source(run, config, tokenizer, digests, SourceRun(sources[0], first_fingerprint))])
    data.train_chunks = data.first.chunks
    if len(sources) > 1 and (not run.stopped or until == "chunk"):
        for source in sources[1:]:
            given = drop_fingerprint if source.name == config.drop_source else None
            data.runs.append(other_source(run, config, tokenizer, digests, source, data.runs[-1], summary, given))
        data.train_chunks = mix_of(run, config, data.runs, [d.share for d in sources], "mix")
    if config.anneal.sources and (not run.stopped or until == "chunk") and data.first.chunks is not None:
        runs, shares = anneal_shares(config, data.runs)
        data.anneal_chunks = mix_of(run, config, runs, shares, "anneal-mix")
    return data


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

