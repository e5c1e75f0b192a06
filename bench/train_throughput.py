"""Training throughput of cpt's train stage: packing off vs on, and the seed notebook's settings, in one run.

Each configuration runs the real train stage path (an `accelerate launch` child running TRL's SFTTrainer on a
chunk-stage DatasetDict) for a fixed number of optimizer steps. Throughput is the worker's StepClock: the
optimizer steps alone (the first two, and any step in which a checkpoint was saved or an evaluation ran, are
left out), with tokens counted from the batches the model ran: all tokens (positions holding a token) and
trained tokens (label != -100 after the causal shift: the seed trains its overlap twice, cpt masks it). Padding
is measured from the same batches: padded positions over the rows' capacity.

The cpt rows use cpt's chunker (EOS per document, overlap masked); the seed row uses the seed notebook's own
chunker (`chunk_text_with_overlap`: 1000-token windows every 500 tokens, no EOS, every token a label) with its
batch 2 x accumulation 4 and activation checkpointing (turned off on CPU by the worker, as there).

Model: on CPU a small Llama (4 layers, hidden 256) at random init with a BPE tokenizer trained here. The GPU
comparison with a Gemma-3-1B-shaped model and MFU is bench.gpu_check.

    .venv/bin/python -m bench.train_throughput [--corpus PATH] [--steps 30]
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bench.common import CORPORA, SAMPLE_CORPUS, argument_parser, build_model, write_seed_chunks

os.environ.setdefault("CPT_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


SEED_SEQ, SEED_OVERLAP = 1000, 500  # the notebook's chunker settings
SHAPES = {
    # Gemma 3 1B's shape (vocabulary aside).
    "gpu": ("gemma3", dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=256, max_position_embeddings=4096)),
    "cpu": ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, max_position_embeddings=4096)),
}


def model_for(out: Path, texts: list[str], gpu: bool) -> Path:
    """BPE 4k trained on `texts` and the device's model (SHAPES) at random init, in `out`."""
    arch, shape = SHAPES["gpu" if gpu else "cpu"]
    build_model(out, texts, vocab_size=4096, arch=arch, shape=shape)
    return out


def make_chunks(corpus: Path, tokenizer_dir: Path, out: Path, max_seq_length: int, overlap: int, mask: bool) -> Path:
    from tasks.chunk import SHARD, chunk_file, write_dataset_dict
    from tasks.data.windows import window_plan
    from tasks.core.config.data import ChunkConfig, CorpusConfig
    from tasks.data.layout import INDEX_FILE
    from tasks.data.pieces import load_documents, read_documents
    from tasks.shuffle import split_documents, write_split
    from tasks.tokenize import load_tokenizer, special_tokens, tokenize_file

    work = out.parent / f"{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    load_documents([corpus], CorpusConfig(paths=[str(corpus)]), work, [corpus.name])
    table = read_documents(work / INDEX_FILE, [work / "parts" / "0"])
    parts = split_documents(table.column("doc_id").to_pylist(), 42, 0.02)
    tok = load_tokenizer(tokenizer_dir)
    sp = special_tokens(tok)
    cfg = ChunkConfig(max_seq_length=max_seq_length, overlap=overlap, mask_overlap=mask)
    for split in ("train", "validation"):
        write_split(table, parts[split], work / f"{split}.docs.arrow")
        tokenize_file(work / f"{split}.docs.arrow", work / f"{split}.tokens.arrow", tok, sp["eos_id"], 1000)
        chunk_file(work / f"{split}.tokens.arrow", out / split, window_plan(cfg, sp["bos_id"] is not None), sp["bos_id"])
    write_dataset_dict(out, {"train": [SHARD], "validation": [SHARD]}, "bench")
    return out


def run_config(name: str, model_dir: Path, chunks: Path, max_seq_length: int, train: dict, work: Path,
               gpu: bool) -> dict:
    from tasks.core.config.model import ModelConfig, TrainConfig
    from tasks.train import train_model

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    steps = train["max_steps"]
    cfg = TrainConfig(**{"warmup_ratio": 0.0, "logging_steps": steps, "eval_steps": 100_000, "save_steps": 100_000,
                         "early_stopping_patience": None, "optim": "adamw_torch", **train})
    spec = {"model_location": str(model_dir),
            "model": ModelConfig(id=str(model_dir), dtype="bfloat16" if gpu else "float32",
                                 attn_implementation="sdpa").model_dump(),
            "train": cfg.model_dump(), "max_seq_length": max_seq_length, "chunks_dir": str(chunks),
            "output_dir": str(out), "checkpoint_dir": str(out / "ckpt"), "tensorboard_dir": str(out / "tb")}

    class Quiet:
        def info(self, *a): pass
        def warning(self, *a): pass

    return train_model(spec, 1, Quiet())


def seed_chunker_output(corpus: Path, tokenizer_dir: Path, out: Path) -> Path:
    """The seed notebook's chunker on the corpus (train split as cpt's), in the chunk stage's layout."""
    import numpy as np

    from tasks.ml.tiny_model import read_texts
    from tasks.tokenize import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    docs = [np.asarray(e.ids, dtype=np.int32)
            for e in tok._tokenizer.encode_batch_fast(read_texts(corpus), add_special_tokens=False)]
    write_seed_chunks([d for d in docs if len(d)], out, SEED_SEQ, SEED_OVERLAP, "gpu-check-seed")
    return out


def main() -> None:
    import torch

    from tasks.ml.tiny_model import read_texts

    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--corpus", type=Path, default=CORPORA / "ko_transport_bills.jsonl")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    if not args.corpus.is_file():
        args.corpus = SAMPLE_CORPUS
    gpu = torch.cuda.is_available()
    texts = read_texts(args.corpus)
    seq = 1000 if gpu else 256
    batch = 8 if gpu else 4

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        model_dir = model_for(work / "model", texts[:2000], gpu)
        ours = make_chunks(args.corpus, model_dir, work / "chunks", seq, seq // 4, True)
        seed = seed_chunker_output(args.corpus, model_dir, work / "chunks-seed")
        configs = [
            ("packing off", ours, seq, {"per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
                                        "packing": False}),
            ("packing on", ours, seq, {"per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
                                       "packing": True}),
            ("seed settings", seed, SEED_SEQ, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
                                               "packing": False, "gradient_checkpointing": True}),
        ]
        device = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores)"
        print(f"corpus {args.corpus.name} ({len(texts)} docs); model {'Gemma-3-1B-shaped' if gpu else 'Llama 4x256'} "
              f"at random init; {device}; {args.steps} optimizer steps per configuration, the first 2 untimed")
        print(f"{'configuration':16} {'seq':>5} {'batch x accum':>13} {'tokens/s':>10} {'trained/s':>10} "
              f"{'padding':>8} {'trained vs seed':>16}")
        rows = []
        for name, chunks, L, train in configs:
            m = run_config(name.replace(" ", "-"), model_dir, chunks, L, {"max_steps": args.steps, **train}, work, gpu)
            rows.append((name, L, train, m))
        seed_trained = rows[-1][3]["trained_tokens_per_second"]
        for name, L, train, m in rows:
            print(f"{name:16} {L:5d} {train['per_device_train_batch_size']:>7} x {train['gradient_accumulation_steps']:<3}"
                  f" {m['tokens_per_second']:10,.0f} {m['trained_tokens_per_second']:10,.0f}"
                  f" {m['batch_padding_fraction']:8.1%} {m['trained_tokens_per_second'] / seed_trained:15.2f}x")


if __name__ == "__main__":
    main()
