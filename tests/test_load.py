import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import write_jsonl
from tasks.core.config import ConfigError, CorpusConfig
from tasks.load import (
    DOCS_FILE, REJECTS_FILE, BadRecordError, fingerprint_corpus, load_documents, resolve_corpus_files,
    source_names,
)


def run_load(tmp_path, files, **cfg):
    cfg = CorpusConfig(paths=[str(f) for f in files], **cfg)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    resolved = resolve_corpus_files(cfg)
    result = load_documents(resolved, cfg, out, source_names(resolved))
    table = pa.ipc.open_file(str(out / DOCS_FILE)).read_all()
    rejects = [json.loads(x) for x in (out / REJECTS_FILE).read_text().splitlines()]
    return result["counts"], table, rejects


def test_every_format_and_source_lines(tmp_path):
    d = tmp_path / "corpus"
    write_jsonl(d / "a.jsonl", [{"content": "첫 번째 문서"}, {"content": "두 번째 문서"}])
    (d / "b.json").write_text(json.dumps([{"content": "배열 하나"}, {"content": "배열 둘"}], ensure_ascii=False,
                                         indent=1), encoding="utf-8")
    (d / "c.json").write_text('{"content": "줄 단위 JSON"}\n', encoding="utf-8")
    pq.write_table(pa.table({"content": ["파케이 하나", "파케이 둘"]}), d / "d.parquet")
    (d / "e.csv").write_text('content,other\n"여러 줄\n셀",1\n씨에스브이,2\n', encoding="utf-8")
    (d / "sub").mkdir()
    (d / "sub" / "f.txt").write_text("텍스트 파일 전체가\n한 문서\n", encoding="utf-8")
    counts, table, rejects = run_load(tmp_path, [d])
    assert counts["documents"] == 10 and counts["files"] == 6 and not rejects
    by_source = dict(zip(table.column("source").to_pylist(), table.column("text").to_pylist()))
    assert by_source["a.jsonl:2"] == "두 번째 문서"
    assert by_source["b.json:5"] == "배열 둘"  # the line where the element starts
    assert by_source["c.json:1"] == "줄 단위 JSON"
    assert by_source["d.parquet:2"] == "파케이 둘"
    assert by_source["e.csv:2"] == "여러 줄\n셀" and by_source["e.csv:4"] == "씨에스브이"
    assert by_source["sub/f.txt:1"] == "텍스트 파일 전체가\n한 문서\n"
    assert len(set(table.column("doc_id").to_pylist())) == 10


def test_globs_and_folders_resolve_sorted_and_unique(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "skip.md", ".hidden.jsonl"):
        (tmp_path / name).write_text('{"content": "x"}\n')
    cfg = CorpusConfig(paths=[str(tmp_path / "*.jsonl"), str(tmp_path), str(tmp_path / "a.jsonl")])
    assert [p.name for p in resolve_corpus_files(cfg)] == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize("paths, message", [
    (["missing.jsonl"], "corpus.paths[0] ('missing.jsonl'): no such file or folder"),
    (["*.nothing"], "corpus.paths[0] ('*.nothing'): the glob matches no file"),
    (["notes.md"], "unsupported format .md"),
])
def test_unresolvable_paths_name_the_config_key(tmp_path, monkeypatch, paths, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ConfigError) as e:
        resolve_corpus_files(CorpusConfig(paths=paths))
    assert message in str(e.value)


def test_qa_pairs_use_the_template(tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"q": "무엇?", "a": "이것."}])
    counts, table, _ = run_load(tmp_path, [f], question_field="q", answer_field="a",
                                template="질문: {question}\n답변: {answer}")
    assert table.column("text").to_pylist() == ["질문: 무엇?\n답변: 이것."]


def test_duplicates_and_short_documents_are_removed_and_counted(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"content": "같은 문서입니다"}, {"content": "짧음"},
                                          {"content": "같은 문서입니다"}, {"content": "   "}])
    counts, table, rejects = run_load(tmp_path, [f], min_chars=5)
    assert (counts["documents"], counts["duplicates"], counts["too_short"], counts["records"]) == (1, 1, 2, 4)
    assert not rejects


BAD_CASES = {
    "malformed JSON": (b'{"content": "ok"}\n{"content": "broken\n', "a.jsonl:2: malformed JSON"),
    "missing field": (b'{"content": "ok"}\n{"text": "x"}\n', "a.jsonl:2: missing field 'content'"),
    "non-string field": (b'{"content": "ok"}\n{"content": 3}\n', "a.jsonl:2: field 'content' is int, expected a string"),
    "null field": (b'{"content": "ok"}\n{"content": null}\n', "a.jsonl:2: field 'content' is null"),
    "not an object": (b'{"content": "ok"}\n["x"]\n', "a.jsonl:2: expected a JSON object, got list"),
    "invalid UTF-8": (b'{"content": "ok"}\n{"content": "\xff\xfe"}\n', "a.jsonl:2: invalid UTF-8"),
    "empty file": (b"", "a.jsonl:1: empty file"),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_records_fail_with_file_line_reason(tmp_path, case):
    data, message = BAD_CASES[case]
    (tmp_path / "a.jsonl").write_bytes(data)
    with pytest.raises(BadRecordError) as e:
        run_load(tmp_path, [tmp_path / "a.jsonl"])
    assert message in str(e.value)


@pytest.mark.parametrize("case", [c for c in BAD_CASES if c != "empty file"])
def test_skip_keeps_rejects_and_counts_them(tmp_path, case):
    data, message = BAD_CASES[case]
    (tmp_path / "a.jsonl").write_bytes(data)
    counts, table, rejects = run_load(tmp_path, [tmp_path / "a.jsonl"], on_bad_record="skip")
    assert counts["documents"] == 1 and counts["rejected"] == 1 == len(rejects)
    assert message.split(": ", 1)[1].split(" (")[0] in rejects[0]["reason"]
    assert rejects[0]["source"] == "a.jsonl:2"
    assert rejects[0]["raw"]  # the record itself is kept, not only its position


def test_skip_with_an_empty_file_among_good_ones(tmp_path):
    write_jsonl(tmp_path / "good.jsonl", [{"content": "좋은 문서"}])
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n")
    counts, table, rejects = run_load(tmp_path, [tmp_path], on_bad_record="skip")
    assert counts["documents"] == 1 and [r["source"] for r in rejects] == ["empty.jsonl:1"]


@pytest.mark.parametrize("name, data, message", [
    ("a.json", b'[{"content": "ok"},\n {"content": 1}]', "a.json:2: field 'content' is int"),
    ("a.json", b'[{"content": "ok"},\n {"content": "x"', "a.json:2: malformed JSON"),
    ("a.csv", b"other\nx\n", "a.csv:1: missing field 'content'"),
    ("a.csv", b"content\nok\n\xff\n", "a.csv:3: invalid UTF-8"),
    ("a.txt", b"\xc3\x28 broken", "a.txt:1: invalid UTF-8"),
])
def test_bad_input_in_other_formats(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(BadRecordError) as e:
        run_load(tmp_path, [tmp_path / name])
    assert message in str(e.value)


def test_parquet_non_string_and_missing_column(tmp_path):
    pq.write_table(pa.table({"content": ["ok", None]}), tmp_path / "a.parquet")
    with pytest.raises(BadRecordError, match=r"a.parquet:2: field 'content' is null"):
        run_load(tmp_path, [tmp_path / "a.parquet"])
    pq.write_table(pa.table({"text": ["ok"]}), tmp_path / "b.parquet")
    with pytest.raises(BadRecordError, match=r"b.parquet:1: missing field 'content'"):
        run_load(tmp_path, [tmp_path / "b.parquet"])


def test_all_records_bad_is_an_error_even_under_skip(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"{bad\n")
    with pytest.raises(BadRecordError, match="no documents left out of 1 records"):
        run_load(tmp_path, [tmp_path / "a.jsonl"], on_bad_record="skip")


def test_fingerprint_follows_content_not_mtime(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"content": "x"}])
    cfg = CorpusConfig(paths=[str(f)])
    first = fingerprint_corpus(cfg)
    f.touch()
    assert fingerprint_corpus(cfg).digest == first.digest
    write_jsonl(f, [{"content": "y"}])
    assert fingerprint_corpus(cfg).digest != first.digest
