import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from helpers import sample_texts
from tasks.core.root import open_root
from tasks.core.config.base import ConfigError
from tasks.core.config.data import ChunkConfig
from tasks.core.config.model import ModelConfig
from tasks.shuffle import split_documents
from tasks.data.windows import window_plan
from tasks.token_stats import STAT_NAMES, compute_token_stats, length_stats, plot_histograms
from tasks.tokenize import (
    batch_bounds, encode_batch, load_tokenizer, resolve_tokenizer, special_tokens, tokenize_file,
)


# ------------------------------------------------------------------------------------------ tokenize

def test_bos_is_detected_like_llama_and_absent_like_gpt2(tiny_model, no_bos_tokenizer_dir):
    with_bos = special_tokens(load_tokenizer(tiny_model))
    assert with_bos["bos_id"] is not None and with_bos["eos_id"] != with_bos["bos_id"]
    assert special_tokens(load_tokenizer(no_bos_tokenizer_dir))["bos_id"] is None


def test_encode_batch_matches_one_call_per_text_plus_eos(tiny_model):
    tok = load_tokenizer(tiny_model)
    texts = sample_texts(20) + ["", "a"]
    eos = tok.eos_token_id
    got = encode_batch(tok, texts, eos).to_pylist()
    assert got == [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]


def test_tokens_take_the_narrowest_type_the_whole_vocabulary_allows(tiny_model, tmp_path):
    """uint16 up to 65,536 ids, uint32 past it; added tokens count (they are numbered after the base vocabulary),
    and an id the type cannot hold is an error, never a wrap-around."""
    from tasks.data.arrow import token_type
    from tasks.tokenize import id_limit

    assert token_type(65_536) == pa.uint16() and token_type(65_537) == pa.uint32()
    assert token_type(262_144) == pa.uint32()
    tok = load_tokenizer(tiny_model)
    base = id_limit(tok)
    assert base == max(tok.get_vocab().values()) + 1
    tok.add_tokens(["<added-one>", "<added-two>"])
    assert id_limit(tok) == base + 2
    assert special_tokens(tok)["id_limit"] == base + 2
    texts = ["a b c <added-two>"]
    assert encode_batch(tok, texts, tok.eos_token_id, ids_type=pa.uint16()).type == pa.list_(pa.uint16())
    assert encode_batch(tok, texts, tok.eos_token_id, ids_type=pa.uint16()).to_pylist()[0][-2] == base + 1
    with pytest.raises(ValueError, match="outside uint8"):
        encode_batch(tok, texts, tok.eos_token_id, ids_type=pa.uint8())


def test_batches_are_bounded_by_documents_and_bytes():
    assert batch_bounds(np.array([1, 1, 1, 1, 1]), 2, 100) == [(0, 2), (2, 4), (4, 5)]
    assert batch_bounds(np.array([60, 60, 10, 500, 5]), 100, 100) == [(0, 1), (1, 3), (3, 4), (4, 5)]
    assert batch_bounds(np.array([], dtype=np.int64), 10, 10) == []


def test_tokenize_file_is_independent_of_batching(tiny_model, tmp_path):
    from tasks.data.layout import DOC_SCHEMA

    tok = load_tokenizer(tiny_model)
    texts = sample_texts(30)
    table = pa.table({"doc_id": [str(i) for i in range(30)], "text": texts, "norm_id": ["n"] * 30, "source": ["x"] * 30},
                     schema=DOC_SCHEMA)
    with pa.OSFile(str(tmp_path / "docs.arrow"), "wb") as f, pa.ipc.new_file(f, DOC_SCHEMA) as w:
        w.write_table(table, max_chunksize=7)
    results = []
    for size, nbytes in [(1000, 1 << 30), (3, 1 << 30), (1000, 500)]:
        tokenize_file(tmp_path / "docs.arrow", tmp_path / "t.arrow", tok, tok.eos_token_id, size, nbytes)
        results.append(pa.ipc.open_file(str(tmp_path / "t.arrow")).read_all().to_pylist())
    assert results[0] == results[1] == results[2] and len(results[0]) == 30


def test_tokenizer_fingerprint_follows_file_content(tiny_model, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    a = resolve_tokenizer(ModelConfig(id=str(tiny_model)))
    b = resolve_tokenizer(ModelConfig(id=str(copy)))
    assert a.digest == b.digest and a.location != b.location  # same content, another place: same key
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<pad>"
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert resolve_tokenizer(ModelConfig(id=str(copy))).digest != a.digest


def test_unusable_model_ids_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.id: .* holds no tokenizer files"):
        resolve_tokenizer(ModelConfig(id=str(tmp_path)))
    with pytest.raises(ConfigError, match="model.id: './nowhere' is not a directory"):
        resolve_tokenizer(ModelConfig(id="./nowhere"))
    with pytest.raises(ConfigError, match="model.id: cannot fetch the tokenizer of 'no-such-org/no-such-model'"):
        resolve_tokenizer(ModelConfig(id="no-such-org/no-such-model"))  # HF_HUB_OFFLINE=1 in tests


# ------------------------------------------------------------------------------------------- shuffle

def test_split_is_seeded_disjoint_and_independent_of_input_order():
    ids = [f"{i:016x}" for i in range(2000)]
    parts = split_documents(ids, seed=7, fraction=0.1)
    assert len(parts["validation"]) + len(parts["train"]) == 2000
    assert abs(len(parts["validation"]) - 200) < 5 * (2000 * 0.1 * 0.9) ** 0.5  # binomial: within 5 sigma
    assert not set(parts["validation"]) & set(parts["train"])
    as_ids = {k: [ids[i] for i in v] for k, v in parts.items()}
    rev = list(reversed(ids))
    again = {k: [rev[i] for i in v] for k, v in split_documents(rev, seed=7, fraction=0.1).items()}
    assert again == as_ids
    other = {k: [ids[i] for i in v] for k, v in split_documents(ids, seed=8, fraction=0.1).items()}
    assert other["train"] != as_ids["train"]


def test_adding_documents_moves_no_old_document_and_keeps_their_order():
    old = [f"old{i}" for i in range(300)]
    new = old + [f"new{i}" for i in range(100)]
    before = {k: [old[i] for i in v] for k, v in split_documents(old, 1, 0.1).items()}
    after = {k: [new[i] for i in v if new[i].startswith("old")] for k, v in split_documents(new, 1, 0.1).items()}
    assert before == after


def test_small_corpora_still_get_one_validation_document():
    assert len(split_documents(["a", "b", "c"], 0, 0.01)["validation"]) == 1
    assert len(split_documents(["a", "b", "c"], 0, 0.0)["validation"]) == 0
    with pytest.raises(ConfigError, match="split.validation_fraction: 0.5 of 1 documents"):
        split_documents(["a"], 0, 0.5)


# --------------------------------------------------------------------------------------- token-stats

def test_length_stats_match_numpy():
    x = np.array([1, 5, 9, 100, 3, 3])
    s = length_stats(x)
    assert set(s) == set(STAT_NAMES)
    assert s["mean"] == pytest.approx(x.mean()) and s["median"] == 4 and s["min"] == 1 and s["max"] == 100
    assert s["p95"] == pytest.approx(np.percentile(x, 95)) and s["std"] == pytest.approx(x.std())
    assert length_stats(np.array([]))["count"] == 0


def write_arrow(path, table):
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)


def test_stats_of_a_tokenized_split(tmp_path):
    # Two source files; both splits hold the documents of lengths 45, 300 and 10, spread over them.
    ids = pa.list_(pa.int32())
    write_arrow(tmp_path / "p0.arrow", pa.table({"doc_id": ["a", "b"], "input_ids": pa.array([[1] * 10, [1] * 300], ids)}))
    write_arrow(tmp_path / "p1.arrow", pa.table({"doc_id": ["c"], "input_ids": pa.array([[1] * 45], ids)}))
    for split in ("train", "validation"):
        write_arrow(tmp_path / f"{split}.arrow", pa.table({"part": pa.array([1, 0, 0], pa.int32()),
                                                          "row": pa.array([0, 1, 0], pa.int64())}))
    rows, lengths = compute_token_stats([tmp_path / "p0.arrow", tmp_path / "p1.arrow"], tmp_path,
                                        window_plan(ChunkConfig(max_seq_length=100, overlap=20), has_bos=True))
    assert sorted(lengths["train"]["documents"]) == [10, 45, 300]
    docs = next(r for r in rows if r["split"] == "train" and r["unit"] == "documents")
    chunks = next(r for r in rows if r["split"] == "train" and r["unit"] == "chunks")
    assert (docs["count"], docs["max"], docs["total"]) == (3, 300, 355)
    # W=99, S=79: 300 tokens -> windows at 0, 79, 158, 237 (the last reaches the end).
    assert chunks["count"] == 1 + 4 + 1 and chunks["max"] == 100
    plot_histograms(lengths, 10, tmp_path / "h.svg", "t")
    import xml.etree.ElementTree as ET

    svg = ET.parse(tmp_path / "h.svg").getroot()  # well-formed
    curves = [e for e in svg.iter() if e.tag.endswith("polyline")]
    assert len(curves) == sum(1 for split in lengths for kind in ("documents", "chunks") if len(lengths[split][kind]))
    labels = "".join(e.text or "" for e in svg.iter() if e.tag.endswith("text"))
    assert "train (3, median 45)" in labels


def test_encoder_uses_the_fast_backend_only_when_it_agrees(tiny_model):
    from types import SimpleNamespace

    from tasks.tokenize import Encoder

    tok = load_tokenizer(tiny_model)
    real = Encoder(tok)
    texts = sample_texts(5)
    assert real(texts) == tok(texts, add_special_tokens=False)["input_ids"] and real.fast is True

    class Preprocessing:  # a tokenizer whose own call changes the text before the backend sees it
        _tokenizer = SimpleNamespace(encode_batch_fast=lambda texts, add_special_tokens: [
            SimpleNamespace(ids=[9]) for _ in texts])

        def __call__(self, texts, **kwargs):
            return {"input_ids": [[1, 2] for _ in texts]}

    other = Encoder(Preprocessing())
    assert other(["a", "b"]) == [[1, 2], [1, 2]] and other.fast is False


@pytest.mark.slow  # a fresh interpreter
def test_a_profiled_tokenizer_tokenizes_in_a_fresh_process_without_transformers(tiny_model, tmp_path, monkeypatch):
    import subprocess
    import sys

    from helpers import sample_texts
    from tasks.core.config.model import ModelConfig
    from tasks.tokenize import BackendEncoder, Encoder, TokenizerOnce, resolve_tokenizer, tokenizer_profile

    monkeypatch.setenv("CPT_CACHE_HOME", str(tmp_path / "home"))
    fp = resolve_tokenizer(ModelConfig(id=str(tiny_model)))
    profile, tok = tokenizer_profile(fp, open_root(tmp_path))
    assert profile["backend"] is True and tok is not None
    # Known to this user: another artifacts root takes the profile without loading the tokenizer.
    assert tokenizer_profile(fp, open_root(tmp_path / "another-root")) == (profile, None)
    texts = sample_texts(50)
    assert BackendEncoder(tiny_model / "tokenizer.json")(texts) == Encoder(tok)._slow(texts)
    assert tokenizer_profile(fp, open_root(tmp_path)) == (profile, None)  # kept: no tokenizer loaded the second time

    probe = ("import sys; from tasks.core.config.model import ModelConfig; "
             "from tasks.core.root import open_root; from tasks.tokenize import TokenizerOnce, resolve_tokenizer; "
             f"enc, sp = TokenizerOnce(resolve_tokenizer(ModelConfig(id={str(tiny_model)!r})), False, "
             f"open_root({str(tmp_path)!r}))(); ids = enc(['질문: 고혈압']); "
             "print(type(enc).__name__, sp['eos_id'], ids, [m for m in ('transformers', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"BackendEncoder {tok.eos_token_id} {Encoder(tok)._slow(['질문: 고혈압'])} []")

    # A tokenizer whose backend disagrees with transformers' call keeps transformers' path.
    other = tmp_path / "other"
    monkeypatch.setenv("CPT_CACHE_HOME", str(tmp_path / "other-home"))
    monkeypatch.setattr(Encoder, "_slow", lambda self, t: [[0] for _ in t])
    profile, _ = tokenizer_profile(fp, open_root(other))
    assert profile["backend"] is False
    enc, _ = TokenizerOnce(fp, False, open_root(other))()
    assert not isinstance(enc, BackendEncoder)


def test_the_tokenizer_class_named_in_its_config_is_what_autotokenizer_loads(tiny_model):
    """load_tokenizer imports the named class alone (no torch); it must be the tokenizer AutoTokenizer gives."""
    from transformers import AutoTokenizer

    from helpers import sample_texts
    from tasks.tokenize import special_tokens, tokenizer_class

    auto = AutoTokenizer.from_pretrained(str(tiny_model))
    assert tokenizer_class(tiny_model) is type(auto)
    ours = load_tokenizer(tiny_model)
    texts = sample_texts(30)
    assert ours(texts, add_special_tokens=False)["input_ids"] == auto(texts, add_special_tokens=False)["input_ids"]
    assert ours(texts[:3])["input_ids"] == auto(texts[:3])["input_ids"]  # BOS placement too
    assert special_tokens(ours) == special_tokens(auto)
    assert tokenizer_class(tiny_model, trust_remote_code=True) is None


def test_a_prefetched_profile_is_waited_for_not_probed_twice(tiny_model, tmp_path, monkeypatch):
    import threading

    from tasks import tokenize as tk
    from tasks.core.config.model import ModelConfig

    monkeypatch.setenv("CPT_CACHE_HOME", str(tmp_path / "home"))
    fp = tk.resolve_tokenizer(ModelConfig(id=str(tiny_model)))
    calls, release = [], threading.Event()
    real = tk._probe_profile

    def slow_probe(*args):
        calls.append(threading.current_thread().name)
        release.wait(10)  # still running when the stage asks for the profile
        return real(*args)

    monkeypatch.setattr(tk, "_probe_profile", slow_probe)
    tk.prefetch_profile(fp, open_root(tmp_path))
    tk.prefetch_profile(fp, open_root(tmp_path))  # once per tokenizer
    threading.Timer(0.3, release.set).start()
    profile, tok = tk.tokenizer_profile(fp, open_root(tmp_path))
    assert profile["backend"] is True and tok is not None
    assert len(calls) == 1 and calls[0].startswith("tokenizer-profile")
    tk.prefetch_profile(fp, open_root(tmp_path))  # known now: nothing started
    assert len(calls) == 1 and tk.tokenizer_profile(fp, open_root(tmp_path)) == (profile, None)


def test_the_split_order_of_load_ids_is_their_string_order_with_ties_on_the_text():
    """load's 16-hex-digit ids are sorted as integers (8 bytes each, not a numpy string array): the order, ties
    on u included (copies equal after normalisation share u), must be the strings' own."""
    import hashlib

    import numpy as np

    from tasks.shuffle import _in_string_order, split_values

    ids = [hashlib.blake2b(str(i).encode(), digest_size=8).hexdigest() for i in range(5000)]
    norms = [f"text {i % 700}" for i in range(5000)]  # many ties on u
    parts = split_documents(ids, 3, 0.2, norms)
    u = split_values(norms, 3)
    expected = np.lexsort((np.array(ids, dtype=object).astype(str), u))
    assert np.concatenate([parts["validation"], parts["train"]]).tolist() == expected.tolist()
    assert _in_string_order(ids).dtype == np.uint64
