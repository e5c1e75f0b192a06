"""Cost of a corpus drop that adds one file to N, against a cold run of the data stages, from one run.

Corpus: ../shared/corpora/ko_transport_bills.jsonl + python_docs.jsonl (5,944 documents, ~20 MB), cut into N
files. Tokenizer: byte-level BPE (8k) trained here. Both measured runs happen in this process after a warm-up
run on other data, so imports and the Prefect server are warm for both; the figure is the sum of the data
stages' seconds (load, shuffle, tokenize, token-stats, chunk) as the run summary records them.

    .venv/bin/python bench/incremental_drop.py [--files 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CPT_NO_PROGRESS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
CORPORA = ROOT.parent / "shared" / "corpora"
DATA_STAGES = ("load", "shuffle", "tokenize", "token-stats", "chunk")


def write_files(texts: list[str], folder: Path, n: int, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(texts) // n)
    for i in range(n):
        part = texts[i * size : (i + 1) * size]
        with open(folder / f"part-{start + i:03d}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"content": t}, ensure_ascii=False) + "\n" for t in part)


def data_seconds(summary: dict) -> dict[str, float]:
    return {s["name"]: s["seconds"] for s in summary["stages"] if s["name"] in DATA_STAGES}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20, help="N: files in the corpus before the drop")
    args = ap.parse_args()
    sources = [CORPORA / "ko_transport_bills.jsonl", CORPORA / "python_docs.jsonl"]
    if not all(p.is_file() for p in sources):
        sys.exit("this benchmark needs ../shared/corpora beside the checkout")
    texts = [json.loads(x)["content"] for p in sources for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]

    from flows.continued_pretraining import continued_pretraining
    from tasks.config import validate_config
    from tasks.tiny_model import train_tokenizer

    n = args.files
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        train_tokenizer(texts[::10], vocab_size=8000).save_pretrained(d / "tok")
        (d / "tok" / "config.json").write_text("{}")
        drop_docs, base_docs = texts[: len(texts) // (n + 1)], texts[len(texts) // (n + 1) :]
        write_files(base_docs, d / "corpus", n)

        def run(corpus: Path, artifacts: Path) -> dict[str, float]:
            cfg = validate_config({"corpus": {"paths": [str(corpus)]}, "model": {"id": str(d / "tok")},
                                   "split": {"validation_fraction": 0.05},
                                   "chunk": {"max_seq_length": 1000, "overlap": 500}})
            return data_seconds(continued_pretraining(config=cfg, artifacts=str(artifacts), until="chunk"))

        write_files(texts[:200], d / "warmup", 2)
        run(d / "warmup", d / "warmup-artifacts")

        cold = run(d / "corpus", d / "artifacts")
        write_files(drop_docs, d / "corpus", 1, start=n)  # the drop: one more file
        incremental = run(d / "corpus", d / "artifacts")

    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus: {len(texts)} documents, {mb:.1f} MB in {n} files, then a drop of 1 file "
          f"({len(drop_docs)} documents); tokenizer BPE 8k; chunk 1000/500; {os.cpu_count()} cores")
    print(f"{'stage':12} {'cold':>8} {'+1 file':>8}")
    for stage in DATA_STAGES:
        print(f"{stage:12} {cold[stage]:8.2f} {incremental[stage]:8.2f}")
    c, i = sum(cold.values()), sum(incremental.values())
    print(f"{'total':12} {c:8.2f} {i:8.2f}")
    print(f"\nadding 1 file to {n}: {i / c:.3f} of a cold run (target <= 1/N + 10% = {1 / n + 0.10:.3f})")


if __name__ == "__main__":
    main()
