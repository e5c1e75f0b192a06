"""What a line trains on: the configured corpus as listed now, less every drop the line knows of, plus each
active drop exactly as the gate let it through (its recorded identity: real path, files and digests).

A drop's files never come from listing its path again: an active drop's are its identity's, each opened later
without following a symlink and checked against its digest as it is read (tasks/data/opening.py), so a drop
swapped for a symlink after the gate is trained as gated or not at all. A drop that is not active (pending,
rejected, removed) is taken out of the configured corpus by the files the gate recorded for it (or, never gated,
by its path as written, not resolved): a symlink put at a rejected drop's path takes nothing out of the line.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Iterable
from typing import Any

from tasks.core.config.data import CorpusConfig
from tasks.core.config.tree import CptConfig
from tasks.core.manifest import Fingerprint, combine_digests, hash_file
from tasks.data.files import glob_base, is_glob, path_ranks, resolve_corpus_files
from tasks.line.lines import Drop, LineState


def _under(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def holds_configured_path(drop: str, corpus: CorpusConfig, base: Path | None = None) -> bool:
    """Whether the drop is, or holds, one of `corpus.paths` (a glob: the folder it lists)."""
    base = base or Path.cwd()
    drop_path = Path(drop)
    for entry in corpus.paths:
        p = Path(entry).expanduser()
        p = p if p.is_absolute() else base / p
        p = (glob_base(p) if is_glob(entry, p) else p).resolve()
        if p == drop_path or drop_path in p.parents:
            return True
    return False


def line_sources(config: CptConfig, state: LineState, digest=hash_file,
                 without: Drop | str | Iterable[Drop | str] | None = None) -> tuple[Fingerprint, list[Path]]:
    """The line's corpus — the source drops join, `config.drop_corpus` (drops.source) — as the load stage's
    sources (items: path, digest, bytes, rank), and the configured files among them (for the settle check).
    `without`: drops (or their paths) the line is taken without, as if they were not active: the drop being
    gated, and those the gate left out of this run (pending, or not gated for an infrastructure error). Ranks: a
    configured file the index of the first `corpus.paths` entry yielding it, an active drop's files after them in
    the order the drops joined."""
    corpus = config.drop_corpus
    if without is None or isinstance(without, (Drop, str)):
        without = [] if without is None else [without]
    left = {w.path if isinstance(w, Drop) else str(w) for w in without}
    configured = resolve_corpus_files(corpus)
    out_files: set[str] = set()
    out_prefixes: list[str] = []
    active = []
    for d in state.drops:
        taken = d.status == "active" and d.path not in left
        if taken and d.identity is not None:
            active.append(d)
        elif d.profile.get("refused") or (not taken and holds_configured_path(d.path, corpus)):
            continue  # never the line's, or the configured corpus itself: nothing of the corpus is taken out
        if d.identity is not None:
            out_files |= d.identity.paths()
        if d.identity is None or d.status != "rejected":
            out_prefixes.append(d.path)  # as written: a path is never resolved again to take files out
    keep = [f for f in configured if str(f) not in out_files and not _under(str(f), out_prefixes)]
    ranks = path_ranks(corpus, [str(f) for f in keep]) if corpus.near_dedup.enabled and keep \
        else [0] * len(keep)
    items: list[dict[str, Any]] = [{"path": str(f), "digest": digest(f), "bytes": f.stat().st_size, "rank": r}
                                   for f, r in zip(keep, ranks)]
    seen = {i["path"] for i in items}
    for n, d in enumerate(active):
        rank = len(corpus.paths) + n
        for f in d.identity.files:
            path = d.identity.file_path(f)
            if path not in seen:
                seen.add(path)
                items.append({"path": path, "digest": f.digest, "bytes": f.bytes, "rank": rank})
    fingerprint = Fingerprint(kind="corpus", digest=combine_digests([("file", d) for d in
                                                                     sorted(i["digest"] for i in items)]),
                              location=str(Path.cwd()), items=items)
    return fingerprint, keep


def other_sources(config: CptConfig, digest=hash_file) -> dict[str, str]:
    """The content fingerprint of every source drops do not join (`sources` besides the drop source, or `replay`),
    by name: a line retrains when one of them changed, not only when its drops or its corpus did."""
    from tasks.data.files import fingerprint_corpus

    return {d.name: fingerprint_corpus(d.corpus, digest=digest).digest for d in config.data_sources()
            if d.name != config.drop_source}


def sources_changed(last: dict[str, Any] | None, now: dict[str, str]) -> list[str]:
    """The other sources that differ from the line's last training: changed, added or removed. A training recorded
    before other sources were fingerprinted names none: nothing is known to have changed since (no retrain for it)."""
    if not last or "sources" not in last:
        return []
    before = last["sources"] or {}
    return sorted(n for n in {*before, *now} if before.get(n) != now.get(n))
