"""Promotions: which model a lineage (a training line, or a push.name) last let through the gate, and where its
weights are, so the next run can continue from it (train.init: last_promoted) and be compared with it.

State: `<artifacts>/state/promotions/<lineage>.json` = {"lineage", "last", "history"}, every change a locked
read-modify-write renamed into place (a killed run leaves the old or the new file). A record names the model by
the digest of its files, so it is found again in the train stage's cache entry or in the release folder, and
only if the bytes there are still the promoted ones.

No Prefect, torch or transformers here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.cache import Fingerprint, combine_digests, fetch_state, hash_file, local_entry, locked_state, verified_manifest

CARD = "README.md"


class Promotion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_digest: str
    model_path: str  # the train entry's model dir, relative to the artifacts root
    release: str = ""  # the release folder it was copied to
    train_identity: str  # what it was trained on and how, leaving out the weights it started from
    parent: dict[str, Any]  # {kind: base|promoted, id, digest, flow_run}
    reference: dict[str, Any]  # what the gate compared it with: {kind, digest, location, id}
    validation_perplexity: float | None = None
    general_perplexity: float | None = None
    reason: str = ""
    flow_run: str = ""
    at: str = ""
    hub: dict[str, Any] | None = None


class Promotions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lineage: str
    last: Promotion | None = None
    history: list[Promotion] = []


def lineage_of(line: str | None, push_name: str | None) -> str | None:
    """A retraining line's lineage, else push.name's; None when neither names one (nothing to continue)."""
    if line:
        return f"line-{line}"
    if push_name:
        return f"name-{push_name}"
    return None


def state_file(root: str | Path, lineage: str) -> Path:
    if "/" in lineage or lineage.startswith("."):
        raise ValueError(f"{lineage!r} is not a valid lineage name")
    return Path(root) / "state" / "promotions" / f"{lineage}.json"


def read_promotions(root: str | Path, lineage: str | None, fetch: bool = True) -> Promotions | None:
    if lineage is None:
        return None
    path = state_file(root, lineage)
    if fetch:  # an object-store root: the store's copy is the state (another host may have changed it)
        fetch_state(root, path)
    try:
        return Promotions.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Promotions(lineage=lineage)
    except ValueError as e:
        raise ValueError(f"{path}: not a valid promotions file ({e}); fix or remove it") from None


def updating(root: str | Path, lineage: str):
    return locked_state(state_file(root, lineage), lambda: read_promotions(root, lineage, fetch=False),
                        root=Path(root))


def record_promotion(root: str | Path, lineage: str, record: Promotion) -> None:
    """Make `record` the lineage's last promotion (a repeat of the current last one is not added again)."""
    with updating(root, lineage) as state:
        if state.last is not None and state.last.model_digest == record.model_digest and \
                state.last.train_identity == record.train_identity:
            state.last = state.last.model_copy(update={"release": record.release, "hub": record.hub or state.last.hub})
            state.history[-1] = state.last
            return
        state.last = record
        state.history.append(record)


# ----------------------------------------------------------------------------------------- model files


def model_files(directory: Path) -> list[Path]:
    """A model folder's files, less the card (a release adds one) and hidden files."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.relative_to(directory).as_posix() != CARD)


def model_digest(directory: str | Path, digest=hash_file) -> str:
    directory = Path(directory)
    return combine_digests([(p.relative_to(directory).as_posix(), digest(p)) for p in model_files(directory)])


def find_model(root: Path, record: Promotion, digest=hash_file) -> Path | None:
    """The promoted model's folder: the train entry if it is intact, else the release folder, each only if its
    files are still the promoted bytes."""
    train_dir = local_entry(root, Path(record.model_path).parent.as_posix()) / Path(record.model_path).name
    if verified_manifest(train_dir.parent, root) is not None and model_digest(train_dir, digest) == record.model_digest:
        return train_dir
    if record.release:
        release = Path(record.release)
        if release.is_dir() and model_digest(release, digest) == record.model_digest:
            return release
    return None


def promoted_fingerprint(root: Path, record: Promotion, digest=hash_file) -> Fingerprint | None:
    where = find_model(root, record, digest)
    if where is None:
        return None
    return Fingerprint(kind="model", digest=record.model_digest, location=str(where))


def without_location(desc: dict[str, Any]) -> dict[str, Any]:
    """A model description as records and cards keep it: where it sits now is not part of what it is."""
    return {k: v for k, v in desc.items() if k != "location"}


def promotion_record(trained, pushed, decision, identity: str, parent: dict[str, Any], reference: dict[str, Any],
                     flow_run: str) -> Promotion:
    """The record of a model the gate let through and push released (train, push and gate outputs)."""
    c, hub = decision.counts, pushed.counts
    return Promotion(
        model_digest=trained.model_digest, model_path=trained.model_dir("").as_posix(), release=hub["local_path"],
        train_identity=identity, parent=without_location(parent), reference=without_location(reference),
        validation_perplexity=c["validation_perplexity"], general_perplexity=c["general_perplexity"],
        reason=c["reason"], flow_run=flow_run, at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        hub={"url": hub["hub_url"], "commit": hub.get("hub_commit")} if hub.get("hub_url") else None,
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
                  root: Path, digest=hash_file) -> tuple[Fingerprint, dict[str, Any], str]:
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
    fp = promoted_fingerprint(root, record, digest)
    if fp is None:
        raise LostPromotedModel(
            f"train.init: last_promoted: the promoted model {record.model_digest} of {promos.lineage} (run "
            f"{record.flow_run}) is gone: neither {root / record.model_path} nor the release folder "
            f"{record.release or '(none)'} holds its files. Set train.init: base to start over from the base "
            f"model, or restore the release folder")
    return fp, describe("promoted", fp, model_id, record), f"{why} ({record.model_digest[:16]}, run {record.flow_run})"


def choose_reference(promos: Promotions | None, trained_digest: str, root: Path,
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
    fp = promoted_fingerprint(root, record, digest)
    if fp is None:
        return None, None, (f"the last promoted model {record.model_digest[:16]} (run {record.flow_run}) is gone "
                            "from the cache and the release folder: comparing with the base model")
    return fp, record, note
