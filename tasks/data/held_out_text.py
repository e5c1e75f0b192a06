"""The held-out text's layout: `held_out.arrow` (text, source), one row a held-out document, written by
`gather` (tasks/held_out.py's stage) and read by `HeldOut.texts` (shuffle's decontamination). Apart from the
stage so that shuffle, which reads it, and the stage, which reads shuffle's validation split, import one
another's types in one direction only."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa

from tasks.core.manifest import OutputMeta, StageOutput
from tasks.core.root import ArtifactsRoot
from tasks.data.arrow import read_arrow

HELD_OUT_FILE = "held_out.arrow"
SCHEMA = pa.schema([("text", pa.large_string()), ("source", pa.string())])
_BATCH = 1024


class HeldOutMeta(OutputMeta):
    tasks_not_checked: dict[str, str] = {}  # evaluate.tasks whose data is not at hand: name -> why


class HeldOut(StageOutput):
    """held-out's output: `held_out.arrow` (text, source), one row a held-out document."""

    meta: HeldOutMeta = HeldOutMeta()

    def held_out_file(self, root: ArtifactsRoot) -> Path:
        return self.dir(root) / HELD_OUT_FILE

    def texts(self, root: ArtifactsRoot) -> Iterator[tuple[str, str]]:
        """(text, source) of every held-out document, a record batch at a time from the memory-mapped file."""
        for batch in read_arrow(self.held_out_file(root)).to_batches(_BATCH):
            yield from zip(batch.column("text").to_pylist(), batch.column("source").to_pylist())

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        c = self.counts
        lines = [(logging.INFO, f"{c['documents']} held-out documents (" + ", ".join(
            f"{k.removeprefix('documents_from_')}: {v}" for k, v in c.items() if k.startswith("documents_from_"))
            + ")")]
        for name, why in self.meta.tasks_not_checked.items():
            lines.append((logging.WARNING, f"evaluate.tasks {name!r}: its data is not at hand, so training is NOT "
                          f"checked against it ({why})"))
        return lines


def gather(rows: Iterable[tuple[str, str]], path: Path) -> tuple[dict[str, int], str]:
    """Write the (text, source) `rows` to `path` a batch at a time, empty texts left out; returns documents per
    source and the digest of the rows (the output's content)."""
    h = hashlib.blake2b(digest_size=16)
    counts: dict[str, int] = {}
    texts: list[str] = []
    sources: list[str] = []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        def flush() -> None:
            if texts:
                writer.write_batch(pa.record_batch([pa.array(texts, pa.large_string()), pa.array(sources)],
                                                   schema=SCHEMA))
                texts.clear()
                sources.clear()

        for text, source in rows:
            if not text.strip():
                continue
            for part in (source, text):
                b = part.encode()
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
            texts.append(text)
            sources.append(source)
            counts[source] = counts.get(source, 0) + 1
            if len(texts) >= _BATCH:
                flush()
        flush()
    return counts, h.hexdigest()
