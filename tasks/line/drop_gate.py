"""The drop gate: whether a corpus drop may join a training line, decided before any GPU time.

A drop announced to a line (tasks/line/lines.py) is profiled against the line through the stages' own public
functions — the same cached per-file pieces the pipeline then reuses, so the run that admits a drop reads it
once — and registered (active) or rejected with its reasons:

- documents, rejected and too-short records (load's pieces);
- exact duplicates of documents the line already has (load's ids);
- documents whose text the line's validation split holds (the shuffle stage's rule);
- the median document length in tokens against the line's (tokenize's pieces).

A drop still being written is not gated: a folder holding a `_WRITING` file is being written, and so is any file
modified less than `settle_seconds` ago; the drop stays pending and a later run picks it up.

Nothing a drop sends escapes its folder or stops its line: a drop must lie inside one of `drops.roots` (and one
an event announced is refused while that list is empty), only its regular files are read and no symlink out of
it is followed (what is skipped is named in its profile), and a file that cannot be read is a reject with its
place, never an exception. A rejected drop is excluded from every later run of the line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.data.arrow import read_arrow
from tasks.core.config.base import ConfigError
from tasks.core.config.data import CorpusConfig, DropsConfig
from tasks.core.config.tree import CptConfig
from tasks.core.manifest import DigestMemo, Fingerprint
from tasks.core.root import ArtifactsRoot
from tasks.data.files import fingerprint_files, list_corpus_files
from tasks.data.layout import REJECTS_FILE, LoadSource, piece_docs_file
from tasks.data.pieces import load_pieces, piece_ids
from tasks.data.records import BadRecordError
from tasks.shuffle import validation_texts
from tasks.line import lines
from tasks.line.sources import line_sources
from tasks.tokenize import TokenizerOnce, resolve_tokenizer, token_lengths, tokenize_pieces

WRITING_MARKER = "_WRITING"
NAMED = 20  # skipped files, bad files and rejects named in a profile (the rest counted)


def unsettled_files(files: list[Path], settle_seconds: float, now: float | None = None) -> list[str]:
    """Files modified less than `settle_seconds` ago, and folders marked as being written."""
    now = time.time() if now is None else now
    busy = sorted({str(f.parent) for f in files if (f.parent / WRITING_MARKER).exists()})
    busy += [f"{f} (modified {now - f.stat().st_mtime:.0f}s ago)" for f in files
             if now - f.stat().st_mtime < settle_seconds]
    return busy


def symlinked(entry: lines.Drop) -> str | None:
    """Why the drop's recorded path is no longer its real path (it, or a folder above it, is now a symlink), or
    None. Such a drop is never listed through the symlink: it is gated again only as what it was."""
    import os

    real = os.path.realpath(entry.path)
    if real == entry.path:
        return None
    return (f"its path is now a symlink (to {real}): nothing is read through it; what the gate recorded of it "
            "stays out of the line (announce its real folder as a new drop)")


def drop_files(path: str) -> tuple[list[Path], list[str]]:
    """A drop's files and what was skipped in it (`path: why`: a symlink out of the drop, a FIFO, a device…).
    The path is literal, never a glob."""
    if not Path(path).exists():
        raise ConfigError(f"drop {path}: no such file or folder")
    return list_corpus_files(CorpusConfig(paths=[path]), labels=[f"drop {path}"])


def refusal(entry: lines.Drop, limits: DropsConfig) -> str | None:
    """Why the drop may not join a line at all, decided from its (resolved) path alone, before anything in it is
    listed or read: it lies outside every one of `drops.roots` (or is one of them), or an event announced it
    while `drops.roots` is empty (an event payload is untrusted input). None: it may be gated."""
    if not limits.roots:
        if entry.announced_by == "event":
            return ("announced by an event while drops.roots is empty: set drops.roots to the folders drops may "
                    "come from (or announce it with `cpt retrain --drop` at a shell)")
        return None
    path = Path(entry.path).resolve()  # resolved when announced; again, in case it was swapped for a symlink
    roots = [Path(r).expanduser().resolve() for r in limits.roots]
    if any(root in path.parents for root in roots):
        return None
    if path in roots:
        return f"{path} is one of drops.roots, not a drop inside one"
    return f"outside drops.roots ({', '.join(map(str, roots))})"


def check_profile(profile: dict[str, Any], limits: DropsConfig) -> list[str]:
    """Reasons a drop fails `limits`; empty when it passes."""
    reasons = []
    records = max(profile["records"], 1)
    if profile["documents"] < limits.min_documents:
        reasons.append(f"{profile['documents']} documents, fewer than drops.min_documents={limits.min_documents}")
    if profile["rejected"] / records > limits.max_reject_share:
        examples = profile.get("reject_examples") or []
        reasons.append(f"{profile['rejected']} of {profile['records']} records rejected "
                       f"({profile['rejected'] / records:.0%} > drops.max_reject_share={limits.max_reject_share:g})"
                       + (f", e.g. {'; '.join(examples[:3])}" if examples else ""))
    if profile["too_short"] / records > limits.max_too_short_share:
        reasons.append(f"{profile['too_short']} of {profile['records']} records too short "
                       f"({profile['too_short'] / records:.0%} > drops.max_too_short_share="
                       f"{limits.max_too_short_share:g})")
    docs = max(profile["documents"], 1)
    duplicates = profile["duplicates_in_line"] + profile.get("near_duplicates", 0)
    if profile["documents"] and duplicates / docs > limits.max_duplicate_share:
        near = f", {profile['near_duplicates']} of them near-duplicates" if profile.get("near_duplicates") else ""
        reasons.append(f"{duplicates} of {profile['documents']} documents already in the line{near} "
                       f"({duplicates / docs:.0%} > drops.max_duplicate_share={limits.max_duplicate_share:g})")
    drop_median, line_median = profile.get("median_tokens"), profile.get("line_median_tokens")
    if drop_median and line_median:
        ratio = max(drop_median / line_median, line_median / drop_median)
        if ratio > limits.median_tokens_ratio:
            reasons.append(f"median document length {drop_median:.0f} tokens against the line's {line_median:.0f} "
                           f"(×{ratio:.1f} > drops.median_tokens_ratio={limits.median_tokens_ratio:g})")
    return reasons


def _named(items: list[str], limit: int = NAMED) -> list[str]:
    return items[:limit] + ([f"… and {len(items) - limit} more"] if len(items) > limit else [])


def reject_examples(root: ArtifactsRoot, pieces: list[tuple[dict[str, Any], Any]], limit: int = NAMED) -> list[str]:
    """The first rejects of load-file pieces as `file:line: reason` (the pieces keep them in rejects.jsonl)."""
    out: list[str] = []
    for item, piece in pieces:
        if not piece.counts["rejected"]:
            continue
        with open(piece.dir(root) / REJECTS_FILE, encoding="utf-8") as f:
            for raw in f:
                r = json.loads(raw)
                out.append(f"{item['path']}:{r['line']}: {r['reason']}")
                if len(out) >= limit:
                    return out
    return out


def near_duplicates_in_line(root: ArtifactsRoot, drop_pieces: list, line_pieces: list, exact: set[str],
                            corpus: CorpusConfig) -> dict[str, Any]:
    """How many of the drop's documents (not exact copies, counted already) are near-duplicates of one the line
    has, from the cached signature pieces, and a few such pairs side by side."""
    from tasks.data.arrow import read_arrow
    from tasks.data.layout import piece_docs_file
    from tasks.data.near_pass import drop_matches
    from tasks.data.near_pieces import SAMPLES, SAMPLE_CHARS, piece_index

    cfg = corpus.near_dedup
    drop = piece_index(drop_pieces, [piece_docs_file(root, p.path) for p in drop_pieces], cfg, root)
    line = piece_index(line_pieces, [piece_docs_file(root, p.path) for p in line_pieces], cfg, root)
    tables = [read_arrow(piece_docs_file(root, p.path)) for p in [*line_pieces, *drop_pieces]]  # memory-mapped
    near = [m for m in drop_matches(line.parts, drop.parts, cfg.threshold, cfg.num_perm,
                                    lambda part, row: tables[part].column("text")[row].as_py(), cfg.shingle_chars,
                                    [*line.keys, *drop.keys])
            if m[0] not in exact]
    texts: dict[str, str] = {}
    wanted = {d for m in near[:SAMPLES] for d in m[:2]}
    for piece in [*drop_pieces, *line_pieces]:
        if wanted - texts.keys():
            table = read_arrow(piece_docs_file(root, piece.path)).select(["doc_id", "text"])
            for d, t in zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()):
                if d in wanted:
                    texts.setdefault(d, t[:SAMPLE_CHARS])
    samples = [{"similarity": round(j, 3), "drop": {"doc_id": d, "text": texts.get(d, "")},
                "line": {"doc_id": l, "text": texts.get(l, "")}} for d, l, j in near[:SAMPLES]]
    return {"near_duplicates": len(near), "near_duplicate_samples": samples}


def near_duplicate_pairs(drop: str, profile: dict[str, Any]) -> str:
    """Markdown: the drop's sample near-duplicate pairs side by side (drop | line), for a person to judge."""
    samples = profile.get("near_duplicate_samples") or []
    if not samples:
        return ""

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    rows = [f"| {s['similarity']:.2f} | {cell(s['drop']['text'])} | {cell(s['line']['text'])} |" for s in samples]
    return (f"\n## Near-duplicates in {drop} ({profile['near_duplicates']}; a few pairs)\n\n"
            "| similarity | drop | line |\n|---|---|---|\n" + "\n".join(rows) + "\n")


def ids_in_pieces(root: ArtifactsRoot, pieces: list, doc_ids: set[str], norm_ids: set[str]
                  ) -> tuple[set[str], set[str]]:
    """Which of `doc_ids` and of `norm_ids` (a drop's) the load-file `pieces` (its line's) hold: each piece's id
    columns are matched against the drop's in Arrow, one memory-mapped piece at a time, so memory holds the
    drop's ids and what matched, never the line's ids as Python strings."""
    found_ids: set[str] = set()
    found_norms: set[str] = set()
    if not pieces or not (doc_ids or norm_ids):
        return found_ids, found_norms
    wanted = {"doc_id": (pa.array(sorted(doc_ids), pa.string()), found_ids),
              "norm_id": (pa.array(sorted(norm_ids), pa.string()), found_norms)}
    for piece in pieces:
        table = read_arrow(piece_docs_file(root, piece.path))
        for column, (values, found) in wanted.items():
            ids = table.column(column)
            found.update(pc.filter(ids, pc.is_in(ids, value_set=values)).to_pylist())
    return found_ids, found_norms


def profile_drop(drop_files: list[Path], line_files: list[Path] | Fingerprint, config: CptConfig, tokenizer: Fingerprint,
                 root: ArtifactsRoot, digest, skipped: list[str] | None = None) -> dict[str, Any]:
    """Profile a drop against its line through the cached pieces: documents, rejects (the first ones named),
    too-short records, exact duplicates of the line's documents, documents whose text is in the line's
    validation split, median token length against the line's. `tokenizer` is the config's tokenizer
    Fingerprint; `skipped` names what listing the drop left out (a symlink out of it, a FIFO…)."""
    drop_fp = fingerprint_files(drop_files, digest)
    skipped = skipped or []
    profile: dict[str, Any] = {"files": len(drop_files), "records": 0, "documents": 0, "rejected": 0, "too_short": 0,
                               "duplicates_in_line": 0, "validation_matches": 0, "tokens": 0,
                               "median_tokens": None, "line_median_tokens": None,
                               "skipped": len(skipped), "skipped_files": _named(skipped),
                               "reject_examples": []}
    # File by file, so that under on_bad_record: fail every bad file is named with its place, not the first.
    loaded, failed = [], []
    for item in drop_fp.items:
        try:
            loaded += load_pieces([item], config.corpus, root)
        except (BadRecordError, OSError) as e:
            failed.append(str(e) if isinstance(e, BadRecordError) else f"{item['path']}: unreadable ({e})")
    if failed:
        return {**profile, "passed": False, "reasons": _named(failed)}
    loaded.sort(key=lambda p: (p[1].key, p[0]["path"]))  # load_pieces' order
    drop_pieces = [out for _, out, _ in loaded]
    for out in drop_pieces:
        for k in ("records", "rejected", "too_short"):
            profile[k] += out.counts[k]
    profile["reject_examples"] = reject_examples(root, [(item, out) for item, out, _ in loaded])
    # The line as it trains (tasks/line/sources.py: its drops by their recorded identities), or files to list.
    line_items = line_files.items if isinstance(line_files, Fingerprint) else \
        fingerprint_files(line_files, digest).items if line_files else []
    line_pieces = [out for _, out, _ in load_pieces(line_items, config.corpus, root)] if line_items else []

    drop_ids, drop_norms = piece_ids(root, drop_pieces)
    line_ids, line_norms = ids_in_pieces(root, line_pieces, drop_ids, drop_norms)
    profile["documents"] = len(drop_ids)
    profile["duplicates_in_line"] = len(line_ids)
    if config.corpus.near_dedup.enabled:
        profile.update(near_duplicates_in_line(root, drop_pieces, line_pieces, line_ids, config.corpus))
    # The shuffle rule decides a text's split from the text alone: only the drop's texts the line has are hashed.
    profile["validation_matches"] = len(validation_texts(line_norms, config.shuffle, config.split))

    if drop_ids:
        once = TokenizerOnce(tokenizer, config.model.trust_remote_code, root)

        def lengths_of(pieces: list) -> np.ndarray:
            parts = [LoadSource.of(o) for o in pieces]
            tokens = tokenize_pieces(parts, config.tokenize, tokenizer, root, config.model.trust_remote_code,
                                     tokenizer_once=once)
            return token_lengths(root, [o for o, _ in tokens])

        lengths = lengths_of(drop_pieces)
        profile["tokens"] = int(lengths.sum())
        profile["median_tokens"] = float(np.median(lengths)) if len(lengths) else None
        if line_pieces:
            line_lengths = lengths_of(line_pieces)
            profile["line_median_tokens"] = float(np.median(line_lengths)) if len(line_lengths) else None
    reasons = check_profile(profile, config.drops)
    return {**profile, "passed": not reasons, "reasons": reasons}


def gate_drops(config: CptConfig, root: ArtifactsRoot, line: str, settle_seconds: float, digests: DigestMemo,
               log) -> dict[str, Any]:
    """Gate every drop of the line that needs a verdict: pending ones, and active or rejected ones whose
    content changed since. Returns {"unsettled": [...], "rejected": [paths], "gated": [(drop, profile)]}.
    A drop removed (or otherwise changed) while it was gated keeps its status: its verdict is not recorded."""
    state = lines.read_line(root, line)
    out: dict[str, Any] = {"unsettled": [], "rejected": [], "gated": []}
    tokenizer = None

    def verdict(entry: lines.Drop, fingerprint: str, profile: dict[str, Any],
                identity: lines.DropIdentity | None = None) -> None:
        recorded = lines.record_verdict(root, line, entry.path, fingerprint, profile, gated=entry.status,
                                        identity=identity)
        if recorded is None:
            now = lines.read_line(root, line).find(entry.path)
            log.warning("drop gate: %s changed status while it was gated (%s → %s): its verdict (%s) is not "
                        "recorded", entry.path, entry.status, now.status if now else "gone",
                        "passed" if profile["passed"] else "rejected: " + "; ".join(profile["reasons"]))
            out["gated"].append((now or entry, {**profile, "not_recorded": True}))
            return
        out["gated"].append((recorded, profile))
        if profile.get("skipped"):
            log.warning("drop gate: %s: %d files skipped (only regular files are read, no symlink out of the drop): "
                        "%s", entry.path, profile["skipped"], "; ".join(profile["skipped_files"]))
        if profile["passed"]:
            log.info("drop gate: %s passed (%d files, %d documents, %d tokens); registered to line %r",
                     entry.path, profile["files"], profile["documents"], profile["tokens"], line)
        else:
            out["rejected"].append(entry.path)
            log.warning("drop gate: %s rejected: %s", entry.path, recorded.reason)

    def refused(reason: str, where: bool = False) -> dict[str, Any]:
        """A verdict without a profile; `where`: refused for its place or announcer (never the line's: not
        excluded from it, lines.LineState.inactive_paths)."""
        return {"files": 0, "documents": 0, "tokens": 0, "records": 0, "passed": False, "reasons": [reason],
                **({"refused": True} if where else {})}

    for entry in state.drops:
        if entry.status == "removed":
            continue
        if moved := symlinked(entry):  # never listed through: what it recorded stays out of the line
            if entry.status != "rejected":
                verdict(entry, "", refused(moved))
            continue
        # Where the drop lies is checked before anything in it is listed (`path: /` lists nothing).
        why_not = refusal(entry, config.drops)
        if why_not and entry.status != "active":
            if entry.status == "pending":
                verdict(entry, "", refused(why_not, where=True))
            continue  # rejected: stays so, unlisted
        try:
            files, skipped = drop_files(entry.path)
            busy = unsettled_files(files, settle_seconds)
            fingerprint = None if busy else fingerprint_files(files, digests.digest)
        except (ConfigError, OSError) as e:
            if entry.status == "active":
                raise ConfigError(f"line {line!r}: the active drop {entry.path} cannot be read ({e}); restore it, "
                                  f"or retire it with `cpt drops --line {line} --remove {entry.path}`") from None
            if entry.status == "pending":
                verdict(entry, "", refused(f"unreadable: {e}"))
            continue
        if busy:
            out["unsettled"] += busy
            continue
        identity = lines.DropIdentity.of(entry.path, fingerprint.items)  # its real path and files, as read now
        if entry.status in ("active", "rejected") and entry.identity == identity:
            continue  # verdict already given on exactly these files
        if why_not:  # an active drop whose content changed, where drops may no longer come from
            verdict(entry, fingerprint.digest, refused(why_not, where=True))
            continue
        # The line without this drop (which may sit under a configured folder), its drops as they were gated.
        line_files, _ = line_sources(config, state, digests.digest, without=entry)
        if tokenizer is None:
            tokenizer = resolve_tokenizer(config.model, digest=digests.digest)
        profile = profile_drop(files, line_files, config, tokenizer, root, digests.digest, skipped)
        verdict(entry, fingerprint.digest, profile, identity)
    digests.save()
    return out
