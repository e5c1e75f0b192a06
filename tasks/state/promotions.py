"""Promotions: which model a lineage (a training line, or a push.name) last let through the gate, and where its
weights are, so the next run can continue from it (train.init: last_promoted) and be compared with it. What is
decided from them (the parent, the reference, the record of a new promotion) is tasks/lineage.py.

State: `<artifacts>/state/promotions/<lineage>.json` = {"lineage", "last", "history"}, every change a locked
read-modify-write renamed into place (a killed run leaves the old or the new file). A record names the model by
the digest of its files, so it is found again in the train stage's cache entry or in the release folder, and
only if the bytes there are still the promoted ones.

No Prefect, torch or transformers here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.core.root import ArtifactsRoot


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


def state_file(lineage: str) -> str:
    """The lineage's state file, relative to the root."""
    if "/" in lineage or lineage.startswith("."):
        raise ValueError(f"{lineage!r} is not a valid lineage name")
    return f"state/promotions/{lineage}.json"


def read_promotions(root: ArtifactsRoot, lineage: str | None, fetch: bool = True) -> Promotions | None:
    if lineage is None:
        return None
    rel = state_file(lineage)
    # The root's copy is the state (on an object-store root another host may have changed it).
    path = root.fetch_state(rel) if fetch else root.path(rel)
    try:
        return Promotions.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Promotions(lineage=lineage)
    except ValueError as e:
        raise ValueError(f"{path}: not a valid promotions file ({e}); fix or remove it") from None


def updating(root: ArtifactsRoot, lineage: str):
    """Lock the lineage's state, yield it, write it back atomically when the block ends without error."""
    return root.locked_state(state_file(lineage), lambda: read_promotions(root, lineage, fetch=False))


def record_promotion(root: ArtifactsRoot, lineage: str, record: Promotion) -> None:
    """Make `record` the lineage's last promotion (a repeat of the current last one is not added again)."""
    with updating(root, lineage) as state:
        if state.last is not None and state.last.model_digest == record.model_digest and \
                state.last.train_identity == record.train_identity:
            state.last = state.last.model_copy(update={"release": record.release, "hub": record.hub or state.last.hub})
            state.history[-1] = state.last
            return
        state.last = record
        state.history.append(record)
