"""shuffle: a seeded document order and a document-level train/validation split, made before chunking.

Both come from a keyed hash of (seed, the document's whitespace-normalised text), mapped to u in [0, 1): a
document is in validation when u < validation_fraction, and documents are ordered by u. So a document's split
and relative order depend only on the seed and the document itself — never on file order or on what else is in
the corpus — and a later copy of a validation document (re-exported with other line breaks or spacing) lands in
validation too, never in training. Such copies are held out of validation as well (one document per
normalised text is kept there) and counted (`validation_copies_held_out`). A corpus drop
adds documents without moving any old one between splits, which keeps validation loss comparable across
retrains and lets the later stages reuse everything computed for the old files. The split sizes follow the
fraction statistically (for n documents, within a few sqrt(n·f) of n·f); a corpus too small to put any
document under the threshold still gets one validation document, the one with the smallest u.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.cache import StageOutput, current_key, publish, stage_task
from tasks.report import run_logger
from tasks.config import ConfigError, ShuffleConfig, SplitConfig
from tasks.load import DOCS_FILE, read_arrow

SPLITS = ("train", "validation")
_WRITE_BATCH = 2048


def split_values(doc_ids: list[str], seed: int) -> np.ndarray:
    """u in [0, 1) per document: a keyed hash of (seed, doc_id)."""
    salt = seed.to_bytes(16, "little", signed=True)
    keys = np.fromiter(
        (int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8, key=salt).digest(), "little") for d in doc_ids),
        dtype=np.uint64,
        count=len(doc_ids),
    )
    return (keys >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_documents(doc_ids: list[str], seed: int, fraction: float,
                    norm_ids: list[str] | None = None) -> dict[str, np.ndarray]:
    """Row indices per split, each in shuffled order (ascending u). With `norm_ids`, u comes from them, so
    documents equal after whitespace normalisation always share a split."""
    u = split_values(norm_ids if norm_ids is not None else doc_ids, seed)
    # Ties are astronomically unlikely; doc_id breaks them so the order is total anyway.
    order = np.lexsort((np.array(doc_ids, dtype=object).astype(str), u))
    u = u[order]
    n_val = int(np.searchsorted(u, fraction, side="left")) if fraction > 0 else 0
    if fraction > 0 and n_val == 0:
        n_val = 1
    if fraction > 0 and n_val >= len(doc_ids):
        raise ConfigError(
            f"split.validation_fraction: {fraction} of {len(doc_ids)} documents leaves no training document"
        )
    return {"validation": order[:n_val], "train": order[n_val:]}


def one_per_text(rows: np.ndarray, norm_ids: list[str], doc_ids: list[str]) -> tuple[np.ndarray, int]:
    """`rows` keeping one document per normalised text (the smallest doc_id, whatever the file order), and how
    many copies were dropped."""
    best: dict[str, int] = {}
    for r in rows.tolist():
        n = norm_ids[r]
        if n not in best or doc_ids[r] < doc_ids[best[n]]:
            best[n] = r
    keep = set(best.values())
    kept = np.array([r for r in rows.tolist() if r in keep], dtype=rows.dtype)
    return kept, len(rows) - len(kept)


def write_split(table: pa.Table, indices: np.ndarray, path: Path) -> None:
    """The rows `indices` of `table`, in that order, with the table's own columns."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for start in range(0, len(indices), _WRITE_BATCH):
            writer.write_table(table.take(pa.array(indices[start : start + _WRITE_BATCH])))


@stage_task("shuffle", version=1, code=[split_values, split_documents, one_per_text, write_split],
            libraries=["numpy", "pyarrow"])
def shuffle(shuffle: ShuffleConfig, split: SplitConfig, docs: StageOutput, artifacts: str) -> StageOutput:

    key = current_key("shuffle", {"shuffle": shuffle, "split": split, "docs": docs})

    def build(tmp: Path):
        # Only where each document lives goes on (no text, no path): tokenize reads the per-file outputs.
        table = read_arrow(docs.dir(artifacts) / DOCS_FILE).select(["doc_id", "norm_id", "part", "row"])
        doc_ids, norm_ids = table.column("doc_id").to_pylist(), table.column("norm_id").to_pylist()
        parts = split_documents(doc_ids, shuffle.seed, split.validation_fraction, norm_ids)
        parts["validation"], held_out = one_per_text(parts["validation"], norm_ids, doc_ids)
        counts = {"validation_copies_held_out": held_out}
        for name in SPLITS:
            write_split(table, parts[name], tmp / f"{name}.arrow")
            counts[f"{name}_documents"] = len(parts[name])
        return counts, {}

    out = publish(artifacts, "shuffle", key, build)
    log = run_logger()
    log.info("shuffle: %d train / %d validation documents (seed %d)",
             out.counts["train_documents"], out.counts["validation_documents"], shuffle.seed)
    if out.counts["validation_copies_held_out"]:
        log.warning("shuffle: %d documents repeat a validation document's text (after whitespace normalisation): "
                    "held out of training and of validation", out.counts["validation_copies_held_out"])
    return out
