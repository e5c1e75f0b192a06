"""The chunk stage that ships against the seed notebook's same work: tokenized documents grouped into
fixed-length overlapping blocks.

Data: ../shared/corpora/python_docs.jsonl (497 documents, 11 MB; or --corpus, --copies K for K times its
documents) tokenized once, before any clock starts, by cpt's tokenize stage (`tasks.tokenize.tokenize_file`: each
document's ids and its EOS, in the narrowest id type) with a byte-level BPE of 16k trained here on the corpus (so
nothing is downloaded). Settings: the seed's max_seq_length 1000, overlap 500. Both sides group exactly these
token ids into windows of 1000 tokens every 500: cpt's side is given no BOS id (as for a tokenizer without one,
GPT-2's), so its windows are the seed's; with a BOS its windows are 999 tokens after the BOS, the same work.

What each side does inside the clock (best of --repeat, in this process; imports and the tokenization are timed
on neither side):
- seed: the loop of the notebook's `chunk_text_with_overlap` that follows its tokenizer call, as written there,
  on each document's ids as Python lists (what its tokenizer call returns); every block's ids kept, as Python
  lists, in memory. Left out: the tokenizer call, the attention masks it also builds (`[1] * len(chunk)`: cpt
  builds none, its collator does; printed on a line of their own), and its `datasets.map`, which would read the
  text from Arrow and write every block to its cache.
- cpt chunk stage: what the stage runs for each source file (`chunk_piece`'s build): open the tokenize stage's
  Arrow file (memory-mapped) and window its documents (`tasks.chunk.window_rows`): one row per window (token
  piece, document row, start, length, trained_from, doc_id) written to an Arrow file. No token is read or copied:
  the stage stores windows, and the trainer gathers them when it starts.
- cpt chunk stage + gathered rows: the above, then every window's ids gathered from the memory-mapped tokens
  (`tasks.chunk.gather_rows`, what `Chunks.row_batches` runs for the trainer) into Arrow arrays kept in memory:
  the same blocks the seed's lists hold. This is the like-for-like line.

Checked before anything is printed: cpt's gathered rows are the seed's blocks, less the seed's tail blocks that
lie wholly inside the block before them (its loop emits one per stride until the document's end; cpt stops at the
first window that reaches it).

    .venv/bin/python -m bench.chunk_throughput [--corpus PATH] [--copies 1] [--repeat 7]
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bench.common import CORPORA, ROOT, argument_parser, best_of, build_model, require

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("CPT_NO_PROGRESS", "1")

MAX_SEQ_LENGTH, OVERLAP = 1000, 500


def build_tokenizer(texts: list[str], out: Path) -> Path:
    """The benchmark's tokenizer (BPE 16k trained on the corpus), trained once and kept in `out`."""
    if not (out / "tokenizer.json").exists():
        build_model(out, texts, vocab_size=16_000)
    return out


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


def seed_grouping(all_token_ids: list[list[int]], max_seq_length: int, overlap: int) -> list[list[int]]:
    """The seed notebook's `chunk_text_with_overlap` from after its tokenizer call, line for line, less the
    attention masks."""
    stride = max_seq_length - overlap
    chunked_input_ids = []
    for token_ids in all_token_ids:
        for i in range(0, len(token_ids), stride):
            chunk = token_ids[i : i + max_seq_length]
            if len(chunk) > 0:
                chunked_input_ids.append(chunk)
    return chunked_input_ids


def seed_grouping_with_masks(all_token_ids: list[list[int]], max_seq_length: int, overlap: int):
    """The same loop with the attention masks the notebook also builds."""
    stride = max_seq_length - overlap
    chunked_input_ids, chunked_attention_mask = [], []
    for token_ids in all_token_ids:
        for i in range(0, len(token_ids), stride):
            chunk = token_ids[i : i + max_seq_length]
            if len(chunk) > 0:
                chunked_input_ids.append(chunk)
                chunked_attention_mask.append([1] * len(chunk))
    return chunked_input_ids, chunked_attention_mask


def cpt_chunk_stage(tokens_path: Path, dst: Path, cfg, bos_id) -> dict[str, int]:
    """What `tasks.chunk.chunk_piece` builds for one source file (every document in one split here)."""
    import numpy as np

    from tasks.data.arrow import read_arrow
    from tasks.chunk import window_rows
    from tasks.data.windows import window_plan

    tokens = read_arrow(tokens_path)
    return window_rows(tokens, np.arange(tokens.num_rows), window_plan(cfg, bos_id is not None), dst)


def cpt_gathered(tokens_path: Path, windows_path: Path, bos_id, ids_type, rows_per_batch: int = 4096) -> list:
    """Every window's row gathered from the memory-mapped tokens, as `Chunks.row_batches` does, kept in memory."""
    from tasks.data.arrow import read_arrow
    from tasks.chunk import TokenFile, gather_rows

    files = {0: TokenFile(tokens_path)}
    windows = read_arrow(windows_path)
    return [gather_rows(batch, files, bos_id, ids_type) for batch in windows.to_batches(max_chunksize=rows_per_batch)]


def seed_without_inner_tails(docs: list[list[int]], max_seq_length: int, overlap: int) -> list[list[int]]:
    """The seed's blocks less those wholly inside the block before them (what cpt does not emit)."""
    stride = max_seq_length - overlap
    out = []
    for ids in docs:
        for i in range(0, len(ids), stride):
            if i > 0 and i - stride + max_seq_length >= len(ids):
                break  # the block before this one already reached the document's end
            out.append(ids[i : i + max_seq_length])
    return out


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--corpus", type=Path, default=CORPORA / "python_docs.jsonl")
    ap.add_argument("--copies", type=int, default=1, help="group K copies of the corpus's documents")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--tokenizer-dir", type=Path, default=ROOT / "artifacts" / "bench" / "bpe16k-python-docs")
    args = ap.parse_args()
    require(args.corpus)

    from tasks.data.arrow import read_arrow, token_type
    from tasks.core.config.data import ChunkConfig, TokenizeConfig
    from tasks.ml.tiny_model import read_texts
    from tasks.tokenize import id_limit, load_tokenizer, special_tokens, tokenize_file

    texts = read_texts(args.corpus)
    build_tokenizer(texts, args.tokenizer_dir)
    texts = texts * args.copies
    tok = load_tokenizer(args.tokenizer_dir)
    sp = special_tokens(tok)
    ids_type = token_type(id_limit(tok))
    cfg = ChunkConfig(max_seq_length=MAX_SEQ_LENGTH, overlap=OVERLAP)
    bos_id = None  # the seed's geometry: 1000-token windows every 500 (see the docstring)
    mb = sum(len(t.encode()) for t in texts) / 1e6

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        write_docs(texts, work / "docs.arrow")
        tcfg = TokenizeConfig()
        tokenize_file(work / "docs.arrow", work / "tokens.arrow", tok, sp["eos_id"], tcfg.batch_size, tcfg.batch_bytes,
                      ids_type=ids_type)
        docs = read_arrow(work / "tokens.arrow").column("input_ids").to_pylist()  # the seed's input, untimed
        n_tokens = sum(map(len, docs))
        print(f"corpus: {args.corpus.name} x{args.copies}, {len(texts)} documents, {mb:.1f} MB, {n_tokens:,} tokens "
              f"(EOS included); BPE {len(tok)} ({ids_type}); windows of {MAX_SEQ_LENGTH} every "
              f"{MAX_SEQ_LENGTH - OVERLAP}; {os.cpu_count()} cores; best of {args.repeat}")

        seed_s, seed_rows = best_of(args.repeat, lambda: seed_grouping(docs, MAX_SEQ_LENGTH, OVERLAP))
        masks_s, _ = best_of(args.repeat, lambda: seed_grouping_with_masks(docs, MAX_SEQ_LENGTH, OVERLAP))
        runs = iter(range(10 * args.repeat))
        stage_s, counts = best_of(args.repeat, lambda: cpt_chunk_stage(
            work / "tokens.arrow", work / f"windows-{next(runs)}.arrow", cfg, bos_id))
        windows = work / "windows.arrow"
        cpt_chunk_stage(work / "tokens.arrow", windows, cfg, bos_id)
        gather_s, gathered = best_of(args.repeat, lambda: cpt_gathered(work / "tokens.arrow", windows, bos_id,
                                                                       ids_type))

        cpt_rows = [row for batch in gathered for row in batch.column("input_ids").to_pylist()]
        expected = seed_without_inner_tails(docs, MAX_SEQ_LENGTH, OVERLAP)
        assert cpt_rows == expected, "cpt's windows must be the seed's blocks less its inner tails"
        assert counts["chunks"] == len(cpt_rows)
        seed_tokens = sum(map(len, seed_rows))

        both_s = stage_s + gather_s
        print(f"\n{'':48} {'seconds':>8} {'tokens in/s':>13} {'rows':>7} {'row tokens':>11}")
        for name, secs, rows, row_tokens in [
            ("seed: grouping loop, blocks as lists", seed_s, len(seed_rows), seed_tokens),
            ("  (the same loop with its attention masks)", masks_s, len(seed_rows), seed_tokens),
            ("cpt chunk stage: window table written", stage_s, counts["chunks"], counts["tokens"]),
            ("cpt chunk stage + every window's row gathered", both_s, counts["chunks"], counts["tokens"])]:
            print(f"{name:48} {secs:8.4f} {n_tokens / secs:13,.0f} {rows:7} {row_tokens:11,}")
        print(f"  (gathering alone: {gather_s:.4f} s)")
        print(f"\nlike for like (every block's ids in memory): cpt {seed_s / both_s:.2f}x the seed's throughput")
        print(f"the chunk stage as it ships (windows only; rows gathered at train start): {seed_s / stage_s:.2f}x")
        print(f"rows: the seed's {len(seed_rows)} include {len(seed_rows) - len(cpt_rows)} tail blocks wholly inside "
              f"the block before them; cpt's {len(cpt_rows)} are the rest, identical (checked)")


if __name__ == "__main__":
    main()
