"""The data stages on real corpora from ../shared/corpora (skipped where that folder is absent)."""

import pyarrow as pa
import pytest

from helpers import shared_corpus
from tasks.chunk import chunk_file
from tasks.data.arrow import IGNORE_INDEX
from tasks.data.windows import window_plan
from tasks.core.config.data import ChunkConfig, CorpusConfig
from tasks.data.layout import DOCS_FILE
from tasks.data.pieces import load_documents
from tasks.tokenize import load_tokenizer, special_tokens, tokenize_file


@pytest.mark.parametrize("name", ["ko_law.jsonl", "ko_transport_bills.jsonl"])
def test_real_corpus_round_trips_through_load_tokenize_chunk(name, tiny_model, tmp_path):
    path = shared_corpus(name)
    counts = load_documents([path], CorpusConfig(paths=[str(path)]), tmp_path, [name])["counts"]
    assert counts["documents"] + counts["duplicates"] + counts["too_short"] == counts["records"]
    assert counts["rejected"] == 0 and counts["documents"] > 100

    tok = load_tokenizer(tiny_model)
    sp = special_tokens(tok)
    tokenize_file(tmp_path / "parts" / "0" / DOCS_FILE, tmp_path / "tokens.arrow", tok, sp["eos_id"], 256)
    cfg = ChunkConfig(max_seq_length=128, overlap=48)
    c = chunk_file(tmp_path / "tokens.arrow", tmp_path / "chunks", window_plan(cfg, sp["bos_id"] is not None),
                   sp["bos_id"])

    tokens = pa.ipc.open_file(str(tmp_path / "tokens.arrow")).read_all()
    rows = pa.ipc.open_stream(str(tmp_path / "chunks" / "data-00000-of-00001.arrow")).read_all()
    assert c["chunks"] == rows.num_rows and c["documents"] == tokens.num_rows == counts["documents"]
    # Every document token is trained exactly once, and chunks of a document rebuild it.
    assert c["trained_tokens"] == sum(len(x) for x in tokens.column("input_ids").to_pylist())
    by_doc = {}
    from tasks.data.arrow import with_labels

    rows = rows.append_column("labels", with_labels(rows).column("labels"))
    for r in rows.to_pylist():
        by_doc.setdefault(r["doc_id"], []).append(r)
    for doc_id, ids in zip(tokens.column("doc_id").to_pylist()[:200], tokens.column("input_ids").to_pylist()):
        mine = by_doc[doc_id]
        rebuilt = [t for r in mine for t, lab in zip(r["input_ids"], r["labels"]) if lab != IGNORE_INDEX]
        assert rebuilt == ids
        assert all(len(r["input_ids"]) <= 128 for r in mine)
