"""shuffle: a seeded document order and a document-level train/validation split, made before chunking.

Both come from a keyed hash of (seed, doc_id), mapped to u in [0, 1): a document is in validation when
u < validation_fraction, and documents are ordered by u. So a document's split and relative order depend only
on the seed and the document itself — never on file order or on what else is in the corpus. A corpus drop
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


def split_documents(doc_ids: list[str], seed: int, fraction: float) -> dict[str, np.ndarray]:
    """Row indices per split, each in shuffled order (ascending u)."""
    u = split_values(doc_ids, seed)
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


def write_split(table: pa.Table, indices: np.ndarray, path: Path) -> None:
    """The rows `indices` of `table`, in that order, with the table's own columns."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for start in range(0, len(indices), _WRITE_BATCH):
            writer.write_table(table.take(pa.array(indices[start : start + _WRITE_BATCH])))


@stage_task("shuffle", libraries=["numpy", "pyarrow"])
def shuffle(shuffle: ShuffleConfig, split: SplitConfig, docs: StageOutput, artifacts: str) -> StageOutput:
    from prefect.logging import get_run_logger

    key = current_key("shuffle", {"shuffle": shuffle, "split": split, "docs": docs})

    def build(tmp: Path):
        # Only where each document lives goes on: tokenize reads tokens of the per-file outputs.
        table = read_arrow(docs.dir(artifacts) / DOCS_FILE).drop_columns(["text"])
        parts = split_documents(table.column("doc_id").to_pylist(), shuffle.seed, split.validation_fraction)
        counts = {}
        for name in SPLITS:
            write_split(table, parts[name], tmp / f"{name}.arrow")
            counts[f"{name}_documents"] = len(parts[name])
        return counts, {}

    out = publish(artifacts, "shuffle", key, build)
    get_run_logger().info("shuffle: %d train / %d validation documents (seed %d)",
                          out.counts["train_documents"], out.counts["validation_documents"], shuffle.seed)
    return out
