"""Near-dedup over load's pieces: per-piece MinHash signatures (`near-dedup-sig` entries) and the documents of
a line that are near-duplicates of one it had first (`near_dedup_rows`, load's assembly hook).

A signature piece is keyed by its load-file piece (the file's content and the reading settings) and the
signature settings, so a drop computes only its own signatures and a changed setting recomputes them from the
cached texts, never re-reading a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.core.config.data import NearDedupConfig, RuntimeConfig
from tasks.core.keys import register_code_version, stage_key
from tasks.core.manifest import StageOutput
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import publish_piece
from tasks.data import minhash, near_pass
from tasks.data.arrow import read_arrow
from tasks.data.layout import piece_docs_file

SIGNATURES_FILE = "signatures.npy"
SAMPLES = 5
SAMPLE_CHARS = 400


# Settings that decide which documents are near-duplicates, not what a signature is: tuning them recomputes no
# signature (the assembly, whose key holds them, bands the cached signatures again).
NOT_IN_SIGNATURES = frozenset({"threshold"})


def signature_key(piece: StageOutput, cfg: NearDedupConfig) -> str:
    material = {k: v for k, v in cfg.key_material().items() if k not in NOT_IN_SIGNATURES}
    return stage_key("near-dedup-sig", {"piece": piece.key, "near_dedup": material, "backend": minhash.BACKEND})


def signature_piece(piece: StageOutput, cfg: NearDedupConfig, root: ArtifactsRoot) -> tuple[StageOutput, bool]:
    """The MinHash signatures of one load-file piece's documents, in its row order. Its texts are read (fetched,
    on a worker that did not build the piece) only when the signatures are missing."""

    def build(tmp: Path):
        texts = read_arrow(piece_docs_file(root, piece.path)).column("text")  # hashed from its UTF-8 bytes
        sigs = minhash.signatures(texts, cfg.num_perm, cfg.shingle_chars, cfg.seed)
        np.save(tmp / SIGNATURES_FILE, sigs)
        return {"documents": len(texts)}, {}

    return publish_piece(root, "near-dedup-sig", signature_key(piece, cfg), build)


# 2: shingles hashed without a finaliser (rensa mixes its input), a text shorter than the n-gram padded.
register_code_version("near-dedup-sig", 2, [signature_piece], ["numpy", "pyarrow", "rensa"])


KEYS_FILE = "band_keys.npy"
LOOKUP_FILE = "band_lookup.npy"
CHARACTERS_FILE = "characters.npy"


def band_keys_piece(piece: StageOutput, sig: StageOutput, cfg: NearDedupConfig, root: ArtifactsRoot
                    ) -> tuple[StageOutput, bool]:
    """What a load-file piece contributes to the line's LSH index, cached so a line's later passes read it instead
    of computing it again for every piece on every drop: per document its band keys for the threshold's bands
    (`minhash.bands`: 112 bytes a document at 14 bands, instead of hashing its 512 bytes of signature again) and,
    in one more column, its doc_id as `minhash.sortable_ids` gives it (when the ids are load's hex ids: a line's
    ids were otherwise decoded from every piece's hex on each drop). Beside it, the same keys sorted
    (`minhash.band_lookup`: a drop's buckets are searched in them, never a scan of the line's keys) and each
    document's characters (load's count of the rows a piece keeps, summed without reading a text)."""
    b, r = minhash.bands(cfg.threshold, cfg.num_perm)
    key = stage_key("near-dedup-keys", {"signatures": sig.key, "bands": [b, r]})

    def build(tmp: Path):
        sigs = np.load(sig.dir(root) / SIGNATURES_FILE, mmap_mode="r")
        keys = minhash._band_keys(sigs.reshape(-1, cfg.num_perm), b, r)
        docs = read_arrow(piece_docs_file(root, piece.path))
        np.save(tmp / LOOKUP_FILE, minhash.band_lookup(keys))
        np.save(tmp / CHARACTERS_FILE, pc.utf8_length(docs.column("text")).to_numpy().astype(np.int64))
        ids = minhash.sortable_ids(docs.column("doc_id"))
        if ids.dtype == np.uint64 and len(ids) == len(keys):
            keys = np.concatenate([keys, ids[:, None]], axis=1)
        np.save(tmp / KEYS_FILE, keys)
        return {"documents": len(sigs)}, {}

    return publish_piece(root, "near-dedup-keys", key, build)


# 2: the piece's ids as a last column of its band keys. 3: the keys sorted and each document's characters beside.
register_code_version("near-dedup-keys", 3, [band_keys_piece], ["numpy", "pyarrow"])


def _signature_and_keys(piece: StageOutput, cfg: NearDedupConfig, root: ArtifactsRoot
                        ) -> tuple[StageOutput, StageOutput]:
    sig, _ = signature_piece(piece, cfg, root)
    keys, _ = band_keys_piece(piece, sig, cfg, root)
    return sig, keys


def keys_and_ids(entry: StageOutput, documents: int, cfg: NearDedupConfig, root: ArtifactsRoot
                 ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A keys piece's band keys ((documents, bands) uint64, memory-mapped) and its ids (uint64, or None where the
    piece's ids are not load's). (None, None) where the file does not fit the piece (`documents` rows, the
    threshold's bands, 64-bit): the pass then computes the keys from the signatures and reads the ids from the
    doc_id column, never trusting a file of another shape."""
    b, _ = minhash.bands(cfg.threshold, cfg.num_perm)
    try:
        table = np.load(entry.dir(root) / KEYS_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None, None
    if table.dtype != np.uint64 or table.ndim != 2 or len(table) != documents or table.shape[1] not in (b, b + 1):
        return None, None
    return (table, None) if table.shape[1] == b else (table[:, :b], table[:, b])


def _cached_array(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray | None:
    """The array saved at `path` (memory-mapped) when it is of `dtype` and `shape`, else None (a file of another
    shape or kind is never trusted: the caller does without it)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return array if array.dtype == dtype and array.shape == shape else None


def lookup_and_characters(entry: StageOutput, documents: int, cfg: NearDedupConfig, root: ArtifactsRoot
                          ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A keys piece's sorted band keys ((2, documents * bands) uint64: `minhash.band_lookup`) and its documents'
    characters ((documents,) int64), each None where its file does not fit the piece."""
    b, _ = minhash.bands(cfg.threshold, cfg.num_perm)
    folder = entry.dir(root)
    return (_cached_array(folder / LOOKUP_FILE, np.uint64, (2, documents * b)),
            _cached_array(folder / CHARACTERS_FILE, np.int64, (documents,)))


@dataclass
class PieceIndex:
    """The near-dedup index of some load-file pieces: per piece its doc_id column (memory-mapped Arrow), its
    signatures and band keys (memory-mapped), and the cache entries they came from."""
    parts: list[tuple[pa.ChunkedArray, np.ndarray]]
    keys: list[np.ndarray | None]  # per piece its band keys (None: not usable, computed from the signatures)
    ids: list[np.ndarray | None]  # per piece its ids as `minhash.sortable_ids` (uint64), where cached
    signature_keys: list[str]
    deps: list[str]
    lookups: list[np.ndarray | None] = field(default_factory=list)  # per piece `minhash.band_lookup`, where cached
    characters: list[np.ndarray | None] = field(default_factory=list)  # per piece each document's, where cached


def piece_index(pieces: list[StageOutput], docs_files: list[Path], cfg: NearDedupConfig, root: ArtifactsRoot,
                runtime: RuntimeConfig | None = None, docs: list[pa.Table] | None = None) -> PieceIndex:
    """Each load-file piece's signatures and band keys (`docs_files`: their doc_id/text tables, `docs` the same
    opened). The pieces missing are built through the same fan-out as load's (`runtime`), one per file: a drop
    computes its own files' only."""
    from tasks.core.fanout import map_pieces

    done = map_pieces(_signature_and_keys, [{"piece": piece, "cfg": cfg, "root": root} for piece in pieces],
                      runtime, "near-dedup-sig")
    docs = docs or [read_arrow(f) for f in docs_files]
    # The ids as the (memory-mapped) Arrow column and the signatures memory-mapped: the pass reads the rows it
    # compares only, so a line of millions of documents holds neither in memory.
    parts = [(table.column("doc_id"), np.load(sig.dir(root) / SIGNATURES_FILE, mmap_mode="r"))
             for table, (sig, _) in zip(docs, done)]
    keys, ids = zip(*[keys_and_ids(k, len(column), cfg, root) for (column, _), (_, k) in zip(parts, done)]
                    ) if done else ((), ())
    lookups, characters = zip(*[lookup_and_characters(k, len(column), cfg, root)
                                for (column, _), (_, k) in zip(parts, done)]) if done else ((), ())
    return PieceIndex(parts, list(keys), list(ids), [sig.key for sig, _ in done], [p.path for pair in done for p in pair],
                      list(lookups), list(characters))


def piece_signatures(pieces: list[StageOutput], docs_files: list[Path], cfg: NearDedupConfig, root: ArtifactsRoot,
                     runtime: RuntimeConfig | None = None, docs: list[pa.Table] | None = None
                     ) -> tuple[list[tuple[pa.ChunkedArray, np.ndarray]], list[str]]:
    """[(doc_id column, signatures)] per load-file piece, and the entries they came from (`piece_index`)."""
    index = piece_index(pieces, docs_files, cfg, root, runtime, docs)
    return index.parts, index.deps


STATE_FILE = "decisions.npz"


def state_key(signature_keys: list[str], ranks: list[int], cfg: NearDedupConfig) -> str:
    """The decisions' key: the set of pieces (each by its signature entry, with its rank: the order documents are
    visited in) and every setting that decides a pair (the threshold included)."""
    members = sorted({(k, r) for k, r in zip(signature_keys, ranks)})
    return stage_key("near-dedup-state", {"pieces": members, "near_dedup": cfg.key_material(),
                                          "margin": minhash.VERIFY_MARGIN})


def previous_decisions(signature_keys: list[str], ranks: list[int], cfg: NearDedupConfig, root: ArtifactsRoot
                       ) -> tuple[near_pass.Decisions | None, str | None]:
    """The decisions of a pass over most of these pieces, when one is cached: the line without its newest corpus
    path's pieces (a drop's: its documents come after all others, so nothing before them is decided again), else
    the line without one of its pieces (a file added to a folder the line reads). Each a lookup by key: no
    listing of the cache."""
    members = list(zip(signature_keys, ranks))
    tries = []
    if len(set(ranks)) > 1:
        top = max(ranks)
        tries.append([m for m in members if m[1] != top])
    if len(members) <= 256:
        tries += [members[:k] + members[k + 1:] for k in range(len(members))]
    for subset in tries:
        if not subset:
            continue
        key = state_key([k for k, _ in subset], [r for _, r in subset], cfg)
        found = root.published("near-dedup-state", key)
        if found is None:
            continue
        try:
            decisions = near_pass.Decisions.load(root.entry(found.path) / STATE_FILE)
        except Exception:  # an entry gone between the lookup and the read: decided again, never a crash
            decisions = None
        if decisions is not None:
            return decisions, found.path
    return None, None


@dataclass
class NearDedupResult:
    doc_ids: np.ndarray  # documents left out (every copy of them), as `minhash.sortable_ids`: sorted, distinct
    ranks: list[int]
    samples: list[dict[str, Any]]
    deps: list[str] = field(default_factory=list)
    state: str = ""  # the decisions' key: what was removed, decided by this code over these pieces
    stats: dict[str, Any] = field(default_factory=dict)
    ids: list[np.ndarray | None] = field(default_factory=list)  # per piece its cached sortable ids (PieceIndex)
    characters: list[np.ndarray | None] = field(default_factory=list)  # per piece each document's, where cached


def samples_of(found: list[minhash.NearDuplicate], docs: list[pa.Table], names: list[str], limit: int = SAMPLES
               ) -> list[dict[str, Any]]:
    """A few pairs side by side (the removed document and the one it repeats), for a person to judge."""
    out = []
    for d in found[:limit]:
        text = {}
        for side, (p, r) in (("removed", d.row), ("kept", d.kept)):
            t = docs[p].column("text")[r].as_py()
            text[side] = {"doc_id": d.doc_id if side == "removed" else d.kept_doc_id, "file": names[p],
                          "text": t[:SAMPLE_CHARS]}
        out.append({"similarity": round(d.similarity, 3), **text})
    return out


def near_dedup_rows(pieces: list[StageOutput], docs_files: list[Path], names: list[str], ranks: list[int],
                    cfg: NearDedupConfig, root: ArtifactsRoot, runtime: RuntimeConfig | None = None,
                    docs: list[pa.Table] | None = None) -> NearDedupResult:
    """load's assembly hook: which documents of its load-file pieces (in assembly order, each with its doc_id/text
    table, its file's name and its rank: lower is older in the line) are near-duplicates of one the line had
    before (`near_pass.decide`). The decisions are cached per set of pieces (`near-dedup-state`), and a pass starts
    from those of the line before this drop (`previous_decisions`): a drop of k files judges only the pairs that
    involve its documents. Independent of how the assembled output is written."""
    import tempfile
    import time

    started = time.perf_counter()
    docs = docs or [read_arrow(f) for f in docs_files]  # memory-mapped, opened once each (`docs`: by the caller)
    index = piece_index(pieces, docs_files, cfg, root, runtime, docs)
    key = state_key(index.signature_keys, ranks, cfg)
    stats = near_pass.DecideStats()
    found_list: list[minhash.NearDuplicate] = []
    removed = np.zeros(0, np.uint64)
    previous_path = None

    def build(tmp: Path):
        nonlocal found_list, removed, previous_path
        previous, previous_path = previous_decisions(index.signature_keys, ranks, cfg, root)
        removed, found_list, decisions = near_pass.line_pass(
            index.parts, ranks, cfg.threshold, cfg.num_perm, lambda p, r: docs[p].column("text")[r].as_py(),
            cfg.shingle_chars, index.keys, previous, stats, SAMPLES, index.ids, index.lookups)
        decisions.save(tmp / STATE_FILE)
        return {"documents": len(decisions.names), "near_duplicates": int((decisions.kept_by >= 0).sum()),
                "pairs": len(decisions.pair_a)}, {}

    state, built = root.publish("near-dedup-state", key, build)
    if not built:  # decided before over these very pieces (a load whose other inputs changed): taken as it is
        decisions = near_pass.Decisions.load(root.entry(state.path) / STATE_FILE)
        if decisions is None:  # damaged since it was verified: decided again here (a miss, never a crash)
            with tempfile.TemporaryDirectory() as tmp:
                build(Path(tmp))
        else:
            removed, found_list, _ = near_pass.line_pass(
                index.parts, ranks, cfg.threshold, cfg.num_perm, None, cfg.shingle_chars, index.keys, decisions,
                stats, SAMPLES, index.ids, index.lookups)
    summary = {"reused_rows": stats.reused_rows, "visited": stats.visited, "judged": stats.judged,
               "remembered": stats.remembered, "previous": previous_path or "",
               "seconds": round(time.perf_counter() - started, 3)}  # signatures, band keys and the pass
    return NearDedupResult(removed, ranks, samples_of(found_list, docs, names),
                           index.deps + [state.path], key, summary, index.ids, index.characters)


# The decisions follow from the code that takes them (the rule, the pair decision, the band choice).
register_code_version("near-dedup-state", 1, [near_dedup_rows], ["numpy", "pyarrow", "rensa"])
