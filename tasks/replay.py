"""mix: the training set with replay. Domain training chunks plus a seeded draw of replay chunks sized so that
replay makes up `replay.fraction` of the labelled (trained) tokens; validation stays the domain's own.

The replay text goes through the same cached load/shuffle/tokenize/chunk stages as the corpus (all of it in
the train split); this stage only draws from its chunks. The domain shards are linked, not copied, and the
draw is written as one more shard, so a new fraction costs one small write. The last drawn chunk is cut to the
exact number of labelled tokens still needed, so the share is exact to the token, not to a chunk. A replay
corpus smaller than its share is drawn from again (a fresh permutation per pass) and the passes are counted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from tasks.arrow import labelled_lengths, take_rows
from tasks.chunk import Chunks, chunk_arrow_schema, link_or_copy, write_dataset_dict
from tasks.core.config import SPLITS, ReplayConfig, ShuffleConfig
from tasks.core.report import run_logger
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import Build, stage

if TYPE_CHECKING:
    from tasks.load import Docs

REPLAY_SHARD = "replay.arrow"


def read_shard(path: Path) -> pa.Table:
    """A datasets shard (Arrow IPC stream), memory-mapped."""
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()


def labelled_per_row(rows: pa.Table) -> np.ndarray:
    """Labelled (trained) positions of each chunk row: its length past `trained_from`. Only list offsets and
    one int per row are read, never the tokens."""
    parts = [labelled_lengths(b.column("input_ids"), b.column("trained_from").to_numpy()) for b in rows.to_batches()]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def replay_target(domain_tokens: int, fraction: float) -> int:
    """Replay tokens R with R / (domain + R) = fraction."""
    return int(round(fraction * domain_tokens / (1 - fraction))) if fraction > 0 else 0


def draw(labelled: np.ndarray, target: int, seed: int) -> tuple[np.ndarray, int, int]:
    """Rows to take (in a seeded order, repeated in fresh permutations when the pool is too small), how many
    labelled tokens of the last row to keep (0: all of it), and the number of passes over the pool."""
    if target <= 0 or labelled.sum() == 0:
        return np.zeros(0, dtype=np.int64), 0, 0
    rng = np.random.default_rng(seed)
    order, got, passes = [], 0, 0
    while got < target:
        perm = rng.permutation(len(labelled))
        cum = got + np.cumsum(labelled[perm])
        passes += 1
        stop = int(np.searchsorted(cum, target))  # first row reaching the target
        if stop < len(perm):
            order.append(perm[: stop + 1])
            got_before = int(cum[stop - 1]) if stop > 0 else got
            keep = target - got_before
            return np.concatenate(order), (0 if keep == labelled[perm[stop]] else keep), passes
        order.append(perm)
        got = int(cum[-1])
    return np.concatenate(order), 0, passes


def write_replay_shard(pool: pa.Table, rows: np.ndarray, keep_last: int, dst: Path, ids_type: pa.DataType,
                       batch_rows: int = 2048) -> int:
    """The drawn rows as a datasets shard at `dst`, a block of rows at a time (the draw may be a large share of
    the training set: it is never held whole); returns the labelled tokens written. The last row is cut to the
    shortest prefix holding `keep_last` labelled tokens (0: whole)."""
    schema = chunk_arrow_schema(ids_type)
    written = 0
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for s in range(0, len(rows), batch_rows):
            block = rows[s:s + batch_rows]
            taken = take_rows(pool, block).select(schema.names).combine_chunks()
            if keep_last and s + batch_rows >= len(rows):
                last = taken.slice(len(block) - 1)
                cut = last.column("trained_from")[0].as_py() + keep_last
                ids = last.column("input_ids").chunk(0)
                trimmed = pa.ListArray.from_arrays(pa.array([0, cut], pa.int32()), ids.flatten().slice(0, cut))
                last = last.set_column(0, "input_ids", pa.chunked_array([trimmed.cast(schema.field(0).type)]))
                taken = pa.concat_tables([taken.slice(0, len(block) - 1), last]).combine_chunks()
            taken = taken.cast(schema)
            writer.write_table(taken)
            written += int(labelled_per_row(taken).sum())
    return written


def mix_chunks(domain: Chunks, replay: Chunks, root: ArtifactsRoot, fraction: float, seed: int,
               out_dir: Path) -> dict[str, Any]:
    """The mixed DatasetDict at `out_dir`; returns per-source token counts."""
    listing: dict[str, list[str]] = {}
    domain_labelled = domain_rows = 0
    for split in SPLITS:
        (out_dir / split).mkdir(parents=True)
        files = domain.shard_files(root, split)
        listing[split] = []
        for i, src in enumerate(files):
            name = f"data-{i:05d}.arrow"
            link_or_copy(src, out_dir / split / name)
            listing[split].append(name)
            if split == "train":
                table = read_shard(src)
                domain_rows += table.num_rows
                domain_labelled += int(labelled_per_row(table).sum())
    pool = pa.concat_tables([read_shard(f) for f in replay.shard_files(root, "train")])
    pool_labelled = labelled_per_row(pool)
    target = replay_target(domain_labelled, fraction)
    rows, keep_last, passes = draw(pool_labelled, target, seed)
    # The domain's id type: every shard of a split must have the same schema (both come from one tokenizer).
    ids_type = read_shard(domain.shard_files(root, "train")[0]).schema.field("input_ids").type.value_type
    replay_labelled = write_replay_shard(pool, rows, keep_last, out_dir / "train" / REPLAY_SHARD, ids_type)
    listing["train"].append(REPLAY_SHARD)
    write_dataset_dict(out_dir, listing, f"mix{seed}{fraction}{domain_labelled}{replay_labelled}", ids_type)
    total = domain_labelled + replay_labelled
    return {
        "domain_trained_tokens": domain_labelled, "replay_trained_tokens": replay_labelled,
        "replay_share": replay_labelled / total if total else 0.0, "replay_fraction_asked": fraction,
        "domain_rows": domain_rows, "replay_rows": int(len(rows)), "replay_pool_rows": pool.num_rows,
        "replay_pool_tokens": int(pool_labelled.sum()), "replay_passes": passes,
    }


class Mixed(Chunks):
    """mix's output: the chunk stage's DatasetDict layout, the training split with one shard of replay rows."""

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        c = self.counts
        lines = [(logging.INFO, f"{c['domain_trained_tokens']} domain + {c['replay_trained_tokens']} replay trained "
                                f"tokens (replay share {c['replay_share']:.4f}, asked {c['replay_fraction_asked']:.4f}; "
                                f"{c['replay_rows']} replay rows)")]
        if c["replay_passes"] > 1:
            lines.append((logging.WARNING, f"the replay text ({c['replay_pool_tokens']} trained tokens) is smaller than "
                          f"its share ({c['replay_trained_tokens']} tokens): it is repeated {c['replay_passes']} times; "
                          "add replay text to avoid overfitting it"))
        return lines


@stage("mix", version=2, output=Mixed, libraries=["numpy", "pyarrow", "datasets"])
def mix(build: Build, replay: ReplayConfig, shuffle: ShuffleConfig, chunks: Chunks, replay_chunks: Chunks):
    counts = mix_chunks(chunks, replay_chunks, build.root, replay.fraction, shuffle.seed, build.tmp)
    counts.update({k: v for k, v in chunks.counts.items() if k.startswith("validation_")})
    return counts, dict(chunks.meta)


def replay_overlap(general_paths: list[str], replay_docs: Docs, root: ArtifactsRoot) -> tuple[int, int]:
    """(general-corpus documents whose normalised text is also a replay document, general documents)."""
    from tasks.core.config import CorpusConfig
    from tasks.load import Record, norm_id_of, read_corpus_file, resolve_corpus_files

    cfg = CorpusConfig(paths=general_paths, on_bad_record="skip")
    general = {norm_id_of(r.text) for f in resolve_corpus_files(cfg) for r in read_corpus_file(f, cfg)
               if isinstance(r, Record) and r.text.strip()}
    replay = replay_docs.norm_ids(root)
    return len(general & replay), len(general)


def contamination_warnings(general_paths: list[str], replay_docs: Docs, root: ArtifactsRoot) -> list[str]:
    """Warnings (logged, and kept in the run summary) when the general evaluation corpus shares documents with
    the replay text: the forgetting measure would then be measured on text the model trained on."""
    if not general_paths:
        return []
    shared, total = replay_overlap(general_paths, replay_docs, root)
    if not shared:
        return []
    msg = (f"replay: {shared} of the {total} documents of evaluate.general_corpus are also in replay.paths: "
           "the general perplexity (the forgetting measure) is contaminated; hold them out of the replay text")
    run_logger().warning(msg)
    return [msg]
