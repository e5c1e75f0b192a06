"""token-stats: length statistics and histograms per split, for documents and for the chunks they become.

Document lengths are read from the tokenize output (list lengths, no token is materialised); chunk lengths
come from the same `window_layout` the chunk stage uses, so the numbers describe exactly what will be trained
before anything is chunked — the seed notebook's analysis, kept with the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from tasks.cache import StageOutput, current_key, publish, stage_task
from tasks.chunk import chunk_lengths
from tasks.config import ChunkConfig, TokenStatsConfig
from tasks.report import markdown_artifact, markdown_table, png_data_uri, run_logger, table_artifact
from tasks.load import read_arrow
from tasks.shuffle import SPLITS
from tasks.tokenize import part_token_files

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
    per_part = [pc.list_value_length(read_arrow(f).column("input_ids")).to_numpy(zero_copy_only=False)
                for f in token_files]
    offsets = np.concatenate(([0], np.cumsum([len(x) for x in per_part]))).astype(np.int64)
    every = np.concatenate(per_part) if per_part else np.zeros(0, dtype=np.int64)
    return every, offsets


def document_lengths(every: np.ndarray, offsets: np.ndarray, split_file: Path) -> np.ndarray:
    """Token counts of a split's documents, in the split's order."""
    index = read_arrow(split_file)
    return every[offsets[index.column("part").to_numpy()] + index.column("row").to_numpy()]


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
    rows, lengths = [], {}
    every, offsets = part_lengths(token_files)
    for split in SPLITS:
        docs = document_lengths(every, offsets, split_dir / f"{split}.arrow")
        chunks = chunk_lengths(docs, chunk, has_bos) if len(docs) else np.zeros(0, dtype=np.int64)
        lengths[split] = {"documents": docs, "chunks": chunks}
        for kind, values in lengths[split].items():
            rows.append({"split": split, "unit": kind, **length_stats(values)})
    return rows, lengths


@stage_task("token-stats", modules=["tasks.chunk", "tasks.report"], libraries=["numpy", "matplotlib"])
def token_stats(token_stats: TokenStatsConfig, chunk: ChunkConfig, tokens: StageOutput, split: StageOutput,
                artifacts: str) -> StageOutput:
    key = current_key("token-stats", {"token_stats": token_stats, "chunk": chunk, "tokens": tokens, "split": split})
    has_bos = tokens.meta["bos_id"] is not None

    def build(tmp: Path):
        rows, lengths = compute_token_stats(part_token_files(tokens, artifacts), split.dir(artifacts), chunk, has_bos)
        (tmp / "stats.json").write_text(json.dumps(rows, indent=2))
        plot_histograms(lengths, token_stats.bins, tmp / "histogram.png",
                        f"Token lengths (max_seq_length {chunk.max_seq_length}, overlap {chunk.overlap})")
        table = markdown_table([{k: r[k] for k in ("split", "unit", *STAT_NAMES)} for r in rows])
        (tmp / "stats.md").write_text(f"# Token statistics\n\n{table}\n\n![histogram](histogram.png)\n")
        counts = {f"{r['split']}_{r['unit']}_{s}": r[s] for r in rows for s in ("count", "mean", "max", "p95")}
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
