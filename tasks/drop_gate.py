"""The drop gate: whether a corpus drop may join a training line, decided before any GPU time.

A drop announced to a line (tasks/state/lines.py) is profiled against the line through the stages' own public
functions — the same cached per-file pieces the pipeline then reuses, so the run that admits a drop reads it
once — and registered (active) or rejected with its reasons:

- documents, rejected and too-short records (load's pieces);
- exact duplicates of documents the line already has (load's ids);
- documents whose text the line's validation split holds (the shuffle stage's rule);
- the median document length in tokens against the line's (tokenize's pieces).

A drop still being written is not gated: a folder holding a `_WRITING` file is being written, and so is any file
modified less than `settle_seconds` ago; the drop stays pending and a later run picks it up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.config import ConfigError, CorpusConfig, CptConfig, DropsConfig
from tasks.core.manifest import DigestMemo, Fingerprint
from tasks.core.root import ArtifactsRoot
from tasks.load import BadRecordError, fingerprint_files, load_pieces, piece_ids, resolve_corpus_files
from tasks.shuffle import validation_texts
from tasks.state import lines
from tasks.tokenize import TokenizerOnce, resolve_tokenizer, token_lengths, tokenize_pieces

WRITING_MARKER = "_WRITING"


def unsettled_files(files: list[Path], settle_seconds: float, now: float | None = None) -> list[str]:
    """Files modified less than `settle_seconds` ago, and folders marked as being written."""
    now = time.time() if now is None else now
    busy = sorted({str(f.parent) for f in files if (f.parent / WRITING_MARKER).exists()})
    busy += [f"{f} (modified {now - f.stat().st_mtime:.0f}s ago)" for f in files
             if now - f.stat().st_mtime < settle_seconds]
    return busy


def line_config(config: CptConfig, state: lines.LineState, without: str | None = None) -> CptConfig:
    """The config a line trains with: its corpus plus the active drops, less every other drop (a rejected or
    removed drop inside a configured folder is not read either) and less the drop `without`."""
    active = [p for p in state.active_paths() if p not in config.corpus.paths and p != without]
    excluded = [*state.inactive_paths(), *([without] if without else [])]
    corpus = config.corpus.model_copy(update={"paths": [*config.corpus.paths, *active],
                                              "exclude": [*config.corpus.exclude, *excluded]})
    return config.model_copy(update={"corpus": corpus})


def drop_files(path: str) -> list[Path]:
    return resolve_corpus_files(CorpusConfig(paths=[path]))


def check_profile(profile: dict[str, Any], limits: DropsConfig) -> list[str]:
    """Reasons a drop fails `limits`; empty when it passes."""
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


def profile_drop(drop_files: list[Path], line_files: list[Path], config: CptConfig, tokenizer: Fingerprint,
                 root: ArtifactsRoot, digest) -> dict[str, Any]:
    """Profile a drop against its line through the cached pieces: documents, rejects, too-short records,
    exact duplicates of the line's documents, documents whose text is in the line's validation split, median
    token length against the line's. `tokenizer` is the config's tokenizer Fingerprint."""
    drop_fp = fingerprint_files(drop_files, digest)
    profile: dict[str, Any] = {"files": len(drop_files), "records": 0, "documents": 0, "rejected": 0, "too_short": 0,
                               "duplicates_in_line": 0, "validation_matches": 0, "tokens": 0,
                               "median_tokens": None, "line_median_tokens": None}
    try:
        drop_pieces = [out for _, out, _ in load_pieces(drop_fp.items, config.corpus, root)]
    except BadRecordError as e:  # on_bad_record: fail and a bad record: the drop fails with its place
        return {**profile, "passed": False, "reasons": [str(e)]}
    for out in drop_pieces:
        for k in ("records", "rejected", "too_short"):
            profile[k] += out.counts[k]
    line_pieces = ([out for _, out, _ in load_pieces(fingerprint_files(line_files, digest).items, config.corpus,
                                                     root)] if line_files else [])

    (drop_ids, drop_norms), (line_ids, line_norms) = piece_ids(root, drop_pieces), piece_ids(root, line_pieces)
    profile["documents"] = len(drop_ids)
    profile["duplicates_in_line"] = len(drop_ids & line_ids)
    profile["validation_matches"] = len(drop_norms & validation_texts(line_norms, config.shuffle, config.split))

    if drop_ids:
        once = TokenizerOnce(tokenizer, config.model.trust_remote_code, root)

        def lengths_of(pieces: list) -> np.ndarray:
            parts = [{"key": o.key, "path": o.path, "content": o.content, "documents": o.counts["documents"]}
                     for o in pieces]
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
    content changed since. Returns {"unsettled": [...], "rejected": [paths], "gated": [(drop, profile)]}."""
    state = lines.read_line(root, line)
    out: dict[str, Any] = {"unsettled": [], "rejected": [], "gated": []}
    tokenizer = None
    for entry in state.drops:
        if entry.status == "removed":
            continue
        try:
            files = drop_files(entry.path)
        except ConfigError as e:
            if entry.status == "active":
                raise ConfigError(f"line {line!r}: the active drop {entry.path} cannot be read ({e}); restore it, "
                                  f"or retire it with `cpt drops --line {line} --remove {entry.path}`") from None
            if entry.status == "pending":
                profile = {"files": 0, "documents": 0, "tokens": 0, "records": 0, "passed": False,
                           "reasons": [f"unreadable: {e}"]}
                out["rejected"].append(entry.path)
                out["gated"].append((lines.record_verdict(root, line, entry.path, "", profile), profile))
            continue
        busy = unsettled_files(files, settle_seconds)
        if busy:
            out["unsettled"] += busy
            continue
        fingerprint = fingerprint_files(files, digests.digest)
        if entry.status in ("active", "rejected") and fingerprint.digest == entry.fingerprint:
            continue  # verdict already given on this content
        # The line without this drop (which may sit under a configured folder).
        line_files = resolve_corpus_files(line_config(config, state, without=entry.path).corpus)
        if tokenizer is None:
            tokenizer = resolve_tokenizer(config.model, digest=digests.digest)
        profile = profile_drop(files, line_files, config, tokenizer, root, digests.digest)
        verdict = lines.record_verdict(root, line, entry.path, fingerprint.digest, profile)
        out["gated"].append((verdict, profile))
        if profile["passed"]:
            log.info("drop gate: %s passed (%d files, %d documents, %d tokens); registered to line %r",
                     entry.path, profile["files"], profile["documents"], profile["tokens"], line)
        else:
            out["rejected"].append(entry.path)
            log.warning("drop gate: %s rejected: %s", entry.path, verdict.reason)
    digests.save()
    return out
