"""The data path as the user waits for it: a fresh `cpt run --until chunk` against the seed notebook's data
path run as its own process, on the same corpus and tokenizer, imports included on both sides.

Corpus: ../shared/corpora/ko_transport_bills.jsonl, documents 2,000 onwards (3,447 documents, ~5.6 MB),
held out from the tokenizer, a byte-level BPE of 16k tokens trained here on the first 2,000 (with a tiny
model beside it so `model.id` is a real model dir; nothing is downloaded).

- seed: `python seed.py` in a fresh process — `from datasets import load_dataset`, `AutoTokenizer`,
  `load_dataset("json")`, `shuffle()`, `map(chunk_text_with_overlap, batched=True)` with its on-disk cache
  (max_seq_length 1000, overlap 500, as in the notebook). Timed: the process wall, start to exit.
- cpt: `cpt run --until chunk` in a fresh process, cold artifacts root (same 1000/500 chunking; cpt also
  splits validation, computes token statistics and writes the DatasetDict). Timed: the data stages' seconds
  from the run summary (load … chunk, each with the imports that land in it), and the whole process wall
  (Prefect's temporary server included) for reference.

Each side runs --repeat times, each with fresh caches and a cold artifacts root. cpt's first run is also the first
time this machine sees the tokenizer (a temporary CPT_CACHE_HOME): it probes the tokenizer once (importing
transformers and torch) and keeps the profile in the user's cache, so the later runs, still on a cold
artifacts root, tokenize with the Rust backend alone. Both are printed; the best of the later runs is the
figure for a team that has used this tokenizer before, the first run the figure for a brand-new tokenizer.

    .venv/bin/python bench/data_path.py [--repeat 3]
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
CORPUS = ROOT.parent / "shared" / "corpora" / "ko_transport_bills.jsonl"
DATA_STAGES = ("load", "shuffle", "tokenize", "token-stats", "chunk")

SEED = '''
import sys
from datasets import load_dataset
from transformers import AutoTokenizer

model_dir, corpus, cache = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
max_seq_length, overlap = 1000, 500


def chunk_text_with_overlap(examples, tokenizer, max_seq_length, text_field, overlap):
    stride = max_seq_length - overlap
    all_token_ids = []
    for text in examples[text_field]:
        all_token_ids.append(tokenizer(text, add_special_tokens=False, truncation=False, padding=False)["input_ids"])
    chunked_input_ids, chunked_attention_mask = [], []
    for token_ids in all_token_ids:
        for i in range(0, len(token_ids), stride):
            chunk = token_ids[i : i + max_seq_length]
            if len(chunk) > 0:
                chunked_input_ids.append(chunk)
                chunked_attention_mask.append([1] * len(chunk))
    return {"input_ids": chunked_input_ids, "attention_mask": chunked_attention_mask}


data = load_dataset("json", data_files={"train": corpus}, cache_dir=cache)
data = data.shuffle()
chunked = data["train"].map(chunk_text_with_overlap, batched=True, remove_columns=data["train"].column_names,
                            fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length,
                                       "text_field": "content", "overlap": overlap})
print(len(chunked))
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not CORPUS.is_file():
        sys.exit(f"{CORPUS} not found: this benchmark needs ../shared/corpora beside the checkout")
    from tasks.ml.tiny_model import build_tiny_model, read_texts

    texts = read_texts(CORPUS)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "CPT_NO_PROGRESS": "1",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true", "PREFECT_LOGGING_LEVEL": "WARNING"}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        env["CPT_CACHE_HOME"] = str(work / "user-cache")
        model = build_tiny_model(work / "model", texts[:2000], vocab_size=16_000)
        corpus = work / "corpus" / "bills.jsonl"
        corpus.parent.mkdir()
        corpus.write_text("".join(json.dumps({"content": t}, ensure_ascii=False) + "\n" for t in texts[2000:]),
                          encoding="utf-8")
        (work / "seed.py").write_text(SEED)
        mb = corpus.stat().st_size / 1e6
        print(f"corpus: {len(texts) - 2000} documents of ko_transport_bills ({mb:.1f} MB), held out from the "
              f"tokenizer (BPE 16k); max_seq_length 1000, overlap 500; {os.cpu_count()} cores; best of {args.repeat}")

        seed_times, cpt_data, cpt_wall, stage_best, first_stages = [], [], [], None, {}
        for i in range(args.repeat):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(work / "seed.py"), str(model), str(corpus), str(work / f"hf-{i}")],
                           check=True, env=env, capture_output=True)
            seed_times.append(time.perf_counter() - t0)

            artifacts = work / f"artifacts-{i}"
            t0 = time.perf_counter()
            subprocess.run([str(Path(sys.executable).parent / "cpt"), "run", "--until", "chunk",
                            "--artifacts", str(artifacts), "--set", f"corpus.paths=['{corpus}']",
                            "--set", f"model.id={model}", "--set", "chunk.max_seq_length=1000",
                            "--set", "chunk.overlap=500"],
                           check=True, env=env, capture_output=True, cwd=ROOT)
            cpt_wall.append(time.perf_counter() - t0)
            summary = json.loads(next((artifacts / "runs").glob("*/summary.json")).read_text())
            stages = {s["name"]: s["seconds"] for s in summary["stages"] if s["name"] in DATA_STAGES}
            cpt_data.append(sum(stages.values()))
            if i == 0:
                first_stages = stages
            if i > 0 and cpt_data[-1] <= min(cpt_data[1:]):
                stage_best = stages
        stage_best = stage_best or first_stages

        seed_s = min(seed_times)
        later = cpt_data[1:] or cpt_data
        data_s, wall_s = min(later), min(cpt_wall[1:] or cpt_wall)
        print(f"\n{'':44} {'seconds':>8}")
        print(f"{'seed data path (process wall)':44} {seed_s:8.2f}")
        print(f"{'cpt data stages, new tokenizer (1st run)':44} {cpt_data[0]:8.2f}   "
              + "  ".join(f"{k} {v:.2f}" for k, v in first_stages.items()))
        print(f"{'cpt data stages, tokenizer seen before':44} {data_s:8.2f}   "
              + "  ".join(f"{k} {v:.2f}" for k, v in stage_best.items()))
        print(f"{'cpt run --until chunk (process wall)':44} {wall_s:8.2f}   (Prefect's temporary server included)")
        print(f"\ncpt data stages vs seed: {seed_s / data_s:.2f}x (goal >= 3.5x); "
              f"with a tokenizer never seen before {seed_s / cpt_data[0]:.2f}x")
        print(f"cpt whole process vs seed: {seed_s / wall_s:.2f}x")


if __name__ == "__main__":
    main()
