import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.data.arrow import with_labels
from tasks.data.arrow import IGNORE_INDEX
from tasks.data.windows import chunk_batch, chunk_lengths, trained_tokens, window_plan
from tasks.core.config.base import ConfigError
from tasks.core.config.data import ChunkConfig

BOS = 1


def run_chunks(docs: list[list[int]], max_seq_length: int, overlap: int, bos: bool, mask: bool = True):
    cfg = ChunkConfig(max_seq_length=max_seq_length, overlap=overlap, mask_overlap=mask)
    plan = window_plan(cfg, bos)
    ids = pa.array(docs, type=pa.list_(pa.int32()))
    doc_ids = pa.array([f"d{i}" for i in range(len(docs))])
    rb = chunk_batch(doc_ids, ids, plan, BOS if bos else None)
    labels = with_labels(rb).column("labels").to_pylist()
    rows = [{**r, "labels": lab} for r, lab in zip(rb.to_pylist(), labels)]
    labelled = sum(t != IGNORE_INDEX for r in rows for t in r["labels"])
    assert trained_tokens(ids, rb, plan) == labelled
    return rows


def test_hand_worked_example_without_bos():
    ids = list(range(10, 20))  # 10 tokens, the last one is the document's EOS
    rows = run_chunks([ids], max_seq_length=4, overlap=1, bos=False)
    # W=4, S=3: windows at 0, 3, 6; the window at 6 reaches the end, so no redundant tail at 9.
    assert [r["start"] for r in rows] == [0, 3, 6]
    assert [r["input_ids"] for r in rows] == [[10, 11, 12, 13], [13, 14, 15, 16], [16, 17, 18, 19]]
    assert [r["labels"] for r in rows] == [[10, 11, 12, 13], [-100, 14, 15, 16], [-100, 17, 18, 19]]


def test_hand_worked_example_with_bos():
    rows = run_chunks([list(range(10, 17))], max_seq_length=4, overlap=1, bos=True)
    # W=3, S=2: windows at 0, 2, 4 (the window at 4 covers 14..16 and reaches the end).
    assert [r["input_ids"] for r in rows] == [[1, 10, 11, 12], [1, 12, 13, 14], [1, 14, 15, 16]]
    assert [r["labels"] for r in rows] == [[-100, 10, 11, 12], [-100, -100, 13, 14], [-100, -100, 15, 16]]


def test_mask_overlap_false_reproduces_the_seed_labels():
    rows = run_chunks([list(range(10, 20))], max_seq_length=4, overlap=1, bos=False, mask=False)
    assert all(r["labels"] == r["input_ids"] for r in rows)


def test_short_document_is_one_chunk():
    rows = run_chunks([[5, 6]], max_seq_length=8, overlap=4, bos=True)
    assert rows == [{"input_ids": [1, 5, 6], "trained_from": 1, "doc_id": "d0", "start": 0, "labels": [-100, 5, 6]}]


@pytest.mark.parametrize("max_len, overlap, bos, ok", [(10, 9, False, True), (10, 9, True, False), (2, 0, True, True),
                                                       (10, 8, True, True)])
def test_overlap_bound_depends_on_bos(max_len, overlap, bos, ok):
    cfg = ChunkConfig.model_construct(max_seq_length=max_len, overlap=overlap, mask_overlap=True)  # unvalidated
    if ok:
        plan = window_plan(cfg, bos)
        assert plan.stride == plan.window - overlap >= 1 and plan.masked_overlap == overlap
    else:
        with pytest.raises(ConfigError, match="chunk.overlap: 9 must be smaller than the window of 9 tokens"):
            window_plan(cfg, bos)


docs_strategy = st.lists(st.lists(st.integers(2, 30000), min_size=1, max_size=300), min_size=1, max_size=8)


@st.composite
def chunk_cases(draw):
    docs = draw(docs_strategy)
    bos = draw(st.booleans())
    max_len = draw(st.integers(2 + bos, 64))
    overlap = draw(st.integers(0, max_len - 1 - bos - 1))
    return docs, max_len, overlap, bos


@settings(max_examples=300, deadline=None)
@given(chunk_cases())
def test_chunk_invariants(case):
    docs, max_len, overlap, bos = case
    rows = run_chunks(docs, max_len, overlap, bos)
    plan = window_plan(ChunkConfig(max_seq_length=max_len, overlap=overlap), bos)
    window, stride = plan.window, plan.stride
    assert [len(r["input_ids"]) for r in rows] == list(chunk_lengths(np.array([len(d) for d in docs]), plan))
    for i, ids in enumerate(docs):
        mine = [r for r in rows if r["doc_id"] == f"d{i}"]
        body = [r["input_ids"][1:] if bos else r["input_ids"] for r in mine]
        labels = [r["labels"][1:] if bos else r["labels"] for r in mine]
        # Never longer than max_seq_length, and every chunk starts with BOS when the tokenizer has one.
        assert all(len(r["input_ids"]) <= max_len for r in mine)
        assert all(r["input_ids"][0] == BOS and r["labels"][0] == IGNORE_INDEX for r in mine) if bos else True
        # Windows start at 0, S, 2S, … and only the last one reaches the end.
        assert [r["start"] for r in mine] == [k * stride for k in range(len(mine))]
        assert [r["start"] + len(b) >= len(ids) for r, b in zip(mine, body)] == [False] * (len(mine) - 1) + [True]
        # Dropping each later window's overlap and concatenating gives back ids exactly.
        rebuilt = body[0] + [t for b in body[1:] for t in b[overlap:]]
        assert rebuilt == ids
        # Every token is unmasked exactly once.
        trained = [r["start"] + p for r, lab in zip(mine, labels) for p, t in enumerate(lab) if t != IGNORE_INDEX]
        assert sorted(trained) == list(range(len(ids)))
        assert all(ids[r["start"] + p] == t for r, lab in zip(mine, labels) for p, t in enumerate(lab)
                   if t != IGNORE_INDEX)
        # No window lies wholly inside its predecessor.
        ends = [r["start"] + len(b) for r, b in zip(mine, body)]
        assert all(later > earlier for earlier, later in zip(ends, ends[1:]))


@settings(max_examples=100, deadline=None)
@given(chunk_cases())
def test_unmasked_windows_keep_every_label(case):
    docs, max_len, overlap, bos = case
    rows = run_chunks(docs, max_len, overlap, bos, mask=False)
    for r in rows:
        body = r["input_ids"][1:] if bos else r["input_ids"]
        assert (r["labels"][1:] if bos else r["labels"]) == body


def test_batch_boundaries_do_not_change_the_result():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(2, 500, size=rng.integers(1, 200))) for _ in range(50)]
    whole = run_chunks(docs, 32, 8, True)
    cfg = ChunkConfig(max_seq_length=32, overlap=8)
    ids = pa.array(docs, type=pa.list_(pa.int32()))
    names = pa.array([f"d{i}" for i in range(50)])
    parts = []
    for s in range(0, 50, 7):  # sliced list arrays have non-zero offsets
        rb = chunk_batch(names.slice(s, 7), ids.slice(s, 7), window_plan(cfg, True), BOS)
        parts += [{**r, "labels": lab} for r, lab in zip(rb.to_pylist(), with_labels(rb)["labels"].to_pylist())]
    assert parts == whole


@pytest.mark.parametrize("ids", ["uint16", "uint32"])
def test_the_written_features_are_what_datasets_would_write(ids):
    """The chunk stage writes the DatasetDict's features and shard schema without importing datasets: they
    must be exactly what the library produces, or load_from_disk would read other types."""
    import pyarrow as pa

    from tasks.chunk import chunk_arrow_schema, chunk_feature_dict, chunk_features

    assert chunk_features(ids).to_dict() == chunk_feature_dict(getattr(pa, ids)())
    assert chunk_features(ids).arrow_schema.equals(chunk_arrow_schema(getattr(pa, ids)()), check_metadata=True)


def test_labels_are_derived_from_sliced_and_chunked_rows():
    """The trainer derives labels from a block of rows at a time: a slice (non-zero offsets) must give the same
    labels as the rows alone, and the ids come back as int32 whatever the stored type."""
    docs = [list(range(10, 30)), [5, 6], list(range(40, 47))]
    rb = chunk_batch(pa.array(["a", "b", "c"]), pa.array(docs, pa.list_(pa.uint16())),
                     window_plan(ChunkConfig(max_seq_length=6, overlap=2), True), BOS)
    assert rb.schema.field("input_ids").type == pa.list_(pa.uint16())
    whole = with_labels(rb)
    assert whole.schema.field("input_ids").type == pa.list_(pa.int32())
    table = pa.Table.from_batches([rb])
    from tasks.data.arrow import derived_labels

    trained_from = rb.column("trained_from").to_numpy()
    for s in range(rb.num_rows):
        assert with_labels(table.slice(s, 2)).to_pylist() == whole.slice(s, 2).to_pylist()
        sliced = derived_labels(rb.column("input_ids").slice(s, 2), trained_from[s:s + 2])
        assert sliced.to_pylist() == whole.column("labels").slice(s, 2).to_pylist()
    # W 5, S 3: the second window reads 13..17 after its BOS; the BOS and the 2 overlap tokens are not trained.
    assert whole.column("labels")[1].as_py() == [-100, -100, -100, 15, 16, 17]


def test_chunk_rows_streams_in_bounded_batches_with_the_same_rows(tmp_path):
    """chunk_rows holds about `batch_tokens` document tokens at a time (memory flat whatever the file's size):
    a small budget writes many record batches and exactly the rows of one big batch."""
    from tasks.chunk import chunk_rows

    rng = np.random.default_rng(1)
    docs = [list(rng.integers(2, 60000, size=rng.integers(1, 300))) for _ in range(40)]
    tokens = pa.table({"doc_id": [f"d{i}" for i in range(40)], "input_ids": pa.array(docs, pa.list_(pa.uint16()))})
    rows = rng.permutation(40)
    cfg = ChunkConfig(max_seq_length=64, overlap=16)
    shards = {}
    for budget in (1 << 20, 500):
        c = chunk_rows(tokens, rows, window_plan(cfg, True), BOS, tmp_path / f"{budget}.arrow", batch_tokens=budget)
        reader = pa.ipc.open_stream(str(tmp_path / f"{budget}.arrow"))
        batches = list(reader)
        shards[budget] = (pa.Table.from_batches(batches, reader.schema).to_pylist(), len(batches), c)
    assert shards[500][0] == shards[1 << 20][0] and shards[500][2] == shards[1 << 20][2]
    assert shards[1 << 20][1] == 1 and shards[500][1] >= sum(map(len, docs)) // 800


def test_taking_rows_of_a_memory_mapped_file_copies_only_those_rows(tmp_path):
    """Arrow's take joins a chunked column before taking: on a token file that is the whole file in memory per
    batch of windows. take_rows must give the same rows while allocating about what it took."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from tasks.data.arrow import read_arrow, take_rows

    path = tmp_path / "tokens.arrow"
    schema = pa.schema([("doc_id", pa.string()), ("input_ids", pa.list_(pa.uint16()))])
    rng = np.random.default_rng(0)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for b in range(60):  # 60 record batches of 200 documents × 500 tokens: 12 MB of ids
            offsets = np.arange(0, 200 * 500 + 1, 500, dtype=np.int32)
            values = rng.integers(0, 16_000, 200 * 500).astype(np.uint16)
            writer.write_batch(pa.record_batch([pa.array([f"d{b}-{i}" for i in range(200)]),
                                                pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))],
                                               schema=schema))
    table = read_arrow(path)
    rows = rng.permutation(table.num_rows)[:300]
    pool = pa.system_memory_pool()  # used by nothing else here: its high-water mark is this call's
    taken = take_rows(table, rows, pool)
    assert taken.to_pylist() == [table.slice(int(r), 1).to_pylist()[0] for r in rows]
    column_bytes = table.column("input_ids").nbytes
    assert pool.max_memory() < column_bytes / 4, (pool.max_memory(), column_bytes)
    # The library's own take on the same rows joins the column first (what take_rows avoids).
    pc.take(table, pa.array(rows), memory_pool=pool)
    assert pool.max_memory() > column_bytes / 2
    texts = take_rows(table.column("doc_id"), rows)
    assert texts.to_pylist() == [f"d{r // 200}-{r % 200}" for r in rows]
    assert take_rows(table, np.array([], dtype=np.int64)).num_rows == 0


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=12), max_seq_length=st.integers(3, 20),
       overlap_share=st.floats(0, 0.9), bos=st.booleans(), mask=st.booleans(), batches=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_windows_gathered_from_the_tokens_are_the_materialised_rows(tmp_path_factory, lengths, max_seq_length,
                                                                     overlap_share, bos, mask, batches, seed):
    """The chunk stage stores windows (offsets into the token pieces); gathered back from a memory-mapped token
    file of several record batches, in any row order, they are exactly the rows `chunk_batch` materialises, and
    `window_rows`' counts are the rows' counts."""
    from tasks.chunk import TokenFile, chunk_rows, gather_rows, window_rows

    tmp = tmp_path_factory.mktemp("w")
    rng = np.random.default_rng(seed)
    window = max_seq_length - (1 if bos else 0)
    from hypothesis import assume
    from pydantic import ValidationError

    try:
        cfg = ChunkConfig(max_seq_length=max_seq_length, overlap=min(int(overlap_share * window), window - 1),
                          mask_overlap=mask)
    except ValidationError:
        assume(False)
    docs = [rng.integers(5, 60000, n).tolist() for n in lengths]
    tokens = pa.table({"doc_id": [f"d{i}" for i in range(len(docs))], "input_ids": pa.array(docs, pa.list_(pa.uint16()))})
    with pa.OSFile(str(tmp / "tokens.arrow"), "wb") as sink, pa.ipc.new_file(sink, tokens.schema) as w:
        w.write_table(tokens, max_chunksize=max(1, -(-len(docs) // batches)))
    rows = rng.permutation(len(docs))[: max(1, len(docs) - 1)]
    bos_id = BOS if bos else None
    plan = window_plan(cfg, bos)
    counts = window_rows(tokens, rows, plan, tmp / "windows.arrow", batch_docs=3)
    expected_counts = chunk_rows(tokens, rows, plan, bos_id, tmp / "rows.arrow")
    assert counts == expected_counts
    windows = pa.ipc.open_file(str(tmp / "windows.arrow")).read_all()
    got = gather_rows(windows, {0: TokenFile(tmp / "tokens.arrow")}, bos_id, pa.uint16())
    expected = pa.ipc.open_stream(str(tmp / "rows.arrow")).read_all()
    assert got.to_pylist() == expected.to_pylist()
