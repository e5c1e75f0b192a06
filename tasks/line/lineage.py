"""Lineage: where a run's weights come from, what the gate compares them with, and what is recorded when they
are released. The flow asks `RunLineage` at three points (before training, before the gate, after push) and
decides nothing itself.

- The parent (`train.init: last_promoted`): the lineage's last promoted model, found by the digest of its
  files in the train entry or the release folder, unless that model came from this very training (then its
  own parent, so a rerun is Cached instead of stacking the training on itself).
- The reference: the last promoted model, or the base model when there is none; a rerun of the promoted model
  keeps the reference it was promoted against, so its decision and push stay Cached.
- The card's lineage: base, parent, corpus and drops, replay, the perplexities compared, the gate's verdict.
- After push: the release folder re-made if it was lost or altered, and the promotion recorded.

No Prefect, torch or transformers here.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core.config.tree import CptConfig
from tasks.core.keys import stage_key
from tasks.core.manifest import Fingerprint, StageOutput, hash_file, verified_manifest
from tasks.core.report import run_logger
from tasks.core.root import ArtifactsRoot, EntryUnavailable
from tasks.ml.modeling import model_digest, without_location
from tasks.push import ensure_release
from tasks.line import lines
from tasks.line.kept import kept_rel
from tasks.line.promotions import (Promotion, Promotions, apply_promotion, claim_releases, lineage_of,
                                    read_promotions, recent_models, record_promotion, release_targets, updating)

if TYPE_CHECKING:  # the manifests it reads; their stages are not imported to run
    from tasks.gate import Decision
    from tasks.push import Release
    from tasks.train import Trained


def find_model(root: ArtifactsRoot, record: Promotion, digest=hash_file, lineage: str | None = None) -> Path | None:
    """The promoted model's folder, each place only if its files are still the promoted bytes: the lineage's
    kept copy (tasks/line/kept.py: outside the cache, fetched from the store on a host that lacks it), else the
    train entry (and then it is kept now: a record made before models were kept), else the release folder."""
    from tasks.core.root import EntryUnavailable
    from tasks.line.kept import keep, kept_model

    if lineage:
        kept = kept_model(root, lineage, record.model_digest, digest)
        if kept is not None:
            return kept
    entry, name = record.model_path.rsplit("/", 1)
    try:
        train_dir = root.entry(entry) / name
    except (EntryUnavailable, OSError):
        train_dir = None
    if train_dir is not None and verified_manifest(train_dir.parent, root.local) is not None and \
            model_digest(train_dir, digest) == record.model_digest:
        return keep(root, lineage, train_dir, record.model_digest, digest) if lineage else train_dir
    if record.release:
        release = root.path(record.release)  # the release's name, resolved on this host
        if release.is_dir() and model_digest(release, digest) == record.model_digest:
            return release
    return None


def promoted_fingerprint(root: ArtifactsRoot, record: Promotion, digest=hash_file,
                         lineage: str | None = None) -> Fingerprint | None:
    where = find_model(root, record, digest, lineage)
    if where is None:
        return None
    return Fingerprint(kind="model", digest=record.model_digest, location=str(where))


def promotion_record(trained, pushed, decision, identity: str, parent: dict[str, Any], reference: dict[str, Any],
                     flow_run: str, stable: dict[str, str] | None = None) -> Promotion:
    """The record of a model the gate let through and push released (train — or anneal —, push and gate outputs);
    `stable`: the stable model a stable line's release was annealed from ({digest, model_path})."""
    c, hub = decision.counts, pushed.counts
    return Promotion(
        model_digest=trained.model_digest, model_path=trained.model_rel, release=hub["release"],
        train_identity=identity, parent=without_location(parent), reference=without_location(reference),
        validation_perplexity=c["validation_perplexity"], general_perplexity=c["general_perplexity"],
        reason=c["reason"], flow_run=flow_run, at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        hub={"url": hub["hub_url"], "commit": hub.get("hub_commit"), "repo": hub.get("hub_repo"),
             "revision": hub.get("hub_revision")} if hub.get("hub_url") else None,
        stable=stable,
    )


def describe(kind: str, fingerprint: Fingerprint, model_id: str, record: Promotion | None = None) -> dict[str, Any]:
    """A parent or reference model as the summary, the card and the next promotion record name it."""
    return {"kind": kind, "id": model_id, "digest": fingerprint.digest, "location": fingerprint.location,
            "flow_run": record.flow_run if record else ""}


# ------------------------------------------------------------------------------- parent and reference


class LostPromotedModel(RuntimeError):
    """train.init: last_promoted, and the last promoted model's files are nowhere to be found."""


def _record_with_digest(promos: Promotions, digest: str) -> Promotion | None:
    return next((r for r in reversed(promos.history) if r.model_digest == digest), None)


def choose_parent(init: str, promos: Promotions | None, base: Fingerprint, model_id: str, identity: str,
                  root: ArtifactsRoot, digest=hash_file) -> tuple[Fingerprint, dict[str, Any], str]:
    """The model training starts from, its description, and a sentence for the log.

    With `last_promoted`: the lineage's last promoted model — unless that model came from this very training
    (same data and settings, `identity`): then its own parent, so a rerun reuses the training instead of
    stacking it on itself (and is Cached)."""
    base_desc = describe("base", base, model_id)
    if init == "base":
        return base, base_desc, "starting from the base model (train.init: base)"
    if promos is None:
        return base, base_desc, ("train.init is last_promoted but this run has no lineage (give push.name, or run "
                                 "a line with cpt retrain --line): starting from the base model")
    last = promos.last
    if last is None:
        return base, base_desc, f"no promoted model in {promos.lineage} yet: starting from the base model"
    record, why = last, "continuing from the last promoted model"
    if last.train_identity == identity:
        if last.parent.get("kind") == "base":
            return base, base_desc, ("the last promoted model came from this same training: starting from its "
                                     "parent, the base model (the training is reused)")
        record = _record_with_digest(promos, last.parent["digest"])
        why = "the last promoted model came from this same training: starting from its parent"
        if record is None:
            raise LostPromotedModel(f"{promos.lineage}: the parent {last.parent['digest']} of the last promoted "
                                    "model has no promotion record")
    fp = promoted_fingerprint(root, record, digest, promos.lineage)
    if fp is None:
        raise LostPromotedModel(
            f"train.init: last_promoted: the promoted model {record.model_digest} of {promos.lineage} (run "
            f"{record.flow_run}) is gone: neither its kept copy "
            f"({root.location(kept_rel(promos.lineage, record.model_digest))}), the train entry "
            f"{root.location(record.model_path.rsplit('/', 1)[0])} nor the release folder "
            f"{record.release or '(none)'} holds its files. Set train.init: base to start over from the base "
            f"model, or restore the release folder")
    return fp, describe("promoted", fp, model_id, record), f"{why} ({record.model_digest[:16]}, run {record.flow_run})"


def stable_fingerprint(root: ArtifactsRoot, record: Promotion, digest=hash_file) -> Fingerprint | None:
    """A promotion's stable model (never released: it lives in its train entry), if its files are still those."""
    entry, name = record.stable["model_path"].rsplit("/", 1)
    folder = root.entry(entry) / name
    if verified_manifest(folder.parent, root.local) is None or model_digest(folder, digest) != record.stable["digest"]:
        return None
    return Fingerprint(kind="model", digest=record.stable["digest"], location=str(folder))


def _record_with_stable(promos: Promotions, digest: str) -> Promotion | None:
    return next((r for r in reversed(promos.history) if r.stable and r.stable["digest"] == digest), None)


def choose_stable_parent(promos: Promotions | None, base: Fingerprint, model_id: str, identity: str,
                         root: ArtifactsRoot, digest=hash_file) -> tuple[Fingerprint, dict[str, Any], str]:
    """train.schedule stable_anneal: the line's last stable model — the stable model of its last promoted run,
    never its annealed release — its description (kind `stable`; `base` or `promoted` for a line's first stable run,
    which warms up) and a sentence for the log. A rerun of the last promoted training (same `identity`) starts from
    what that one started from, so it is Cached."""
    base_desc = describe("base", base, model_id)
    if promos is None:
        return base, base_desc, ("train.schedule is stable_anneal but this run has no lineage (give push.name, or run "
                                 "a line with cpt retrain --line): the stable phase starts from the base model")
    last = promos.last
    if last is None:
        return base, base_desc, f"no promoted model in {promos.lineage} yet: the stable line starts from the base model"
    if last.train_identity == identity:
        parent, why = last.parent, "the last promoted release came from this same training: starting from its parent"
        if parent.get("kind") == "base":
            return base, base_desc, f"{why}, the base model (the training is reused)"
        if parent.get("kind") == "stable":
            record = _record_with_stable(promos, parent["digest"])
            found = record and stable_fingerprint(root, record, digest)
            kind = "stable"
        else:
            record = _record_with_digest(promos, parent["digest"])
            found = record and promoted_fingerprint(root, record, digest, promos.lineage)
            kind = "promoted"
    elif last.stable:
        record, kind, why = last, "stable", "continuing the line's stable model"
        found = stable_fingerprint(root, last, digest)
    else:  # the line's last release was a standard run's (decayed): the stable line starts here, warming up
        record, kind, why = last, "promoted", "the line has no stable model yet: starting from the last promoted model"
        found = promoted_fingerprint(root, last, digest, promos.lineage)
    if not found:
        what = parent["digest"] if last.train_identity == identity else (
            last.stable["digest"] if kind == "stable" else last.model_digest)
        raise LostPromotedModel(
            f"train.schedule stable_anneal: the {kind} model {what} of {promos.lineage} is gone (its train entry was "
            f"removed or altered; a stable model is never released, so there is no other copy). Set train.init: base "
            f"to start the line over from the base model")
    return found, describe(kind, found, model_id, record), f"{why} ({found.digest[:16]}, run {record.flow_run})"


def stable_chain(promos: Promotions | None, parent: dict[str, Any], root: ArtifactsRoot, count: int,
                 digest=hash_file) -> list[Fingerprint]:
    """The line's stable models this run's stable phase descends from, newest first: its parent, that one's
    parent, ... (`count` at most; stopping at one whose files are gone): what anneal: average averages with this
    run's own. Followed through the records' parents, so a rerun finds the same ones."""
    out: list[Fingerprint] = []
    while promos is not None and parent.get("kind") == "stable" and len(out) < count:
        record = _record_with_stable(promos, parent["digest"])
        found = record and stable_fingerprint(root, record, digest)
        if not found:
            break
        out.append(found)
        parent = record.parent
    return out


def choose_reference(promos: Promotions | None, trained_digest: str, root: ArtifactsRoot,
                     digest=hash_file) -> tuple[Fingerprint | None, Promotion | None, str]:
    """The model the gate compares with: the last promoted one (None: the base model), its record, and a note.
    When this run's model is the last promoted one (a rerun), the reference it was promoted against stands, so
    the decision — and the push — stay Cached."""
    if promos is None or promos.last is None:
        return None, None, "no promoted model yet: the reference is the base model"
    record, note = promos.last, f"the reference is the last promoted model (run {promos.last.flow_run})"
    if record.model_digest == trained_digest:
        ref = record.reference
        if ref.get("kind") != "promoted":
            return None, None, "this model is the last promoted one; it was promoted against the base model"
        record = _record_with_digest(promos, ref["digest"])
        note = "this model is the last promoted one; the reference it was promoted against stands"
        if record is None:
            return None, None, "the reference of the last promotion has no record: comparing with the base model"
    fp = promoted_fingerprint(root, record, digest, promos.lineage)
    if fp is None:
        return None, None, (f"the last promoted model {record.model_digest[:16]} (run {record.flow_run}) is gone "
                            "from its kept copy, the cache and the release folder: comparing with the base model")
    return fp, record, note


# ------------------------------------------------------------------------------------------- a run


class RunLineage:
    """One run's lineage decisions, in the order the flow needs them. `line` is the retraining line the run
    belongs to (else `push.name` names the lineage; with neither there is nothing to continue or record)."""

    def __init__(self, root: ArtifactsRoot, config: CptConfig, line: str | None, digest=hash_file):
        self.root, self.config, self.line, self.digest = root, config, line, digest
        self.lineage = lineage_of(line, config.push.name, config.push.repo_id)
        self.promos: Promotions | None = None
        self.identity = ""
        self.base: Fingerprint | None = None
        self.parent: dict[str, Any] = {}
        self.reference: dict[str, Any] | None = None
        self.parent_note = ""  # where training starts from, in words (the flow logs it with train's outcome)
        self.stable: dict[str, str] | None = None  # stable_anneal: this run's stable model (note_stable)
        self._state: Promotions | None = None  # the promotion state, locked, while `promoting` is held
        # push.repo_id's head when the gate compared (the push's parent commit), and why it may not be pushed on.
        self.hub_parent: str | None = None
        self.hub_read = False
        self.hub_refusal: str | None = None

    def choose_parent(self, base_model: Fingerprint, train_chunks: StageOutput) -> tuple[Fingerprint, dict]:
        """The model training starts from and its description (for the train stage and the summary)."""
        c = self.config
        self.base = base_model
        self.promos = read_promotions(self.root, self.lineage)
        # What this training is, less the weights it starts from: how a rerun recognises its own result.
        self.identity = stage_key("train-identity", {"train": c.train, "model": c.model, "base": base_model,
                                                     "chunk": c.chunk, "chunks": train_chunks})
        if c.train.schedule == "stable_anneal":
            model, self.parent, self.parent_note = choose_stable_parent(self.promos, base_model, c.model.id,
                                                                        self.identity, self.root, self.digest)
        else:
            model, self.parent, self.parent_note = choose_parent(c.train.init, self.promos, base_model, c.model.id,
                                                                 self.identity, self.root, self.digest)
        return model, self.parent

    @property
    def warm_start(self) -> bool | None:
        """stable_anneal: whether the stable phase warms up (the line's first stable run: its parent is not a stable
        model); None for a standard run."""
        if self.config.train.schedule != "stable_anneal":
            return None
        return self.parent.get("kind") != "stable"

    def previous_stables(self) -> list[Fingerprint]:
        """anneal: average: the stable models before this run's, newest first."""
        return stable_chain(self.promos, self.parent, self.root, self.config.train.anneal_checkpoints - 1, self.digest)

    def note_stable(self, stable: Trained) -> None:
        """The stable model this run's release is annealed from: recorded with its promotion, named on the card."""
        self.stable = {"digest": stable.model_digest, "model_path": stable.model_rel}

    def read_hub_head(self) -> None:
        """Where push.repo_id stands as the gate compares (the parent of the commit a push makes). A head that is
        not the commit this lineage pushed last means someone else pushed there: the gate's reference is not
        what the Hub serves, so the push is refused, with that reason."""
        push = self.config.push
        if not push.repo_id or self.hub_read:
            return
        from tasks.push import hub_head

        self.hub_parent, self.hub_read = hub_head(push), True
        revision = push.revision or "main"
        last = self.promos.last if self.promos else None
        ours = last.hub if last is not None and last.hub and last.hub.get("repo") == push.repo_id \
            and last.hub.get("revision") == revision else None
        if ours and ours.get("commit") and self.hub_parent != ours["commit"]:
            self.hub_refusal = (f"{push.repo_id}@{revision} is at {str(self.hub_parent)[:12]}, not at "
                                f"{ours['commit'][:12]} that {self.lineage} pushed last (run {last.flow_run}): "
                                "someone else pushed there, and the gate did not compare with it: not pushed")

    def choose_reference(self, trained: Trained) -> Fingerprint | None:
        """The model the gate compares with; None: the base model (whose evaluation the run already has)."""
        self.read_hub_head()
        model, record, note = choose_reference(self.promos, trained.model_digest, self.root, self.digest)
        run_logger().info("gate: %s", note)
        self.reference = (describe("base", self.base, self.config.model.id) if model is None
                          else describe("promoted", model, self.config.model.id, record))
        return model

    @property
    def reference_kind(self) -> str:
        return self.reference["kind"]

    def card(self, sources: Fingerprint, replay: Fingerprint | None, train_chunks: StageOutput, trained: Trained,
             evaluation: StageOutput, base_eval: StageOutput, ref_eval: StageOutput | None,
             decision: Decision | None, fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
        """What the model card says about where the weights come from (no paths that move with the root).
        `trained`: the released model (anneal's with a stable line); `fingerprints`: every source's content."""
        c = self.config
        drops = ([{"path": d.path, "fingerprint": d.fingerprint} for d in lines.read_line(self.root, self.line).drops
                  if d.status == "active"] if self.line else [])
        e = evaluation.counts

        def ppl(out: StageOutput | None, name: str):
            return None if out is None else out.counts.get(f"{name}_perplexity")

        def task(out: StageOutput | None, name: str):
            return None if out is None else (out.counts.get("tasks") or {}).get(name)

        tasks = {name: {"base": task(base_eval, name), "reference": task(ref_eval, name), "new": value}
                 for name, value in (e.get("tasks") or {}).items()}

        def source_ppl(out: StageOutput | None, name: str):
            return None if out is None else (out.counts.get("sources") or {}).get(name)

        per_source = {name: {"base": source_ppl(base_eval, name), "reference": source_ppl(ref_eval, name),
                             "new": v.get("after")} for name, v in (e.get("sources") or {}).items()}
        shares = {t["source"]: {"share": t["share"], "asked": t["share_asked"], "trained_tokens": t["trained_tokens"]}
                  for t in getattr(train_chunks.meta, "sources", None) or []}
        stable = None
        if self.stable is not None:
            stable = {"digest": self.stable["digest"], "parent": without_location(self.parent),
                      "anneal": c.train.anneal, "averaged": trained.counts.get("averaged")}

        return {
            "model_digest": trained.model_digest,
            "base": {"id": c.model.id, "digest": self.base.digest},
            "parent": without_location(self.parent),
            "corpus": sources.digest,
            "drops": drops,
            "replay": {"fraction": c.replay.fraction, "paths": c.replay.paths,
                       "fingerprint": replay.digest if replay else None,
                       "share": train_chunks.counts.get("replay_share", 0.0)},
            "evaluation": {"validation_base": ppl(base_eval, "validation"),
                           "validation_reference": ppl(ref_eval, "validation"),
                           "validation_new": e.get("validation_perplexity_after"),
                           "general_base": ppl(base_eval, "general"), "general_reference": ppl(ref_eval, "general"),
                           "general_new": e.get("general_perplexity_after"),
                           **({"tasks": tasks, "task_examples": evaluation.counts.get("task_examples")}
                              if tasks else {}),
                           **({"sources": per_source} if per_source else {})},
            "gate": None if decision is None else {k: decision.counts[k] for k in ("promoted", "reason", "reference")},
            **({"sources": {name: {"fingerprint": digest, **shares.get(name, {})}
                            for name, digest in fingerprints.items()}} if c.sources and fingerprints else {}),
            **({"stable": stable} if stable else {}),
        }

    @contextlib.contextmanager
    def promoting(self, trained: Trained, decision: Decision | None):
        """Around push: the lineage's promotion state, locked (one writer across runs and hosts) and read again.
        Yields None when the promotion may go ahead, else why not: the last promoted model is no longer the one
        the gate compared this model with (another run promoted meanwhile), so it would be promoted blind. The
        release folder and Hub repo must belong to this lineage (ReleaseClaimed otherwise)."""
        targets = release_targets(self.config.push)
        if targets:
            claim_releases(self.root, self.lineage or "a run without lineage", targets)
        self.read_hub_head()  # the gate off: the head as it is now
        if self.hub_refusal:
            yield self.hub_refusal
            return
        if not self.lineage or decision is None:  # nothing to compare with (no lineage, or the gate is off)
            yield None
            return
        with updating(self.root, self.lineage) as state:
            expected = self.reference.get("digest") if self.reference and self.reference["kind"] == "promoted" else None
            current = state.last.model_digest if state.last else None
            if current not in (expected, trained.model_digest):
                yield (f"the last promoted model of {self.lineage} changed while this run trained (now "
                       f"{current[:16]}, run {state.last.flow_run}; the gate compared with "
                       f"{expected[:16] if expected else 'the base model'}): not promoted blind; the next run "
                       "gates against the current one")
                return
            self._state = state
            try:
                yield None
            finally:
                self._state = None

    def released(self, pushed: Release, trained: Trained, decision: Decision | None, flow_run: str) -> str | None:
        """After push, every run, cached or not: the release folder holds the pushed model (re-made if it was lost
        or altered: returns why), and the promotion is recorded (with a gate and a lineage), inside `promoting`
        when the flow holds it."""
        restored = ensure_release(pushed, trained, self.root, self.digest)
        if self.lineage and decision is not None:
            from tasks.line.kept import keep, prune

            # Kept first (outside the cache: what the lineage continues from and is gated against), then recorded.
            keep(self.root, self.lineage, trained.verified_model_dir(self.root), trained.model_digest, self.digest)
            record = promotion_record(trained, pushed, decision, self.identity, self.parent, self.reference, flow_run,
                                      self.stable)
            if self._state is not None:
                apply_promotion(self._state, record)
                history = self._state.history
            else:
                record_promotion(self.root, self.lineage, record)
                history = (read_promotions(self.root, self.lineage) or Promotions(lineage=self.lineage)).history
            # Kept: the lineage's last `retention.keep_releases` promoted models (retention keeps these releases
            # by their kept copy, not their train entry) and the models this record names.
            wanted = {record.model_digest, record.parent.get("digest"), record.reference.get("digest"),
                      *recent_models(history, self.config.retention.keep_releases)}
            prune(self.root, self.lineage, {d for d in wanted if d})
        return restored
