"""Retrain a training line when its corpus changed. Scheduled (nightly) and event-triggered (a drop landed)
deployments both run this flow.

A line trains on the configured corpus plus every drop registered to it (tasks/line/lines.py). A drop
announced with `drop` (the on-drop deployment, `cpt retrain --drop PATH`) is noted as pending; once settled it
passes the drop gate (tasks/line/drop_gate.py) and is registered (active) or rejected with its reasons. Then the
line's corpus is fingerprinted by content and compared with the line's last successful training: unchanged,
nothing is trained.

A drop must lie inside one of `drops.roots`; a run an event started (`drop_source: event`, which the on-drop
deployment sets, or any run an automation created) refuses its drop while that list is empty, since an event
payload is untrusted input. `cpt retrain --drop PATH` typed at a shell accepts any folder then.

A drop still being written is not trained on: it stays pending and is left out of the run, which trains on
everything else; a later run, nightly or the next announcement, picks it up (or rejects it after
`drops.max_pending_hours`). Files named `.*`, `*.part`, `*.tmp` are never read, so a producer can write to a
temp name and rename. A drop is trained exactly as the gate read it (its recorded identity: real path, files and
digests; tasks/line/sources.py), each file read once, no symlink followed, checked against its digest as it is
read (tasks/data/opening.py): a drop that changed is gated again before anything of it is trained. A drop can
fail, its line cannot: any error gating a drop rejects that drop (tasks/line/drop_gate.py); only the line's own
configured corpus can fail a run.

After each run, garbage collection keeps the root within `retention` (tasks/line/retention.py), unless
`retention.after_retrain` is off; a failure to collect is logged, never fails the run.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.context import FlowRunContext
from prefect.runtime import flow_run

from flows.continued_pretraining import continued_pretraining
from tasks.core.config.tree import CptConfig, load_config
from tasks.core.manifest import DigestMemo
from tasks.core.report import markdown_artifact, markdown_table, run_logger, table_artifact
from tasks.core.root import open_root
from tasks.core.scope import build_scope
from tasks.core.heap import freeze_long_lived
from tasks.line.drop_gate import gate_drops, near_duplicate_pairs, unsettled_files
from tasks.line.sources import line_sources, other_sources, sources_changed
from tasks.line import lines
from tasks.line.preflight import check_before_compute, describe_failure


def show_gate(gated: list[tuple[lines.Drop, dict[str, Any]]]) -> None:
    def verdict(d: lines.Drop, p: dict[str, Any]) -> str:
        if p.get("not_recorded"):
            return f"not recorded: {d.status} meanwhile"
        return "passed" if p["passed"] else "rejected"

    rows = [{"drop": d.path, "verdict": verdict(d, p),
             **{k: p.get(k) for k in ("files", "records", "documents", "rejected", "too_short", "duplicates_in_line",
                                      "near_duplicates", "validation_matches", "median_tokens", "line_median_tokens")},
             "skipped": f"{p.get('skipped', 0)}" + (f": {'; '.join(p['skipped_files'])}" if p.get("skipped") else ""),
             "reasons": "; ".join(p["reasons"]),
             "rejects": "; ".join(p.get("reject_examples") or [])} for d, p in gated]
    pairs = "".join(near_duplicate_pairs(d.path, p) for d, p in gated)
    markdown_artifact(f"# Drop gate\n\n{markdown_table(rows)}\n{pairs}", "drop-gate",
                      "Profile of each drop checked in this run, and the verdict")


def show_drops(state: lines.LineState) -> None:
    rows = [{k: d.listing()[k] for k in ("path", "status", "files", "documents", "tokens", "registered_at")}
            | {"fingerprint": d.fingerprint[:12], "reason": d.reason, "outcome": d.outcome} for d in state.drops]
    if rows:
        table_artifact(rows, "line-drops", f"Drops of training line {state.line!r}")
    else:
        markdown_artifact(f"# Line {state.line}\n\nNo drops registered.\n", "line-drops",
                          f"Drops of training line {state.line!r}")


def announced_by(drop_source: str) -> lines.DropSource:
    """Who announced this run's drop: `event` when the run says so (`drop_source`) or when an automation (an
    event trigger: the on-drop deployment, `cpt serve`) created the run, whatever its parameters; else `shell`."""
    if drop_source == "event":
        return "event"
    ctx = FlowRunContext.get()
    created_by = getattr(getattr(ctx, "flow_run", None), "created_by", None)
    return "event" if created_by is not None and str(created_by.type).upper() == "AUTOMATION" else "shell"


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
    drop_source: Literal["shell", "event"] = "shell",
) -> dict[str, Any]:
    """Train line `line` — `config` (or the YAML at `config_file` + `overrides`) plus its registered drops — if
    its corpus changed since the line's last successful training. `drop` announces a landed drop folder;
    `drop_source` says who announced it: `event` (untrusted: refused outside `drops.roots`, and while that list is
    empty) or `shell` (`cpt retrain --drop`). A run an automation created counts as `event` either way."""
    freeze_long_lived()  # once per process: full collections mid-stage skip the imports (tasks/core/heap.py)
    log = run_logger()
    if config is None:
        if not config_file:
            raise ValueError("give config or config_file")
        config = load_config(config_file, overrides or [])
    root = open_root(artifacts)
    # What would fail after training (another lineage's release, a stuck run holding the line, no Hub token)
    # fails now, before the gate reads a drop (tasks/line/preflight.py).
    check_before_compute(config, root, line)
    # One run per line at a time, whichever deployment, schedule, event or shell started it, on any host: the
    # second waits, then finds its work done (the corpus unchanged) or does it.
    with root.exclusive(lines.run_lock(line), f"line {line!r} is being retrained by another run; waiting"):
        result = _retrain(config, drop, line, settle_seconds, force, root, drop_source, log)
    if config.retention.after_retrain:
        result["gc"] = collect_garbage(root, config, log)
    return result


def collect_garbage(root, config: CptConfig, log) -> dict[str, Any]:
    """GC after a run: its report, or the error that stopped it (logged; the run it follows has succeeded)."""
    from tasks.line.retention import collect

    try:
        return collect(root, config.retention, log=log)
    except Exception as e:  # a collection is retried by the next run and the scheduled cache-gc deployment
        log.warning("gc: garbage collection after the run failed (%s: %s); the next run tries again",
                    type(e).__name__, e)
        return {"error": f"{type(e).__name__}: {e}"}


def _retrain(config: CptConfig, drop: str | None, line: str, settle_seconds: float, force: bool, root,
             drop_source: str, log) -> dict[str, Any]:
    digests = DigestMemo(root)

    gate_seconds = 0.0

    def result(trained: bool, reason: str, **extra) -> dict[str, Any]:
        state = lines.read_line(root, line)
        show_drops(state)
        return {"trained": trained, "reason": reason, "line": line, "flow_run": flow_run.name,
                "drops": [d.listing() for d in state.drops], "gate_seconds": gate_seconds, **extra}

    def skipped(reason: str, msg: str, **extra) -> dict[str, Any]:
        log.info("retrain: %s", msg)
        markdown_artifact(f"# Retrain skipped: {reason}\n\n{msg}\n", "retrain-decision", "Why this run did not train")
        return result(False, reason, pipeline=None, **extra)

    # One scope for the gate and the pipeline: a drop's files are read once in this run, and the pipeline's
    # counts (files_read, files_tokenized, files_chunked) include what the gate read for it.
    with build_scope(str(flow_run.id)):
        if drop:
            source = announced_by(drop_source)
            try:
                path = Path(drop).resolve()
            except (ValueError, OSError) as e:  # not a path at all (a NUL byte, too long): nothing to record
                return skipped("drop-rejected", f"drop {drop!r} refused: {e}", rejected=[drop])
            entry = lines.announce(root, line, path, source)
            log.info("retrain: drop %s announced to line %r by %s (%s)", entry.path, line,
                     "an event" if source == "event" else "a shell", entry.status)
        started = time.perf_counter()
        gate = gate_drops(config, root, line, settle_seconds, digests, log)
        gate_seconds = round(time.perf_counter() - started, 3)
        if gate["gated"]:
            show_gate(gate["gated"])
        left_out = gate["left_out"]
        if left_out:
            log.info("retrain: left out of this run (still being written, or not gated now): %s",
                     ", ".join([*gate["unsettled"][:5], *left_out[:5]]))
        rejected = gate["rejected"]
        if rejected:  # left out like every inactive drop: the line trains on whatever else changed
            log.warning("retrain: rejected by the drop gate, not trained on: %s", "; ".join(
                f"{d.path}: {d.reason}" for d, p in gate["gated"] if d.path in rejected))

        state = lines.read_line(root, line)
        # What the line trains on: the configured corpus as listed now, its drops exactly as the gate read them,
        # less those left out of this run (the pipeline flow takes the same `left_out`).
        fingerprint, configured = line_sources(config, state, digests.digest, without=left_out)
        files = fingerprint.items
        others = other_sources(config, digests.digest)  # a change to a source drops do not join retrains too
        moved = sources_changed(state.last_training, others)
        busy = unsettled_files(configured, settle_seconds)
        if busy:
            return skipped("unsettled", f"corpus still being written, not training now: {', '.join(busy[:5])}",
                           files=busy)
        digests.save()
        last = state.last_training
        if moved:
            log.info("retrain: line %r: source %s changed since the last training", line, ", ".join(moved))
            last = None  # changed: trained whatever the drops say
        if last and last["corpus"] == fingerprint.digest and not force and rejected:
            reasons = "; ".join(f"{d.path}: {d.reason}" for d, p in gate["gated"] if d.path in rejected)
            return skipped("drop-rejected", f"drop rejected by the gate, nothing else changed: {reasons}",
                           rejected=rejected, fingerprint=fingerprint.digest)
        if last and last["corpus"] == fingerprint.digest and not force and left_out:
            return skipped("unsettled", f"drop still being written, left out; nothing else changed: "
                                        f"{', '.join(gate['unsettled'][:5])}", files=gate["unsettled"],
                           left_out=left_out)
        if last and last["corpus"] == fingerprint.digest and not force:
            return skipped("unchanged", f"line {line!r} unchanged since its last successful training "
                                        f"({last['flow_run']}, fingerprint {fingerprint.digest[:12]}, "
                                        f"{len(files)} files, {len(state.active_paths())} drops): nothing to train",
                           fingerprint=fingerprint.digest)

        log.info("retrain: line %r: corpus fingerprint %s (%d files, %d drops) differs from the last training "
                 "(%s); running the pipeline", line, fingerprint.digest[:12], len(files), len(state.active_paths()),
                 last["corpus"][:12] if last else f"other sources changed: {', '.join(moved)}" if moved else "none")
        try:
            summary = continued_pretraining(config=config, artifacts=root.spec, line=line, left_out=left_out)
        except Exception as e:
            failed_pipeline(e, root, line, [p for p in state.active_paths() if p not in left_out], result)
            raise
    gate = summary.get("gate") or {}
    trained_drops = [p for p in state.active_paths() if p not in left_out]
    lines.record_outcome(root, line, trained_drops, f"run {summary['flow_run']}: " + (
        "trained, released" if gate.get("promoted", True) else f"trained, not promoted: {gate.get('reason', '')}"))
    lines.record_training(root, line, {
        "corpus": fingerprint.digest, "sources": others, "files": len(files), "drops": trained_drops,
        "flow_run": flow_run.name, "pipeline_run": summary["flow_run"], "finished_at": lines.now_iso(),
        "promoted": gate.get("promoted", True), "gate_reason": gate.get("reason", "")})
    verdict = ("promoted by the gate" if gate.get("promoted", True) else
               f"**not promoted**: {gate.get('reason', '')}") if gate else "pushed (gate disabled)"
    markdown_artifact(f"# Retrained line {line}\n\nCorpus fingerprint `{fingerprint.digest}` ({len(files)} files, "
                      f"{len(state.active_paths())} drops); pipeline run `{summary['flow_run']}`; {verdict}.\n",
                      "retrain-decision", "What this run trained on, and whether its model was promoted")
    return result(True, "changed", fingerprint=fingerprint.digest, pipeline=summary,
                  promoted=gate.get("promoted", True), gate_reason=gate.get("reason", ""), left_out=left_out,
                  rejected=rejected)


def failed_pipeline(error: BaseException, root, line: str, drops: list[str], result) -> None:
    """The pipeline failed: the line's drops say what became of their training (trained but not released, or not
    trained), the run shows the line's drops and its decision, and the error carries the retrain result
    (`cpt retrain --summary` writes it)."""
    summary = getattr(error, "cpt_summary", None)
    failure = describe_failure(summary, error)
    run = (summary or {}).get("flow_run", "?")
    lines.record_outcome(root, line, drops, f"run {run}: {failure['outcome']}")
    markdown_artifact(f"# Retrain failed\n\nPipeline run `{run}`: {failure['outcome']}\n", "retrain-decision",
                      "What this run trained on, and why its model was not released")
    with contextlib.suppress(AttributeError):
        error.cpt_result = result(failure.pop("trained"), "failed", pipeline=summary, **failure)


def write_result(result: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
