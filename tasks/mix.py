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
from tasks.chunk import ChunkMeta, Chunks, link_or_copy, windows_file, write_windows
from tasks.core.config.data import ReplayConfig, SPLITS, ShuffleConfig
from tasks.core.config.sources import MixShare
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


# ------------------------------------------------------------------------------------- many sources


def source_seed(seed: int, name: str) -> list[int]:
    """A source's own draw seed, from shuffle.seed and its name: adding or reordering sources changes no other
    source's order (torchtitan reseeds every later child instead), and a new share takes a prefix or an extension
    of the same seeded order."""
    import hashlib

    return [seed, int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")]


def source_targets(pools: list[int], shares: list[MixShare]) -> tuple[list[int], float]:
    """Trained tokens to take from each source, and the total they were sized from. A source in `epochs` gives
    round(epochs x its tokens); the weighted ones share the rest: total = fixed / (1 - their weights), or, with every
    source weighted, the total at which the first is read once (its tokens / its weight)."""
    fixed = [round(s.epochs * p) for s, p in zip(shares, pools) if s.epochs is not None]
    weight = sum(s.weight for s in shares if s.weight is not None)
    if fixed:
        total = sum(fixed) / (1 - weight) if weight < 1 else float(sum(fixed))
    else:
        total = pools[0] / shares[0].weight
    return [round(s.epochs * p) if s.epochs is not None else int(round(s.weight * total))
            for s, p in zip(shares, pools)], total


def taken_windows(pool: pa.Table, labelled: np.ndarray, target: int, epochs: float | None, seed, bos: int,
                  part_offset: int) -> tuple[list[pa.Table], int]:
    """A source's training windows for `target` trained tokens (its `part` moved past the sources before it): a
    source read exactly once keeps its windows in their order; otherwise a seeded draw (fresh permutations per
    pass, the last window cut to the token). Returns the window tables and the passes over the pool."""
    if epochs == 1.0:
        return [with_offset(pool, part_offset)], 1
    rows, keep_last, passes = draw(labelled, target, seed)
    return list(drawn_windows(pool, rows, keep_last, bos, part_offset)), passes


def with_offset(table: pa.Table, offset: int) -> pa.Table:
    part = table.column("part").to_numpy() + offset
    return table.set_column(0, "part", pa.array(part.astype(np.int32)))


def mix_sources_chunks(sources: list[Chunks], shares: list[MixShare], root: ArtifactsRoot, seed: int,
                       out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The mixed windows at `out_dir`: every source's share of the training windows, one after another, and every
    source's validation windows (each source keeps its own: `meta.sources` gives their rows). Returns the counts
    and the per-source table (trained tokens, share got and asked, passes, pool, validation rows)."""
    bos = 1 if sources[0].meta.bos_id is not None else 0
    pools = [s.windows(root, "train") for s in sources]
    labelled = [labelled_per_window(p, bos) for p in pools]
    targets, total = source_targets([int(x.sum()) for x in labelled], shares)
    offsets = np.cumsum([0] + [len(s.token_files) for s in sources]).tolist()
    taken, table = [], []
    for i, (src, share) in enumerate(zip(sources, shares)):
        windows, passes = taken_windows(pools[i], labelled[i], targets[i], share.epochs, source_seed(seed, share.name),
                                        bos, offsets[i])
        got = sum(int(labelled_per_window(w, bos).sum()) for w in windows)
        taken += windows
        table.append({"source": share.name, "trained_tokens": got, "share_asked": targets[i] / total if total else 0.0,
                      "rows": sum(w.num_rows for w in windows), "passes": passes, "pool_tokens": int(labelled[i].sum()),
                      "pool_rows": pools[i].num_rows, "parts": [offsets[i], offsets[i + 1]]})
    write_windows(out_dir / windows_file("train"), taken)
    validation, start = [], 0
    for i, src in enumerate(sources):
        v = with_offset(src.windows(root, "validation"), offsets[i])
        validation.append(v)
        table[i]["validation_rows"] = [start, start + v.num_rows]
        table[i]["validation_tokens"] = int(labelled_per_window(v, bos).sum())
        start += v.num_rows
    write_windows(out_dir / windows_file("validation"), validation)
    trained = sum(t["trained_tokens"] for t in table)
    for t in table:
        t["share"] = t["trained_tokens"] / trained if trained else 0.0
    counts = {"train_trained_tokens": trained, "train_chunks": sum(t["rows"] for t in table),
              "validation_chunks": start, "validation_trained_tokens": sum(t["validation_tokens"] for t in table)}
    for t in table:
        counts.update({f"{t['source']}_trained_tokens": t["trained_tokens"], f"{t['source']}_share": t["share"],
                       f"{t['source']}_passes": t["passes"]})
    return counts, table


class MixedSourcesMeta(ChunkMeta):
    """The chunk meta of the first source, the token pieces of every source (in order: a window's `part` is
    offset past the sources before it), and per source what it got (`mix_sources_chunks`' table)."""

    sources: list[dict[str, Any]]


class MixedSources(Chunks):
    """mix-sources' output: the chunk stage's layout, every source's drawn training windows and every source's
    validation windows (which refer to that source's token pieces); `meta.sources` says what each got."""

    meta: MixedSourcesMeta

    @property
    def sources(self) -> list[dict[str, Any]]:
        return self.meta.sources

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        lines = [(logging.INFO, "; ".join(f"{t['source']} {t['trained_tokens']} trained tokens (share "
                                          f"{t['share']:.4f}, asked {t['share_asked']:.4f})" for t in self.sources))]
        for t in self.sources:
            if t["passes"] > 1:
                lines.append((logging.WARNING, f"source {t['source']} ({t['pool_tokens']} trained tokens) is read "
                              f"{t['passes']} times for its share ({t['trained_tokens']} tokens); add text to it to "
                              "avoid overfitting it"))
        return lines

    def show(self, root: ArtifactsRoot) -> None:
        from tasks.core.report import table_artifact

        table_artifact([{k: t[k] for k in ("source", "trained_tokens", "share", "share_asked", "passes", "rows",
                                           "pool_tokens", "validation_rows")} for t in self.sources],
                       "mix-sources", "Trained tokens per source: the share each got and the share asked")


@stage("mix-sources", version=1, output=MixedSources, libraries=["numpy", "pyarrow"])
def mix_sources(build: Build, shares: list[MixShare], seed: int, chunks: list[Chunks]):
    """`chunks`: each source's chunk output, in the order of `shares` (the first source's meta is the output's)."""
    counts, table = mix_sources_chunks(chunks, shares, build.root, seed, build.tmp)
    meta = {**chunks[0].meta.model_dump(), "token_pieces": [k for c in chunks for k in c.meta.token_pieces],
            "sources": table}
    return counts, meta, {"deps": sorted({d for c in chunks for d in c.deps})}


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
