"""Cost of a corpus drop that adds one file to a line of N files, against a cold run, as the user runs it:
`cpt retrain` in a fresh process each time, the drop in its own folder outside the corpus paths (where the
on-drop deployment's producer puts it).

Corpus: ../shared/corpora/ko_transport_bills.jsonl + python_docs.jsonl (5,944 documents, ~20 MB), cut into N
files for the corpus and one more file for the drop. Tokenizer and model: byte-level BPE (8k) and a tiny
Llama built here (training is 1 step: this measures the data path, not training). Three runs of the line:

- cold: an empty artifacts root, the corpus alone;
- +1 drop: `--drop <folder>`: the gate profiles the drop, the pipeline runs;
- nothing changed: the nightly run right after, which must train nothing.

For each: the data stages' seconds (load … chunk, from the pipeline's run summary), the drop gate's seconds
(it reads and tokenizes the drop through the same pieces the stages then reuse, so the drop's cost is data
stages + gate), and the whole process wall (Prefect's temporary server, imports, training, evaluation, push).

    .venv/bin/python bench/incremental_drop.py [--files 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPORA = ROOT.parent / "shared" / "corpora"
DATA_STAGES = ("load", "shuffle", "tokenize", "token-stats", "chunk")


def write_files(texts: list[str], folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(texts) // n)
    for i in range(n):
        with open(folder / f"part-{i:03d}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"content": t}, ensure_ascii=False) + "\n" for t in texts[i * size:(i + 1) * size])
    old = time.time() - 3600  # settled: written an hour ago
    for p in folder.iterdir():
        os.utime(p, (old, old))


def retrain(config: Path, artifacts: Path, summary: Path, drop: Path | None = None) -> tuple[dict, float]:
    env = {**os.environ, "CPT_NO_PROGRESS": "1", "PREFECT_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "cpt"), "retrain", "-c", str(config), "--line", "bench",
           "--artifacts", str(artifacts), "--summary", str(summary)] + (["--drop", str(drop)] if drop else [])
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"cpt retrain failed:\n{done.stderr[-4000:]}")
    return json.loads(summary.read_text()), wall


def data_seconds(result: dict) -> float:
    stages = (result.get("pipeline") or {}).get("stages", [])
    return sum(s["seconds"] for s in stages if s["name"] in DATA_STAGES)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20, help="N: files in the corpus before the drop")
    args = ap.parse_args()
    sources = [CORPORA / "ko_transport_bills.jsonl", CORPORA / "python_docs.jsonl"]
    if not all(p.is_file() for p in sources):
        sys.exit("this benchmark needs ../shared/corpora beside the checkout")
    texts = [json.loads(x)["content"] for p in sources for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]

    import yaml

    from tasks.ml.tiny_model import build_tiny_model

    n = args.files
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        build_tiny_model(d / "model", texts[::10], vocab_size=8000)
        drop_docs, base_docs = texts[: len(texts) // (n + 1)], texts[len(texts) // (n + 1):]
        write_files(base_docs, d / "corpus", n)
        write_files(drop_docs, d / "landing" / "2026-11-26", 1)  # outside the corpus paths
        config = d / "line.yaml"
        config.write_text(yaml.safe_dump({
            "corpus": {"paths": [str(d / "corpus")]}, "model": {"id": str(d / "model")},
            "split": {"validation_fraction": 0.05}, "chunk": {"max_seq_length": 1000, "overlap": 500},
            "train": {"max_steps": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                      "eval_steps": 1, "save_steps": 1, "early_stopping_patience": None},
            "evaluate": {"max_eval_rows": 4}, "push": {"name": "bench"},
        }))
        artifacts = d / "artifacts"
        runs = {
            "cold": retrain(config, artifacts, d / "cold.json"),
            "+1 drop": retrain(config, artifacts, d / "drop.json", d / "landing" / "2026-11-26"),
            "nothing changed": retrain(config, artifacts, d / "again.json"),
        }
        drop_bytes = sum(f.stat().st_size for f in (d / "landing").rglob("*.jsonl"))
        corpus_bytes = sum(f.stat().st_size for f in (d / "corpus").rglob("*.jsonl"))

    print(f"corpus: {len(base_docs)} documents in {n} files ({corpus_bytes / 1e6:.1f} MB); drop: 1 file, "
          f"{len(drop_docs)} documents ({drop_bytes / 1e6:.1f} MB, {drop_bytes / (corpus_bytes + drop_bytes):.1%} "
          f"of the bytes after it); tokenizer BPE 8k; chunk 1000/500; {os.cpu_count()} cores; each run a fresh "
          f"`cpt retrain` process")
    print(f"{'run':16} {'trained':>8} {'data s':>8} {'gate s':>8} {'process s':>10}")
    for name, (result, wall) in runs.items():
        print(f"{name:16} {str(result['trained']):>8} {data_seconds(result):8.2f} {result['gate_seconds']:8.2f} "
              f"{wall:10.2f}")
    cold = data_seconds(runs["cold"][0]) + runs["cold"][0]["gate_seconds"]
    drop = data_seconds(runs["+1 drop"][0]) + runs["+1 drop"][0]["gate_seconds"]
    print(f"\nadding 1 file to {n}: data stages + gate = {drop / cold:.3f} of a cold run "
          f"(goal <= 1/{n + 1} + 10% = {1 / (n + 1) + 0.10:.3f}); process wall {runs['+1 drop'][1] / runs['cold'][1]:.3f} "
          f"of cold; nothing changed: process wall {runs['nothing changed'][1] / runs['cold'][1]:.3f} of cold")


if __name__ == "__main__":
    main()
