"""Throughput of cpt's tokenize + chunk stages against the seed notebook's chunker, from one run.

Data: ../shared/corpora/python_docs.jsonl (497 documents, 11 MB) with a byte-level BPE tokenizer of 16k
tokens trained here on that corpus (so nothing is downloaded). Settings: the seed's max_seq_length 1000,
overlap 500.

Prints, each measured in this process, best of --repeat runs:
- seed: the notebook's data path — `load_dataset("json", data_files=...)`, `shuffle(seed=42)`, then
  `map(chunk_text_with_overlap, batched=True)` writing its on-disk cache (a fresh cache folder per repeat, so
  each repeat computes, as a first run does) — calling the tokenizer once per text and slicing Python lists;
- raw: batch tokenization alone, `tokenizer(batch)` as a user writes it, nothing written;
- raw Rust: the tokenizer backend's `encode_batch_fast` alone (no offsets; what our stage calls when a probe
  shows it gives the same ids) — the fastest raw call, and the floor the target is set against;
- cpt: tokenize stage (batch tokenization, EOS, Arrow file) + chunk stage (vectorised windows, Arrow shard).
and then peak memory of the cpt stages on 1x, 2x and 4x the corpus, each in a fresh subprocess. Imports are
timed on neither side (datasets, transformers and the stages are imported before any clock starts); the
fresh-process figure, imports included, is bench.incremental_drop's.

    .venv/bin/python -m bench.chunk_throughput [--corpus PATH] [--repeat 3]
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

from bench.common import CORPORA, ROOT, argument_parser, best_of, build_model, require, seed_data_path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("CPT_NO_PROGRESS", "1")

MAX_SEQ_LENGTH, OVERLAP = 1000, 500


def build_tokenizer(texts: list[str], out: Path) -> Path:
    """The benchmark's tokenizer (BPE 16k trained on the corpus), trained once and kept in `out`."""
    if not (out / "tokenizer.json").exists():
        build_model(out, texts, vocab_size=16_000)
    return out


def seed_chunker(corpus: Path, tokenizer, cache_dir: Path) -> int:
    """The notebook's data path (bench.common.seed_data_path), shuffled with seed 42, its on-disk cache in
    `cache_dir`."""
    return seed_data_path(corpus, tokenizer, cache_dir, MAX_SEQ_LENGTH, OVERLAP, shuffle_seed=42)


def raw_batch_tokenization(texts: list[str], tokenizer, batch_size: int = 1000) -> int:
    n = 0
    for s in range(0, len(texts), batch_size):
        ids = tokenizer(texts[s : s + batch_size], add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        n += sum(map(len, ids))
    return n


def raw_backend_tokenization(texts: list[str], tokenizer, batch_size: int = 1000) -> int:
    """The Rust tokenizer's own batch call without offsets: the strictest floor."""
    n = 0
    for s in range(0, len(texts), batch_size):
        n += sum(len(e.ids) for e in tokenizer._tokenizer.encode_batch_fast(texts[s : s + batch_size],
                                                                            add_special_tokens=False))
    return n


def write_docs(texts: list[str], path: Path) -> None:
    """A load-stage docs file of `texts` (every column the stage writes)."""
    import pyarrow as pa

    from tasks.data.layout import DOC_SCHEMA
    from tasks.data.records import doc_id_of, norm_id_of

    n = len(texts)
    columns = {"doc_id": [doc_id_of(t) + str(i) for i, t in enumerate(texts)], "text": texts,
               "norm_id": [norm_id_of(t) for t in texts], "source": [f"bench:{i + 1}" for i in range(n)],
               "part": [0] * n, "row": list(range(n))}
    table = pa.table({f.name: pa.array(columns[f.name], f.type) for f in DOC_SCHEMA}, schema=DOC_SCHEMA)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, DOC_SCHEMA) as w:
        w.write_table(table, max_chunksize=2048)


def cpt_stages(docs: Path, work: Path, tokenizer) -> tuple[int, float, float]:
    from tasks.chunk import chunk_file, window_plan
    from tasks.core.config.data import ChunkConfig, TokenizeConfig
    from tasks.tokenize import special_tokens, tokenize_file

    sp = special_tokens(tokenizer)
    cfg = TokenizeConfig()
    t0 = time.perf_counter()
    tokenize_file(docs, work / "tokens.arrow", tokenizer, sp["eos_id"], cfg.batch_size, cfg.batch_bytes)
    t1 = time.perf_counter()
    plan = window_plan(ChunkConfig(max_seq_length=MAX_SEQ_LENGTH, overlap=OVERLAP), sp["bos_id"] is not None)
    counts = chunk_file(work / "tokens.arrow", work / "chunks", plan, sp["bos_id"])
    t2 = time.perf_counter()
    return counts["chunks"], t1 - t0, t2 - t1


def memory_child(docs: Path, tok_dir: Path) -> None:
    """Runs in a subprocess: the cpt stages on an existing docs file; prints peak RSS (VmHWM) in MiB."""
    from tasks.tokenize import load_tokenizer

    tok = load_tokenizer(tok_dir)
    before = _vm_hwm()
    with tempfile.TemporaryDirectory() as d:
        cpt_stages(docs, Path(d), tok)
    print(json.dumps({"peak_mib": _vm_hwm(), "before_mib": before}))


def _vm_hwm() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--corpus", type=Path, default=CORPORA / "python_docs.jsonl")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tokenizer-dir", type=Path, default=ROOT / "artifacts" / "bench" / "bpe16k-python-docs")
    ap.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    require(args.corpus)
    if args.memory_child:
        memory_child(args.memory_child, args.tokenizer_dir)
        return

    from tasks.ml.tiny_model import read_texts
    from tasks.tokenize import load_tokenizer

    texts = read_texts(args.corpus)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    build_tokenizer(texts, args.tokenizer_dir)
    tok = load_tokenizer(args.tokenizer_dir)
    print(f"corpus: {args.corpus.name}, {len(texts)} documents, {mb:.1f} MB; tokenizer: BPE {len(tok)} tokens; "
          f"max_seq_length {MAX_SEQ_LENGTH}, overlap {OVERLAP}; {os.cpu_count()} cores; best of {args.repeat}")

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        write_docs(texts, work / "docs.arrow")
        n_tokens = raw_batch_tokenization(texts, tok)
        rows = []
        import datasets  # noqa: F401  imported before any clock starts, like the stages' modules

        runs = iter(range(args.repeat))
        seed_s, seed_chunks = best_of(args.repeat, lambda: seed_chunker(args.corpus, tok, work / f"hf-{next(runs)}"))
        raw_s, _ = best_of(args.repeat, lambda: raw_batch_tokenization(texts, tok))
        backend_s, _ = best_of(args.repeat, lambda: raw_backend_tokenization(texts, tok))
        stage_times = []

        def ours():
            r = cpt_stages(work / "docs.arrow", work, tok)
            stage_times.append(r[1:])
            return r[0]

        cpt_s, cpt_chunks = best_of(args.repeat, ours)
        tok_s, chunk_s = min(stage_times, key=sum)
        for name, secs, chunks in [("seed chunker (datasets.map)", seed_s, seed_chunks),
                                   ("raw batch tokenization", raw_s, None),
                                   ("raw Rust encode_batch_fast", backend_s, None),
                                   ("cpt tokenize + chunk", cpt_s, cpt_chunks)]:
            rows.append((name, secs, chunks))
        print(f"\n{'':30} {'seconds':>8} {'tokens/s':>10} {'rows':>7}")
        for name, secs, chunks in rows:
            print(f"{name:30} {secs:8.2f} {n_tokens / secs:10,.0f} {chunks if chunks is not None else '':>7}")
        print(f"  (cpt split: tokenize {tok_s:.2f}s, chunk {chunk_s:.2f}s)")
        print(f"\ncpt vs seed chunker:          {seed_s / cpt_s:.2f}x throughput (target >= 1.8x)")
        print(f"cpt vs raw batch tokenization: {raw_s / cpt_s:.2f}x throughput (tokenizer(batch), as a user writes it)")
        print(f"cpt vs raw encode_batch_fast:  {backend_s / cpt_s:.2f}x throughput (target >= 0.9x: the fastest raw "
              "call, tokenization alone)")
        print(f"rows: seed {seed_chunks} (redundant tails, no EOS) vs cpt {cpt_chunks}")

    print("\npeak memory of the cpt stages (a fresh process per size; tokenizer loaded before 'before'):")
    peaks = []
    with tempfile.TemporaryDirectory() as d:
        for copies in (1, 2, 4):
            docs = Path(d) / f"docs-{copies}.arrow"
            write_docs(texts * copies, docs)
            out = subprocess.run([sys.executable, "-m", "bench.chunk_throughput", "--tokenizer-dir",
                                  str(args.tokenizer_dir), "--memory-child", str(docs)],
                                 capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            peaks.append(r["peak_mib"] - r["before_mib"])
            print(f"  {copies}x corpus ({mb * copies:5.1f} MB): peak {r['peak_mib']:7.1f} MiB, "
                  f"{peaks[-1]:6.1f} MiB above the process before the stages ({r['before_mib']:.1f} MiB)")
    print(f"growth at 4x / growth at 1x: {peaks[2] / peaks[0]:.2f} (flat = 1.00; proportional = 4.00)")


if __name__ == "__main__":
    main()
