"""Promotions: which model a lineage (a training line, or a push.name) last let through the gate, and where its
weights are, so the next run can continue from it (train.init: last_promoted) and be compared with it. What is
decided from them (the parent, the reference, the record of a new promotion) is tasks/line/lineage.py.

State: `<artifacts>/state/promotions/<lineage>.json` = {"lineage", "last", "history"}, every change a locked
read-modify-write renamed into place (a killed run leaves the old or the new file). A record names the model by
the digest of its files, so it is found again in the train stage's cache entry or in the release folder, and
only if the bytes there are still the promoted ones.

No Prefect, torch or transformers here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from tasks.core.manifest import entry_rel, safe_relpath
from tasks.core.root import ArtifactsRoot


class Promotion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_digest: str
    model_path: str  # the train entry's model dir, relative to the artifacts root
    release: str = ""  # the release folder it was copied to, relative to the root (models/<name>)
    train_identity: str  # what it was trained on and how, leaving out the weights it started from
    parent: dict[str, Any]  # {kind: base|promoted, id, digest, flow_run}
    reference: dict[str, Any]  # what the gate compared it with: {kind, digest, location, id}
    validation_perplexity: float | None = None
    general_perplexity: float | None = None
    reason: str = ""
    flow_run: str = ""
    at: str = ""
    hub: dict[str, Any] | None = None
    # train.schedule stable_anneal: the stable model this release was annealed from, the line's next parent
    # ({digest, model_path}: the train entry's model dir, relative to the root); never released.
    stable: dict[str, str] | None = None

    @field_validator("stable")
    @classmethod
    def _stable_inside(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None:
            if set(v) != {"digest", "model_path"}:
                raise ValueError("stable: {digest, model_path} expected")
            safe_relpath(v["model_path"])
        return v

    # A promotions file may come from a store others write to: the names in it stay inside the root.
    @field_validator("model_path")
    @classmethod
    def _model_inside(cls, v: str) -> str:
        entry, sep, name = v.rpartition("/")
        # train's model, or anneal's (a stable line's release, train.schedule: stable_anneal)
        if not sep or name != "model" or not entry.startswith(("cache/train/", "cache/anneal/")):
            raise ValueError(f"{v!r} is not a train or anneal entry's model folder (cache/train/<key>/model)")
        entry_rel(entry)
        return v

    @field_validator("release")
    @classmethod
    def _release_inside(cls, v: str) -> str:
        if v.startswith("/"):  # written by an earlier version as this host's absolute path: its name is kept
            parts = v.rstrip("/").split("/")
            return f"models/{parts[-1]}" if len(parts) > 1 and parts[-2] == "models" else ""
        return safe_relpath(v) if v else v


class Promotions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lineage: str
    last: Promotion | None = None
    history: list[Promotion] = []


def lineage_of(line: str | None, push_name: str | None, repo_id: str | None = None) -> str | None:
    """A retraining line's lineage, else push.name's, else push.repo_id's (a Hub repo is a lineage of its own:
    what replaces its head is compared with what is there); None when none names one (nothing to continue)."""
    if line:
        return f"line-{line}"
    if push_name:
        return f"name-{push_name}"
    if repo_id:
        return "hub-" + repo_id.replace("/", "--")
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


def recent_models(history: list[Promotion], count: int) -> list[str]:
    """The digests of the last `count` distinct models promoted in `history`, newest first."""
    seen: list[str] = []
    for record in reversed(history):
        if record.model_digest not in seen:
            seen.append(record.model_digest)
            if len(seen) == count:
                break
    return seen


def record_promotion(root: ArtifactsRoot, lineage: str, record: Promotion) -> None:
    """Make `record` the lineage's last promotion (a repeat of the current last one is not added again)."""
    with updating(root, lineage) as state:
        apply_promotion(state, record)


def apply_promotion(state: Promotions, record: Promotion) -> None:
    """`record` as the last promotion of `state` (held under its lock by the caller)."""
    if state.last is not None and state.last.model_digest == record.model_digest and \
            state.last.train_identity == record.train_identity:
        state.last = state.last.model_copy(update={"release": record.release, "hub": record.hub or state.last.hub})
        state.history[-1] = state.last
        return
    state.last = record
    state.history.append(record)


# ------------------------------------------------------------------------------------- release owners


class ReleaseClaimed(ValueError):
    """A release folder or Hub repo another lineage already writes."""


class Releases(BaseModel):
    """Which lineage writes each release folder (`models/<name>`) and Hub repo (`hub:<repo_id>`)."""

    model_config = ConfigDict(extra="forbid")
    owners: dict[str, str] = {}


RELEASES = "state/releases.json"


def release_targets(push) -> list[str]:
    """What a push writes (push.name's folder, push.repo_id's Hub repo), as `claim_releases` names them."""
    return ([f"models/{push.name}"] if push.name else []) + ([f"hub:{push.repo_id}"] if push.repo_id else [])


def release_owners(root: ArtifactsRoot) -> dict[str, str]:
    """Which lineage writes each release, read without the lock (a check before a run: the claim itself is
    made under it, around push)."""
    try:
        return Releases.model_validate_json(root.fetch_state(RELEASES).read_text(encoding="utf-8")).owners
    except FileNotFoundError:
        return {}


def claim_releases(root: ArtifactsRoot, owner: str, targets: list[str]) -> None:
    """Make `owner` (a lineage) the writer of `targets`, or raise ReleaseClaimed when another lineage is: two
    lineages writing one folder or repo would overwrite each other's model with one never compared to it."""

    def read() -> Releases:
        try:
            return Releases.model_validate_json(root.path(RELEASES).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return Releases()

    with root.locked_state(RELEASES, read) as state:
        taken = {t: state.owners[t] for t in targets if state.owners.get(t, owner) != owner}
        if taken:
            where = ", ".join(f"{t} (written by {o})" for t, o in taken.items())
            raise ReleaseClaimed(f"{owner} would write {where}: give it its own push.name / push.repo_id")
        state.owners.update({t: owner for t in targets})
