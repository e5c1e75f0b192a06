"""Drops are never lost: what no announcement reached is found (the announcement itself, delivered at least once,
is flows/announce.py).

- `scan_drops` (the shipped `scan-drops` deployment, on a schedule): lists the folders directly under each of
  `drops.roots`, announces to the line every settled one the line does not know (as the on-drop deployment's
  event would: `announced_by: event`, so it is gated like one), then runs the line's retrain, which gates the
  pending drops and trains on those that pass. A drop whose event was lost on the way is trained by the next scan.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.retrain import retrain
from tasks.core.config.tree import CptConfig, load_config
from tasks.core.report import run_logger
from tasks.core.root import open_root
from tasks.line import lines
from tasks.line.drop_gate import WRITING_MARKER

# ------------------------------------------------------------------------------------------------- the scan


def _files(folder: Path) -> list[Path]:
    """Regular files under a drop folder, no symlink followed, names a producer writes to first left out."""
    out = []
    for base, dirs, names in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            p = Path(base) / n
            if not n.startswith(".") and not n.endswith((".part", ".tmp")) and p.is_file() and not p.is_symlink():
                out.append(p)
    return out


def settled_drops(roots: list[str], settle_seconds: float, now: float | None = None) -> tuple[list[Path], list[str]]:
    """The drop folders directly under `roots` that are complete (no `_WRITING`, every file older than
    `settle_seconds`, at least one file), and why others were passed over."""
    now = time.time() if now is None else now
    found, passed = [], []
    for r in roots:
        base = Path(r).resolve()
        if not base.is_dir():
            passed.append(f"{r}: not a folder")
            continue
        for child in sorted(base.iterdir()):
            if child.name.startswith(".") or not child.is_dir():
                continue
            folder = child.resolve()
            if not folder.is_relative_to(base):  # a symlink out of the root: not a drop of this root
                passed.append(f"{child}: leads out of {base}")
                continue
            files = _files(folder)
            if (folder / WRITING_MARKER).exists() or not files:
                passed.append(f"{folder}: {'being written' if files else 'empty'}")
                continue
            young = [f for f in files if now - f.stat().st_mtime < settle_seconds]
            if young:
                passed.append(f"{folder}: {len(young)} files modified in the last {settle_seconds:g} s")
                continue
            found.append(folder)
    return found, passed


@flow(name="scan-drops", log_prints=True)
def scan_drops(
    config: CptConfig | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    line: str = "default",
    settle_seconds: float = 60.0,
    artifacts: str | None = None,
) -> dict[str, Any]:
    """Announce to `line` every settled drop under `drops.roots` it does not know (an event that never arrived),
    then retrain the line if a drop is waiting for the gate. Same parameters as retrain-on-drop."""
    log = run_logger()
    if config is None:
        if not config_file:
            raise ValueError("give config or config_file")
        config = load_config(config_file, overrides or [])
    if not config.drops.roots:
        log.info("scan: drops.roots is empty: no folder to scan")
        return {"announced": [], "retrain": None}
    root = open_root(artifacts)
    found, passed = settled_drops(config.drops.roots, settle_seconds)
    known = lines.read_line(root, line)
    new = [p for p in found if known.find(p) is None]
    for p in new:
        lines.announce(root, line, p, "event")
        log.warning("scan: %s was never announced to line %r (its event lost?): registered now", p, line)
    for why in passed:
        log.info("scan: passed over %s", why)
    ready = {str(p) for p in found}
    pending = [d.path for d in lines.read_line(root, line).drops if d.status == "pending" and d.path in ready]
    if not pending:
        log.info("scan: line %r has no settled drop waiting for the gate", line)
        return {"announced": [str(p) for p in new], "retrain": None}
    result = retrain(config=config, line=line, settle_seconds=settle_seconds, artifacts=artifacts,
                     drop_source="event")
    return {"announced": [str(p) for p in new], "retrain": result}
