"""Windows stored as offsets into the tokens against today's materialized chunk rows: disk, training start,
and per-batch reads, set against a training step.

Data: ../shared/corpora/python_docs.jsonl (or --corpus; --docs to take fewer documents) with the byte-level BPE
16k tokenizer bench.chunk_throughput trains on that corpus (kept in artifacts/bench). Settings: 1000/500 windows,
overlap masked, as the seed. Every figure below is measured in this process, best of --repeat:

- bytes: the chunk shard (input_ids in the tokens' type + trained_from, doc_id, start: today's layout) against a
  window table (token batch, start, length, trained_from as int32 per window) that refers to the tokenize
  output, which exists in both layouts;
- training start: what the train child does before its first step. Today: open the shard with datasets and
  derive labels (`training_columns`). Windows, materialized: gather each window from the memory-mapped tokens
  into an Arrow file of int32 input_ids and labels and open it with datasets (the same dataset the trainer reads
  today). Windows, lazy: open the tokens and the table (nothing gathered; a map-style dataset slices the tokens
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

from bench.common import CORPORA, ROOT, argument_parser, require

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
os.environ.setdefault("CPT_NO_PROGRESS", "1")

MAX_SEQ_LENGTH, OVERLAP = 1000, 500
GEMMA_1B_PARAMS, H200_BF16_FLOPS, UTILISATION = 1.0e9, 989e12, 0.4


def best_of(repeat: int, fn):
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def window_table(tokens_path: Path, cfg, bos: bool):
    """Per window: the token record batch holding its document, the window's first token in that batch's flat
    values, its length (BOS not counted) and where its trained part starts (BOS included)."""
    import numpy as np
    import pyarrow as pa

    from tasks.chunk import window_layout, window_plan

    window, stride = window_plan(cfg.max_seq_length, cfg.overlap, bos)
    reader = pa.ipc.open_file(pa.memory_map(str(tokens_path)))
    cols = {"batch": [], "start": [], "length": [], "trained_from": []}
    for b in range(reader.num_record_batches):
        ids = reader.get_batch(b).column("input_ids")
        offsets = ids.offsets.to_numpy().astype(np.int64) - ids.offsets[0].as_py()
        doc, nth, starts, sizes = window_layout(np.diff(offsets), window, stride)
        cols["batch"].append(np.full(len(doc), b, np.int32))
        cols["start"].append((offsets[doc] + starts).astype(np.int32))
        cols["length"].append(sizes.astype(np.int32))
        tf = np.full(len(doc), int(bos), np.int32)
        if cfg.mask_overlap and cfg.overlap:
            tf[nth > 0] += cfg.overlap
        cols["trained_from"].append(tf)
    return pa.table({k: pa.array(np.concatenate(v)) for k, v in cols.items()})


def token_values(tokens_path: Path):
    """Each token record batch's flat ids, a zero-copy numpy view of the memory-mapped file."""
    import pyarrow as pa

    reader = pa.ipc.open_file(pa.memory_map(str(tokens_path)))
    out = []
    for b in range(reader.num_record_batches):
        ids = reader.get_batch(b).column("input_ids")
        out.append(ids.values.to_numpy()[ids.offsets[0].as_py():])
    return out


def gather_windows(values, table, bos_id, dst: Path, rows_per_batch: int = 4096) -> None:
    """Every window of `table` as int32 input_ids and labels (the rule: -100 before trained_from), one gather per
    block of rows, written as an Arrow stream datasets opens."""
    import numpy as np
    import pyarrow as pa

    from tasks.arrow import IGNORE_INDEX

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
    bos = 1 if bos_id is not None else 0
    b_all, s_all, n_all, t_all = (table.column(c).to_numpy() for c in ("batch", "start", "length", "trained_from"))
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for lo in range(0, len(b_all), rows_per_batch):
            hi = min(lo + rows_per_batch, len(b_all))
            sizes = n_all[lo:hi].astype(np.int64) + bos
            offsets = np.zeros(hi - lo + 1, np.int64)
            np.cumsum(sizes, out=offsets[1:])
            position = np.arange(offsets[-1]) - np.repeat(offsets[:-1], sizes)
            ids = np.empty(offsets[-1], np.int32)
            for b in np.unique(b_all[lo:hi]):  # windows of one block come from one or two token batches
                sel = np.repeat(b_all[lo:hi] == b, sizes)
                first = np.repeat(s_all[lo:hi].astype(np.int64) - bos, sizes)
                ids[sel] = values[b].take(first[sel] + position[sel], mode="clip")
            if bos:
                ids[offsets[:-1]] = bos_id
            labels = ids.copy()
            labels[position < np.repeat(t_all[lo:hi].astype(np.int64), sizes)] = IGNORE_INDEX
            o = pa.array(offsets.astype(np.int32))
            writer.write_batch(pa.record_batch([pa.ListArray.from_arrays(o, pa.array(ids)),
                                                pa.ListArray.from_arrays(o, pa.array(labels))], schema=schema))


class LazyWindows:
    """A map-style dataset that slices each window from the memory-mapped tokens when the loader asks for it."""

    def __init__(self, values, table, bos_id):
        self.values, self.bos_id = values, bos_id
        self.cols = [table.column(c).to_numpy() for c in ("batch", "start", "length", "trained_from")]

    def __len__(self) -> int:
        return len(self.cols[0])

    def __getitem__(self, i):
        b, s, n, t = (int(c[i]) for c in self.cols)
        ids = self.values[b][s:s + n].tolist()
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
    from tasks.core.config import ChunkConfig, TokenizeConfig
    from tasks.ml.tiny_model import read_texts
    from tasks.ml.train_worker import training_columns
    from tasks.arrow import token_type
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
        counts = chunk_file(work / "tokens.arrow", work / "chunks", cfg, sp["bos_id"])
        shard = work / "chunks" / "data-00000-of-00001.arrow"
        table_s, table = best_of(args.repeat, lambda: window_table(work / "tokens.arrow", cfg, sp["bos_id"] is not None))
        import pyarrow as pa

        with pa.OSFile(str(work / "windows.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
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
        def today():
            return training_columns(datasets.DatasetDict({"train": Dataset.from_file(str(shard))}))["train"]

        runs = iter(range(args.repeat))

        def materialized():
            dst = work / f"windows-{next(runs)}.arrow"
            gather_windows(token_values(work / "tokens.arrow"), table, sp["bos_id"], dst)
            return Dataset.from_file(str(dst))

        def lazy():
            t = pa.ipc.open_file(pa.memory_map(str(work / "windows.arrow"))).read_all()
            return LazyWindows(token_values(work / "tokens.arrow"), t, sp["bos_id"])

        start = {}
        sets = {}
        for name, fn in [("today: shard + derived labels", today), ("windows, gathered at start", materialized),
                         ("windows, lazy slices", lazy)]:
            start[name], sets[name] = best_of(args.repeat, fn)
        a, b = sets["today: shard + derived labels"], sets["windows, gathered at start"]
        same = all(a[i] == b[i] for i in np.random.default_rng(0).integers(0, len(a), 50))
        lz = sets["windows, lazy slices"]
        same_lazy = all(a[i] == lz[i] for i in np.random.default_rng(1).integers(0, len(a), 50))
        assert same and same_lazy, "the window layouts must give the rows today's chunks give"

        collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id or 0)
        reads = {name: best_of(args.repeat, lambda ds=ds: read_batches(ds, collator, args.batch, args.batches))[1]
                 for name, ds in sets.items()}
        sample = next(iter(__import__("torch").utils.data.DataLoader(a, batch_size=args.batch, collate_fn=collator)))
        step_s = tiny_step_seconds(len(tok), sample)
        step_tokens = int(sample["attention_mask"].sum())
        gpu_step_s = 6 * GEMMA_1B_PARAMS * step_tokens / (H200_BF16_FLOPS * UTILISATION)

        base = "today: shard + derived labels"
        print(f"\n{'':32} {'start s':>8} {'x today':>8} {'batch ms':>9} {'tokens/s':>11} {'x today':>8} "
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
