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

from tasks.data.arrow import take_rows
from tasks.chunk import Chunks, link_or_copy, windows_file, write_windows
from tasks.core.config.data import ReplayConfig, SPLITS, ShuffleConfig
from tasks.core.report import run_logger
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import Build, stage

if TYPE_CHECKING:
    from tasks.load import Docs

def labelled_per_window(windows: pa.Table, bos: int) -> np.ndarray:
    """Labelled (trained) positions of each window's row: its length (BOS included) past `trained_from`. Only
    the window table is read, never the tokens."""
    lengths = windows.column("length").to_numpy().astype(np.int64) + bos
    return np.maximum(lengths - windows.column("trained_from").to_numpy().astype(np.int64), 0)


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


def drawn_windows(pool: pa.Table, rows: np.ndarray, keep_last: int, bos: int, part_offset: int,
                  batch_rows: int = 2048):
    """The drawn windows a block at a time (the draw may be a large share of the training set: it is never held
    whole), their `part` moved past the domain's token pieces. The last is cut to the shortest prefix holding
    `keep_last` labelled tokens (0: whole)."""
    for s in range(0, len(rows), batch_rows):
        taken = take_rows(pool, rows[s:s + batch_rows])
        part = taken.column("part").to_numpy() + part_offset
        taken = taken.set_column(0, "part", pa.array(part.astype(np.int32)))
        if keep_last and s + batch_rows >= len(rows):
            length = taken.column("length").to_numpy().copy()
            length[-1] = taken.column("trained_from")[-1].as_py() + keep_last - bos
            taken = taken.set_column(3, "length", pa.array(length.astype(np.int32)))
        yield taken


def mix_chunks(domain: Chunks, replay: Chunks, root: ArtifactsRoot, fraction: float, seed: int,
               out_dir: Path) -> dict[str, Any]:
    """The mixed windows at `out_dir` (the domain's, then the drawn replay windows, which refer to the replay's
    token pieces after the domain's); returns per-source token counts."""
    bos = 1 if domain.meta.bos_id is not None else 0
    for split in SPLITS:
        if split != "train":
            link_or_copy(domain.file(root, windows_file(split)), out_dir / windows_file(split))
    domain_train = domain.windows(root, "train")
    domain_labelled = int(labelled_per_window(domain_train, bos).sum())
    pool = replay.windows(root, "train")
    pool_labelled = labelled_per_window(pool, bos)
    target = replay_target(domain_labelled, fraction)
    rows, keep_last, passes = draw(pool_labelled, target, seed)
    counted = {"replay": 0}

    def replay_blocks():
        for block in drawn_windows(pool, rows, keep_last, bos, len(domain.token_files)):
            counted["replay"] += int(labelled_per_window(block, bos).sum())
            yield block

    write_windows(out_dir / windows_file("train"), [domain_train, *replay_blocks()])
    replay_labelled = counted["replay"]
    total = domain_labelled + replay_labelled
    return {
        "domain_trained_tokens": domain_labelled, "replay_trained_tokens": replay_labelled,
        "replay_share": replay_labelled / total if total else 0.0, "replay_fraction_asked": fraction,
        "domain_rows": domain_train.num_rows, "replay_rows": int(len(rows)), "replay_pool_rows": pool.num_rows,
        "replay_pool_tokens": int(pool_labelled.sum()), "replay_passes": passes,
    }


class Mixed(Chunks):
    """mix's output: the chunk stage's layout, the training windows followed by the drawn replay windows (which
    refer to the replay's token pieces)."""

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


@stage("mix", version=3, output=Mixed, libraries=["numpy", "pyarrow"])
def mix(build: Build, replay: ReplayConfig, shuffle: ShuffleConfig, chunks: Chunks, replay_chunks: Chunks):
    counts = mix_chunks(chunks, replay_chunks, build.root, replay.fraction, shuffle.seed, build.tmp)
    counts.update({k: v for k, v in chunks.counts.items() if k.startswith("validation_")})
    counts["train_chunks"] = counts["domain_rows"] + counts["replay_rows"]
    meta = {**chunks.meta.model_dump(), "token_pieces": chunks.meta.token_pieces + replay_chunks.meta.token_pieces}
    return counts, meta, {"deps": sorted(set(chunks.deps) | set(replay_chunks.deps))}


def replay_overlap(general_paths: list[str], replay_docs: Docs, root: ArtifactsRoot) -> tuple[int, int]:
    """(general-corpus documents whose normalised text is also a replay document, general documents)."""
    from tasks.core.config.data import CorpusConfig
    from tasks.data.files import resolve_corpus_files
    from tasks.data.readers import read_corpus_file
    from tasks.data.records import Record, norm_id_of

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
