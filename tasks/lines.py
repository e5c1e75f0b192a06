"""Training lines: the durable state of one retraining line, and the gate a corpus drop passes to join it.

A line (`cpt retrain --line L`) trains on the configured corpus plus every drop registered to it. Its state,
`<artifacts>/state/lines/<L>.json`, lists the drops (path, content fingerprint, counts, status and the history
of each status change) and the fingerprint of its last successful training. Every change is a locked
read-modify-write of the whole file, written to a temp file and renamed into place: a killed run leaves the
old state or the new one, never half of one, and `cpt drops --remove` beside a running retrain loses nothing.

Statuses: `pending` (announced, still being written), `active` (passed the gate: trained on), `rejected` (failed
the gate; the reason is kept; re-checked when its content changes), `removed` (retired by hand).

Nothing here imports Prefect, torch or transformers: `cpt drops` answers at once. The gate's profile reads the
drop through the same cached per-file pieces as the pipeline, so the run that admits a drop reads it once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

DropStatus = Literal["pending", "active", "rejected", "removed"]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Drop(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    status: DropStatus
    fingerprint: str = ""
    files: int = 0
    documents: int = 0
    tokens: int = 0
    registered_at: str = ""
    reason: str = ""
    profile: dict[str, Any] = {}
    history: list[dict[str, str]] = Field(default_factory=list, description="Every status change: at, status, why.")

    def set_status(self, status: DropStatus, why: str) -> None:
        self.status = status
        self.history.append({"at": now_iso(), "status": status, "why": why})

    def listing(self) -> dict[str, Any]:
        """What `cpt drops --json` prints per drop."""
        return self.model_dump(include={"path", "fingerprint", "files", "documents", "tokens", "registered_at",
                                        "status", "reason", "history"})


class LineState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    line: str
    drops: list[Drop] = []
    last_training: dict[str, Any] | None = None

    def find(self, path: str | Path) -> Drop | None:
        path = str(Path(path).resolve())
        return next((d for d in self.drops if d.path == path), None)

    def active_paths(self) -> list[str]:
        return [d.path for d in self.drops if d.status == "active"]

    def inactive_paths(self) -> list[str]:
        return [d.path for d in self.drops if d.status != "active"]


def state_file(root: str | Path, line: str) -> Path:
    if not line or "/" in line or line.startswith("."):
        raise ValueError(f"line: {line!r} is not a valid line name (no '/', not starting with '.')")
    return Path(root) / "state" / "lines" / f"{line}.json"


def read_line(root: str | Path, line: str, fetch: bool = True) -> LineState:
    path = state_file(root, line)
    if fetch:  # an object-store root: the store's copy is the state (another host may have changed it)
        from tasks.cache import fetch_state

        fetch_state(root, path)
    try:
        return LineState.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        # A line last trained before lines kept drops: take its last training, so it does not retrain.
        try:
            old = json.loads((Path(root) / "state" / f"retrain-{line}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        return LineState(line=line, last_training=old)
    except ValueError as e:
        raise ValueError(f"{path}: not a valid line state ({e}); fix or remove it") from None


def updating(root: str | Path, line: str):
    """Lock the line, yield its state, write it back atomically when the block ends without error."""
    from tasks.cache import locked_state

    return locked_state(state_file(root, line), lambda: read_line(root, line, fetch=False), root=Path(root))


def announce(root: str | Path, line: str, drop: str | Path) -> Drop:
    """Note an announced drop as pending unless it is known with an active or rejected verdict (the gate then
    looks again only if its content changed). A removed drop announced again is pending again, recorded."""
    path = str(Path(drop).resolve())
    with updating(root, line) as state:
        entry = state.find(path)
        if entry is None:
            entry = Drop(path=path, status="pending", registered_at=now_iso())
            entry.history.append({"at": entry.registered_at, "status": "pending", "why": "announced"})
            state.drops.append(entry)
        elif entry.status == "removed":
            entry.set_status("pending", "announced again after removal")
        return entry


def remove(root: str | Path, line: str, drop: str | Path, why: str = "removed by hand") -> Drop:
    path = str(Path(drop).resolve())
    with updating(root, line) as state:
        entry = state.find(path)
        if entry is None:
            known = ", ".join(d.path for d in state.drops) or "none"
            raise KeyError(f"line {line!r} has no drop {path} (its drops: {known})")
        if entry.status != "removed":
            entry.set_status("removed", why)
        return entry


def record_verdict(root: str | Path, line: str, path: str, fingerprint: str, profile: dict[str, Any]) -> Drop:
    """The gate's verdict on a drop: active (registered) or rejected with the reasons."""
    with updating(root, line) as state:
        entry = state.find(path)
        if entry is None:
            entry = Drop(path=path, status="pending", registered_at=now_iso())
            state.drops.append(entry)
        entry.fingerprint = fingerprint
        entry.profile = profile
        entry.files, entry.documents, entry.tokens = profile["files"], profile["documents"], profile["tokens"]
        if profile["passed"]:
            entry.reason = ""
            entry.set_status("active", "passed the drop gate")
        else:
            entry.reason = "; ".join(profile["reasons"])
            entry.set_status("rejected", entry.reason)
        return entry


def record_training(root: str | Path, line: str, record: dict[str, Any]) -> None:
    with updating(root, line) as state:
        state.last_training = record


# ------------------------------------------------------------------------------------------ the gate


def check_profile(profile: dict[str, Any], limits) -> list[str]:
    """Reasons a drop fails `limits` (a DropsConfig); empty when it passes."""
    reasons = []
    records = max(profile["records"], 1)
    if profile["documents"] < limits.min_documents:
        reasons.append(f"{profile['documents']} documents, fewer than drops.min_documents={limits.min_documents}")
    if profile["rejected"] / records > limits.max_reject_share:
        reasons.append(f"{profile['rejected']} of {profile['records']} records rejected "
                       f"({profile['rejected'] / records:.0%} > drops.max_reject_share={limits.max_reject_share:g})")
    if profile["too_short"] / records > limits.max_too_short_share:
        reasons.append(f"{profile['too_short']} of {profile['records']} records too short "
                       f"({profile['too_short'] / records:.0%} > drops.max_too_short_share="
                       f"{limits.max_too_short_share:g})")
    docs = max(profile["documents"], 1)
    if profile["documents"] and profile["duplicates_in_line"] / docs > limits.max_duplicate_share:
        reasons.append(f"{profile['duplicates_in_line']} of {profile['documents']} documents already in the line "
                       f"({profile['duplicates_in_line'] / docs:.0%} > drops.max_duplicate_share="
                       f"{limits.max_duplicate_share:g})")
    drop_median, line_median = profile.get("median_tokens"), profile.get("line_median_tokens")
    if drop_median and line_median:
        ratio = max(drop_median / line_median, line_median / drop_median)
        if ratio > limits.median_tokens_ratio:
            reasons.append(f"median document length {drop_median:.0f} tokens against the line's {line_median:.0f} "
                           f"(×{ratio:.1f} > drops.median_tokens_ratio={limits.median_tokens_ratio:g})")
    return reasons


def profile_drop(drop_files: list[Path], line_files: list[Path], config, tokenizer, artifacts: str,
                 digest) -> dict[str, Any]:
    """Profile a drop against its line through the cached pieces: documents, rejects, too-short records,
    exact duplicates of the line's documents, documents whose text is in the line's validation split, median
    token length against the line's. `config` is the CptConfig; `tokenizer` its tokenizer Fingerprint."""
    import pyarrow as pa

    from tasks.load import BadRecordError, fingerprint_files, load_pieces, piece_docs_file, read_arrow
    from tasks.shuffle import split_values
    from tasks.token_stats import part_lengths
    from tasks.tokenize import TokenizerOnce, token_file, tokenize_pieces

    drop_fp = fingerprint_files(drop_files, digest)
    profile: dict[str, Any] = {"files": len(drop_files), "records": 0, "documents": 0, "rejected": 0, "too_short": 0,
                               "duplicates_in_line": 0, "validation_matches": 0, "tokens": 0,
                               "median_tokens": None, "line_median_tokens": None}
    try:
        drop_pieces = load_pieces(drop_fp.items, config.corpus, artifacts)
    except BadRecordError as e:  # on_bad_record: fail and a bad record: the drop fails with its place
        return {**profile, "passed": False, "reasons": [str(e)]}
    for _, out, _ in drop_pieces:
        for k in ("records", "rejected", "too_short"):
            profile[k] += out.counts[k]
    line_pieces = load_pieces(fingerprint_files(line_files, digest).items, config.corpus, artifacts) \
        if line_files else []

    def ids(pieces) -> tuple[set[str], set[str]]:
        """doc_ids and norm_ids of the pieces, each piece's file read once."""
        tables = [read_arrow(piece_docs_file(artifacts, out.path)).select(["doc_id", "norm_id"])
                  for _, out, _ in pieces]
        if not tables:
            return set(), set()
        table = pa.concat_tables(tables)
        return set(table.column("doc_id").to_pylist()), set(table.column("norm_id").to_pylist())

    (drop_ids, drop_norms), (line_ids, line_norms) = ids(drop_pieces), ids(line_pieces)
    profile["documents"] = len(drop_ids)
    profile["duplicates_in_line"] = len(drop_ids & line_ids)
    # The line's validation documents by the shuffle stage's rule (a keyed hash of the normalised text).
    if line_norms and config.split.validation_fraction > 0:
        norms = sorted(line_norms)
        u = split_values(norms, config.shuffle.seed)
        validation = {n for n, v in zip(norms, u) if v < config.split.validation_fraction}
        profile["validation_matches"] = len(drop_norms & validation)

    if drop_ids:
        once = TokenizerOnce(tokenizer, config.model.trust_remote_code, artifacts)

        def lengths_of(pieces) -> np.ndarray:
            parts = [{"key": o.key, "path": o.path, "content": o.content, "documents": o.counts["documents"]}
                     for _, o, _ in pieces]
            tokens = tokenize_pieces(parts, config.tokenize, tokenizer, artifacts, config.model.trust_remote_code,
                                     tokenizer_once=once)
            return part_lengths([token_file(artifacts, o.path) for o, _ in tokens])[0]

        lengths = lengths_of(drop_pieces)
        profile["tokens"] = int(lengths.sum())
        profile["median_tokens"] = float(np.median(lengths)) if len(lengths) else None
        if line_pieces:
            line_lengths = lengths_of(line_pieces)
            profile["line_median_tokens"] = float(np.median(line_lengths)) if len(line_lengths) else None
    reasons = check_profile(profile, config.drops)
    return {**profile, "passed": not reasons, "reasons": reasons}
