"""The GPU path, measured: the seed notebook's training settings against cpt's best, on the real train stage.

One short script (a few minutes on one H100/H200). It builds a Gemma-3-1B-shaped model at random
initialisation from a config (no download; the full 262,144-token vocabulary, so the LM head costs what it
costs in the real model) and synthetic documents of realistic lengths (log-normal, median ~400 tokens, random
ids). Each setting runs the train stage's own child, `accelerate launch -m tasks.ml.train_worker`, for
`--steps` optimizer steps:

- seed:  the notebook's settings — its chunker (1000-token windows, stride 500, no EOS, overlap trained
         twice), no packing, batch 2 x accumulation 4, activation checkpointing, eager attention, bf16,
         paged_adamw_8bit;
- cpt sdpa / cpt flex: cpt's chunker (same 1000/500 windows, EOS per document, overlap masked), packing with
         position ids restarting per chunk (padding-free), batch 8 x 1, no activation checkpointing, bf16,
         paged_adamw_8bit; attention by sdpa (transformers derives the per-chunk block mask from the position
         ids) or flex_attention (block-sparse: masked blocks are skipped); cpt-flex-b32: 32 rows per step;
- static, static-fused-adamw, fast (configs/gemma3-1b-medical.yaml's train section), fast-autotune,
         fast-sdpa, fast-ckpt: cpt-flex-b32 with static packed rows of 1024 positions (train.packed_length:
         auto), then fused AdamW, then each decoder layer compiled (train.compile), then one alternative each:
         the max-autotune-no-cudagraphs compile mode, sdpa, activation checkpointing.

Library versions are printed first. Throughput is the worker's StepClock: optimizer steps only (the first 2 and any step with a checkpoint save
or evaluation left out), synchronised with the GPU, tokens counted from the batches the model ran. Printed per
setting: tokens/s over all tokens and over trained tokens (label != -100), MFU, peak GPU memory, padding, and
the ratio to the seed in trained tokens/s, and the first step's seconds beyond a timed step (compile_seconds:
compilation, which an uncompiled setting pays a little of too: kernel selection, allocator growth).

MFU = tokens/s x 6N / peak, N the model's parameters (attention-score FLOPs left out: a lower bound), peak the
card's dense bf16 rate from its datasheet (989 TFLOP/s for H100/H200 SXM).

On CPU `--shape tiny` runs the same path on a tiny Gemma-3 (the suite's smoke test; `--batch 4` keeps the packed
settings small there).

    .venv/bin/python -m bench.gpu_check [--shape gemma-3-1b|tiny] [--steps 20] [--out DIR] [--settings seed,fast]
                                        [--batch N] [--timeout S]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from bench.common import ROOT, argument_parser, build_model, write_seed_chunks

os.environ.setdefault("CPT_NO_PROGRESS", "1")

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
SEQ, OVERLAP = 1000, 500

SHAPES = {
    # google/gemma-3-1b-pt's config.json, less its weights.
    "gemma-3-1b": dict(vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                       max_position_embeddings=32_768, query_pre_attn_scalar=256),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, sliding_window=64, max_position_embeddings=2048,
                 query_pre_attn_scalar=32),
}

_FAST = dict(chunker="cpt", attn="flex_attention", packing=True, batch=32, accumulation=1, checkpointing=False,
             packed_length="auto", compile=True, optim="adamw_torch_fused")
SETTINGS = {
    "seed": dict(chunker="seed", attn="eager", packing=False, batch=2, accumulation=4, checkpointing=True),
    "cpt-sdpa": dict(chunker="cpt", attn="sdpa", packing=True, batch=8, accumulation=1, checkpointing=False),
    "cpt-flex": dict(chunker="cpt", attn="flex_attention", packing=True, batch=8, accumulation=1,
                     checkpointing=False),
    # Larger packed batches: fewer optimizer steps and launches per token (the same rows per step x2, x4).
    "cpt-flex-b16": dict(chunker="cpt", attn="flex_attention", packing=True, batch=16, accumulation=1,
                         checkpointing=False),
    "cpt-flex-b32": dict(chunker="cpt", attn="flex_attention", packing=True, batch=32, accumulation=1,
                         checkpointing=False),
    # Issue 22, one change at a time on top of cpt-flex-b32 (today's best), then the shipped config's train
    # section (`fast`) and its alternatives: static packed rows of 1024 positions; fused AdamW; each decoder layer
    # compiled; the autotuning compile mode; sdpa in place of flex_attention; activation checkpointing's cost.
    "static": {**_FAST, "compile": False, "optim": "paged_adamw_8bit"},
    "static-fused-adamw": {**_FAST, "compile": False},
    "fast": _FAST,
    "fast-autotune": {**_FAST, "compile_mode": "max-autotune-no-cudagraphs"},
    "fast-sdpa": {**_FAST, "attn": "sdpa"},
    "fast-ckpt": {**_FAST, "checkpointing": True},
}
# Issue 33, on a machine with several GPUs (all of them, one process each, the same global batch): plain DDP
# against FSDP2 full sharding (train.sharding: fsdp), on the same packed sdpa rows. Tokens/s are the whole
# machine's (rank 0's clock x processes) and peak memory is per GPU (each rank reports its own).
# python -m bench.gpu_check --settings ddp,fsdp --steps 20
_MULTI = dict(chunker="cpt", attn="sdpa", packing=True, batch=8, accumulation=1, checkpointing=False,
              optim="adamw_torch_fused", processes="all")
SETTINGS["ddp"] = {**_MULTI, "sharding": "none"}
SETTINGS["fsdp"] = {**_MULTI, "sharding": "fsdp"}
SETTINGS["fsdp-ckpt"] = {**_MULTI, "sharding": "fsdp", "checkpointing": True}
# One run of about 10 minutes on an H100/H200 (python -m bench.gpu_check --steps 20 --timeout 150): the seed,
# today's best, then issue 22's changes one at a time. The alternatives (fast-autotune, fast-sdpa, fast-ckpt) are
# a second run of about 6 minutes: --settings fast,fast-autotune,fast-sdpa,fast-ckpt.
GPU_DEFAULT = "seed,cpt-flex-b32,static,static-fused-adamw,fast"
CPU_DEFAULT = "seed,cpt-sdpa,fast-sdpa"


def synthetic_documents(n_tokens: int, vocab: int, seed: int = 0) -> list:
    """Documents of log-normal length (median ~400 tokens, long tail, clipped to 16..8000) of random ids above
    the special tokens, until `n_tokens` in all."""
    import numpy as np

    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        n = int(np.clip(rng.lognormal(6.0, 1.0), 16, 8000))
        docs.append(rng.integers(8, vocab, n, dtype=np.int32))
        total += n
    return docs


def cpt_chunks(docs: list, eos_id: int, bos_id: int | None, out: Path) -> None:
    """cpt's chunk stage functions on the same documents (EOS appended as tokenize does)."""
    import numpy as np
    import pyarrow as pa

    from tasks.chunk import SHARD, chunk_rows, write_dataset_dict
    from tasks.data.windows import window_plan
    from tasks.core.config.data import ChunkConfig

    ids = [np.append(d, eos_id).astype(np.uint32) for d in docs]
    tokens = pa.table({"doc_id": [f"doc{i}" for i in range(len(ids))], "input_ids": pa.array(ids, pa.list_(pa.uint32()))})
    cfg = ChunkConfig(max_seq_length=SEQ, overlap=OVERLAP, mask_overlap=True)
    for split, rows in (("train", np.arange(len(ids))), ("validation", np.arange(0))):
        (out / split).mkdir(parents=True)
        chunk_rows(tokens, rows, window_plan(cfg, bos_id is not None), bos_id, out / split / SHARD)
    write_dataset_dict(out, {"train": [SHARD], "validation": [SHARD]}, "gpu-check")


def run_setting(name: str, model_dir: Path, chunks: Path, steps: int, work: Path, timeout: float,
                batch: int | None = None) -> dict:
    """One setting through the train stage's child (`launch_command`), killed with its process group at
    `timeout`. Returns the worker's metrics, or {"error": ...}."""
    from tasks.core.config.model import ModelConfig, TrainConfig
    from tasks.ml.modeling import device_type
    from tasks.ml.spec import TrainSpec
    from tasks.train import PROJECT_ROOT, launch_command

    import torch

    s = SETTINGS[name]
    if batch is not None and s["packing"]:
        s = {**s, "batch": batch}
    processes = 1
    if s.get("processes") == "all":
        # Every GPU (on CPU: 2 processes over gloo, the suite's smoke test of the same path).
        processes = torch.cuda.device_count() if torch.cuda.is_available() else 2
        if processes < 2:
            return {"error": f"{name} needs at least 2 GPUs; this machine has {processes}", "log": ""}
    out = work / name
    out.mkdir(parents=True)
    train = TrainConfig(max_steps=steps, per_device_train_batch_size=s["batch"],
                        gradient_accumulation_steps=s["accumulation"], packing=s["packing"],
                        gradient_checkpointing=s["checkpointing"], optim=s.get("optim", "paged_adamw_8bit"),
                        packed_length=s.get("packed_length"), compile=s.get("compile", False),
                        compile_mode=s.get("compile_mode", "default"), warmup_ratio=0.0,
                        logging_steps=steps, eval_steps=100_000, save_steps=100_000, early_stopping_patience=None,
                        num_processes=processes, sharding=s.get("sharding", "none"))
    TrainSpec(model_location=str(model_dir),
              model=ModelConfig(id=str(model_dir), dtype="auto", attn_implementation=s["attn"]), train=train,
              max_seq_length=SEQ, chunks_dir=str(chunks), output_dir=str(out), checkpoint_dir=str(out / "checkpoints"),
              tensorboard_dir=str(out / "tensorboard")).write(out / "spec.json")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    log = out / "log.txt"
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(launch_command(out / "spec.json", processes, device_type()), stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"error": f"timed out after {timeout:.0f} s", "log": log.read_text()[-3000:]}
    if rc != 0 or not (out / "metrics.json").is_file():
        return {"error": f"exit status {rc}", "log": log.read_text()[-3000:]}
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - started
    metrics["processes"] = processes
    # Each rank's peak GPU memory, from its rank_done line in the log (rank 0 alone writes metrics.json).
    ranks = [json.loads(line.split("@@cpt ", 1)[1]) for line in log.read_text().splitlines() if "@@cpt " in line]
    peaks = [r["peak_memory_bytes"] for r in ranks if r.get("event") == "rank_done" and r.get("peak_memory_bytes")]
    metrics["peak_memory_per_gpu_bytes"] = max(peaks) if peaks else metrics.get("peak_memory_bytes")
    if processes > 1 and metrics.get("tokens_per_second"):
        # rank 0's clock over its own batches; every rank runs as many in the same time
        metrics["tokens_per_second"] *= processes
        metrics["trained_tokens_per_second"] *= processes
    return metrics


def main(argv: list[str] | None = None) -> dict:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--shape", choices=list(SHAPES), default=None, help="default: gemma-3-1b on a GPU, tiny on CPU")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--settings", default=None, help=f"comma-separated; default: {GPU_DEFAULT} on a GPU, "
                    f"{CPU_DEFAULT} on CPU (of: {', '.join(SETTINGS)})")
    ap.add_argument("--timeout", type=float, default=200.0, help="seconds per setting")
    ap.add_argument("--batch", type=int, default=None, help="rows per micro-batch of every packed setting "
                    "(a small CPU run); default: each setting's own")
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "bench" / "gpu-check")
    args = ap.parse_args(argv)

    import shutil

    import torch

    gpu = torch.cuda.is_available()
    shape = args.shape or ("gemma-3-1b" if gpu else "tiny")
    names = (args.settings or (GPU_DEFAULT if gpu else CPU_DEFAULT)).split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores)"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if gpu and k in device), None)

    shutil.rmtree(args.out, ignore_errors=True)
    work = args.out / "work"
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    # Tokenizer small, trained here (only its special tokens matter); the shape's Gemma 3 at random init, in bf16.
    n_params = build_model(work / "model", ["synthetic corpus for the throughput check"] * 8, vocab_size=300,
                           arch="gemma3", shape={**SHAPES[shape], "tie_word_embeddings": True}, dtype="bfloat16")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "model")
    # Enough documents for the largest setting: steps x rows per step x 1000 tokens, and more.
    rows = max(SETTINGS[n]["batch"] * SETTINGS[n]["accumulation"] for n in names)
    docs = synthetic_documents(int(1.5 * args.steps * rows * SEQ), SHAPES[shape]["vocab_size"])
    write_seed_chunks(docs, work / "chunks-seed", SEQ, OVERLAP, "gpu-check-seed")
    cpt_chunks(docs, tok.eos_token_id, tok.bos_token_id, work / "chunks-cpt")
    print(f"{device}; {shape} at random init ({n_params / 1e6:,.0f} M parameters); {len(docs)} synthetic documents; "
          f"{args.steps} optimizer steps per setting; setup {time.perf_counter() - t0:.0f} s", flush=True)

    versions = library_versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    results = {"device": device, "shape": shape, "parameters": n_params, "steps": args.steps, "versions": versions,
               "settings": {}}
    for name in names:
        chunks = work / ("chunks-seed" if SETTINGS[name]["chunker"] == "seed" else "chunks-cpt")
        m = run_setting(name, work / "model", chunks, args.steps, work, args.timeout, args.batch)
        row = {"setting": name, **SETTINGS[name]}
        if args.batch is not None and row["packing"]:
            row["batch"] = args.batch
        if "error" in m:
            row.update(error=m["error"], log=m["log"])
            print(f"{name}: {m['error']}\n{m['log'][-1500:]}", flush=True)
        else:
            tps, trained = m["tokens_per_second"], m["trained_tokens_per_second"]
            row.update(tokens_per_second=tps, trained_tokens_per_second=trained, timed_steps=m["timed_steps"],
                       timed_seconds=m["timed_seconds"], batch_padding=m["batch_padding_fraction"],
                       row_padding=m["padding_fraction"], optim=m["optim"], dtype=m["dtype"],
                       checkpointing=m["gradient_checkpointing"], wall_seconds=m["wall_seconds"],
                       compile_seconds=m.get("compile_seconds"), first_step_seconds=m.get("first_step_seconds"),
                       packed_length=m.get("packed_length"), compiled=m.get("compile"),
                       peak_memory_gib=(m["peak_memory_per_gpu_bytes"] or 0) / 2**30
                       if m.get("peak_memory_per_gpu_bytes") else None, processes=m.get("processes", 1),
                       mfu=tps * 6 * n_params / (peak * m.get("processes", 1)) if peak and tps else None)
            print(f"{name}: done in {m['wall_seconds']:.0f} s", flush=True)
        results["settings"][name] = row
    seed_trained = (results["settings"].get("seed") or {}).get("trained_tokens_per_second")
    ddp = results["settings"].get("ddp") or {}
    for row in results["settings"].values():
        t = row.get("trained_tokens_per_second")
        row["vs_seed_trained"] = t / seed_trained if t and seed_trained else None
        if row.get("sharding") == "fsdp" and ddp.get("trained_tokens_per_second") and t:
            row["vs_ddp_trained"] = t / ddp["trained_tokens_per_second"]
            row["vs_ddp_memory"] = (row["peak_memory_gib"] / ddp["peak_memory_gib"]
                                    if row.get("peak_memory_gib") and ddp.get("peak_memory_gib") else None)
    table = render(results)
    print(table)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(table + "\n")
    return results


def library_versions() -> dict[str, str]:
    """What the figures were measured with (docs/gpu.md's tables name them)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("transformers", "trl", "accelerate", "triton", "bitsandbytes", "liger-kernel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def render(results: dict) -> str:
    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    lines = [f"{results['device']}, {results['shape']} ({results['parameters'] / 1e6:,.0f} M parameters), "
             f"{results['steps']} optimizer steps per setting",
             "versions: " + ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items()),
             "",
             "| setting | attention | batch x accum | packed length | compile | act. ckpt | optimizer | tokens/s (all) "
             "| tokens/s (trained) | vs seed (trained) | MFU | peak GPU memory | padding (batch / rows) "
             "| compile s (first step s) | GPUs, sharding | vs DDP (tokens/s, memory) |",
             "| --- | --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in results["settings"].values():
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['attn']} | {r['batch']} x {r['accumulation']} | | | — | — | failed: "
                         f"{r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['setting']} | {r['attn']} | {r['batch']} x {r['accumulation']} | {r.get('packed_length') or '—'} "
            f"| {r.get('compiled') or 'off'} | {'on' if r['checkpointing'] else 'off'} "
            f"| {r['optim']} | {f(r['tokens_per_second'], ',.0f')} | {f(r['trained_tokens_per_second'], ',.0f')} "
            f"| {f(r['vs_seed_trained'], '.2f')}x | {f(r['mfu'], '.1%')} "
            f"| {f(r['peak_memory_gib'], '.1f')} GiB | {f(r['batch_padding'], '.1%')} / {f(r['row_padding'], '.1%')} "
            f"| {f(r.get('compile_seconds'), '.0f')} ({f(r.get('first_step_seconds'), '.0f')}) "
            f"| {r.get('processes', 1)}, {r.get('sharding', 'none')} "
            f"| {f(r.get('vs_ddp_trained'), '.2f')}x, {f(r.get('vs_ddp_memory'), '.2f')}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
