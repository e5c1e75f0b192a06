"""What an artifacts root holds, item by item: the listing `cpt cache du` prints and garbage collection decides on.

An item is one thing that is deleted whole:
- `entry`: a published cache entry, `cache/<stage>/<key>/` with its manifest;
- `partial`: an entry folder without a manifest (an upload or build cut short, a mirror's partial fetch) or a
  temp build folder;
- `record`: a Prefect result record, `cache/_records/<key>` (each host writes its own);
- `work`: a training's checkpoints, `work/<stage>/<key>/`, kept to resume a killed attempt;
- `run`: a run summary, `runs/<name>/`;
- and what garbage collection never deletes: `release` (`models/<name>/`, the folder users point at), `state`
  (lines, promotions, pins, holds), `lock` (the store's lease locks) and `other` (memo files, lock files).

Nothing here decides what is kept (tasks/line/retention.py) or how a delete is made safe (the root's
`delete_entry`, tasks/core/root.py). It names no stage: stages are read from the paths.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from tasks.core.manifest import MANIFEST, RECORDS_DIR, TMP_PREFIX

NEVER_DELETED = frozenset({"release", "state", "lock", "other"})


@dataclasses.dataclass
class Item:
    rel: str
    kind: str
    bytes: int = 0
    files: int = 0
    modified: float | None = None  # the newest file's time; an entry's: its manifest's (and its last use here)
    stage: str = ""

    @property
    def key(self) -> str:
        return self.rel.rsplit("/", 1)[-1]


def stage_of_key(key: str) -> str:
    """The stage a key belongs to: keys are `<stage>-<hash>` (tasks/core/keys.py stage_key)."""
    return key.rsplit("-", 1)[0]


def entry_rel(key: str) -> str:
    return f"cache/{stage_of_key(key)}/{key}"


def _place(path: str) -> tuple[str, str, str]:
    """(the item's rel, its kind, its stage) of a file at `path` (relative to the root)."""
    parts = path.split("/")
    top = parts[0]
    if top == "cache" and len(parts) >= 3:
        if parts[1] == RECORDS_DIR:
            return "/".join(parts[:3]), "record", ""
        name = parts[2]
        if name.startswith(".lock-") or len(parts) == 3 and not name.startswith(TMP_PREFIX):
            return f"cache/{parts[1]}", "other", parts[1]  # lock files, stray files beside the entries
        if name.startswith(TMP_PREFIX):
            return "/".join(parts[:3]), "partial", parts[1]
        return "/".join(parts[:3]), "entry", parts[1]
    if top == "work" and len(parts) >= 4:
        return "/".join(parts[:3]), "work", parts[1]
    if top == "runs" and len(parts) >= 3:
        return "/".join(parts[:2]), "run", ""
    if top == "models" and len(parts) >= 3:
        return "/".join(parts[:2]), "release", ""
    if top == "state":
        return "/".join(parts[:2]) if len(parts) > 2 else "state", "state", ""
    if top == "locks":
        return "locks", "lock", ""
    return top if len(parts) > 1 else "(top)", "other", ""


def inventory(files: dict[str, tuple[int, float | None]],
              touched: Callable[[str], float | None] = lambda rel: None) -> dict[str, Item]:
    """The items a scan of a root (`root.scan()`: rel -> (bytes, modified)) holds, by rel. `touched(rel)`: when
    this host last used an entry (a local root's folder time), which counts as its modification."""
    items: dict[str, Item] = {}
    manifests: set[str] = set()
    for path, (size, modified) in files.items():
        rel, kind, stage = _place(path)
        item = items.get(rel)
        if item is None:
            item = items[rel] = Item(rel=rel, kind=kind, stage=stage)
        item.bytes += size
        item.files += 1
        if kind == "entry" and path == f"{rel}/{MANIFEST}":
            manifests.add(rel)
        if modified is not None and kind != "entry":
            item.modified = max(item.modified or 0.0, modified)
    for rel, item in items.items():
        if item.kind != "entry":
            continue
        if rel not in manifests:
            item.kind = "partial"
        times = [files.get(f"{rel}/{MANIFEST}", (0, None))[1], touched(rel)]
        if item.kind == "partial":
            times += [m for p, (_, m) in files.items() if p.startswith(rel + "/")]
        item.modified = max((t for t in times if t is not None), default=None)
    return items


def totals(items: Iterable[Item]) -> int:
    return sum(i.bytes for i in items)


class DepsMemo:
    """The entries each entry refers to or was made from (its manifest's `deps` and `pieces`), remembered on this host in
    `<local>/cache/_deps.json`: a key names one content, so its deps never change, and a collection on an
    object-store root reads each manifest once rather than once a run."""

    def __init__(self, root, stamps: dict[str, float | None] | None = None):
        """`stamps`: each entry's manifest time as the caller's scan found it (a manifest rewritten since it was
        remembered is read again)."""
        self.root = root
        self.stamps = stamps or {}
        self.path = Path(root.local) / "cache" / "_refs.json"
        try:
            self.known: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def deps(self, rel: str) -> list[str] | None:
        """None: no readable manifest (gone, or not an entry)."""
        stamp = self.stamps.get(rel)
        if rel in self.known and self.known[rel][0] == stamp:
            return self.known[rel][1]
        manifest = self.root.manifest_of(rel)
        if manifest is None:
            return None
        self.known[rel] = [stamp, [*manifest.deps, *manifest.pieces]]
        self.changed = True
        return self.known[rel][1]

    def forget(self, rels: Iterable[str]) -> None:
        for rel in rels:
            if self.known.pop(rel, None) is not None:
                self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Unique per writer, threads included: two collections in one process (or two hosts sharing a pid on one
        # disk) each replace the memo whole; the last one wins and both were right (a key's deps never change).
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(self.known))
        os.replace(tmp, self.path)
        self.changed = False


def closure(roots: dict[str, str], deps: Callable[[str], list[str] | None]) -> dict[str, str]:
    """`roots` (rel -> why it is kept) and every entry they refer to, transitively (-> the same why)."""
    out = dict(roots)
    todo = list(roots)
    while todo:
        rel = todo.pop()
        for dep in deps(rel) or ():
            if dep not in out:
                out[dep] = out[rel]
                todo.append(dep)
    return out
