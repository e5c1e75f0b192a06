"""Retention: what garbage collection of an artifacts root keeps, what it deletes and why (docs/retention.md).

Kept whatever the budget, computed from the root's state each time (nothing is listed by hand) — `ROOTS`:
- each lineage's last `retention.keep_releases` promoted models, each with its evaluation, gate decision and
  card (the train, evaluate, evaluate-base, evaluate-reference, gate and push entries of the run that promoted
  it);
- each line's state (never a candidate) and every entry the line's next nightly run would look up: those of its
  last training run, and the model it continues from;
- runs pinned with `cpt cache pin`;
- entries a running build holds (tasks/core/holds.py);
and everything those entries refer to. Everything else is reclaimable: with `retention.max_bytes`, least recently
used first until the root is within the budget; without, once unused for `retention.keep_days`. Nothing used
less than `retention.min_age` ago is deleted, and an entry being built or published is skipped.

"Used" is the newest of: when the entry was published, when this host last looked it up (a local root's folder
time), the end of the newest run whose summary names it or an entry referring to it, and now for a held one.

`collect` deletes through the root (`delete_entry`: readers lose an entry first — record, then manifest and files
at once — under the key's lock, never twice) and prunes this host's mirror of an object-store root down to
`$CPT_SCRATCH_MAX_BYTES`. `usage` is `cpt cache du`.

No Prefect, torch or transformers here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.core.config.retention import RetentionConfig, parse_bytes
from tasks.core.holds import HOLDS, Hold, lease_seconds, read_holds
from tasks.core.inventory import NEVER_DELETED, DepsMemo, Item, closure, entry_rel, inventory
from tasks.core.manifest import DigestMemo, safe_relpath
from tasks.core.root import ArtifactsRoot
from tasks.line import lines
from tasks.line.kept import LOCAL_MARKER, kept_rel
from tasks.line.promotions import Promotions

RELEASE_STAGES = ("train", "evaluate", "evaluate-base", "evaluate-reference", "gate", "push")
PINS = "state/pins.json"
DAY = 86400.0


# ------------------------------------------------------------------------------------------ the survey


@dataclasses.dataclass
class Survey:
    """One look at a root: its files, items, holds and run summaries, read once per collection."""

    root: ArtifactsRoot
    now: float
    files: dict[str, tuple[int, float | None]]
    items: dict[str, Item]
    holds: dict[str, Hold | None]
    deps: DepsMemo
    _summaries: dict[str, dict | None] = dataclasses.field(default_factory=dict)

    def state_files(self, folder: str) -> list[str]:
        return sorted(p for p in self.files if p.startswith(folder + "/") and p.endswith(".json")
                      and not p.rsplit("/", 1)[-1].startswith("."))

    def summary(self, run: str) -> dict | None:
        """A run's summary (`runs/<run>/summary.json`), None when it is gone or unreadable."""
        if run not in self._summaries:
            try:
                rel = f"runs/{safe_relpath(run)}/summary.json"
                self._summaries[run] = json.loads(self.root.fetch_state(rel).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._summaries[run] = None
        return self._summaries[run]

    def run_entries(self, run: str, stages: tuple[str, ...] | None = None) -> list[str]:
        """The entries a run's stages published or took from the cache (by stage or label name)."""
        summary = self.summary(run) or {}
        out = []
        for s in summary.get("stages", []):
            key = s.get("key")
            if key and isinstance(key, str) and (stages is None or s.get("name") in stages):
                try:
                    out.append(safe_relpath(entry_rel(key)))
                except ValueError:
                    continue
        return out


def survey(root: ArtifactsRoot, now: float | None = None) -> Survey:
    files = root.scan()
    items = inventory(files, root.touched)
    stamps = {rel: files[f"{rel}/_COMPLETE"][1] for rel, i in items.items() if i.kind == "entry"}
    return Survey(root=root, now=time.time() if now is None else now, files=files, items=items,
                  holds=read_holds(root, files), deps=DepsMemo(root, stamps))


# ------------------------------------------------------------------------------------------ the roots


def promoted_releases(s: Survey, policy: RetentionConfig) -> dict[str, str]:
    """Each lineage's last `keep_releases` promoted models, with their evaluation, gate decision and card.
    (Issue 30's release prefix joins here: a root source per place a release lives.)"""
    out: dict[str, str] = {}
    for rel in s.state_files("state/promotions"):
        try:
            promos = Promotions.model_validate_json(s.root.fetch_state(rel).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        seen: list[str] = []
        for record in reversed(promos.history):
            if record.model_digest in seen:
                continue
            seen.append(record.model_digest)
            if len(seen) > policy.keep_releases:
                break
            why = (f"release {len(seen)} of {policy.keep_releases} of {promos.lineage} (model "
                   f"{record.model_digest[:12]}, run {record.flow_run})")
            # A release whose model is kept (kept/<lineage>/<digest>, outside the cache, never collected) is kept
            # by that copy: its train (or anneal) entry, a second copy of the same model, is reclaimable like any
            # other; its evaluation, gate decision and card stay. A release from before models were kept: its entry.
            try:
                kept = kept_rel(promos.lineage, record.model_digest)
            except ValueError:  # not a digest a model is kept by: the record's entry holds it
                kept = None
            in_kept = kept is not None and (f"{kept}/_COMPLETE" in s.files or f"{kept}/{LOCAL_MARKER}" in s.files)
            if not in_kept:
                out.setdefault("/".join(record.model_path.split("/")[:3]), why)
            stable = (record.stable or {}).get("model_path")
            if isinstance(stable, str) and stable.startswith("cache/"):  # a stable line's parent: never released,
                out.setdefault("/".join(stable.split("/")[:3]), why + ": its stable model")  # its one copy
            if record.flow_run:
                for e in s.run_entries(record.flow_run, RELEASE_STAGES[1:] if in_kept else RELEASE_STAGES):
                    out.setdefault(e, why)
                out.setdefault(f"runs/{record.flow_run}", why)
    return out


def _model_entry(s: Survey, digest: str) -> str | None:
    """The train entry of a promoted model with this digest (any lineage's record names it)."""
    for rel in s.state_files("state/promotions"):
        try:
            promos = Promotions.model_validate_json(s.root.fetch_state(rel).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for record in promos.history:
            if record.model_digest == digest:
                return "/".join(record.model_path.split("/")[:3])
    return None


def next_runs(s: Survey, policy: RetentionConfig) -> dict[str, str]:
    """What each line's next nightly run looks up: everything its last training run did (a rerun of it is Cached
    throughout; a new drop reuses every piece of the rest), and the models that run started from and was compared
    with (the run summary names them)."""
    out: dict[str, str] = {}
    for rel in s.state_files("state/lines"):
        try:
            state = lines.LineState.model_validate_json(s.root.fetch_state(rel).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        last = state.last_training or {}
        trained = set(last.get("drops") or [])
        for drop in state.drops:  # gated, not yet trained on (the run that gated it trained nothing): next
            if drop.status == "active" and drop.path not in trained:
                for piece in drop.profile.get("pieces") or []:
                    if isinstance(piece, str) and piece.startswith("cache/") and ".." not in piece.split("/"):
                        out.setdefault(piece, f"line {state.line}: its drop {drop.path}, gated, not yet trained on")
        run = last.get("pipeline_run")
        if not run:
            continue
        why = f"line {state.line}: its next run looks it up (last training, run {run})"
        for e in s.run_entries(run):
            out.setdefault(e, why)
        out.setdefault(f"runs/{run}", why)
        summary = s.summary(run) or {}
        for role, what in (("parent", "started from"), ("reference", "was compared with")):
            model = summary.get(role) or {}
            entry = _model_entry(s, model["digest"]) if model.get("kind") == "promoted" and model.get("digest") \
                else None
            if entry:
                out.setdefault(entry, f"line {state.line}: the model its last training {what}")
    return out


class Pins(BaseModel):
    model_config = ConfigDict(extra="forbid")
    runs: dict[str, dict[str, str]] = Field(default_factory=dict, description="run name -> {at, note}")


def read_pins(root: ArtifactsRoot) -> Pins:
    try:
        return Pins.model_validate_json(root.fetch_state(PINS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Pins()


def pin(root: ArtifactsRoot, run: str, note: str = "", remove: bool = False) -> Pins:
    """Pin a run (its entries are kept whatever the budget) or, with `remove`, unpin it."""
    safe_relpath(run)

    def read() -> Pins:
        try:
            return Pins.model_validate_json(root.path(PINS).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return Pins()

    with root.locked_state(PINS, read) as pins:
        if remove:
            if run not in pins.runs:
                raise KeyError(f"run {run!r} is not pinned (pinned: {', '.join(pins.runs) or 'none'})")
            del pins.runs[run]
        else:
            pins.runs[run] = {"at": lines.now_iso(), "note": note}
        return pins


def pinned_runs(s: Survey, policy: RetentionConfig) -> dict[str, str]:
    out: dict[str, str] = {}
    for run, info in read_pins(s.root).runs.items():
        why = f"pinned run {run}" + (f" ({info.get('note')})" if info.get("note") else "")
        for e in s.run_entries(run):
            out.setdefault(e, why)
        out.setdefault(f"runs/{run}", why)
    return out


def running_builds(s: Survey, policy: RetentionConfig) -> dict[str, str]:
    out: dict[str, str] = {}
    for hold in s.holds.values():
        if hold is not None and hold.live(s.now):
            for e in hold.entries:
                out.setdefault(e, f"held by the running build {hold.run} ({hold.owner})")
            out.setdefault(f"runs/{hold.run}", f"the running build {hold.run}")
    return out


# What is never deleted, source by source: each maps a survey to {rel: why}. Add a source here for a new kind of
# root (issue 30's release prefix); `live` takes what they name and everything it refers to.
ROOTS: list[Callable[[Survey, RetentionConfig], dict[str, str]]] = [promoted_releases, next_runs, pinned_runs,
                                                                    running_builds]


def live(s: Survey, policy: RetentionConfig) -> dict[str, str]:
    """Every rel garbage collection must keep, with why: the ROOTS and what their entries refer to."""
    roots: dict[str, str] = {}
    for source in ROOTS:
        for rel, why in source(s, policy).items():
            roots.setdefault(rel, why)
    return closure(roots, lambda rel: s.deps.deps(rel) if rel.startswith("cache/") else None)


# ------------------------------------------------------------------------------------------ the plan


@dataclasses.dataclass
class Decision:
    item: Item
    delete: bool
    why: str
    used: float | None = None


def last_used(s: Survey) -> dict[str, float]:
    """When each entry was last used: its own time, the newest run summary naming it, a live hold (now), passed
    on to what it refers to (a piece is used whenever an entry made of it is)."""
    used = {rel: item.modified or 0.0 for rel, item in s.items.items()}
    for rel, item in s.items.items():
        if item.kind == "run":
            for e in s.run_entries(rel.split("/", 1)[1]):
                if e in used:
                    used[e] = max(used[e], item.modified or 0.0)
    for hold in s.holds.values():
        if hold is not None and hold.live(s.now):
            for e in hold.entries:
                used[e] = s.now
    entries = sorted((r for r, i in s.items.items() if i.kind == "entry"), key=lambda r: -used[r])
    for rel in entries:  # newest first: what a dependent passes on is final before it reaches the deps
        for dep in closure({rel: ""}, s.deps.deps):
            if dep in used and used[dep] < used[rel]:
                used[dep] = used[rel]
    return used


def _ago(seconds: float) -> str:
    if seconds >= 2 * DAY:
        return f"{seconds / DAY:.1f} days"
    if seconds >= 7200:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.0f} minutes"


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def plan(s: Survey, policy: RetentionConfig) -> tuple[list[Decision], dict[str, str]]:
    """Each item's fate, in the order deletes are made (least recently used first, an entry before what it
    refers to), and the live set."""
    keep = live(s, policy)
    used = last_used(s)
    min_age = policy.min_age_seconds
    decisions: list[Decision] = []
    candidates: list[Decision] = []
    entries = {r for r, i in s.items.items() if i.kind == "entry"}
    for rel, item in s.items.items():
        age = s.now - used.get(rel, s.now)
        if item.kind in NEVER_DELETED:
            decisions.append(Decision(item, False, f"{item.kind}: never deleted"))
        elif item.kind == "record":
            orphan = entry_rel(item.key) not in entries
            decisions.append(Decision(item, orphan, "its entry is gone" if orphan else "its entry is here"))
        elif rel in keep:
            decisions.append(Decision(item, False, keep[rel], used.get(rel)))
        elif age < min_age:
            decisions.append(Decision(item, False, f"used {_ago(age)} ago, younger than retention.min_age",
                                      used.get(rel)))
        elif item.kind == "partial":
            decisions.append(Decision(item, True, f"no manifest for {_ago(age)}: a build or upload cut short, or "
                                                  "a partial copy", used.get(rel)))
        elif item.kind == "run" or policy.max_bytes is None:
            old = age > policy.keep_days * DAY
            decisions.append(Decision(item, old, f"{'unused' if old else 'used'} for {_ago(age)}"
                                                 f"{', over' if old else ', within'} retention.keep_days="
                                                 f"{policy.keep_days:g}", used.get(rel)))
        else:
            candidates.append(Decision(item, False, "", used.get(rel)))
    if policy.max_bytes is not None:
        total = sum(i.bytes for i in s.items.values()) - sum(d.item.bytes for d in decisions if d.delete)
        # Least recently used first; among equals, an entry before the ones it refers to.
        candidates.sort(key=lambda d: (d.used or 0.0, -len(s.deps.deps(d.item.rel) or ())))
        for d in candidates:
            if total > policy.max_bytes:
                d.delete = True
                d.why = (f"least recently used ({_ago(s.now - (d.used or 0))} ago) while the root holds "
                         f"{human(total)}, over retention.max_bytes={human(policy.max_bytes)}")
                total -= d.item.bytes
            else:
                d.why = f"within retention.max_bytes={human(policy.max_bytes)} (used {_ago(s.now - (d.used or 0))} ago)"
        decisions += candidates
    order = {"entry": 0, "work": 1, "partial": 2, "run": 3, "record": 4}
    deletes = sorted((d for d in decisions if d.delete),
                     key=lambda d: (order.get(d.item.kind, 9), d.used or 0.0,
                                    -len(s.deps.deps(d.item.rel) or ()) if d.item.kind == "entry" else 0))
    return deletes + [d for d in decisions if not d.delete], keep


# ------------------------------------------------------------------------------------------ collecting


def scratch_budget() -> int | None:
    """This host's mirror budget, `$CPT_SCRATCH_MAX_BYTES` (a size: 200GB, 1.5TiB, bytes); None: unbounded."""
    value = os.environ.get("CPT_SCRATCH_MAX_BYTES")
    return parse_bytes(value, "CPT_SCRATCH_MAX_BYTES") if value else None


def _delete(root: ArtifactsRoot, d: Decision) -> str | None:
    item = d.item
    if item.kind == "entry":
        return root.delete_entry(item.rel, complete=True, seen=item.modified)
    if item.kind == "partial":
        return root.delete_entry(item.rel, complete=False)
    if item.kind == "work":
        return root.delete_tree(item.rel, lock=(item.stage, item.key))
    if item.kind == "run":
        return root.delete_tree(item.rel)
    if item.kind == "record":
        root.remove_file(item.rel)
        return None
    return f"a {item.kind} is never deleted"


def prune_mirror(root: ArtifactsRoot, keep: dict[str, str], budget: int | None, min_age: float,
                 now: float | None = None, dry_run: bool = False) -> dict[str, Any]:
    """This host's copy of an object-store root: copies of entries the store no longer has go (another host's
    collection deleted them), then, over `budget`, the least recently used copies (a copy costs a fetch to make
    again, never a rebuild). Releases (`models/`), state, run summaries and work folders stay; so does a copy a
    running build holds, one used less than `min_age` ago, and one being fetched or built (its key lock)."""
    now = time.time() if now is None else now
    files = root.scan_local()
    items = inventory(files, lambda rel: ArtifactsRoot.touched(root, rel))
    in_store = {rel for rel, i in inventory(root.scan("cache")).items() if i.kind == "entry"}
    total = sum(i.bytes for i in items.values())
    copies = sorted((i for i in items.values() if i.kind in ("entry", "partial")), key=lambda i: i.modified or 0.0)
    deleted, skipped = [], []
    for item in copies:
        stale = item.kind == "entry" and item.rel not in in_store
        over = budget is not None and total > budget
        if not (stale or over) or now - (item.modified or now) < min_age:
            continue
        if not stale and item.rel in keep and keep[item.rel].startswith("held by"):
            continue
        why = "the store no longer has it" if stale else (f"least recently used copy: the mirror holds "
                                                          f"{human(total)}, over CPT_SCRATCH_MAX_BYTES={human(budget)}")
        refused = None if dry_run else root.delete_local_copy(item.rel)
        if refused is None:
            deleted.append({"rel": item.rel, "bytes": item.bytes, "why": why})
            total -= item.bytes
        else:
            skipped.append({"rel": item.rel, "why": refused})
    return {"path": str(root.local), "budget": budget, "bytes": total, "deleted": deleted, "skipped": skipped}


def _prune_holds(root: ArtifactsRoot, s: Survey, dry_run: bool) -> list[str]:
    """Hold files of runs that died without removing them (lapsed for over a lease), and unreadable ones as old."""
    gone = []
    for rel, hold in s.holds.items():
        modified = s.files.get(rel, (0, None))[1] or s.now
        lapsed = (hold.expires if hold is not None else modified) + lease_seconds() < s.now
        if lapsed:
            gone.append(rel)
            if not dry_run:
                root.remove_file(rel)
    return gone


def collect(root: ArtifactsRoot, policy: RetentionConfig, dry_run: bool = False, now: float | None = None,
            log=None) -> dict[str, Any]:
    """Garbage-collect `root` by `policy` (see the module's docstring); with `dry_run`, only say what would go.
    Returns the report `cpt cache gc` prints: what went (or would go) and why, what was skipped, bytes before
    and after, the live bytes, and this host's mirror."""
    started = time.perf_counter()
    s = survey(root, now)
    decisions, keep = plan(s, policy)
    before = sum(i.bytes for i in s.items.values())
    deleted, skipped = [], []
    for d in decisions:
        if not d.delete:
            continue
        refused = None if dry_run else _delete(root, d)
        row = {"rel": d.item.rel, "kind": d.item.kind, "stage": d.item.stage, "bytes": d.item.bytes, "why": d.why}
        if refused is None:
            deleted.append(row)
            if log is not None and d.item.kind != "record":
                log.info("gc: %s %s (%s): %s", "would delete" if dry_run else "deleted", d.item.rel,
                         human(d.item.bytes), d.why)
        else:
            skipped.append({**row, "why": refused})
    holds = _prune_holds(root, s, dry_run)
    if not dry_run:
        s.deps.forget(r["rel"] for r in deleted)
        s.deps.save()
        _prune_digest_memo(root)
    live_bytes = sum(s.items[r].bytes for r in keep if r in s.items)
    after = before - sum(r["bytes"] for r in deleted)
    report = {"root": root.spec, "dry_run": dry_run, "bytes_before": before, "bytes_after": after,
              "live_bytes": live_bytes, "max_bytes": policy.max_bytes, "deleted": deleted, "skipped": skipped,
              "holds_removed": holds, "kept": _kept_summary(decisions)}
    if policy.max_bytes is not None and after > policy.max_bytes:
        report["over_budget"] = (f"{human(after)} after collection, over retention.max_bytes="
                                 f"{human(policy.max_bytes)}: what is kept alone holds {human(live_bytes)} "
                                 "(raise the budget, lower retention.keep_releases, or unpin runs)")
        if log is not None:
            log.warning("gc: %s", report["over_budget"])
    if root.url is not None:
        report["mirror"] = prune_mirror(root, keep, scratch_budget(), policy.min_age_seconds, s.now, dry_run)
    report["seconds"] = round(time.perf_counter() - started, 3)
    if log is not None:
        log.info("gc: %s %d items (%s) of %s; %s kept, %s of it live", "would delete" if dry_run else "deleted",
                 len(deleted), human(before - after), root.spec, human(after), human(live_bytes))
    return report


def _kept_summary(decisions: list[Decision]) -> dict[str, int]:
    """Bytes kept by reason family (release, line, pinned, running build, young, budget...)."""
    out: dict[str, int] = {}
    for d in decisions:
        if d.delete or d.item.kind in NEVER_DELETED or d.item.kind == "record":
            continue
        family = ("release" if d.why.startswith("release ") else "line" if d.why.startswith("line ") else
                  "pinned" if d.why.startswith("pinned") else "running build" if "running build" in d.why else
                  "young" if "min_age" in d.why else "within budget or keep_days")
        out[family] = out.get(family, 0) + d.item.bytes
    return out


def _prune_digest_memo(root: ArtifactsRoot) -> None:
    """Digests of files that no longer exist (deleted entries' models, retired drops) leave the memo."""
    memo = DigestMemo(root)
    gone = [p for p in memo.entries if not os.path.exists(p)]
    for p in gone:
        del memo.entries[p]
    memo.changed = bool(gone)
    memo.save()


# ------------------------------------------------------------------------------------------ du


def usage(root: ArtifactsRoot, policy: RetentionConfig | None = None, now: float | None = None) -> dict[str, Any]:
    """`cpt cache du`: bytes by stage, by line (what each line's roots keep), by kind, and this host's mirror."""
    policy = policy or RetentionConfig()
    s = survey(root, now)
    by_stage: dict[str, dict[str, int]] = {}
    by_kind: dict[str, int] = {}
    for item in s.items.values():
        by_kind[item.kind] = by_kind.get(item.kind, 0) + item.bytes
        if item.kind in ("entry", "partial", "work"):
            row = by_stage.setdefault(item.stage, {"bytes": 0, "entries": 0})
            row["bytes"] += item.bytes
            row["entries"] += 1
    by_line: dict[str, dict[str, int]] = {}
    deps = (lambda rel: s.deps.deps(rel) if rel.startswith("cache/") else None)
    sources = {"releases": promoted_releases(s, policy), "next run": next_runs(s, policy)}
    for family, roots in sources.items():
        for rel, why in closure(roots, deps).items():
            owner = _owner(why)
            item = s.items.get(rel)
            if item is not None:
                row = by_line.setdefault(owner, {})
                row[family] = row.get(family, 0) + item.bytes
    keep = live(s, policy)
    reclaimable = sum(i.bytes for r, i in s.items.items() if i.kind in ("entry", "partial", "work", "run")
                      and r not in keep)
    out = {"root": root.spec, "bytes": sum(by_kind.values()), "by_stage": by_stage, "by_kind": by_kind,
           "by_line": by_line, "live_bytes": sum(s.items[r].bytes for r in keep if r in s.items),
           "reclaimable_bytes": reclaimable}
    if root.url is not None:
        mirror = inventory(root.scan_local())
        out["mirror"] = {"path": str(root.local), "bytes": sum(i.bytes for i in mirror.values()),
                         "budget": scratch_budget()}
    s.deps.save()
    return out


def _owner(why: str) -> str:
    """The line or lineage a keep reason names ("line L: ...", "release 1 of 3 of line-L (...)")."""
    if why.startswith("line "):
        return "line " + why.split(":", 1)[0][5:]
    if why.startswith("release "):
        lineage = why.split(" of ", 2)[-1].split(" (", 1)[0]
        return f"line {lineage[5:]}" if lineage.startswith("line-") else lineage
    return why
