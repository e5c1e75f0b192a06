"""Per-file pieces fanned out on a task runner against the sequential path, from one script.

Corpus: ../shared/corpora/ko_transport_bills.jsonl + python_docs.jsonl (5,944 documents, ~20 MB) cut into 20
files; byte-level BPE of 16k tokens trained here. For each `runtime.task_runner` (sequential, threads,
processes, dask with a local cluster of one worker per core), a flow run `--until tokenize` on a cold artifacts
root (the tokenizer's profile known, as after a first run) in this process. Timed from the run summary: the
load stage (20 load-file pieces), the tokenize stage (20 tokenize-file pieces), and the two together. One task
runner serves the whole run, started by the first stage that fans out (load), so a pool's or a local
cluster's start is in load's seconds and the load + tokenize column is the fair comparison. The `dask/stage`
row is the dask run with a runner started per stage instead, for what sharing one saves.

    .venv/bin/python -m bench.fanout [--files 20]
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bench.common import CORPORA, argument_parser, require, write_parts


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--files", type=int, default=20)
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("CPT_NO_PROGRESS", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    sources = [CORPORA / "ko_transport_bills.jsonl", CORPORA / "python_docs.jsonl"]
    require(*sources)
    from tasks.ml.tiny_model import build_tiny_model, read_texts

    texts = [t for p in sources for t in read_texts(p)]
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        os.environ["CPT_CACHE_HOME"] = str(work / "user-cache")
        model = build_tiny_model(work / "model", texts[::7], vocab_size=16_000)
        corpus = work / "corpus"
        write_parts(texts, corpus, args.files)
        from flows.continued_pretraining import continued_pretraining
        from tasks.core.config.tree import validate_config

        def run(runner: str, root: Path) -> dict[str, float]:
            cfg = validate_config({"corpus": {"paths": [str(corpus)]}, "model": {"id": str(model)},
                                   "runtime": {"task_runner": runner}})
            summary = continued_pretraining(config=cfg, until="tokenize", artifacts=str(root))
            return {s["name"]: s["seconds"] for s in summary["stages"]}

        run("sequential", work / "warm-up")  # the tokenizer's profile, and imports, before anything is timed
        mb = sum(f.stat().st_size for f in corpus.iterdir()) / 1e6
        print(f"corpus: {len(texts)} documents in {args.files} files ({mb:.1f} MB); BPE 16k; {os.cpu_count()} cores; "
              "cold artifacts root per runner")
        rows = {runner: run(runner, work / runner) for runner in ("sequential", "threads", "processes", "dask")}
        # The same dask run with a runner per stage (what the flow did before one runner served the whole run).
        import contextlib

        import flows.continued_pretraining as pipeline

        shared, pipeline.one_runner_per_run = pipeline.one_runner_per_run, lambda runtime: contextlib.nullcontext()
        try:
            rows["dask/stage"] = run("dask", work / "dask-per-stage")
        finally:
            pipeline.one_runner_per_run = shared
        base = rows["sequential"]
        print(f"\n{'task_runner':12} {'load s':>8} {'tokenize s':>11} {'tokenize vs seq':>16} {'load+tokenize s':>16} "
              f"{'load+tokenize vs seq':>21}")
        both = base["load"] + base["tokenize"]
        for runner, s in rows.items():
            total = s["load"] + s["tokenize"]
            print(f"{runner:12} {s['load']:8.2f} {s['tokenize']:11.2f} {base['tokenize'] / s['tokenize']:15.2f}x "
                  f"{total:16.2f} {both / total:20.2f}x")


if __name__ == "__main__":
    main()
