"""The drop gate: whether a corpus drop may join a training line, decided before any GPU time.

A drop announced to a line (tasks/line/lines.py) is profiled against the line through the stages' own public
functions — the same cached per-file pieces the pipeline then reuses, so the run that admits a drop reads it
once — and registered (active) or rejected with its reasons:

- documents, rejected and too-short records (load's pieces);
- exact duplicates of documents the line already has (load's ids);
- documents whose text the line's validation split holds (the shuffle stage's rule);
- the median document length in tokens against the line's (tokenize's pieces).

A drop still being written is not gated: a folder holding a `_WRITING` file is being written, and so is any file
modified less than `settle_seconds` ago; the drop stays pending, is left out of the run (the line trains on
everything else) and a later run picks it up — or rejects it once it has been pending for
`drops.max_pending_hours` (its producer died mid-write).

A drop can fail; its line cannot. Before anything in it is read, a drop over `drops.max_files`,
`drops.max_bytes` or `drops.max_depth` is rejected naming the limit (`drop_census`: the walk stops at the
limit), and so is a drop whose folder became a symlink after it was announced. Any error while a drop is gated
— MemoryError and RecursionError included, whatever the reader — rejects that drop with its reason.

Nothing a drop sends escapes its folder or stops its line: a drop must lie inside one of `drops.roots` (and one
an event announced is refused while that list is empty), only its regular files are read and no symlink out of
it is followed (what is skipped is named in its profile), and a file that cannot be read is a reject with its
place, never an exception. A rejected drop is excluded from every later run of the line.
"""

from __future__ import annotations

import json
import os
import stat
import time
from datetime import datetime, timezone
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
from tasks.core.fence import LockLost
from tasks.core.objectstore import LockTimeout
from tasks.core.root import ArtifactsRoot, EntryUnavailable
from tasks.data.files import fingerprint_files, list_corpus_files
from tasks.data.readers import supported_suffixes
from tasks.data.layout import REJECTS_FILE, LoadSource, piece_docs_file
from tasks.data.pieces import load_pieces, piece_ids
from tasks.data.records import BadRecordError
from tasks.shuffle import validation_texts
from tasks.line import lines
from tasks.line.sources import line_sources
from tasks.tokenize import TokenizerOnce, resolve_tokenizer, token_lengths, tokenize_pieces

WRITING_MARKER = "_WRITING"
PIECES_NAMED = 10_000  # a drop's pieces recorded in its profile (retention keeps them until it is trained on)
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


def drop_census(path: str, limits: DropsConfig) -> str | None:
    """Why a drop is over `drops.max_files`, `drops.max_bytes` or `drops.max_depth` (or became a symlink), found
    by a walk that reads no file and stops at the first limit it meets (a million files, a tree 1,800 folders
    deep: only as far as the limit is looked at); None when it is within them. Counted as the listing would read:
    corpus files, not hidden names; no symlink followed."""
    if os.path.islink(path):
        return f"{path} is a symlink now (it was a folder when announced): a drop is a folder of files"
    suffixes = supported_suffixes()
    files = size = 0
    todo = [(path, 0)]
    while todo:
        folder, depth = todo.pop()
        if depth > limits.max_depth:
            return (f"folders nested over {limits.max_depth} deep (drops.max_depth={limits.max_depth}), e.g. "
                    f"{folder[len(path):][:200]}…: not read")
        try:
            entries = list(os.scandir(folder))
        except NotADirectoryError:
            entries = None
        except OSError:
            continue  # the listing names it (skipped, with why)
        if entries is None:  # a drop that is one file
            st = os.stat(folder)
            files, size = 1, st.st_size
            break
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                todo.append((e.path, depth + 1))
            elif stat.S_ISREG(st.st_mode) and os.path.splitext(e.name)[1].lower() in suffixes:
                files += 1
                size += st.st_size
                if files > limits.max_files:
                    return f"over {limits.max_files} corpus files (drops.max_files={limits.max_files}): not read"
                if size > limits.max_bytes:
                    return (f"over {limits.max_bytes} bytes of corpus files (drops.max_bytes={limits.max_bytes}): "
                            "not read")
    return None


def pending_hours(entry: lines.Drop, now: float | None = None) -> float:
    """How long the drop has been pending: since its last announcement (the newest `pending` in its history)."""
    at = next((h["at"] for h in reversed(entry.history) if h.get("status") == "pending"), entry.registered_at)
    try:
        since = datetime.strptime(at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, ((time.time() if now is None else now) - since) / 3600)


# What a drop's gate may raise that is not the drop's doing: the store lease lost, an entry collected under the
# gate, a lock held too long. The drop stays as it is and the next run gates it again.
INFRASTRUCTURE_ERRORS = (LockLost, EntryUnavailable, LockTimeout)


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
                            corpus: CorpusConfig, line_docs: list[pa.Table] | None = None) -> dict[str, Any]:
    """How many of the drop's documents (not exact copies, counted already) are near-duplicates of one the line
    has, from the cached signature pieces, and a few such pairs side by side. `line_docs`: the line pieces'
    tables, where the caller opened them already."""
    from tasks.data.arrow import read_arrow
    from tasks.data.layout import piece_docs_file
    from tasks.data.near_pass import drop_matches
    from tasks.data.near_pieces import SAMPLES, SAMPLE_CHARS, piece_index

    cfg = corpus.near_dedup
    line_paths = [piece_docs_file(root, p.path) for p in line_pieces]
    drop_paths = [piece_docs_file(root, p.path) for p in drop_pieces]
    # Memory-mapped, each opened once for its index and its texts.
    line_docs = line_docs if line_docs is not None else [read_arrow(f) for f in line_paths]
    drop_docs = [read_arrow(f) for f in drop_paths]
    drop = piece_index(drop_pieces, drop_paths, cfg, root, docs=drop_docs)
    line = piece_index(line_pieces, line_paths, cfg, root, docs=line_docs)
    tables = [*line_docs, *drop_docs]
    near = [m for m in drop_matches(line.parts, drop.parts, cfg.threshold, cfg.num_perm,
                                    lambda part, row: tables[part].column("text")[row].as_py(), cfg.shingle_chars,
                                    [*line.keys, *drop.keys], [*line.ids, *drop.ids],
                                    [*line.lookups, *drop.lookups])
            if m[0] not in exact]
    texts: dict[str, str] = {}
    wanted = {d for m in near[:SAMPLES] for d in m[:2]}
    for opened in [*drop_docs, *line_docs]:
        if wanted - texts.keys():  # only the wanted rows' texts made Python strings, not every piece's
            table = opened.select(["doc_id", "text"])
            table = table.filter(pc.is_in(table.column("doc_id"), value_set=pa.array(sorted(wanted), pa.string())))
            for d, t in zip(table.column("doc_id").to_pylist(), table.column("text").to_pylist()):
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


def ids_in_pieces(root: ArtifactsRoot, pieces: list, doc_ids: set[str], norm_ids: set[str],
                  docs: list[pa.Table] | None = None) -> tuple[set[str], set[str]]:
    """Which of `doc_ids` and of `norm_ids` (a drop's) the load-file `pieces` (its line's) hold: each piece's id
    columns are matched against the drop's in Arrow, one memory-mapped piece at a time, so memory holds the
    drop's ids and what matched, never the line's ids as Python strings. `docs`: the pieces' tables, where the
    caller opened them already."""
    found_ids: set[str] = set()
    found_norms: set[str] = set()
    if not pieces or not (doc_ids or norm_ids):
        return found_ids, found_norms
    wanted = {"doc_id": (pa.array(sorted(doc_ids), pa.string()), found_ids),
              "norm_id": (pa.array(sorted(norm_ids), pa.string()), found_norms)}
    for table in docs if docs is not None else (read_arrow(piece_docs_file(root, p.path)) for p in pieces):
        for column, (values, found) in wanted.items():
            ids = table.column(column)
            found.update(pc.filter(ids, pc.is_in(ids, value_set=values)).to_pylist())
    return found_ids, found_norms


def profile_drop(drop_files: list[Path], line_files: list[Path] | Fingerprint, config: CptConfig,
                 tokenizer: Fingerprint, root: ArtifactsRoot, digest, skipped: list[str] | None = None) -> dict[str, Any]:
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
            loaded += load_pieces([item], config.drop_corpus, root)
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
    line_pieces = [out for _, out, _ in load_pieces(line_items, config.drop_corpus, root)] if line_items else []

    drop_ids, drop_norms = piece_ids(root, drop_pieces)
    line_docs = [read_arrow(piece_docs_file(root, p.path)) for p in line_pieces]  # memory-mapped, opened once
    line_ids, line_norms = ids_in_pieces(root, line_pieces, drop_ids, drop_norms, line_docs)
    profile["documents"] = len(drop_ids)
    profile["duplicates_in_line"] = len(line_ids)
    if config.drop_corpus.near_dedup.enabled:
        profile.update(near_duplicates_in_line(root, drop_pieces, line_pieces, line_ids, config.drop_corpus,
                                               line_docs))
    # The shuffle rule decides a text's split from the text alone: only the drop's texts the line has are hashed.
    source = next(d for d in config.data_sources() if d.name == config.drop_source)  # its own split fraction
    profile["validation_matches"] = len(validation_texts(line_norms, source.shuffle, source.split))

    if drop_ids:
        once = TokenizerOnce(tokenizer, config.model.trust_remote_code, root)

        made: list[str] = []

        def lengths_of(pieces: list) -> np.ndarray:
            parts = [LoadSource.of(o) for o in pieces]
            tokens = tokenize_pieces(parts, config.tokenize, tokenizer, root, config.model.trust_remote_code,
                                     tokenizer_once=once)
            made.extend(o.path for o, _ in tokens)
            return token_lengths(root, [o for o, _ in tokens])

        lengths = lengths_of(drop_pieces)
        profile["tokens"] = int(lengths.sum())
        # What the line's next run looks up of this drop, kept by garbage collection until it has trained on it.
        if len(drop_pieces) <= PIECES_NAMED:
            profile["pieces"] = sorted({o.path for o in drop_pieces} | set(made))
        profile["median_tokens"] = float(np.median(lengths)) if len(lengths) else None
        if line_pieces:
            line_lengths = lengths_of(line_pieces)
            profile["line_median_tokens"] = float(np.median(line_lengths)) if len(line_lengths) else None
    reasons = check_profile(profile, config.drops)
    return {**profile, "passed": not reasons, "reasons": reasons}


def gate_drops(config: CptConfig, root: ArtifactsRoot, line: str, settle_seconds: float, digests: DigestMemo,
               log) -> dict[str, Any]:
    """Gate every drop of the line that needs a verdict: pending ones, and active or rejected ones whose
    content changed since. Returns {"unsettled": [what is being written], "left_out": [drops left out of this
    run, being written], "rejected": [paths], "gated": [(drop, profile)]}. A drop removed (or otherwise changed)
    while it was gated keeps its status: its verdict is not recorded. Nothing a drop holds raises out of here:
    any error gating it rejects it (tasks/line/drop_gate.py's docstring)."""
    state = lines.read_line(root, line)
    out: dict[str, Any] = {"unsettled": [], "left_out": [], "rejected": [], "gated": []}
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
            if entry.status != "rejected":  # newly rejected: this run trains nothing; one rejected before never
                out["rejected"].append(entry.path)  # stops a later run (the line goes on without it)
            log.warning("drop gate: %s rejected: %s", entry.path, recorded.reason)

    refused = _refused

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
            gated = gate_one(entry, config, root, state, settle_seconds, digests, out["left_out"], tokenizer)
        except INFRASTRUCTURE_ERRORS as e:
            log.warning("drop gate: %s: %s: %s; it is gated again by the next run", entry.path, type(e).__name__, e)
            out["left_out"].append(entry.path)
            continue
        except Exception as e:  # MemoryError, RecursionError, a reader's bug: the drop's, never the line's
            # Recorded without an identity: a rejected drop keeps the one it had, so the same files are not gated again.
            gated = ("verdict", entry.fingerprint if entry.status == "rejected" else "", _failed(e), None)
        if gated is None:
            continue
        if gated[0] == "busy":
            _, busy = gated
            if entry.status == "pending" and pending_hours(entry) > config.drops.max_pending_hours:
                verdict(entry, "", refused(
                    f"still being written {pending_hours(entry):.1f} hours after it was announced, over "
                    f"drops.max_pending_hours={config.drops.max_pending_hours:g} ({'; '.join(busy[:3])})"))
            elif entry.status == "rejected":
                continue  # still being written and already out of the line: it stays rejected, left out of nothing
            else:
                out["unsettled"] += busy
                out["left_out"].append(entry.path)
            continue
        _, fingerprint, profile, identity = gated
        tokenizer = profile.pop("_tokenizer", tokenizer)
        verdict(entry, fingerprint, profile, identity)
    digests.save()
    return out


def gate_one(entry: lines.Drop, config: CptConfig, root: ArtifactsRoot, state: lines.LineState,
             settle_seconds: float, digests: DigestMemo, left_out: list[str], tokenizer=None):
    """One drop through the gate: ("busy", what is being written), ("verdict", fingerprint, profile, identity:
    what was read, None when nothing was), or None (its verdict stands: the same files as when it was given)."""
    why_not = refusal(entry, config.drops)
    over = drop_census(entry.path, config.drops) if Path(entry.path).exists() or os.path.islink(entry.path) else None
    if over:
        return None if entry.status == "rejected" and entry.reason == over else ("verdict", "", _refused(over), None)
    try:
        files, skipped = drop_files(entry.path)
        busy = unsettled_files(files, settle_seconds)
        fingerprint = None if busy else fingerprint_files(files, digests.digest)
    except (ConfigError, OSError) as e:
        if entry.status == "rejected":
            return None
        was = "was active; now " if entry.status == "active" else ""
        return "verdict", "", _refused(f"{was}unreadable: {e}" + ("; the line trains without it"
                                                                  if entry.status == "active" else "")), None
    if busy:
        return "busy", busy
    identity = lines.DropIdentity.of(entry.path, fingerprint.items)  # its real path and files, as read now
    if entry.status in ("active", "rejected") and entry.identity == identity:
        return None  # verdict already given on exactly these files
    if why_not:  # an active drop whose content changed, where drops may no longer come from
        return "verdict", fingerprint.digest, _refused(why_not, where=True), None
    # The line without this drop (which may sit under a configured folder) and without the drops left out of this
    # run, its drops as they were gated (tasks/line/sources.py).
    line_files, _ = line_sources(config, state, digests.digest, without=[entry, *left_out])
    if tokenizer is None:
        tokenizer = resolve_tokenizer(config.model, digest=digests.digest)
    try:
        profile = profile_drop(files, line_files, config, tokenizer, root, digests.digest, skipped)
    except INFRASTRUCTURE_ERRORS:
        raise
    except Exception as e:  # recorded with its content's fingerprint: the same content is not gated again
        return "verdict", fingerprint.digest, _failed(e), identity
    return "verdict", fingerprint.digest, {**profile, "_tokenizer": tokenizer}, identity


def _failed(e: BaseException) -> dict[str, Any]:
    what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return _refused(f"error while gating the drop: {what}")


def _refused(reason: str, where: bool = False) -> dict[str, Any]:
    """A verdict without a profile; `where`: refused for its place or announcer (never the line's: not excluded
    from it, lines.LineState.inactive_paths)."""
    return {"files": 0, "documents": 0, "tokens": 0, "records": 0, "passed": False, "reasons": [reason],
            **({"refused": True} if where else {})}
