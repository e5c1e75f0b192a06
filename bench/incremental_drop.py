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
and the whole process wall (Prefect's temporary server, imports, training, evaluation, push).

"Data-stage seconds" of a run, the goal's measure, are load … chunk **plus the drop gate's**: the gate reads and
tokenizes the drop into the same pieces the stages then reuse, so without it the +1 run would hide the drop's own
reading and tokenizing; a cold run has no drop to gate (its gate seconds are 0). The ratio of the stages alone is
printed beside it. Also printed, measured here in fresh processes: per-process fixed costs both runs pay once
(pyarrow's first array imports pandas; the tokenizer's Rust backend loads), which no incremental design removes
and which a small corpus's cold run is not much larger than.

Near-dedup is on, as a user has it by default, except with `--copies` (the copies are near-duplicates of each
other by construction). `--every 2` keeps every second document (~10 MB); `--copies K` makes the corpus K tagged copies of every document (K × ~20 MB; the drop stays 1/(N+1) of it):
the goal holds "on a 10 MB corpus as on a large one".

    .venv/bin/python -m bench.incremental_drop [--files 20] [--copies 1] [--every 1]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import CORPORA, CPT, DATA_STAGES, argument_parser, quiet_env, require, timed, write_parts


def retrain(config: Path, artifacts: Path, summary: Path, drop: Path | None = None) -> tuple[dict, float]:
    """`cpt retrain` of the line in a fresh process (with `--drop`, if given): its summary and its wall seconds."""
    wall = timed([CPT, "retrain", "-c", str(config), "--line", "bench", "--artifacts", str(artifacts), "--summary",
                  str(summary)] + (["--drop", str(drop)] if drop else []), quiet_env())
    return json.loads(summary.read_text()), wall


def data_seconds(result: dict) -> float:
    stages = (result.get("pipeline") or {}).get("stages", [])
    return sum(s["seconds"] for s in stages if s["name"] in DATA_STAGES)


def fixed_costs(model: Path) -> dict[str, float]:
    """Seconds a fresh process spends, once, before its first data: pyarrow's first array (it imports pandas) and
    loading the tokenizer's Rust backend from tokenizer.json (best of 3 fresh processes each)."""
    probes = {
        "pyarrow's first array (imports pandas)": "import pyarrow as pa\nt = time.perf_counter()\npa.array([0])",
        "tokenizer backend load": "import tokenizers\nt = time.perf_counter()\n"
                                  f"tokenizers.Tokenizer.from_file({str(model / 'tokenizer.json')!r})",
    }
    out = {}
    for name, code in probes.items():
        runs = [float(subprocess.run([sys.executable, "-c", f"import time\n{code}\nprint(time.perf_counter() - t)"],
                                     capture_output=True, text=True, check=True).stdout) for _ in range(3)]
        out[name] = min(runs)
    return out


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--files", type=int, default=20, help="N: files in the corpus before the drop")
    ap.add_argument("--copies", type=int, default=1, help="K: tagged copies of every document (K × ~20 MB)")
    ap.add_argument("--every", type=int, default=1, help="keep every E-th document only (2: a ~10 MB corpus)")
    args = ap.parse_args()
    sources = [CORPORA / "ko_transport_bills.jsonl", CORPORA / "python_docs.jsonl"]
    require(*sources)
    import yaml

    from tasks.ml.tiny_model import build_tiny_model, read_texts

    texts = [t for p in sources for t in read_texts(p)][::args.every]
    tokenizer_texts = texts[::10]
    if args.copies > 1:
        # A document's copies side by side: the drop (the first 1/(N+1) of them) holds all copies of its own.
        texts = [f"[copy {c}] {t}" for t in texts for c in range(args.copies)]

    n = args.files
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        build_tiny_model(d / "model", tokenizer_texts, vocab_size=8000)
        fixed = fixed_costs(d / "model")
        drop_docs, base_docs = texts[: len(texts) // (n + 1)], texts[len(texts) // (n + 1):]
        # Settled files (written an hour ago); the drop outside the corpus paths.
        write_parts(base_docs, d / "corpus", n, settled=True)
        write_parts(drop_docs, d / "landing" / "2026-11-26", 1, settled=True)
        config = d / "line.yaml"
        # Near-dedup as a user has it (on), except for tagged copies: those are near-duplicates by construction.
        corpus = {"paths": [str(d / "corpus")], "near_dedup": {"enabled": args.copies == 1}}
        config.write_text(yaml.safe_dump({
            "corpus": corpus, "model": {"id": str(d / "model")},
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

    print(f"near-dedup {'on' if corpus['near_dedup']['enabled'] else 'off (tagged copies)'}; "
          f"corpus: {len(base_docs)} documents in {n} files ({corpus_bytes / 1e6:.1f} MB); drop: 1 file, "
          f"{len(drop_docs)} documents ({drop_bytes / 1e6:.1f} MB, {drop_bytes / (corpus_bytes + drop_bytes):.1%} "
          f"of the bytes after it); tokenizer BPE 8k; chunk 1000/500; {os.cpu_count()} cores; each run a fresh "
          f"`cpt retrain` process")
    print(f"{'run':16} {'trained':>8} {'data s':>8} {'gate s':>8} {'process s':>10}")
    for name, (result, wall) in runs.items():
        print(f"{name:16} {str(result['trained']):>8} {data_seconds(result):8.2f} {result['gate_seconds']:8.2f} "
              f"{wall:10.2f}")
    for name in ("cold", "+1 drop"):
        stages = (runs[name][0].get("pipeline") or {}).get("stages", [])
        print(f"  {name} per data stage: " + ", ".join(f"{s['name']} {s['seconds']:.2f}" for s in stages
                                                      if s["name"] in DATA_STAGES))
    cold_result, drop_result = runs["cold"][0], runs["+1 drop"][0]
    cold = data_seconds(cold_result) + cold_result["gate_seconds"]
    drop = data_seconds(drop_result) + drop_result["gate_seconds"]
    goal = 1 / (n + 1) + 0.10
    fixed_total = sum(fixed.values())
    print("\nper-process fixed costs (fresh processes, best of 3): " + ", ".join(
        f"{k} {v:.2f} s" for k, v in fixed.items()) + f"; together {fixed_total / cold:.3f} of the cold run")
    print("data-stage seconds = load … chunk + the drop gate (the gate reads and tokenizes the drop for the stages)")
    print(f"adding 1 file to {n}: data stages + gate = {drop / cold:.3f} of a cold run "
          f"(goal <= 1/{n + 1} + 10% = {goal:.3f}); the stages alone {data_seconds(drop_result) / cold:.3f}; "
          f"process wall {runs['+1 drop'][1] / runs['cold'][1]:.3f} of cold; nothing changed: process wall "
          f"{runs['nothing changed'][1] / runs['cold'][1]:.3f} of cold")


if __name__ == "__main__":
    main()
