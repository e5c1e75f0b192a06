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
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from tasks.data.arrow import take_rows
from tasks.core.config.base import ConfigError
from tasks.core.config.data import DecontaminateConfig, SPLITS, ShuffleConfig, SplitConfig
from tasks.core.manifest import NoMeta, StageOutput
from tasks.data.contamination import ContaminationIndex
from tasks.data.minhash import sortable_ids
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import Build, stage

if TYPE_CHECKING:
    from tasks.data.held_out_text import HeldOut
    from tasks.load import Docs

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


# The ids as an array that sorts as the strings do, in little memory (8 bytes a load id; a numpy string array of
# 724k ids held 185 MB).
_in_string_order = sortable_ids


def split_documents(doc_ids: list[str], seed: int, fraction: float,
                    norm_ids: list[str] | None = None) -> dict[str, np.ndarray]:
    """Row indices per split, each in shuffled order (ascending u). With `norm_ids`, u comes from them, so
    documents equal after whitespace normalisation always share a split."""
    u = split_values(norm_ids if norm_ids is not None else doc_ids, seed)
    # Documents equal after normalisation tie on u; doc_id breaks ties, so the order is total.
    order = np.lexsort((_in_string_order(doc_ids), u))
    u = u[order]
    n_val = int(np.searchsorted(u, fraction, side="left")) if fraction > 0 else 0
    if fraction > 0 and n_val == 0:
        n_val = 1
    if fraction > 0 and n_val >= len(doc_ids):
        raise ConfigError(
            f"split.validation_fraction: {fraction} of {len(doc_ids)} documents leaves no training document"
        )
    return {"validation": order[:n_val], "train": order[n_val:]}


def validation_texts(norm_ids: set[str], shuffle: ShuffleConfig, split: SplitConfig) -> set[str]:
    """Which of these normalised texts the shuffle stage puts in validation (its rule: u < the fraction)."""
    if not norm_ids or split.validation_fraction <= 0:
        return set()
    norms = sorted(norm_ids)
    u = split_values(norms, shuffle.seed)
    return {n for n, v in zip(norms, u) if v < split.validation_fraction}


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
            writer.write_table(take_rows(table, indices[start : start + _WRITE_BATCH]))


FEW = 5  # a split with fewer documents than this is warned about


class Split(StageOutput):
    """shuffle's output: per split, `<split>.arrow` (doc_id, norm_id, part, row) in training order: where each
    document lives in the per-file pieces, no text."""

    meta: NoMeta = NoMeta()

    def split_file(self, root: ArtifactsRoot, split: str) -> Path:
        return self.dir(root) / f"{split}.arrow"

    def few_documents(self) -> str | None:
        """A warning when a split holds fewer than a handful of documents (FEW): its perplexity, and the promotion
        gate deciding on it, then speak for one or two texts."""
        c = self.counts
        small = [f"{c[f'{name}_documents']} {name}" for name in ("train", "validation")  # none: no validation asked
                 if c[f"{name}_documents"] < FEW and (name == "train" or c[f"{name}_documents"])]
        if not small:
            return None
        return (f"few documents in a split ({' / '.join(small)} documents, fewer than {FEW}): the validation "
                "perplexity and the gate then speak for a text or two. A .txt file is one document (corpus.txt_split: "
                "paragraph makes each paragraph one); add documents, or change split.validation_fraction")

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        c = self.counts
        lines = [(logging.INFO, f"{c['train_documents']} train / {c['validation_documents']} validation documents")]
        if warning := self.few_documents():
            lines.append((logging.WARNING, warning))
        if c.get("decontaminated"):
            lines.append((logging.WARNING, f"{c['decontaminated']} training documents share a long span with "
                          "validation or evaluation text: removed from training (" + ", ".join(
                              f"{k.removeprefix('decontaminated_by_')}: {v}" for k, v in c.items()
                              if k.startswith("decontaminated_by_")) + ")"))
        if c["validation_copies_held_out"]:
            lines.append((logging.WARNING, f"{c['validation_copies_held_out']} documents repeat a validation document's "
                          "text (after whitespace normalisation): held out of training and of validation"))
        return lines


def decontaminate(train: np.ndarray, text_of: Callable[[int], str], validation: np.ndarray,
                  held_out: Iterable[tuple[str, str]], cfg: DecontaminateConfig,
                  batch_chars: int = 1 << 24) -> tuple[np.ndarray, dict[str, int]]:
    """`train` less the rows whose text shares a long span with a validation text or a held-out text, and how
    many were removed per source matched. Validation and the held-out texts are never changed. What is held:
    the held-out grams (`ContaminationIndex`, 10 bytes a gram, about two a held-out character), one byte a
    training row, and training texts of about `batch_chars` characters at a time."""
    index = ContaminationIndex(cfg.min_words, cfg.min_chars)
    for r in validation.tolist():
        index.add(text_of(r), "validation split")
    for text, source in held_out:
        index.add(text, source)
    if not len(index):
        return train, {}
    keep = np.ones(len(train), dtype=bool)
    matched: dict[str, int] = {}
    batch: list[str] = []
    start = size = 0

    def check() -> None:
        for k, source in enumerate(index.match_many(batch)):
            if source is not None:
                keep[start + k] = False
                label = source.split(" (")[0]
                matched[label] = matched.get(label, 0) + 1

    for i in range(len(train)):
        batch.append(text_of(int(train[i])))
        size += len(batch[-1])
        if size >= batch_chars:
            check()
            batch, start, size = [], i + 1, 0
    check()
    return train[keep], matched


def count_name(source: str) -> str:
    """`decontaminated_by_<source>`: the source's label with every run of other characters as one `_`."""
    return "decontaminated_by_" + re.sub(r"[^0-9A-Za-z]+", "_", source).strip("_")


@stage("shuffle", version=1, output=Split, libraries=["numpy", "pyarrow"])
def shuffle(build: Build, shuffle: ShuffleConfig, split: SplitConfig, docs: Docs, held_out: HeldOut | None = None):
    """`held_out`: evaluation text training must not contain (the held-out stage: evaluate.general_corpus, the
    evaluation tasks' documents, for the replay text the domain's validation split); used only when
    shuffle.decontaminate is on. Its content is in this stage's key."""
    # Only where each document lives goes on (no text, no path): tokenize reads the per-file outputs.
    table = docs.index(build.root, ["doc_id", "norm_id", "part", "row"])
    doc_ids, norm_ids = table.column("doc_id").to_pylist(), table.column("norm_id").to_pylist()
    parts = split_documents(doc_ids, shuffle.seed, split.validation_fraction, norm_ids)
    parts["validation"], held_out_copies = one_per_text(parts["validation"], norm_ids, doc_ids)
    counts = {"validation_copies_held_out": held_out_copies}
    if shuffle.decontaminate.enabled:
        parts["train"], matched = decontaminate(parts["train"], docs.text_reader(build.root), parts["validation"],
                                                held_out.texts(build.root) if held_out is not None else (),
                                                shuffle.decontaminate)
        counts["decontaminated"] = sum(matched.values())
        counts.update({count_name(k): v for k, v in matched.items()})
    for name in SPLITS:
        write_split(table, parts[name], build.tmp / f"{name}.arrow")
        counts[f"{name}_documents"] = len(parts[name])
    return counts, {}
