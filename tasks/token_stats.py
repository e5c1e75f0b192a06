"""token-stats: length statistics and histograms per split, for documents and for the chunks they become.

Document lengths are read from the tokenize output (list lengths, no token is materialised); chunk lengths
come from the same `window_layout` the chunk stage uses, so the numbers describe exactly what will be trained
before anything is chunked — the seed notebook's analysis, kept with the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc

from tasks.data.arrow import read_arrow
from tasks.chunk import rows_by_part
from tasks.data.windows import WindowPlan, chunk_lengths, window_plan
from tasks.core.config.data import ChunkConfig, SPLITS, TokenStatsConfig
from tasks.core.keys import register_code_version, stage_key
from tasks.core.manifest import NoMeta, StageOutput
from tasks.core.report import image_data_uri, markdown_artifact, markdown_table, table_artifact
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import Build, publish_piece, stage

if TYPE_CHECKING:
    from tasks.shuffle import Split
    from tasks.tokenize import Tokens

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


def part_split_lengths(token_file: Path, rows: dict[str, np.ndarray], plan: WindowPlan
                       ) -> dict[str, dict[str, np.ndarray]]:
    """One source file's share of each split: its documents' token counts and those of the chunks they become."""
    lengths = file_lengths(token_file)
    out = {}
    for split, r in rows.items():
        docs = lengths[r].astype(np.int64)
        out[split] = {"documents": docs,
                      "chunks": chunk_lengths(docs, plan) if len(docs) else np.zeros(0, dtype=np.int64)}
    return out


def merge_lengths(parts: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """The per-file shares concatenated: statistics and histograms of the whole are exact, not merged
    summaries (an int64 per document and per chunk is small)."""
    return {split: {kind: np.concatenate([p[split][kind] for p in parts]) if parts else np.zeros(0, np.int64)
                    for kind in ("documents", "chunks")} for split in SPLITS}


def stats_rows(lengths: dict[str, dict[str, np.ndarray]]) -> list[dict]:
    return [{"split": split, "unit": kind, **length_stats(lengths[split][kind])}
            for split in SPLITS for kind in ("documents", "chunks")]


COLOURS = {"train": "#4c72b0", "validation": "#dd8452"}


def plot_histograms(lengths: dict[str, dict[str, np.ndarray]], bins: int, path: Path, title: str) -> None:
    """Documents | chunks, a step curve per split (train filled), as SVG written by hand: a plotting library
    would cost its import (~0.7 s) in every run's data path for two small charts."""
    w, h, pad = 520, 300, 48
    panels = []
    for i, kind in enumerate(("documents", "chunks")):
        x0, parts = i * w, []
        values = {split: lengths[split][kind] for split in lengths}
        nonempty = [v for v in values.values() if len(v)]
        parts.append(f'<text x="{x0 + pad}" y="{pad - 22}" font-size="14">{kind}</text>')
        parts.append(f'<line x1="{x0 + pad}" y1="{h - pad}" x2="{x0 + w - 12}" y2="{h - pad}" stroke="#333"/>'
                     f'<line x1="{x0 + pad}" y1="{pad - 8}" x2="{x0 + pad}" y2="{h - pad}" stroke="#333"/>')
        if nonempty:
            edges = np.histogram_bin_edges(np.concatenate(nonempty), bins=bins)
            hists = {split: np.histogram(v, bins=edges)[0] for split, v in values.items() if len(v)}
            top = max(int(c.max()) for c in hists.values()) or 1
            lo, hi = float(edges[0]), float(edges[-1]) if edges[-1] > edges[0] else float(edges[0]) + 1

            def sx(v):
                return x0 + pad + (v - lo) / (hi - lo) * (w - pad - 12)

            def sy(c):
                return h - pad - c / top * (h - 2 * pad + 8)

            for t in np.linspace(lo, hi, 5):
                parts.append(f'<text x="{sx(t):.1f}" y="{h - pad + 16}" text-anchor="middle" font-size="10">'
                             f'{t:,.0f}</text>')
            for t in np.linspace(0, top, 5):
                parts.append(f'<text x="{x0 + pad - 4}" y="{sy(t) + 3:.1f}" text-anchor="end" font-size="10">'
                             f'{t:,.0f}</text>')
            for n, (split, counts) in enumerate(hists.items()):
                points = [(sx(lo), sy(0))]
                for c, a, b in zip(counts, edges[:-1], edges[1:]):
                    points += [(sx(a), sy(c)), (sx(b), sy(c))]
                points.append((sx(hi), sy(0)))
                d = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
                colour = COLOURS.get(split, "#555")
                fill = f'fill="{colour}" fill-opacity="0.5"' if split == "train" else 'fill="none"'
                parts.append(f'<polyline points="{d}" {fill} stroke="{colour}" stroke-width="1.5"/>')
                v = values[split]
                # Above the plot area, right-aligned: never over a bar.
                parts.append(f'<text x="{x0 + w - 12}" y="{pad - 22 + 12 * n}" text-anchor="end" font-size="11" '
                             f'fill="{colour}">{split} ({len(v):,}, median {float(np.median(v)):.0f})</text>')
        parts.append(f'<text x="{x0 + w / 2}" y="{h - 8}" text-anchor="middle" font-size="11">tokens</text>')
        panels.append("".join(parts))
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{h + 24}" '
                    f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
                    f'<text x="{w}" y="16" text-anchor="middle" font-size="14">{title}</text>'
                    f'<g transform="translate(0,24)">{"".join(panels)}</g></svg>\n', encoding="utf-8")


def compute_token_stats(token_files: list[Path], split_dir: Path, plan: WindowPlan) -> tuple[list[dict], dict]:
    """Statistics of the whole corpus from its per-file shares (what the stage does, without the cache)."""
    by_split = {name: rows_by_part(split_dir / f"{name}.arrow", len(token_files)) for name in SPLITS}
    lengths = merge_lengths([part_split_lengths(f, {name: by_split[name][p] for name in SPLITS}, plan)
                             for p, f in enumerate(token_files)])
    return stats_rows(lengths), lengths


PIECE_FILES = {(split, kind): f"{split}_{kind}.npy" for split in SPLITS for kind in ("documents", "chunks")}
register_code_version("token-stats-part", 1, [part_split_lengths], ["numpy", "pyarrow"])


def token_stats_pieces(tokens: Tokens, split: Split, chunk: ChunkConfig, has_bos: bool,
                       root: ArtifactsRoot) -> tuple[dict, int]:
    """Each source file's lengths, cached by its tokens, its documents' splits and the chunk settings: a drop
    measures only its own files. Returns the merged lengths and how many files were measured now."""
    parts = tokens.parts
    plan = window_plan(chunk, has_bos)  # the chunk stage's own plan, made the same way before it runs
    by_split = {name: rows_by_part(split.split_file(root, name), len(parts)) for name in SPLITS}
    shares, fresh = [], 0
    for p, part in enumerate(parts):
        rows = {name: by_split[name][p] for name in SPLITS}
        assignment = {name: hashlib.blake2b(r.tobytes(), digest_size=16).hexdigest() for name, r in rows.items()}
        key = stage_key("token-stats-part", {"tokens": part.content or part.key, "rows": assignment,
                                             "chunk": chunk, "has_bos": has_bos})

        def build(tmp: Path, part=part, rows=rows):
            share = part_split_lengths(tokens.token_file(root, part), rows, plan)
            for (s, kind), name in PIECE_FILES.items():
                np.save(tmp / name, share[s][kind])
            return {"documents": int(sum(len(r) for r in rows.values()))}, {}

        out, reused = publish_piece(root, "token-stats-part", key, build)
        fresh += not reused
        shares.append({s: {kind: np.load(out.dir(root) / PIECE_FILES[(s, kind)]) for kind in ("documents", "chunks")}
                       for s in SPLITS})
    return merge_lengths(shares), fresh


class TokenStats(StageOutput):
    """token-stats' output: `stats.json` (a row per split and unit), `stats.md` and `histogram.svg`."""

    meta: NoMeta = NoMeta()

    def rows(self, root: ArtifactsRoot) -> list[dict[str, Any]]:
        return json.loads((self.dir(root) / "stats.json").read_text())

    def histogram(self, root: ArtifactsRoot) -> Path:
        return self.dir(root) / "histogram.svg"

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        return [(logging.INFO, f"train {r['unit']}: {r['count']}, mean {r['mean']:.1f}, p95 {r['p95']:.0f}, "
                               f"max {r['max']} tokens") for r in self.rows(root) if r["split"] == "train"]

    def show(self, root: ArtifactsRoot) -> None:
        show(self, root)  # the module's `show` below: its tables and plots


@stage("token-stats", version=3, output=TokenStats, libraries=["numpy"])
def token_stats(build: Build, token_stats: TokenStatsConfig, chunk: ChunkConfig, tokens: Tokens, split: Split):
    lengths, fresh = token_stats_pieces(tokens, split, chunk, tokens.bos_id is not None, build.root)
    rows = stats_rows(lengths)
    (build.tmp / "stats.json").write_text(json.dumps(rows, indent=2))
    plot_histograms(lengths, token_stats.bins, build.tmp / "histogram.svg",
                    f"Token lengths (max_seq_length {chunk.max_seq_length}, overlap {chunk.overlap})")
    table = markdown_table([{k: r[k] for k in ("split", "unit", *STAT_NAMES)} for r in rows])
    (build.tmp / "stats.md").write_text(f"# Token statistics\n\n{table}\n\n![histogram](histogram.svg)\n")
    counts = {f"{r['split']}_{r['unit']}_{s}": r[s] for r in rows for s in ("count", "mean", "max", "p95")}
    counts.update(files_measured=fresh, files_cached=len(tokens.parts) - fresh)
    return counts, {}


def show(out: TokenStats, root: ArtifactsRoot) -> None:
    """Prefect artifacts of a token-stats output, made by the flow for computed and cached runs alike."""
    rows = out.rows(root)
    table_artifact(rows, "token-stats", "Token length statistics per split, documents and chunks")
    markdown_artifact(
        f"# Token lengths\n\n{markdown_table(rows)}\n\n![histogram]({image_data_uri(out.histogram(root))})\n",
        "token-stats-histogram", "Histogram of document and chunk token lengths",
    )
