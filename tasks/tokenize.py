"""tokenize: each document → `ids = tokenizer(text, add_special_tokens=False) + [eos]`, once per file's
content, shared by token-stats and chunk.

The tokenizer is identified by the content of its files (a hub id is resolved to its snapshot first), so two
model ids with the same tokenizer share this stage's output and an edited tokenizer invalidates it.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from pydantic import model_validator

from tasks.core.config.base import ConfigError
from tasks.core.config.data import RuntimeConfig, TokenizeConfig
from tasks.core.config.model import ModelConfig
from tasks.core.keys import register_code_version, stage_key
from tasks.core.manifest import Fingerprint, StageOutput, combine_digests, hash_file
from tasks.core.report import Progress
from tasks.core.paths import temp_beside, user_cache_dir
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import Build, publish_piece, stage
from tasks.data.arrow import batch_bounds, read_arrow, token_type
from tasks.data.layout import (TOKEN_PIECE, TOKENS_FILE, LoadSource, Specials, TokenPart, TokenPiece, TokenType,  # noqa: F401
                               piece_docs_file, token_file)

if TYPE_CHECKING:
    from tasks.load import Docs



def token_schema(ids: pa.DataType) -> pa.Schema:
    """A token piece's columns: ids in the narrowest type the tokenizer's vocabulary allows (`token_type`)."""
    return pa.schema([("doc_id", pa.string()), ("input_ids", pa.list_(ids))])


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


def tokenizer_class(location: str | Path, trust_remote_code: bool = False):
    """The class AutoTokenizer would pick from tokenizer_config.json's `tokenizer_class`, imported alone:
    AutoTokenizer's own import pulls in torch (~2.5 s), the class's module does not. None where the config
    names none, names one transformers lacks, or remote code is allowed (then AutoTokenizer decides)."""
    import json

    if trust_remote_code:
        return None
    try:
        name = json.loads((Path(location) / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None
    if not isinstance(name, str):
        return None
    import transformers

    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError):
        return None


def load_tokenizer(location: str | Path, trust_remote_code: bool = False):
    cls = tokenizer_class(location, trust_remote_code)
    if cls is None:
        from transformers import AutoTokenizer as cls
    tok = cls.from_pretrained(str(location), trust_remote_code=trust_remote_code)
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
    return {"bos_id": bos if has_bos else None, "eos_id": int(tok.eos_token_id), "vocab_size": len(tok),
            "id_limit": id_limit(tok)}


def id_limit(tok) -> int:
    """One past the largest id the tokenizer can emit, added tokens included: `len(tok)` counts entries, and a
    vocabulary with holes or added tokens numbered past the base vocabulary would be undercounted by it."""
    vocab = tok.get_vocab()  # transformers' vocabulary includes the added tokens
    ids = [*vocab.values(), *getattr(tok, "added_tokens_decoder", {}).keys(), len(tok) - 1]
    return int(max(ids)) + 1


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


class BackendEncoder:
    """The Rust `tokenizers` backend alone, loaded from tokenizer.json without importing transformers or torch.
    Used only for a tokenizer whose profile (below) showed that it gives the same ids as transformers' call."""

    def __init__(self, tokenizer_json: Path):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(tokenizer_json))
        # transformers turns these off for an untruncated, unpadded call; tokenizer.json may carry them.
        self.backend.no_truncation()
        self.backend.no_padding()

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]


# Texts the profile compares both paths on: scripts, digits, code, odd whitespace, symbols, emoji, an empty one.
PROBE_TEXTS = [
    "질문: 고혈압의 약물 치료는 어떻게 해야 하나요? \n답변: 이뇨제, 베타차단제 등을 사용합니다.",
    "The quick brown fox jumps over the lazy dog. It's 3.14159 — or ~22/7!",
    "def f(x):\n\treturn x ** 2  # 제곱\n\n\n    indented\r\nwindows line",
    "  leading and trailing spaces  ", "日本語のテキストと中文文本。", "emoji 🙂👍🏽 and symbols ©®™ §¶ ∑∫√",
    "URL https://example.com/a?b=c&d=e, e-mail a.b@c.de, #hashtag @mention", "", "1234567890 0x1F 1e-5 -42",
    "Ünïcödé àccents ßtraße ǅ ﬁ ligature", "\u200bzero\u200dwidth\ufeffbom",
]


def profile_path(root: ArtifactsRoot, tokenizer: Fingerprint) -> Path:
    import importlib.metadata as md

    # p2: profiles hold `id_limit`; one written before is not read (a new name, so simply a miss).
    versions = f"{md.version('tokenizers')}-{md.version('transformers')}-p2"
    return root.local / "cache" / "_tokenizers" / f"{tokenizer.digest}-{versions}.json"


def profile_paths(root: ArtifactsRoot, tokenizer: Fingerprint) -> tuple[Path, Path]:
    """Where a tokenizer's profile is kept: in the artifacts root, and in the user's cache."""
    path = profile_path(root, tokenizer)
    return path, user_cache_dir() / "tokenizers" / path.name


def _write_atomic(path: Path, text: str) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    tmp.write_text(text)
    os.replace(tmp, path)


_PREFETCH: dict[str, Any] = {}  # profile path -> Future of a profile being worked out in the background


def prefetch_profile(tokenizer: Fingerprint, root: ArtifactsRoot, trust_remote_code: bool = False) -> None:
    """Start working out the tokenizer's profile in a background thread when it is not known yet: a run with a
    tokenizer never seen before probes it (importing transformers) while load and shuffle read the corpus,
    instead of after them. `tokenizer_profile` waits for it rather than probing twice."""
    from concurrent.futures import ThreadPoolExecutor

    path, shared = profile_paths(root, tokenizer)
    if path.is_file() or shared.is_file() or str(path) in _PREFETCH:
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="tokenizer-profile")
    _PREFETCH[str(path)] = pool.submit(_probe_profile, tokenizer, path, shared, trust_remote_code)
    pool.shutdown(wait=False)


def tokenizer_profile(tokenizer: Fingerprint, root: ArtifactsRoot, trust_remote_code: bool = False):
    """Special tokens of the tokenizer and whether its Rust backend alone gives transformers' ids on PROBE_TEXTS,
    worked out once per tokenizer content (and library versions) and kept in the cache and in the user's cache
    (`user_cache_dir`): later processes, and a new artifacts root with a tokenizer seen before, tokenize without
    importing transformers (and the torch it pulls in, ~3 s). Returns (profile, the transformers tokenizer if
    it was loaded)."""
    import json

    path, shared = profile_paths(root, tokenizer)
    for candidate in (path, shared):
        try:
            profile = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if candidate is shared:
            _write_atomic(path, json.dumps(profile))
        return profile, None
    pending = _PREFETCH.pop(str(path), None)
    if pending is not None:
        try:
            return pending.result()
        except Exception:  # the background probe failed: probe here, where its error is raised in the stage
            pass
    return _probe_profile(tokenizer, path, shared, trust_remote_code)


def _probe_profile(tokenizer: Fingerprint, path: Path, shared: Path, trust_remote_code: bool):
    import json

    tok = load_tokenizer(tokenizer.location, trust_remote_code)
    tokenizer_json = Path(tokenizer.location) / "tokenizer.json"
    backend = False
    if tokenizer_json.is_file() and not trust_remote_code:
        try:
            backend = BackendEncoder(tokenizer_json)(PROBE_TEXTS) == Encoder(tok)._slow(PROBE_TEXTS)
        except Exception:  # a tokenizer.json the backend cannot read: transformers' path
            backend = False
    profile = {**special_tokens(tok), "backend": backend}
    _write_atomic(path, json.dumps(profile))
    try:
        _write_atomic(shared, json.dumps(profile))
    except OSError:  # a read-only home: the artifacts root still has it
        pass
    return profile, tok


def encode_batch(tok, texts: list[str], eos_id: int, encoder: Encoder | None = None,
                 ids_type: pa.DataType = pa.uint32()) -> pa.ListArray:
    """One tokenizer call for the batch (spread over all cores by the Rust tokenizer), EOS appended, the ids
    stored as `ids_type` (an id that does not fit is an error, never a silent wrap-around)."""
    ids = (encoder or Encoder(tok))(texts)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    ends = np.cumsum(lengths)
    values = np.insert(flat, ends, eos_id)
    dtype = ids_type.to_pandas_dtype()
    if len(values) and (int(values.max()) > np.iinfo(dtype).max or int(values.min()) < 0):
        raise ValueError(f"tokenize: the tokenizer gave id {int(values.max())}, outside {ids_type} "
                         "(its vocabulary was measured smaller)")
    offsets = np.concatenate(([0], ends + np.arange(1, len(ids) + 1))).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(dtype)))


def tokenize_file(src: Path, dst: Path, tok, eos_id: int, batch_size: int, batch_bytes: int = 4 << 20,
                  progress: Progress | None = None, ids_type: pa.DataType = pa.uint32()) -> dict:
    """The documents of one load piece into a token piece, a batch of documents at a time: memory holds one
    batch's texts and ids, whatever the file's size."""
    import pyarrow.compute as pc

    reader = pa.ipc.open_file(pa.memory_map(str(src)))
    docs = tokens = 0
    encoder = tok if isinstance(tok, BackendEncoder) else Encoder(tok)
    schema = token_schema(ids_type)
    with pa.OSFile(str(dst), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for i in range(reader.num_record_batches):
            rb = reader.get_batch(i)
            sizes = pc.binary_length(rb.column("text")).to_numpy(zero_copy_only=False)
            for start, end in batch_bounds(sizes, batch_size, batch_bytes):
                part = rb.slice(start, end - start)
                ids = encode_batch(tok, part.column("text").to_pylist(), eos_id, encoder, ids_type)
                writer.write_batch(pa.record_batch([part.column("doc_id"), ids], schema=schema))
                docs += part.num_rows
                tokens += len(ids.values)
                if progress is not None:
                    progress.update(part.num_rows)
    return {"documents": docs, "tokens": tokens}




def token_lengths(root: ArtifactsRoot, pieces: list[StageOutput]) -> np.ndarray:
    """Tokens per document (EOS included) of tokenize-file pieces, in order (list lengths: no token is read)."""
    import pyarrow.compute as pc

    parts = [pc.list_value_length(read_arrow(token_file(root, p.path)).column("input_ids")).to_numpy(
        zero_copy_only=False) for p in pieces]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def tokenize_file_key(part_key: str, tokenize: TokenizeConfig, tokenizer: Fingerprint,
                      trust_remote_code: bool) -> str:
    return stage_key("tokenize-file", {"tokenize": tokenize, "tokenizer": tokenizer, "part": part_key,
                                       "trust_remote_code": trust_remote_code})


class TokenizerOnce:
    """The tokenizer, loaded on first use: a run whose pieces are all cached loads none. Where the tokenizer's
    profile says its Rust backend gives the same ids, that backend alone is loaded (no transformers import,
    ~2.5 s saved per process). Returns (tokenizer or BackendEncoder, special tokens)."""

    def __init__(self, tokenizer: Fingerprint, trust_remote_code: bool, root: ArtifactsRoot):
        self.fingerprint, self.trust_remote_code, self.root = tokenizer, trust_remote_code, root
        self.loaded: tuple | None = None

    def __call__(self):
        if self.loaded is None:
            profile, tok = tokenizer_profile(self.fingerprint, self.root, self.trust_remote_code)
            specials = {k: profile[k] for k in ("bos_id", "eos_id", "vocab_size", "id_limit")}
            if profile["backend"]:
                tok = BackendEncoder(Path(self.fingerprint.location) / "tokenizer.json")
            elif tok is None:
                tok = load_tokenizer(self.fingerprint.location, self.trust_remote_code)
            self.loaded = (tok, specials)
        return self.loaded


def tokenize_piece(part: LoadSource, tokenize: TokenizeConfig, tokenizer: Fingerprint, root: ArtifactsRoot,
                   trust_remote_code: bool = False, progress: Progress | None = None,
                   once: TokenizerOnce | None = None) -> tuple[StageOutput, bool]:
    """One load piece (by key: `LoadSource`) tokenized into its own cached piece, keyed by the load piece's
    content, the tokenizer's content and the settings. Returns (output, reused)."""
    once = once or TokenizerOnce(tokenizer, trust_remote_code, root)

    def build(tmp: Path):
        tok, specials = once()
        ids_type = token_type(specials["id_limit"])
        c = tokenize_file(piece_docs_file(root, part.rel), tmp / TOKENS_FILE, tok,
                          specials["eos_id"], tokenize.batch_size, tokenize.batch_bytes, progress, ids_type)
        return c, {**specials, "token_type": str(ids_type)}

    key = tokenize_file_key(part.content or part.key, tokenize, tokenizer, trust_remote_code)
    return publish_piece(root, TOKEN_PIECE, key, build, progress, part.documents, output=TokenPiece)


register_code_version("tokenize-file", 2, [tokenize_piece], ["tokenizers", "transformers", "numpy", "pyarrow"])


def tokenize_pieces(parts: list[LoadSource], tokenize: TokenizeConfig, tokenizer: Fingerprint,
                    root: ArtifactsRoot, trust_remote_code: bool = False, progress: Progress | None = None,
                    tokenizer_once: TokenizerOnce | None = None, runtime=None) -> list[tuple[StageOutput, bool]]:
    """Every load piece's tokens (`tokenize_piece`), one after another or fanned out on `runtime`'s task
    runner. Returns [(output, reused)] in the order of `parts`."""
    if runtime is None or runtime.task_runner == "sequential":
        once = tokenizer_once or TokenizerOnce(tokenizer, trust_remote_code, root)
        return [tokenize_piece(part, tokenize, tokenizer, root, trust_remote_code, progress, once)
                for part in parts]
    from tasks.core.fanout import map_pieces

    # Worked out once here (a file read when known), not by every worker at once.
    tokenizer_profile(tokenizer, root, trust_remote_code)
    calls = [{"part": part, "tokenize": tokenize, "tokenizer": tokenizer, "root": root,
              "trust_remote_code": trust_remote_code} for part in parts]
    return map_pieces(tokenize_piece, calls, runtime, "tokenize-file",
                      on_done=lambda i, _: progress.update(parts[i].documents) if progress else None)


class TokensMeta(Specials):
    tokenizer: str  # the tokenizer's content digest
    parts: list[TokenPart]  # per source file, in corpus order


class Tokens(StageOutput):
    """tokenize's output: the list of per-file pieces (`parts`), each a tokenize-file entry holding
    `tokens.arrow` (doc_id, input_ids with EOS, stored as `token_type`: uint16 for a vocabulary of up to
    65,536 ids, else uint32), plus the tokenizer's special ids. The pieces are found by key among its deps."""

    meta: TokensMeta

    @model_validator(mode="after")
    def _parts_are_deps(self):
        for part in self.meta.parts:
            self.refers(part.rel)
        return self

    @property
    def parts(self) -> list[TokenPart]:
        """Per source file, in corpus order: key, content and counts of its token piece."""
        return self.meta.parts

    @property
    def bos_id(self) -> int | None:
        return self.meta.bos_id

    @property
    def eos_id(self) -> int:
        return self.meta.eos_id

    def token_file(self, root: ArtifactsRoot, part: TokenPart) -> Path:
        return token_file(root, part.rel)

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        c = self.counts
        return [(logging.INFO, f"{c['tokens']} tokens in {c['documents']} documents ({c['files_tokenized']} files "
                               f"tokenized, {c['files_cached']} from cache; EOS per document"
                               f"{', BOS added per chunk' if self.bos_id is not None else ''})")]


@stage("tokenize", version=2, output=Tokens, key_exclude={"runtime"})
def tokenize(build: Build, tokenize: TokenizeConfig, tokenizer: Fingerprint, docs: Docs,
             trust_remote_code: bool = False, runtime: RuntimeConfig | None = None):
    """Tokens of every loaded file, each cached by (file content, tokenizer, settings): a drop tokenizes only
    its own files. The stage's output is the list of those per-file outputs."""
    with Progress(docs.counts["documents"], "tokenize", unit="doc") as progress:
        pieces = tokenize_pieces(docs.parts, tokenize, tokenizer, build.root, trust_remote_code, progress,
                                 runtime=runtime)
    parts = [out for out, _ in pieces]
    fresh = sum(not reused for _, reused in pieces)
    listing = [{"key": p.key, "content": p.content, **p.counts} for p in parts]
    counts = {"files_tokenized": fresh, "files_cached": len(parts) - fresh,
              "documents": sum(p.counts["documents"] for p in parts),
              "tokens": sum(p.counts["tokens"] for p in parts)}
    specials = Specials.model_validate(parts[0].meta.model_dump(exclude={"scope"})).model_dump()
    return counts, {**specials, "tokenizer": tokenizer.digest, "parts": listing}, {"deps": [p.path for p in parts]}
