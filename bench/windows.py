"""Windows stored as offsets into the tokens (the chunk stage's layout since its version 3) against
materialised chunk rows (the layout before): disk, training start, and per-batch reads, set against a step.

Data: ../shared/corpora/python_docs.jsonl (or --corpus; --docs to take fewer documents) with the byte-level BPE
16k tokenizer bench.chunk_throughput trains on that corpus (kept in artifacts/bench). Settings: 1000/500 windows,
overlap masked, as the seed. Every figure below is measured in this process, best of --repeat:

- bytes: the chunk shard (input_ids in the tokens' type + trained_from, doc_id, start: the materialised layout)
  against the chunk stage's window table (`tasks.chunk.window_rows`: part, row, start, length, trained_from,
  doc_id per window) that refers to the tokenize output, which exists in both layouts;
- training start: what happens before the first step. Materialised rows: open the shard with datasets and
  derive labels (`training_columns`, the train child's path for stored rows). Windows, gathered (what the train
  stage does now, `Chunks.write_training_set`): gather each window from the memory-mapped tokens
  (`tasks.chunk.gather_rows`) into an Arrow file of int32 input_ids and labels and open it with datasets. Windows, lazy: open the tokens and the table (nothing gathered; a map-style dataset slices the tokens
  per row);
- per-batch reads: rows through a shuffled torch DataLoader with TRL's DataCollatorForLanguageModeling (the
  trainer's collator when packing is off), `--batch` rows per batch, tokens per second and seconds per batch;
- a step: the tiny Llama model (hidden 128, 4 layers, the tokenizer's vocabulary) forward + backward + AdamW on
  one such batch on this CPU; and an estimate for one GPU (gemma-3-1b, ~1.0e9 parameters, 6·N FLOPs per token,
  H200 bf16 989 TFLOP/s at 40% utilisation).

    .venv/bin/python -m bench.windows [--docs 200] [--repeat 3] [--batches 200]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.common import CORPORA, ROOT, argument_parser, best_of, require

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("CPT_NO_PROGRESS", "1")

MAX_SEQ_LENGTH, OVERLAP = 1000, 500
GEMMA_1B_PARAMS, H200_BF16_FLOPS, UTILISATION = 1.0e9, 989e12, 0.4


def window_table(tokens_path: Path, cfg, bos_id, dst: Path):
    """The chunk stage's window table of every document of the token file (`tasks.chunk.window_rows`)."""
    import numpy as np

    from tasks.data.arrow import read_arrow
    from tasks.chunk import window_rows
    from tasks.data.windows import window_plan

    tokens = read_arrow(tokens_path)
    window_rows(tokens, np.arange(tokens.num_rows), window_plan(cfg, bos_id is not None), dst)
    return read_arrow(dst)


def token_values(tokens_path: Path):
    """Each token record batch's flat ids, a zero-copy numpy view of the memory-mapped file."""
    import pyarrow as pa

    reader = pa.ipc.open_file(pa.memory_map(str(tokens_path)))
    out = []
    for b in range(reader.num_record_batches):
        ids = reader.get_batch(b).column("input_ids")
        out.append(ids.values.to_numpy()[ids.offsets[0].as_py():])
    return out


def gather_windows(tokens_path: Path, table, bos_id, ids_type, dst: Path, rows_per_batch: int = 4096) -> None:
    """What the train stage does before training (`Chunks.write_training_set`): every window gathered from the
    memory-mapped tokens (`tasks.chunk.gather_rows`) as int32 input_ids and labels, an Arrow stream datasets
    opens."""
    import pyarrow as pa

    from tasks.data.arrow import with_labels
    from tasks.chunk import TokenFile, gather_rows

    files = {0: TokenFile(tokens_path)}
    writer = sink = None
    for batch in table.to_batches(max_chunksize=rows_per_batch):
        out = with_labels(gather_rows(batch, files, bos_id, ids_type))
        if writer is None:
            sink = pa.OSFile(str(dst), "wb")
            writer = pa.ipc.new_stream(sink, out.schema)
        writer.write_table(out)
    writer.close()
    sink.close()


class LazyWindows:
    """A map-style dataset that slices each window from the memory-mapped tokens when the loader asks for it."""

    def __init__(self, tokens_path: Path, table, bos_id):
        from tasks.chunk import TokenFile

        self.file, self.bos_id = TokenFile(tokens_path), bos_id
        self.cols = [table.column(c).to_numpy() for c in ("row", "start", "length", "trained_from")]

    def __len__(self) -> int:
        return len(self.cols[0])

    def __getitem__(self, i):
        import numpy as np

        row, s, n, t = (int(c[i]) for c in self.cols)
        f = self.file
        b = int(np.searchsorted(f.bounds, row, side="right")) - 1
        first = int(f.offsets[b][row - f.bounds[b]]) + s
        ids = f.values[b][first:first + n].tolist()
        if self.bos_id is not None:
            ids = [self.bos_id] + ids
        return {"input_ids": ids, "labels": [-100] * t + ids[t:]}


def read_batches(dataset, collator, batch: int, n_batches: int) -> tuple[float, int]:
    """Seconds and tokens for `n_batches` shuffled batches through a DataLoader and the collator."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch, shuffle=True, collate_fn=collator,
                        generator=torch.Generator().manual_seed(0))
    tokens = 0
    t0 = time.perf_counter()
    for i, out in enumerate(loader):
        if i >= n_batches:
            break
        tokens += int(out["attention_mask"].sum())
    return time.perf_counter() - t0, tokens


def tiny_step_seconds(vocab: int, batch_out, steps: int = 5) -> float:
    """Median seconds of forward + backward + AdamW of the tiny Llama model on one collated batch."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=32, max_position_embeddings=2048, tie_word_embeddings=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(**batch_out).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--corpus", type=Path, default=CORPORA / "python_docs.jsonl")
    ap.add_argument("--docs", type=int, default=None, help="the corpus's first N documents (default: all)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batches", type=int, default=200, help="batches read per loader measurement")
    ap.add_argument("--batch", type=int, default=2, help="rows per batch (train.per_device_train_batch_size)")
    ap.add_argument("--tokenizer-dir", type=Path, default=ROOT / "artifacts" / "bench" / "bpe16k-python-docs")
    args = ap.parse_args()
    require(args.corpus)

    import datasets
    import numpy as np
    from datasets import Dataset, disable_caching
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from bench.chunk_throughput import build_tokenizer, write_docs
    from tasks.chunk import chunk_file
    from tasks.data.windows import window_plan
    from tasks.core.config.data import ChunkConfig, TokenizeConfig
    from tasks.ml.tiny_model import read_texts
    from tasks.ml.train_worker import training_columns
    from tasks.data.arrow import token_type
    from tasks.tokenize import id_limit, load_tokenizer, special_tokens, tokenize_file

    disable_caching()  # as the train child: its maps go to a temp folder, never into the chunks
    datasets.utils.logging.disable_progress_bar()
    texts = read_texts(args.corpus)[:args.docs]
    build_tokenizer(texts if args.docs is None else read_texts(args.corpus), args.tokenizer_dir)
    tok = load_tokenizer(args.tokenizer_dir)
    sp = special_tokens(tok)
    cfg = ChunkConfig(max_seq_length=MAX_SEQ_LENGTH, overlap=OVERLAP)
    mb = sum(len(t.encode()) for t in texts) / 1e6

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        write_docs(texts, work / "docs.arrow")
        tcfg = TokenizeConfig()
        tokenize_file(work / "docs.arrow", work / "tokens.arrow", tok, sp["eos_id"], tcfg.batch_size,
                      tcfg.batch_bytes, ids_type=token_type(id_limit(tok)))
        counts = chunk_file(work / "tokens.arrow", work / "chunks", window_plan(cfg, sp["bos_id"] is not None),
                            sp["bos_id"])
        shard = work / "chunks" / "data-00000-of-00001.arrow"
        table_s, table = best_of(args.repeat, lambda: window_table(work / "tokens.arrow", cfg, sp["bos_id"],
                                                                   work / "windows.arrow"))
        import pyarrow as pa

        assert table.num_rows == counts["chunks"], (table.num_rows, counts["chunks"])

        token_bytes = (work / "tokens.arrow").stat().st_size
        shard_bytes, table_bytes = shard.stat().st_size, (work / "windows.arrow").stat().st_size
        print(f"corpus: {args.corpus.name}, {len(texts)} documents, {mb:.1f} MB; BPE {len(tok)} "
              f"({token_type(id_limit(tok))}); {MAX_SEQ_LENGTH}/{OVERLAP}, overlap masked; {counts['chunks']} "
              f"windows, {counts['tokens']:,} row tokens; {os.cpu_count()} cores; best of {args.repeat}")
        print(f"\nbytes on disk: tokenize output {token_bytes / 1e6:.1f} MB (both layouts); chunk shard "
              f"{shard_bytes / 1e6:.1f} MB vs window table {table_bytes / 1e6:.2f} MB "
              f"(table / shard {table_bytes / shard_bytes:.3f}; chunk stage / corpus {shard_bytes / 1e6 / mb:.2f} "
              f"-> {table_bytes / 1e6 / mb:.3f}); window table built in {table_s:.3f} s")

        # Training start, as the train child does it (datasets opened, labels derived / windows gathered).
        def rows():
            return training_columns(datasets.DatasetDict({"train": Dataset.from_file(str(shard))}))["train"]

        runs = iter(range(args.repeat))

        def materialized():
            dst = work / f"windows-{next(runs)}.arrow"
            gather_windows(work / "tokens.arrow", table, sp["bos_id"], token_type(id_limit(tok)), dst)
            return Dataset.from_file(str(dst))

        def lazy():
            t = pa.ipc.open_file(pa.memory_map(str(work / "windows.arrow"))).read_all()
            return LazyWindows(work / "tokens.arrow", t, sp["bos_id"])

        start = {}
        sets = {}
        for name, fn in [("rows: shard + derived labels", rows), ("windows, gathered at start", materialized),
                         ("windows, lazy slices", lazy)]:
            start[name], sets[name] = best_of(args.repeat, fn)
        a, b = sets["rows: shard + derived labels"], sets["windows, gathered at start"]
        same = all(a[i] == b[i] for i in np.random.default_rng(0).integers(0, len(a), 50))
        lz = sets["windows, lazy slices"]
        same_lazy = all(a[i] == lz[i] for i in np.random.default_rng(1).integers(0, len(a), 50))
        assert same and same_lazy, "the window layouts must give the rows the materialised chunks give"

        collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id or 0)
        reads = {name: best_of(args.repeat, lambda ds=ds: read_batches(ds, collator, args.batch, args.batches))[1]
                 for name, ds in sets.items()}
        sample = next(iter(__import__("torch").utils.data.DataLoader(a, batch_size=args.batch, collate_fn=collator)))
        step_s = tiny_step_seconds(len(tok), sample)
        step_tokens = int(sample["attention_mask"].sum())
        gpu_step_s = 6 * GEMMA_1B_PARAMS * step_tokens / (H200_BF16_FLOPS * UTILISATION)

        base = "rows: shard + derived labels"
        print(f"\n{'':32} {'start s':>8} {'x rows':>8} {'batch ms':>9} {'tokens/s':>11} {'x rows':>8} "
              f"{'% tiny CPU step':>15} {'% GPU step (est.)':>17}")
        for name in sets:
            secs, tokens = reads[name]
            per_batch = secs / args.batches
            print(f"{name:32} {start[name]:8.3f} {start[name] / start[base]:8.2f} {per_batch * 1e3:9.3f} "
                  f"{tokens / secs:11,.0f} {(tokens / secs) / (reads[base][1] / reads[base][0]):8.2f} "
                  f"{100 * per_batch / step_s:15.2f} {100 * per_batch / gpu_step_s:17.2f}")
        print(f"\na step on {step_tokens} tokens ({args.batch} rows): tiny Llama on this CPU {step_s * 1e3:.1f} ms; "
              f"gemma-3-1b on one H200, estimated {gpu_step_s * 1e3:.1f} ms (6 x {GEMMA_1B_PARAMS:.0e} x tokens "
              f"/ ({H200_BF16_FLOPS:.0e} x {UTILISATION}))")
        print("reads run in the main process (dataloader_num_workers 0, the default); a loader with workers "
              "overlaps them with the step.")


if __name__ == "__main__":
    main()
