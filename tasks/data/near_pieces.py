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

from tasks.core.config.data import NearDedupConfig, RuntimeConfig
from tasks.core.keys import register_code_version, stage_key
from tasks.core.manifest import StageOutput
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import publish_piece
from tasks.data import minhash
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


def piece_signatures(pieces: list[StageOutput], docs_files: list[Path], cfg: NearDedupConfig, root: ArtifactsRoot,
                     runtime: RuntimeConfig | None = None, docs: list[pa.Table] | None = None
                     ) -> tuple[list[tuple[pa.ChunkedArray, np.ndarray]], list[str]]:
    """[(doc_id column, signatures)] per load-file piece (`docs_files`: their doc_id/text tables, `docs` the same
    opened), and the signature pieces' paths (the load output's deps). The pieces missing are built through the
    same fan-out as load's (`runtime`), one per file."""
    from tasks.core.fanout import map_pieces

    done = map_pieces(signature_piece, [{"piece": piece, "cfg": cfg, "root": root} for piece in pieces], runtime,
                      "near-dedup-sig")
    docs = docs or [read_arrow(f) for f in docs_files]
    # The ids as the (memory-mapped) Arrow column and the signatures memory-mapped: the LSH reads a block of rows
    # at a time, so a line of millions of documents holds neither in memory.
    out = [(table.column("doc_id"), np.load(sig.dir(root) / SIGNATURES_FILE, mmap_mode="r"))
           for table, (sig, _) in zip(docs, done)]
    return out, [sig.path for sig, _ in done]


@dataclass
class NearDedupResult:
    doc_ids: set[str]  # documents left out (every copy of them)
    ranks: list[int]
    samples: list[dict[str, Any]]
    deps: list[str] = field(default_factory=list)


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
                    cfg: NearDedupConfig, root: ArtifactsRoot, runtime: RuntimeConfig | None = None
                    ) -> NearDedupResult:
    """load's assembly hook: which documents of its load-file pieces (in assembly order, each with its doc_id/text
    table, its file's name and its rank: lower is older in the line) are near-duplicates of one the line had
    before (`minhash.near_duplicates`). Independent of how the assembled output is written."""
    docs = [read_arrow(f) for f in docs_files]  # memory-mapped, opened once each
    parts, deps = piece_signatures(pieces, docs_files, cfg, root, runtime, docs)
    found = minhash.near_duplicates(parts, ranks, cfg.threshold, cfg.num_perm,
                                       lambda p, r: docs[p].column("text")[r].as_py(), cfg.shingle_chars)
    return NearDedupResult({d.doc_id for d in found}, ranks, samples_of(found, docs, names), deps)
