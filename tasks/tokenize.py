"""tokenize: each document → `ids = tokenizer(text, add_special_tokens=False) + [eos]`, once per file's
content, shared by token-stats and chunk.

The tokenizer is identified by the content of its files (a hub id is resolved to its snapshot first), so two
model ids with the same tokenizer share this stage's output and an edited tokenizer invalidates it.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.cache import (
    Fingerprint, StageOutput, combine_digests, current_key, hash_file, publish, publish_piece, register_code_version,
    stage_key, stage_task,
)
from tasks.config import ConfigError, ModelConfig, TokenizeConfig
from tasks.load import DOCS_FILE
from tasks.report import Progress, run_logger

TOKEN_SCHEMA = pa.schema([("doc_id", pa.string()), ("input_ids", pa.list_(pa.int32()))])
# Files that decide how text becomes ids. config.json is read by AutoTokenizer only to pick a class.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt",
)


def resolve_tokenizer(model: ModelConfig, digest=hash_file) -> Fingerprint:
    """Find the tokenizer files of `model.id` (local dir, or hub snapshot) and fingerprint their content."""
    local = Path(model.id).expanduser()
    if local.is_dir():
        directory = local.resolve()
    elif local.exists() or model.id.startswith((".", "/", "~")):
        raise ConfigError(f"model.id: {model.id!r} is not a directory holding a model")
    else:
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(
                model.id, revision=model.revision, allow_patterns=[*TOKENIZER_FILES, "config.json"],
            ))
        except Exception as e:  # network, auth, unknown repo: the message says which
            raise ConfigError(f"model.id: cannot fetch the tokenizer of {model.id!r}: {e}") from None
    parts = [(name, digest(directory / name)) for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not parts:
        raise ConfigError(f"model.id: {directory} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, …)")
    return Fingerprint(kind="tokenizer", digest=combine_digests(parts), location=str(directory),
                       items=[{"file": n, "digest": d} for n, d in parts])


def load_tokenizer(location: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(location), trust_remote_code=trust_remote_code)
    # Documents are longer than the model's window on purpose (chunk splits them); no warning per document.
    tok.model_max_length = 1 << 60
    return tok


def special_tokens(tok) -> dict[str, Any]:
    """`eos_id`, and `bos_id` when the tokenizer puts a BOS first on request (Gemma, Llama; not GPT-2)."""
    if tok.eos_token_id is None:
        raise ConfigError("model.id: the tokenizer has no EOS token; documents need one to end")
    probe = "a"
    with_special = tok(probe, add_special_tokens=True)["input_ids"]
    without = tok(probe, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    has_bos = bos is not None and with_special[:1] == [bos] and without[:1] != [bos]
    return {"bos_id": bos if has_bos else None, "eos_id": int(tok.eos_token_id), "vocab_size": len(tok)}


class Encoder:
    """Batch tokenization without special tokens. Uses the Rust tokenizer's `encode_batch_fast` (no offset
    tracking, ~20% faster than `tokenizer(texts)`) once a probe shows it gives the same ids as the
    tokenizer's own call; tokenizers that preprocess text in Python keep their own path."""

    def __init__(self, tok):
        self.tok = tok
        self.fast: bool | None = None if hasattr(getattr(tok, "_tokenizer", None), "encode_batch_fast") else False

    def _slow(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]

    def _fast(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.fast is None:
            probe = texts[:8]
            self.fast = self._fast(probe) == self._slow(probe)
        return self._fast(texts) if self.fast else self._slow(texts)


def encode_batch(tok, texts: list[str], eos_id: int, encoder: Encoder | None = None) -> pa.ListArray:
    """One tokenizer call for the batch (spread over all cores by the Rust tokenizer), EOS appended."""
    ids = (encoder or Encoder(tok))(texts)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    ends = np.cumsum(lengths)
    values = np.insert(flat, ends, np.int32(eos_id))
    offsets = np.concatenate(([0], ends + np.arange(1, len(ids) + 1))).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def batch_bounds(byte_lengths: np.ndarray, max_docs: int, max_bytes: int) -> list[tuple[int, int]]:
    """Split rows into batches of at most `max_docs` documents and about `max_bytes` of text (a longer
    document gets a batch of its own): the tokenizer holds every Encoding of a batch in memory at once."""
    bounds, start, size = [], 0, 0
    for i, n in enumerate(byte_lengths.tolist()):
        if i > start and (i - start >= max_docs or size + n > max_bytes):
            bounds.append((start, i))
            start, size = i, 0
        size += n
    if start < len(byte_lengths):
        bounds.append((start, len(byte_lengths)))
    return bounds


def tokenize_file(src: Path, dst: Path, tok, eos_id: int, batch_size: int, batch_bytes: int = 4 << 20,
                  progress: Progress | None = None) -> dict:
    import pyarrow.compute as pc

    reader = pa.ipc.open_file(pa.memory_map(str(src)))
    docs = tokens = 0
    encoder = Encoder(tok)
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_file(sink, TOKEN_SCHEMA) as writer:
        for i in range(reader.num_record_batches):
            rb = reader.get_batch(i)
            sizes = pc.binary_length(rb.column("text")).to_numpy(zero_copy_only=False)
            for start, end in batch_bounds(sizes, batch_size, batch_bytes):
                part = rb.slice(start, end - start)
                ids = encode_batch(tok, part.column("text").to_pylist(), eos_id, encoder)
                writer.write_batch(pa.record_batch([part.column("doc_id"), ids], schema=TOKEN_SCHEMA))
                docs += part.num_rows
                tokens += len(ids.values)
                if progress is not None:
                    progress.update(part.num_rows)
    return {"documents": docs, "tokens": tokens}


register_code_version("tokenize-file", ["tasks.tokenize"], ["tokenizers", "transformers", "numpy", "pyarrow"])


TOKENS_FILE = "tokens.arrow"


def token_file(artifacts: str | Path, piece_path: str) -> Path:
    """The Arrow file of one tokenize-file piece."""
    return Path(artifacts) / piece_path / TOKENS_FILE


def part_token_files(tokens: StageOutput, artifacts: str | Path) -> list[Path]:
    """The per-file token outputs of a tokenize stage, in part order (the load stage's file order)."""
    return [token_file(artifacts, p["path"]) for p in tokens.meta["parts"]]


def tokenize_file_key(part_key: str, tokenize: TokenizeConfig, tokenizer: Fingerprint,
                      trust_remote_code: bool) -> str:
    return stage_key("tokenize-file", {"tokenize": tokenize, "tokenizer": tokenizer, "part": part_key,
                                       "trust_remote_code": trust_remote_code})


class TokenizerOnce:
    """The tokenizer, loaded on first use: a run whose pieces are all cached loads none (and imports no
    transformers)."""

    def __init__(self, tokenizer: Fingerprint, trust_remote_code: bool):
        self.fingerprint, self.trust_remote_code = tokenizer, trust_remote_code
        self.loaded: tuple | None = None

    def __call__(self):
        if self.loaded is None:
            tok = load_tokenizer(self.fingerprint.location, self.trust_remote_code)
            self.loaded = (tok, special_tokens(tok))
        return self.loaded


def tokenize_pieces(parts: list[dict[str, Any]], tokenize: TokenizeConfig, tokenizer: Fingerprint,
                    artifacts: str, trust_remote_code: bool = False, progress: Progress | None = None,
                    tokenizer_once: TokenizerOnce | None = None) -> list[tuple[StageOutput, bool]]:
    """Each load piece (`{"key", "path", "documents"}`) tokenized into its own cached piece, keyed by the load
    piece (so by file content), the tokenizer's content and the settings. Returns [(output, reused)]."""
    once = tokenizer_once or TokenizerOnce(tokenizer, trust_remote_code)
    pieces = []
    for part in parts:
        def build(tmp: Path, part=part):
            tok, specials = once()
            c = tokenize_file(Path(artifacts) / part["path"] / DOCS_FILE, tmp / TOKENS_FILE, tok,
                              specials["eos_id"], tokenize.batch_size, tokenize.batch_bytes, progress)
            return c, specials

        key = tokenize_file_key(part["key"], tokenize, tokenizer, trust_remote_code)
        pieces.append(publish_piece(artifacts, "tokenize-file", key, build, progress, part["documents"]))
    return pieces


@stage_task("tokenize", libraries=["tokenizers", "transformers", "numpy", "pyarrow"])
def tokenize(tokenize: TokenizeConfig, tokenizer: Fingerprint, docs: StageOutput, artifacts: str,
             trust_remote_code: bool = False) -> StageOutput:
    """Tokens of every loaded file, each cached by (file content, tokenizer, settings): a drop tokenizes only
    its own files. The stage's output is the list of those per-file outputs."""
    key = current_key("tokenize", {"tokenize": tokenize, "tokenizer": tokenizer, "docs": docs,
                                   "trust_remote_code": trust_remote_code})
    log = run_logger()
    with Progress(docs.counts["documents"], "tokenize", unit="doc") as progress:
        pieces = tokenize_pieces(docs.meta["parts"], tokenize, tokenizer, artifacts, trust_remote_code, progress)
    parts = [out for out, _ in pieces]
    fresh = sum(not reused for _, reused in pieces)

    def build(tmp: Path):
        listing = [{"key": p.key, "path": p.path, **p.counts} for p in parts]
        counts = {"files_tokenized": fresh, "files_cached": len(parts) - fresh,
                  "documents": sum(p.counts["documents"] for p in parts),
                  "tokens": sum(p.counts["tokens"] for p in parts)}
        specials = {k: parts[0].meta[k] for k in ("bos_id", "eos_id", "vocab_size")}
        return counts, {**specials, "tokenizer": tokenizer.digest, "parts": listing}, {"deps": [p.path for p in parts]}

    out = publish(artifacts, "tokenize", key, build)
    log.info("tokenize: %d tokens in %d documents (%d files tokenized, %d from cache; EOS per document%s)",
             out.counts["tokens"], out.counts["documents"], out.counts["files_tokenized"],
             out.counts["files_cached"], ", BOS added per chunk" if out.meta["bos_id"] is not None else "")
    return out
