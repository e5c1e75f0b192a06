"""What the benchmarks share: paths, corpus files, the seed notebook's data path, the tokenizer and model they
build, the servers some start (Prefect, moto's S3) and the fresh processes they time.

Only the standard library is imported at module level, so importing this costs a benchmark nothing it measures
(datasets, transformers, torch and cpt's modules are imported inside the functions that use them).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared/corpora beside the checkout; CPT_CORPORA names another place (a worktree kept elsewhere).
CORPORA = Path(os.environ.get("CPT_CORPORA") or ROOT.parent / "shared" / "corpora")
SAMPLE_CORPUS = ROOT / "samples" / "medical_ko.jsonl"
BIN = Path(sys.executable).parent
CPT = str(BIN / "cpt")
# The stages of a run summary that make up the data path (load … chunk).
DATA_STAGES = ("load", "shuffle", "tokenize", "token-stats", "chunk")


def argument_parser(spec, doc: str | None) -> argparse.ArgumentParser:
    """The parser of a benchmark run as `python -m bench.<name>` (pass the module's `__spec__` and `__doc__`): its
    usage line says so, where argparse alone would name the file, and --help opens with the docstring's first
    paragraph."""
    return argparse.ArgumentParser(prog=f"python -m {spec.name}", description=(doc or "").split("\n\n")[0] or None)


# --- corpus files --------------------------------------------------------------------------------------------

def require(*paths: Path) -> None:
    """Exit with a message unless every one of `paths` (corpora under ../shared/corpora) is a file."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"{', '.join(missing)} not found: this benchmark needs ../shared/corpora beside the checkout")


def write_jsonl(path: Path, texts: list[str]) -> Path:
    """`texts` as a JSON-lines corpus file, one {"content": text} a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"content": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def write_parts(texts: list[str], folder: Path, n: int, settled: bool = False) -> None:
    """`texts` cut into `n` JSON-lines files `part-000.jsonl` … in `folder`, in order; `settled`: their mtime an
    hour ago (a drop's producer finished with them)."""
    size = -(-len(texts) // n)
    for i in range(n):
        write_jsonl(folder / f"part-{i:03d}.jsonl", texts[i * size:(i + 1) * size])
    if settled:
        old = time.time() - 3600
        for p in folder.iterdir():
            os.utime(p, (old, old))


# --- the seed notebook's data path -----------------------------------------------------------------------------

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


def seed_data_path(corpus, tokenizer, cache_dir, max_seq_length=1000, overlap=500, shuffle_seed=None) -> int:
    """The notebook's data path on a JSON-lines corpus: `load_dataset("json", data_files={"train": ...})` with
    its on-disk cache in `cache_dir`, `shuffle()`, then `chunk_text_with_overlap` through
    `datasets.map(batched=True)`. Returns the number of chunks."""
    from datasets import load_dataset

    data = load_dataset("json", data_files={"train": str(corpus)}, cache_dir=str(cache_dir))
    data = data.shuffle(seed=shuffle_seed)
    chunked = data["train"].map(chunk_text_with_overlap, batched=True, remove_columns=data["train"].column_names,
                                fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length,
                                           "text_field": "content", "overlap": overlap})
    return len(chunked)


def seed_script() -> str:
    """The seed's data path as a standalone script, `python seed.py MODEL_DIR CORPUS CACHE_DIR`, written from the
    two functions above: the notebook's imports, its tokenizer, its data path. It prints the number of chunks and
    `section <seconds>`: the notebook's timed section, from loading the tokenizer to the chunked dataset (what
    a user times in the notebook's cells once the kernel has imported its libraries)."""
    return "\n\n".join([
        "from __future__ import annotations\n\nimport sys\nimport time\n\nfrom datasets import load_dataset\n"
        "from transformers import AutoTokenizer\n\nmodel_dir, corpus, cache = sys.argv[1:4]\n"
        "started = time.perf_counter()\ntokenizer = AutoTokenizer.from_pretrained(model_dir)\n",
        inspect.getsource(chunk_text_with_overlap),
        inspect.getsource(seed_data_path),
        "print(seed_data_path(corpus, tokenizer, cache))\nprint(f'section {time.perf_counter() - started:.4f}')\n",
    ])


def seed_windows(docs: list, max_seq_length: int, overlap: int) -> list:
    """`chunk_text_with_overlap` on documents already tokenized (each a sequence of token ids): its windows
    [i, i + max_seq_length) every max_seq_length - overlap tokens of each document, no EOS."""
    def pretokenized(ids, **_):
        return {"input_ids": ids}

    return chunk_text_with_overlap({"ids": docs}, pretokenized, max_seq_length, "ids", overlap)["input_ids"]


def write_seed_chunks(docs: list, out: Path, max_seq_length: int, overlap: int, fingerprint: str) -> None:
    """The seed's chunks of `docs` (token-id arrays) in the chunk stage's layout, so the train worker reads them as
    it reads cpt's: trained_from 0 (labels = input_ids, every token trained, the overlap twice), an empty
    validation split."""
    import numpy as np
    import pyarrow as pa

    from tasks.chunk import SHARD, chunk_arrow_schema, write_dataset_dict

    rows = seed_windows(docs, max_seq_length, overlap)
    ids = pa.array(rows, pa.list_(pa.uint32()))
    schema = chunk_arrow_schema(pa.uint32())
    for split, table in (("train", pa.table([ids, pa.array(np.zeros(len(rows), np.int32)), pa.array([""] * len(rows)),
                                             pa.array(np.zeros(len(rows), np.int32))], schema=schema)),
                         ("validation", schema.empty_table())):
        (out / split).mkdir(parents=True)
        with pa.OSFile(str(out / split / SHARD), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
            w.write_table(table)
    write_dataset_dict(out, {"train": [SHARD], "validation": [SHARD]}, fingerprint, pa.uint32())


# --- tokenizer and model ------------------------------------------------------------------------------------

def build_model(out: Path, texts: list[str], vocab_size: int, arch: str | None = None, shape: dict | None = None,
                dtype: str | None = None, seed: int = 0) -> int:
    """A byte-level BPE tokenizer of `vocab_size` trained on `texts` (tasks.ml.tiny_model's: BOS first) saved to
    `out`, and with `arch` ("llama" or "gemma3") that architecture's causal LM of `shape` (config keywords;
    `vocab_size` defaults to the tokenizer's) at random initialisation (torch seed `seed`), cast to `dtype`
    ("bfloat16", …) if given, saved beside it. Returns the model's parameter count (0 for a tokenizer alone)."""
    from tasks.ml.tiny_model import train_tokenizer

    tok = train_tokenizer(texts, vocab_size=vocab_size)
    n_params = 0
    if arch:
        import torch
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

        config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM)}[arch]
        cfg = config_cls(**{"vocab_size": len(tok), **(shape or {})}, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed)
        model = model_cls(cfg)
        if dtype:
            model = model.to(getattr(torch, dtype))
        model.save_pretrained(out)
        n_params = sum(p.numel() for p in model.parameters())
    tok.save_pretrained(out)
    return n_params


# --- fresh processes and the servers they talk to ----------------------------------------------------------------

def quiet_env(**extra: str) -> dict[str, str]:
    """This process's environment for a fresh cpt process: no progress bars, Prefect's warnings only, no hub, and
    a temporary Prefect server for a run that finds none (a kept one would outlive the benchmark: `kept_server`)."""
    return {**os.environ, "CPT_NO_PROGRESS": "1", "PREFECT_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
            "CPT_SERVER": "temporary", **extra}


@contextmanager
def kept_server(env: dict[str, str], home: Path) -> Iterator[dict[str, str]]:
    """`env` for runs as a new user makes them with no server started by hand: the first `cpt run` starts the
    server cpt keeps (its state and Prefect's home under `home`, any free port), later runs find it; stopped
    (`cpt server stop`) at the block's end."""
    kept = {**env, "CPT_SERVER": "keep", "CPT_SERVER_PORT": "0", "CPT_CACHE_HOME": str(home / "cache"),
            "PREFECT_HOME": str(home / "prefect"), "CPT_FIND_MAKE_SERVER": "0"}
    kept.pop("PREFECT_API_URL", None)
    try:
        yield kept
    finally:
        subprocess.run([CPT, "server", "stop"], env=kept, stdout=subprocess.DEVNULL, check=False)


def best_of(repeat: int, fn):
    """(the fastest of `repeat` calls' seconds, the last call's result)."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Run `cmd` (from the repository root, output captured) and return its wall seconds, start to exit; exit
    with its output's tail if it fails."""
    return timed_output(cmd, env)[0]


def timed_output(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """`timed`, and what the command printed."""
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return wall, done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(what: str, probe: Callable[[], object], proc: subprocess.Popen | None = None,
                  interval: float = 0.5, timeout: float = 120.0) -> None:
    """Call `probe` until it raises no OSError; after `timeout` seconds kill `proc` and exit."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return
        except OSError:
            if time.monotonic() > deadline:
                if proc is not None:
                    proc.kill()
                sys.exit(f"{what} did not start in {timeout:.0f} s")
            time.sleep(interval)


def wait_port(port: int, what: str, proc: subprocess.Popen | None = None) -> None:
    """Until 127.0.0.1:port accepts a connection."""
    wait_until_up(what, lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close(), proc, 0.3)


@contextmanager
def running(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """`proc` for the block's length, then terminated and waited for."""
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def prefect_env(d: Path, port: int) -> dict[str, str]:
    """quiet_env for a Prefect server on 127.0.0.1:port with its home (SQLite) under `d`."""
    return quiet_env(PREFECT_HOME=str(d / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                     PREFECT_API_URL=f"http://127.0.0.1:{port}/api")


@contextmanager
def prefect_server(env: dict[str, str], port: int) -> Iterator[subprocess.Popen]:
    """`prefect server start` on 127.0.0.1:port, from once it answers to the block's end."""
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_up("the Prefect server",
                  lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2), server)
    with running(server):
        yield server


def s3_env(port: int) -> dict[str, str]:
    """Credentials and endpoint for moto's S3 server on 127.0.0.1:port."""
    return {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}


@contextmanager
def moto_server(port: int) -> Iterator[subprocess.Popen]:
    """moto's S3-compatible server on 127.0.0.1:port, from once it accepts connections to the block's end."""
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, "moto", moto)
    with running(moto):
        yield moto


def small_config(d: Path) -> Path:
    """A `cpt run` config: the bundled sample corpus, a tiny model built here, 2 training steps."""
    import yaml

    from tasks.ml.tiny_model import build_tiny_model, read_texts

    build_tiny_model(d / "model", read_texts(SAMPLE_CORPUS), vocab_size=1024)
    config = d / "config.yaml"
    config.write_text(yaml.safe_dump({
        "corpus": {"paths": [str(SAMPLE_CORPUS)]}, "model": {"id": str(d / "model")},
        "chunk": {"max_seq_length": 128, "overlap": 16},
        "train": {"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                  "eval_steps": 2, "save_steps": 2, "early_stopping_patience": None},
        "evaluate": {"max_eval_rows": 8}, "push": {"name": "bench"},
    }))
    return config
