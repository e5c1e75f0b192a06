"""A one-file drop's load stage alone, in this process (no Prefect, no other stage), onto lines of 1×, 4× and 16×
the size: what bench.incremental_drop's part 2 measures inside `cpt retrain`, without the process and server noise.

Corpus as bench.incremental_drop's (every --every-th document of ko_transport_bills + python_docs, two in three
re-exported, 1/21 of the originals with their re-exports the drop); the line of size K is its documents as K tagged
copies in 20 files. For each K: `load` cold on the line, then on the line + the drop (a later corpus path), each
timed around `load.fn`; with near-dedup's own seconds and work from load's meta (`near_dedup_pass`), when the code
has it. With --repeat R, R drops onto the same line (the first as above, the others its documents tagged
`[drop r]`: new content, so each is a drop's load, not a cache hit), and the median of their seconds: one drop
of about 0.06 s moves by a third on a shared machine. Every line is built first and the drops go round-robin over
the sizes, so the machine's other load falls on all sizes alike. Run it with PYTHONPATH pointing at another checkout to
measure that code.

    .venv/bin/python -m bench.drop_load [--every 4] [--sizes 1,4,16] [--repeat 1]
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.common import CORPORA, argument_parser, require, write_parts


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument("--repeat", type=int, default=1, help="drops per line size; their median is reported")
    args = ap.parse_args()
    os.environ["CPT_NO_PROGRESS"] = "1"
    sources = [CORPORA / "ko_transport_bills.jsonl", CORPORA / "python_docs.jsonl"]
    require(*sources)
    from bench.incremental_drop import reexport
    from tasks.core.config.data import CorpusConfig
    from tasks.data.files import fingerprint_corpus
    from tasks.load import load, load_inputs
    from tasks.ml.tiny_model import read_texts

    originals = [t for p in sources for t in read_texts(p)][::args.every]
    random.Random(0).shuffle(originals)

    def with_reexports(docs: list[str]) -> list[str]:
        out = docs + [reexport(t, i) for i, t in enumerate(docs) if i % 3]
        random.Random(1).shuffle(out)
        return out

    cut = len(originals) // 21
    drop_docs, base = with_reexports(originals[:cut]), with_reexports(originals[cut:])
    print(f"code: {Path(sys.modules['tasks.load'].__file__).parent.parent}; line: {len(base)} documents x K tagged "
          f"copies in 20 files; drop: {len(drop_docs)} documents in 1 file; {os.cpu_count()} cores")
    print(f"{'line':>5} {'documents':>10} {'cold load s':>12} {'drop load s':>12} {'of which near-dedup s':>22} "
          f"{'pairs judged':>13} {'near-duplicates':>16}")
    drops = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for r in range(args.repeat):
            write_parts(drop_docs if r == 0 else [f"[drop {r}] {t}" for t in drop_docs], d / f"drop-{r}", 1)
        sizes = [int(x) for x in args.sizes.split(",")]

        def run(k: int, paths: list[Path]):
            cfg = CorpusConfig(paths=[str(p) for p in paths])
            sources = fingerprint_corpus(cfg)
            t0 = time.perf_counter()
            out = load.fn(**load_inputs(cfg, sources), artifacts=str(d / f"art-{k}"))
            return time.perf_counter() - t0, out

        lines, cold = {}, {}
        for k in sizes:
            lines[k] = base if k == 1 else [f"[copy {c}] {t}" for t in base for c in range(k)]
            write_parts(lines[k], d / f"line-{k}", 20)
            cold[k], _ = run(k, [d / f"line-{k}"])
        # Drops round-robin over the sizes (drop r onto every line, then drop r + 1): a drift in the machine's other
        # load falls on every size alike, not on the sizes measured last.
        timed: dict[int, list] = {k: [] for k in sizes}
        for r in range(args.repeat):
            for k in sizes:
                timed[k].append(run(k, [d / f"line-{k}", d / f"drop-{r}"]))
        for k in sizes:
            drop, out = sorted(timed[k], key=lambda t: t[0])[len(timed[k]) // 2]  # the median (the upper of two)
            drops.append(drop)
            nd = getattr(out.meta, "near_dedup_pass", None)  # typed on this checkout, absent on an older one
            nd = nd.model_dump() if hasattr(nd, "model_dump") else (out.meta.get("near_dedup_pass") or {}
                                                                     if isinstance(out.meta, dict) else {})
            print(f"{k:>4}x {len(lines[k]):>10} {cold[k]:>12.2f} {drop:>12.3f} {nd.get('seconds', '-')!s:>22} "
                  f"{nd.get('judged', '-')!s:>13} {out.counts.get('near_duplicates', 0):>16}", flush=True)
    print(f"the drop's load seconds, largest / smallest: {max(drops) / min(drops):.2f} (goal <= 1.5)")


if __name__ == "__main__":
    main()
