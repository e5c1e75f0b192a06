"""load: corpus files → one Arrow table of documents (`doc_id`, `text`, `source`).

Every record either becomes a document, is counted as a duplicate or too short, or is a reject with
`file:line: reason`. Under `on_bad_record: fail` the first reject stops the stage with that message; under
`skip` rejects are kept in `rejects.jsonl` beside the output and counted. Nothing disappears silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import model_validator

from tasks.data.arrow import read_arrow
from tasks.core.config.data import CorpusConfig, RuntimeConfig
from tasks.core.keys import stage_key
from tasks.core.manifest import Fingerprint, OutputMeta, StageOutput
from tasks.core.report import Progress
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import Build, stage
from tasks.data.files import path_ranks  # noqa: F401 (where it was)
from tasks.data.near_pieces import near_dedup_rows
from tasks.data.layout import DOCS_FILE, INDEX_FILE, REJECTS_FILE, LoadPart
from tasks.data.pieces import assemble_documents, load_pieces, merge_counts, read_documents


class NearDedupPass(OutputMeta):
    """What near-dedup's pass reused, visited, judged and remembered, and its seconds (tasks.data.near_pieces)."""

    reused_rows: int
    visited: int
    judged: int
    remembered: int
    previous: str  # the decisions' entry the pass started from ("" when none): a label, never opened from here
    seconds: float


class LoadMeta(OutputMeta):
    parts: list[LoadPart]  # per source file, in corpus order (its `part` number in the index)
    near_duplicate_samples: list[dict[str, Any]] | None = None  # a few pairs, texts only, for a person to judge
    near_dedup_pass: NearDedupPass | None = None


class Docs(StageOutput):
    """load's output: `index.arrow` (doc_id, norm_id, part, row, line: where each document lives in the per-file
    pieces, no text) and `rejects.jsonl`; the texts stay in the pieces (`parts`, each a load-file entry with
    its own docs.arrow of doc_id, text, norm_id, line), found by key among the output's deps."""

    meta: LoadMeta

    @model_validator(mode="after")
    def _parts_are_deps(self):
        for part in self.meta.parts:
            self.refers(part.rel)
        return self

    def index_file(self, root: ArtifactsRoot) -> Path:
        return self.dir(root) / INDEX_FILE

    def index(self, root: ArtifactsRoot, columns: list[str] | None = None) -> pa.Table:
        """The index (memory-mapped), or some of its columns."""
        table = read_arrow(self.index_file(root))
        return table.select(columns) if columns else table

    def norm_ids(self, root: ArtifactsRoot) -> set[str]:
        return set(pc.unique(self.index(root, ["norm_id"]).column("norm_id")).to_pylist())

    def text_reader(self, root: ArtifactsRoot, rows: pa.Table | None = None) -> Callable[[int], str]:
        """The text of the index's row i (or of `rows`' row i: a table of `part` and `row`, such as a split of
        shuffle's), read from its memory-mapped piece when asked (one text at a time in memory, each piece
        opened once)."""
        index = rows if rows is not None else self.index(root, ["part", "row"])
        part, row = index.column("part").to_numpy(), index.column("row").to_numpy()
        columns: dict[int, pa.ChunkedArray] = {}

        def text_of(i: int) -> str:
            p = int(part[i])
            if p not in columns:
                columns[p] = read_arrow(root.file(self.parts[p].rel, DOCS_FILE)).column("text")
            return columns[p][int(row[i])].as_py()

        return text_of

    def part_dirs(self, root: ArtifactsRoot) -> list[Path]:
        return [root.entry(p.rel) for p in self.parts]

    def documents(self, root: ArtifactsRoot) -> pa.Table:
        """Every document with its text and `source` (path:line), joined from the pieces: for tools and tests on
        small corpora (the stages read piece by piece)."""
        return read_documents(self.index_file(root), self.part_dirs(root), [p.name for p in self.parts])

    def rejects_file(self, root: ArtifactsRoot) -> Path:
        return self.dir(root) / REJECTS_FILE

    @property
    def parts(self) -> list[LoadPart]:
        """Per source file: name, key, content and counts of its piece, in corpus order (its `part`)."""
        return self.meta.parts

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        c = self.counts
        lines = [(logging.INFO, f"{c['documents']} documents from {c['files']} files ({c['files_read']} read now, the "
                                f"rest cached by content; {c['records']} records; {c['rejected']} rejected, "
                                f"{c['duplicates']} duplicates, "
                                + (f"{c['near_duplicates']} near-duplicates, " if "near_duplicates" in c else "")
                                + f"{c['too_short']} too short)")]
        if c["rejected"]:
            lines.append((logging.WARNING, f"{c['rejected']} rejected records kept in {self.rejects_file(root)}"))
        return lines


# Bytes the data stages write per corpus byte, at most: load's pieces ~1.0, tokens 0.4 (uint16) to 0.9 (uint32),
# chunks 0.7 to 1.4 at a 50% overlap (bench.scale) — 3.3 with the widest ids, rounded up.
WRITTEN_PER_CORPUS_BYTE = 3.5


def disk_shortfall(folder: Path, corpus_bytes: int) -> str | None:
    """A warning when the artifacts' disk may not hold what the data stages write for this corpus: said before
    hours of tokenizing, not as a full disk at the end (files built before are not written again, so this is
    an upper bound)."""
    import shutil

    need = int(corpus_bytes * WRITTEN_PER_CORPUS_BYTE)
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return None
    if free >= need:
        return None
    return (f"load: the data stages may write up to {need / 1e9:,.1f} GB under {folder} "
            f"({WRITTEN_PER_CORPUS_BYTE}× the {corpus_bytes / 1e9:,.1f} GB of corpus files, less what is cached) "
            f"and {free / 1e9:,.1f} GB is free there")


def load_inputs(corpus: CorpusConfig, sources: Fingerprint) -> dict[str, Any]:
    """load's inputs for `corpus` and its fingerprint `sources`: the files, and with near-dedup on each file's
    rank (`path_ranks`: which document of a group is kept follows it, so it is in the key; corpus.paths itself
    is not, and reordering it over the same files must not serve the old keep-choice)."""
    files = [i["path"] for i in sources.items]
    if not corpus.near_dedup.enabled:
        ranks = None
    elif sources.items and all("rank" in i for i in sources.items):  # a line's: its drops ranked as they joined
        ranks = [int(i["rank"]) for i in sources.items]
    else:
        ranks = path_ranks(corpus, files)
    return dict(corpus=corpus, sources=sources, files=files, ranks=ranks)


@stage("load", version=2, output=Docs, libraries=["pyarrow", "numpy"], key_exclude={"runtime"})
def load(build: Build, corpus: CorpusConfig, sources: Fingerprint, files: list[str],
         runtime: RuntimeConfig | None = None, ranks: list[int] | None = None):
    """`files` are the resolved paths of `sources` (they go into the `source` column, so into this key);
    `ranks` their ranks, with near-dedup on (`load_inputs` makes both; without them, the order of `files`, which
    is in the key too). What the stages below see is the output's `content`: the pieces it was made of, not
    their paths."""
    if corpus.near_dedup.enabled and ranks is None:
        ranks = list(range(len(files)))
    if corpus.near_dedup.enabled and len(ranks) != len(files):
        raise ValueError(f"load: {len(ranks)} ranks for {len(files)} files (load_inputs makes both)")
    total = sum(item.get("bytes", 0) for item in sources.items)
    short = disk_shortfall(build.root.local, total)
    if short:
        build.log.warning(short)
    with Progress(total, "load", unit="B") as progress:
        pieces = load_pieces(sources.items, corpus, build.root, runtime, progress)
    parts = [out for _, out, _ in pieces]
    # Each piece's docs.arrow opened once (memory-mapped) for near-dedup and the assembly both: an open costs more
    # the larger the file (~0.3 ms at 8 MB), and a drop onto a long line opened every piece twice.
    tables = [read_arrow(p.dir(build.root) / DOCS_FILE) for p in parts]
    near = None
    if corpus.near_dedup.enabled:
        names = [item["path"] for item, _, _ in pieces]
        rank_of = dict(zip(files, ranks))
        near = near_dedup_rows(parts, [p.dir(build.root) / DOCS_FILE for p in parts], names,
                               [rank_of[n] for n in names], corpus.near_dedup, build.root,
                               runtime, tables)
    assembled = assemble_documents([p.dir(build.root) for p in parts], [i["path"] for i, _, _ in pieces],
                                   build.tmp, corpus.deduplicate, [p.counts["characters"] for p in parts],
                                   near.doc_ids if near else None, near.ids if near else None,
                                   near.characters if near else None, tables)
    counts = merge_counts([p.counts for p in parts], assembled)
    counts["files_read"] = sum(not reused for _, _, reused in pieces)
    meta = {"parts": [{"name": item["path"], "key": p.key, "content": p.content, **p.counts}
                      for item, p, _ in pieces]}
    material = {"deduplicate": corpus.deduplicate, "parts": [p.content or p.key for p in parts]}
    deps = [p.path for p in parts]
    if near is not None:
        # Off, nothing of near-dedup enters the key or the output: today's content key and outputs.
        counts["near_duplicates"] = counts.get("near_duplicates", 0)
        for i, n in enumerate(assembled["near_per_part"]):
            meta["parts"][i]["near_duplicates"] = n
        meta["near_duplicate_samples"] = near.samples
        meta["near_dedup_pass"] = near.stats
        material.update(near_dedup=corpus.near_dedup.key_material(), ranks=near.ranks, near_dedup_state=near.state)
        deps += near.deps
    content = stage_key("load-content", material)
    return counts, meta, {"content": content, "deps": deps}
