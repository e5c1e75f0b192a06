"""token-stats: length statistics and histograms per split, for documents and for the chunks they become.

Document lengths are read from the tokenize output (list lengths, no token is materialised); chunk lengths
come from the same `window_layout` the chunk stage uses, so the numbers describe exactly what will be trained
before anything is chunked — the seed notebook's analysis, kept with the run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from tasks.cache import StageOutput, current_key, publish, publish_piece, register_code_version, stage_key, stage_task
from tasks.chunk import chunk_lengths, rows_by_part
from tasks.config import ChunkConfig, TokenStatsConfig
from tasks.report import markdown_artifact, markdown_table, png_data_uri, run_logger, table_artifact
from tasks.load import read_arrow
from tasks.shuffle import SPLITS
from tasks.tokenize import token_file

STAT_NAMES = ("count", "total", "mean", "median", "min", "max", "std", "p90", "p95", "p99")


def length_stats(lengths: np.ndarray) -> dict[str, float | int]:
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return {name: 0 for name in STAT_NAMES}
    p90, p95, p99 = np.percentile(lengths, [90, 95, 99])
    return {
        "count": int(lengths.size),
        "total": int(lengths.sum()),
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "min": int(lengths.min()),
        "max": int(lengths.max()),
        "std": float(lengths.std()),
        "p90": float(p90),
        "p95": float(p95),
        "p99": float(p99),
    }


def part_lengths(token_files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Token counts of every document of the per-file token outputs, concatenated in part order, and the
    offset of each part's first document in that array."""
    per_part = [file_lengths(f) for f in token_files]
    offsets = np.concatenate(([0], np.cumsum([len(x) for x in per_part]))).astype(np.int64)
    every = np.concatenate(per_part) if per_part else np.zeros(0, dtype=np.int64)
    return every, offsets


def file_lengths(token_file: Path) -> np.ndarray:
    """Token counts of the documents of one per-file token output (list lengths: no token is read)."""
    return pc.list_value_length(read_arrow(token_file).column("input_ids")).to_numpy(zero_copy_only=False)


def part_split_lengths(token_file: Path, rows: dict[str, np.ndarray], chunk: ChunkConfig,
                       has_bos: bool) -> dict[str, dict[str, np.ndarray]]:
    """One source file's share of each split: its documents' token counts and those of the chunks they become."""
    lengths = file_lengths(token_file)
    out = {}
    for split, r in rows.items():
        docs = lengths[r].astype(np.int64)
        out[split] = {"documents": docs,
                      "chunks": chunk_lengths(docs, chunk, has_bos) if len(docs) else np.zeros(0, dtype=np.int64)}
    return out


def merge_lengths(parts: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """The per-file shares concatenated: statistics and histograms of the whole are exact, not merged
    summaries (an int64 per document and per chunk is small)."""
    return {split: {kind: np.concatenate([p[split][kind] for p in parts]) if parts else np.zeros(0, np.int64)
                    for kind in ("documents", "chunks")} for split in SPLITS}


def stats_rows(lengths: dict[str, dict[str, np.ndarray]]) -> list[dict]:
    return [{"split": split, "unit": kind, **length_stats(lengths[split][kind])}
            for split in SPLITS for kind in ("documents", "chunks")]


def plot_histograms(lengths: dict[str, dict[str, np.ndarray]], bins: int, path: Path, title: str) -> None:
    """Documents | chunks, one step curve per split (one artist per curve keeps this fast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ("documents", "chunks")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, kind in zip(axes, kinds):
        values = [lengths[split][kind] for split in lengths]
        nonempty = [v for v in values if len(v)]
        if nonempty:
            edges = np.histogram_bin_edges(np.concatenate(nonempty), bins=bins)
            for split, v in zip(lengths, values):
                if len(v):
                    counts, _ = np.histogram(v, bins=edges)
                    ax.stairs(counts, edges, fill=split == "train", alpha=0.6 if split == "train" else 1.0,
                              label=f"{split} ({len(v):,}, median {float(np.median(v)):.0f})")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_title(kind)
        ax.set_xlabel("tokens")
        ax.set_ylabel("count")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def compute_token_stats(token_files: list[Path], split_dir: Path, chunk: ChunkConfig,
                        has_bos: bool) -> tuple[list[dict], dict]:
    """Statistics of the whole corpus from its per-file shares (what the stage does, without the cache)."""
    by_split = {name: rows_by_part(split_dir / f"{name}.arrow", len(token_files)) for name in SPLITS}
    lengths = merge_lengths([part_split_lengths(f, {name: by_split[name][p] for name in SPLITS}, chunk, has_bos)
                             for p, f in enumerate(token_files)])
    return stats_rows(lengths), lengths


PIECE_FILES = {(split, kind): f"{split}_{kind}.npy" for split in SPLITS for kind in ("documents", "chunks")}
register_code_version("token-stats-part", 1, [part_split_lengths, file_lengths, chunk_lengths, "tasks.chunk:window_plan",
                                              "tasks.chunk:window_layout", "tasks.chunk:windows_per_document"],
                      ["numpy", "pyarrow"])


def token_stats_pieces(tokens: StageOutput, split: StageOutput, chunk: ChunkConfig, has_bos: bool,
                       artifacts: str) -> tuple[dict, int]:
    """Each source file's lengths, cached by its tokens, its documents' splits and the chunk settings: a drop
    measures only its own files. Returns the merged lengths and how many files were measured now."""
    parts = tokens.meta["parts"]
    by_split = {name: rows_by_part(split.dir(artifacts) / f"{name}.arrow", len(parts)) for name in SPLITS}
    shares, fresh = [], 0
    for p, part in enumerate(parts):
        rows = {name: by_split[name][p] for name in SPLITS}
        assignment = {name: hashlib.blake2b(r.tobytes(), digest_size=16).hexdigest() for name, r in rows.items()}
        key = stage_key("token-stats-part", {"tokens": part.get("content") or part["key"], "rows": assignment, "chunk": chunk,
                                             "has_bos": has_bos})

        def build(tmp: Path, part=part, rows=rows):
            share = part_split_lengths(token_file(artifacts, part["path"]), rows, chunk, has_bos)
            for (s, kind), name in PIECE_FILES.items():
                np.save(tmp / name, share[s][kind])
            return {"documents": int(sum(len(r) for r in rows.values()))}, {}

        out, reused = publish_piece(artifacts, "token-stats-part", key, build)
        fresh += not reused
        shares.append({s: {kind: np.load(out.dir(artifacts) / PIECE_FILES[(s, kind)]) for kind in ("documents", "chunks")}
                       for s in SPLITS})
    return merge_lengths(shares), fresh


@stage_task("token-stats", version=1, code=[token_stats_pieces, merge_lengths, stats_rows, length_stats,
                                           plot_histograms, "@token-stats-part"], libraries=["numpy", "matplotlib"])
def token_stats(token_stats: TokenStatsConfig, chunk: ChunkConfig, tokens: StageOutput, split: StageOutput,
                artifacts: str) -> StageOutput:
    key = current_key("token-stats", {"token_stats": token_stats, "chunk": chunk, "tokens": tokens, "split": split})
    has_bos = tokens.meta["bos_id"] is not None

    def build(tmp: Path):
        lengths, fresh = token_stats_pieces(tokens, split, chunk, has_bos, artifacts)
        rows = stats_rows(lengths)
        (tmp / "stats.json").write_text(json.dumps(rows, indent=2))
        plot_histograms(lengths, token_stats.bins, tmp / "histogram.png",
                        f"Token lengths (max_seq_length {chunk.max_seq_length}, overlap {chunk.overlap})")
        table = markdown_table([{k: r[k] for k in ("split", "unit", *STAT_NAMES)} for r in rows])
        (tmp / "stats.md").write_text(f"# Token statistics\n\n{table}\n\n![histogram](histogram.png)\n")
        counts = {f"{r['split']}_{r['unit']}_{s}": r[s] for r in rows for s in ("count", "mean", "max", "p95")}
        counts.update(files_measured=fresh, files_cached=len(tokens.meta["parts"]) - fresh)
        return counts, {}

    out = publish(artifacts, "token-stats", key, build)
    for r in json.loads((out.dir(artifacts) / "stats.json").read_text()):
        if r["split"] == "train":
            run_logger().info("token-stats: train %s: %d, mean %.1f, p95 %.0f, max %d tokens",
                              r["unit"], r["count"], r["mean"], r["p95"], r["max"])
    return out


def show(out: StageOutput, artifacts: str) -> None:
    """Prefect artifacts of a token-stats output, made by the flow for computed and cached runs alike."""
    out_dir = out.dir(artifacts)
    rows = json.loads((out_dir / "stats.json").read_text())
    table_artifact(rows, "token-stats", "Token length statistics per split, documents and chunks")
    markdown_artifact(
        f"# Token lengths\n\n{markdown_table(rows)}\n\n![histogram]({png_data_uri(out_dir / 'histogram.png')})\n",
        "token-stats-histogram", "Histogram of document and chunk token lengths",
    )
