import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import write_jsonl
from tasks.core.config.base import ConfigError
from tasks.core.config.data import CorpusConfig
from tasks.data.files import fingerprint_corpus, resolve_corpus_files, source_names
from tasks.data.layout import INDEX_FILE, REJECTS_FILE
from tasks.data.pieces import load_documents, read_documents
from tasks.data.records import BadRecordError


def run_load(tmp_path, files, **cfg):
    cfg = CorpusConfig(paths=[str(f) for f in files], **cfg)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    resolved = resolve_corpus_files(cfg)
    names = source_names(resolved)
    result = load_documents(resolved, cfg, out, names)
    table = read_documents(out / INDEX_FILE, [out / "parts" / str(i) for i in range(len(resolved))], names)
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


# ------------------------------------------------------------------ a file that cannot be read is a reject


def deep_json(depth: int = 100_000) -> str:
    return '{"content": ' + "[" * depth + "]" * depth + "}"


def corrupt_parquet(path):
    pq.write_table(pa.table({"content": ["파케이 문서 " * 20] * 50}), path)
    data = bytearray(path.read_bytes())
    data[8:200] = b"\xff" * 192  # the column chunk: the footer still parses, the data does not
    path.write_bytes(bytes(data))


# name: (file, how to write it, the reject's source, words of its reason). Each file holds one good record
# first where its format allows, so `skip` keeps it.
FILE_FAILURES = {
    "deeply nested JSON line": ("a.jsonl", lambda p: p.write_text('{"content": "좋은 문서"}\n' + deep_json() + "\n"),
                                "a.jsonl:2", "nested too deeply"),
    "deeply nested JSON array": ("a.json", lambda p: p.write_text('[{"content": "좋은 문서"},\n' + deep_json() + "]"),
                                 "a.json:2", "nested too deeply"),
    "CSV field over the csv limit": ("a.csv", lambda p: p.write_text("content\n좋은 문서\n" + "x" * 140_000 + "\n"),
                                     "a.csv:3", "field larger than field limit"),
    "corrupt parquet": ("a.parquet", corrupt_parquet, "a.parquet:1", "unreadable parquet file"),
    "garbage parquet": ("a.parquet", lambda p: p.write_bytes(b"PAR1" + b"\x00garbage" * 8 + b"PAR1"),
                        "a.parquet:1", "unreadable parquet file (ArrowInvalid"),
    "invalid UTF-8": ("a.jsonl", lambda p: p.write_bytes('{"content": "좋은 문서"}\n'.encode() + b'{"content": "\xff"}\n'),
                      "a.jsonl:2", "invalid UTF-8"),
    "a lone surrogate": ("a.jsonl", lambda p: p.write_text('{"content": "좋은 문서"}\n{"content": "x\\ud800"}\n'),
                         "a.jsonl:2", "lone surrogate"),
    "JSON document over the limit": ("a.jsonl",
                                     lambda p: write_jsonl(p, [{"content": "좋은 문서"}, {"content": "가" * 400}]),
                                     "a.jsonl:2", "document is 1200 bytes, over corpus.max_document_bytes=1000"),
    "CSV document over the limit": ("a.csv", lambda p: p.write_text("content\n좋은 문서\n" + "y" * 1001 + "\n"),
                                    "a.csv:3", "over corpus.max_document_bytes=1000"),
    "parquet document over the limit": ("a.parquet",
                                        lambda p: pq.write_table(pa.table({"content": ["좋은 문서", "z" * 1001]}), p),
                                        "a.parquet:2", "over corpus.max_document_bytes=1000"),
    "txt file over the limit": ("a.txt", lambda p: p.write_text("t" * 1001), "a.txt:1",
                                "file is 1001 bytes, over corpus.max_document_bytes=1000"),
}


def write_failure(tmp_path, case):
    name, write, source, words = FILE_FAILURES[case]
    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / name)
    write_jsonl(tmp_path / "in" / "good.jsonl", [{"content": "다른 좋은 문서"}])
    return tmp_path / "in", source, words


@pytest.mark.parametrize("case", FILE_FAILURES)
def test_a_file_that_cannot_be_read_fails_with_its_place_under_fail(tmp_path, case):
    folder, source, words = write_failure(tmp_path, case)
    with pytest.raises(BadRecordError) as e:
        run_load(tmp_path, [folder], max_document_bytes=1000)
    assert str(e.value).startswith(f"{source}: ") and words in str(e.value)


@pytest.mark.parametrize("case", FILE_FAILURES)
def test_a_file_that_cannot_be_read_is_one_counted_reject_under_skip(tmp_path, case):
    folder, source, words = write_failure(tmp_path, case)
    counts, table, rejects = run_load(tmp_path, [folder], max_document_bytes=1000, on_bad_record="skip")
    assert counts["rejected"] == 1 and [r["source"] for r in rejects] == [source] and words in rejects[0]["reason"]
    assert "다른 좋은 문서" in table.column("text").to_pylist()  # the other file is read
    assert str(folder) not in rejects[0]["reason"]  # a piece depends on the file's content, never its path


def test_a_txt_file_over_the_limit_is_not_read(tmp_path, monkeypatch):
    from pathlib import Path

    from tasks.data.readers import read_corpus_file

    (tmp_path / "big.txt").write_text("t" * 5000)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read a file over the limit"))
    [reject] = read_corpus_file(tmp_path / "big.txt", CorpusConfig(max_document_bytes=1000))
    assert reject.source.endswith("big.txt:1") and "over corpus.max_document_bytes" in reject.reason


def test_a_file_that_vanishes_is_a_reject_not_an_exception(tmp_path):
    from tasks.data.readers import read_corpus_file

    [reject] = read_corpus_file(tmp_path / "gone.jsonl", CorpusConfig(), name="gone.jsonl")
    assert reject.source == "gone.jsonl:1" and "FileNotFoundError" in reject.reason
    assert str(tmp_path) not in reject.reason


# ------------------------------------------------------- only regular files, no symlink out of the folder


@pytest.fixture
def tricky_folder(tmp_path):
    """A folder holding a good file, symlinks in and out of it, a FIFO, a broken link; a secret outside."""
    import os

    secret = tmp_path / "home" / ".aws" / "credentials.txt"
    secret.parent.mkdir(parents=True)
    secret.write_text("aws_secret_access_key = do-not-read")
    (tmp_path / "home" / "elsewhere").mkdir()
    write_jsonl(tmp_path / "home" / "elsewhere" / "far.jsonl", [{"content": "먼 곳의 문서"}])
    d = tmp_path / "drop"
    write_jsonl(d / "good.jsonl", [{"content": "좋은 문서"}])
    write_jsonl(d / "sub" / "real.jsonl", [{"content": "안쪽 문서"}])
    (d / "notes.txt").symlink_to(secret)                        # out of the folder: skipped
    (d / "inner.jsonl").symlink_to(d / "sub" / "real.jsonl")    # inside it: read (once)
    (d / "far").symlink_to(tmp_path / "home" / "elsewhere")      # a folder out of it: skipped
    (d / "inside").symlink_to(d / "sub")                        # a folder inside it: reached by its own path
    (d / "broken.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    os.mkfifo(d / "pipe.jsonl")
    return d, secret


def test_a_folder_yields_only_its_regular_files_and_names_what_it_skips(tricky_folder, caplog):
    from tasks.data.files import list_corpus_files

    d, secret = tricky_folder
    files, skipped = list_corpus_files(CorpusConfig(paths=[str(d)]))
    assert files == sorted([(d / "good.jsonl").resolve(), (d / "sub" / "real.jsonl").resolve()])
    assert sorted(skipped) == sorted([f"{d / 'broken.jsonl'}: a broken symlink",
                                      f"{d / 'far'}: a symlink out of the folder",
                                      f"{d / 'notes.txt'}: a symlink out of the folder",
                                      f"{d / 'pipe.jsonl'}: a FIFO, not a regular file"])
    with caplog.at_level("WARNING", logger="cpt"):
        assert resolve_corpus_files(CorpusConfig(paths=[str(d)])) == files
    assert "4 files skipped" in caplog.text and "notes.txt" in caplog.text  # logged, never silent
    counts, table, _ = run_load(d.parent, [d])  # the secret is never read
    assert not any("do-not-read" in t for t in table.column("text").to_pylist()) and counts["documents"] == 2


def test_a_glob_follows_no_symlink_out_of_its_folder_and_a_path_given_directly_is_read(tricky_folder):
    from tasks.data.files import list_corpus_files

    d, secret = tricky_folder
    with pytest.raises(ConfigError, match=r"the glob matches no file \(skipped 1: .*notes.txt: a symlink out"):
        list_corpus_files(CorpusConfig(paths=[str(d / "*.txt")]))
    files, skipped = list_corpus_files(CorpusConfig(paths=[str(d / "*.jsonl")]))
    assert files == [(d / "good.jsonl").resolve(), (d / "sub" / "real.jsonl").resolve()] and len(skipped) == 2
    # A symlink given directly is the user's own choice; a FIFO given directly is refused.
    assert list_corpus_files(CorpusConfig(paths=[str(d / "notes.txt")])) == ([secret.resolve()], [])
    with pytest.raises(ConfigError, match="not a regular file or folder"):
        list_corpus_files(CorpusConfig(paths=[str(d / "pipe.jsonl")]))


def test_a_proc_file_is_not_a_regular_file():
    from pathlib import Path

    from tasks.data.files import _not_readable

    assert _not_readable(Path("/proc/self/status"), Path("/proc/self")) == "a /proc or /sys file, not a regular file"


# ----------------------------------------------------------------- a path that exists is taken literally


def test_an_existing_path_with_glob_characters_is_literal_in_paths_and_exclude(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "corpus" / "a[1]" / "x.jsonl", [{"content": "괄호 폴더"}])
    write_jsonl(tmp_path / "corpus" / "a1" / "y.jsonl", [{"content": "glob이 고르는 폴더"}])
    write_jsonl(tmp_path / "corpus" / "b.jsonl", [{"content": "다른 문서"}])
    names = lambda cfg: [p.relative_to(tmp_path / "corpus").as_posix() for p in resolve_corpus_files(cfg)]  # noqa: E731
    assert names(CorpusConfig(paths=["corpus/a[1]"])) == ["a[1]/x.jsonl"]
    assert names(CorpusConfig(paths=["corpus"], exclude=["corpus/a[1]"])) == ["a1/y.jsonl", "b.jsonl"]
    assert names(CorpusConfig(paths=["corpus"], exclude=[str(tmp_path / "corpus" / "a[1]")])) == ["a1/y.jsonl",
                                                                                                "b.jsonl"]
    # A path that does not exist is still a glob; one matching folders excludes what they hold.
    assert names(CorpusConfig(paths=["corpus/a?/*.jsonl"])) == ["a1/y.jsonl"]
    assert names(CorpusConfig(paths=["corpus"], exclude=["corpus/a*"])) == ["b.jsonl"]


# ------------------------------------------------------------------ streaming: blocks, windows, limits


def records_of(path, **cfg):
    from tasks.data.readers import read_corpus_file

    return [(item.source.rsplit(":", 1)[1], getattr(item, "text", None) or item.reason)
            for item in read_corpus_file(path, CorpusConfig(**cfg), name=path.name)]


def test_json_lines_across_block_boundaries_keep_their_line_numbers(tmp_path, monkeypatch):
    import tasks.data.readers as load

    texts = [f"문서 {i} " + "가나다" * (i % 17) for i in range(300)]
    data = "".join(("\n" if i % 7 == 0 else "") + json.dumps({"content": t}, ensure_ascii=False) + "\n"
                   for i, t in enumerate(texts))
    (tmp_path / "a.jsonl").write_text(data.rstrip("\n"), encoding="utf-8")  # the last line has no newline
    expected = [(str(n), json.loads(line)["content"]) for n, line in enumerate(data.split("\n"), 1) if line]
    monkeypatch.setattr(load, "_BLOCK", 37)  # lines cut by blocks everywhere
    assert records_of(tmp_path / "a.jsonl") == expected


def test_a_json_line_too_long_to_hold_is_a_reject_and_the_next_line_is_read(tmp_path, monkeypatch):
    import tasks.data.readers as load

    monkeypatch.setattr(load, "_BLOCK", 1 << 16)
    big = json.dumps({"content": "x" * ((1 << 20) + 5000)})  # over 2 × 1000 + 1 MiB
    (tmp_path / "a.jsonl").write_text('{"content": "앞"}\n' + big + '\n{"content": "뒤"}\n', encoding="utf-8")
    got = records_of(tmp_path / "a.jsonl", max_document_bytes=1000, on_bad_record="skip")
    assert got[0] == ("1", "앞") and got[2] == ("3", "뒤")
    assert got[1][0] == "2" and "line over" in got[1][1] and "corpus.max_document_bytes=1000" in got[1][1]


def test_a_json_line_too_long_to_hold_is_never_held(tmp_path, monkeypatch):
    import tracemalloc

    import tasks.data.readers as load

    monkeypatch.setattr(load, "_BLOCK", 1 << 16)
    (tmp_path / "a.jsonl").write_text('{"content": "' + "x" * (6 << 20) + '"}\n{"content": "뒤"}\n')
    tracemalloc.start()
    try:
        got = records_of(tmp_path / "a.jsonl", max_document_bytes=1000, on_bad_record="skip")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "line over" in got[0][1] and got[1] == ("2", "뒤")
    assert peak < 3 << 20, f"held {peak} bytes for a line over the 1 MiB + 2,000 byte limit"


def test_orjson_refusals_are_judged_by_the_standard_library(tmp_path):
    # NaN and integers past 64 bits are JSON the standard library reads (orjson does not): still documents.
    (tmp_path / "a.jsonl").write_text('{"content": "NaN 옆", "score": NaN}\n{"content": "큰 수", "n": '
                                      + str(2**70) + "}\n{\"content\": \"끊긴\"\n", encoding="utf-8")
    got = records_of(tmp_path / "a.jsonl", on_bad_record="skip")
    assert got[:2] == [("1", "NaN 옆"), ("2", "큰 수")]
    assert got[2][0] == "3" and "malformed JSON" in got[2][1] and "(column" in got[2][1]


def test_a_json_array_is_read_through_a_bounded_window_with_each_element_line(tmp_path, monkeypatch):
    import tasks.data.readers as load

    docs = [{"id": i, "score": 1234567 + i, "content": f"배열 문서 {i}\n" + "라" * (i % 50)} for i in range(400)]
    text = json.dumps(docs, ensure_ascii=False, indent=2)
    (tmp_path / "a.json").write_text(text, encoding="utf-8")
    # Each element's first line: where `{` opens it at indent 2.
    starts = [n for n, line in enumerate(text.split("\n"), 1) if line == "  {"]
    held = []
    fill = load._Window.fill

    def watched(self, size=None):
        grew = fill(self, size)
        held.append(len(self.buf))
        return grew

    monkeypatch.setattr(load, "_TEXT_BLOCK", 97)
    monkeypatch.setattr(load._Window, "fill", watched)
    assert records_of(tmp_path / "a.json") == [(str(n), d["content"]) for n, d in zip(starts, docs)]
    longest = max(len(json.dumps(d, ensure_ascii=False, indent=2)) for d in docs) + 10
    assert max(held) < 4 * 97 + 2 * longest, "the window holds what was already parsed"


def test_a_json_array_element_too_long_to_hold_is_a_reject_naming_its_line(tmp_path, monkeypatch):
    import tasks.data.readers as load

    monkeypatch.setattr(load, "_TEXT_BLOCK", 1 << 16)
    (tmp_path / "a.json").write_text('[{"content": "첫"},\n {"content": "' + "x" * ((1 << 20) + 5000) + '"}]',
                                     encoding="utf-8")
    got = records_of(tmp_path / "a.json", max_document_bytes=1000, on_bad_record="skip")
    assert got[0] == ("1", "첫") and got[1][0] == "2" and "an element over" in got[1][1]


def test_a_csv_field_up_to_the_document_limit_is_read(tmp_path):
    # Over the csv module's own default (131,072 characters): the field limit is corpus.max_document_bytes.
    (tmp_path / "a.csv").write_text("content\n" + "긴" * 200_000 + "\n짧은\n", encoding="utf-8")
    assert [len(t) for _, t in records_of(tmp_path / "a.csv")] == [200_000, 2]


def test_parquet_is_read_in_batches_with_rows_numbered_across_them(tmp_path, monkeypatch):
    import tasks.data.readers as load

    monkeypatch.setattr(load, "_PARQUET_BATCH", 3)
    texts = [f"파케이 {i}" for i in range(10)]
    pq.write_table(pa.table({"content": texts, "other": list(range(10))}), tmp_path / "a.parquet", row_group_size=4)
    assert records_of(tmp_path / "a.parquet") == [(str(i + 1), t) for i, t in enumerate(texts)]


def test_the_assembled_output_refers_to_the_pieces_and_copies_no_text(tmp_path):
    from tasks.data.layout import INDEX_FILE

    for f in range(3):
        write_jsonl(tmp_path / "c" / f"{f}.jsonl", [{"content": f"{f}-{i} " + "본문" * 2000} for i in range(10)])
    write_jsonl(tmp_path / "c" / "3.jsonl", [{"content": "0-1 " + "본문" * 2000}])  # a copy from another file
    counts, table, _ = run_load(tmp_path, [tmp_path / "c"])
    index = pa.ipc.open_file(str(tmp_path / "out" / INDEX_FILE)).read_all()
    assert "text" not in index.column_names and index.num_rows == counts["documents"] == 30
    text_bytes = sum(len(t.encode()) for t in table.column("text").to_pylist())
    assert (tmp_path / "out" / INDEX_FILE).stat().st_size < text_bytes / 20
    assert counts["duplicates"] == 1 and counts["characters"] == sum(map(len, table.column("text").to_pylist()))
    assert table.column("source").to_pylist()[:2] == ["0.jsonl:1", "0.jsonl:2"]


class _Counter:
    def __init__(self):
        self.steps: list[int] = []

    def update(self, n: int) -> None:
        self.steps.append(n)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_load_reports_its_progress_in_bytes_while_it_reads_one_file(tmp_path, monkeypatch, suffix):
    """A 100 GB file must not sit at 0% until it is done: progress advances by bytes read within the file."""
    import csv

    import tasks.data.pieces as load_mod
    import tasks.data.readers as readers

    monkeypatch.setattr(load_mod, "_WRITE_BATCH", 50)
    monkeypatch.setattr(readers, "_BLOCK", 32 << 10)
    monkeypatch.setattr(readers, "_TEXT_BLOCK", 32 << 10)
    docs = [f"문서 {i}: 진료 기록과 처방 내용이 여기에 길게 적혀 있습니다. " * 8 for i in range(1500)]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, [{"content": d} for d in docs])
    elif suffix == ".json":
        path.write_text(json.dumps([{"content": d} for d in docs], ensure_ascii=False), encoding="utf-8")
    else:
        with path.open("w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["content"])
            w.writerows([d] for d in docs)
    out = tmp_path / "out"
    out.mkdir()
    counter = _Counter()
    counts = load_mod.load_file(path, str(path), CorpusConfig(paths=[str(path)]), out, counter)
    assert counts["documents"] == 1500
    assert sum(counter.steps) == path.stat().st_size
    assert all(n >= 0 for n in counter.steps)
    # Many steps inside the one file, the first well before its end.
    assert len([n for n in counter.steps if n]) >= 5, counter.steps
    assert counter.steps[0] < path.stat().st_size / 2


def test_a_long_stage_logs_how_far_it_is_with_rate_and_time_left(caplog, monkeypatch):
    import logging
    import time

    from tasks.core.report import Progress

    monkeypatch.setenv("CPT_NO_PROGRESS", "1")
    with caplog.at_level(logging.INFO, logger="cpt"):
        with Progress(4_000_000_000, "load", unit="B", log_every=0.01) as p:
            time.sleep(0.02)
            p.update(1_000_000_000)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("load:")]
    assert lines and "1.0 GB/4.0 GB (25%)" in lines[0] and "/s, about" in lines[0] and "left" in lines[0], lines


def test_a_corpus_the_artifacts_disk_may_not_hold_is_said_before_reading(tmp_path, monkeypatch):
    import collections
    import shutil

    from tasks.load import WRITTEN_PER_CORPUS_BYTE, disk_shortfall

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 50 * 10**9))
    corpus = 100 * 10**9
    warning = disk_shortfall(tmp_path / "not-made-yet", corpus)
    assert warning and str(tmp_path / "not-made-yet") in warning and "50.0 GB is free" in warning
    assert f"{corpus * WRITTEN_PER_CORPUS_BYTE / 1e9:,.1f} GB" in warning
    assert disk_shortfall(tmp_path, 10 * 10**9) is None


def test_adding_a_reader_format_is_one_function_and_one_row(tmp_path, monkeypatch):
    """docs/adding-a-reader.md, followed: a tab-separated format (`.tsv`, the text in the last column) is one
    reader function and one row of READERS; the folder walk lists it and load reads it, rejects with their
    lines included, with nothing else changed."""
    from tasks.data import readers
    from tasks.data.files import list_corpus_files
    from tasks.data.pieces import load_file
    from tasks.data.records import Reject, _record

    def read_tsv(f, name, cfg):
        for lineno, raw in enumerate(f, start=1):
            fields = raw.decode("utf-8").rstrip("\n").split("\t")
            if len(fields) < 2:
                yield Reject(f"{name}:{lineno}", "expected an id and a text, tab-separated", raw.decode())
                continue
            yield _record({cfg.text_field: fields[-1]}, f"{name}:{lineno}", cfg, lambda: raw.decode())

    monkeypatch.setitem(readers.READERS, ".tsv", read_tsv)
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "notes.tsv").write_text("1\t고혈압 환자의 식이 요법\nno-tab-here\n2\t당뇨병 환자의 운동\n", encoding="utf-8")
    (folder / "ignored.xyz").write_text("not a corpus file\n")
    cfg = CorpusConfig(paths=[str(folder)], on_bad_record="skip")
    files, skipped = list_corpus_files(cfg)
    assert [f.name for f in files] == ["notes.tsv"] and skipped == []
    out = tmp_path / "piece"
    out.mkdir()
    counts = load_file(files[0], "notes.tsv", cfg, out)
    assert counts["documents"] == 2 and counts["rejected"] == 1
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"line": 2, "reason": "expected an id and a text, tab-separated", "raw": "no-tab-here\n"}]
    monkeypatch.delitem(readers.READERS, ".tsv")
    with pytest.raises(ConfigError, match="holds no"):  # without its row, the format is not a corpus file
        list_corpus_files(cfg)


def test_a_missing_text_field_lists_the_record_fields_and_names_text_field_not_skip(tmp_path):
    """Every record has `text`, none `content`: the fix is corpus.text_field; skipping would keep nothing."""
    write_jsonl(tmp_path / "a.jsonl", [{"id": i, "text": f"문서 {i} 본문입니다"} for i in range(5)])
    with pytest.raises(BadRecordError) as e:
        run_load(tmp_path, [tmp_path / "a.jsonl"])
    msg = str(e.value)
    assert "a.jsonl:1: missing field 'content' (the record has 'id', 'text')" in msg
    assert "set corpus.text_field to the field that holds the text, e.g. --set corpus.text_field=text" in msg
    assert "on_bad_record: skip to keep going" not in msg and "all 5 records read are rejected" in msg
    # Some records are good: skipping the others is a fix, and is said.
    write_jsonl(tmp_path / "b.jsonl", [{"content": "좋은 문서"}, {"text": "다른 필드"}])
    with pytest.raises(BadRecordError, match="b.jsonl:2: missing field 'content'.*skip to keep going"):
        run_load(tmp_path, [tmp_path / "b.jsonl"])
    (tmp_path / "c.csv").write_text("title,body\nt,긴 본문\n", encoding="utf-8")
    with pytest.raises(BadRecordError, match=r"c.csv:1: missing field 'content' \(the record has 'title', 'body'\).*"
                                             r"--set corpus.text_field=body"):
        run_load(tmp_path, [tmp_path / "c.csv"])


def test_a_txt_file_is_one_document_or_one_per_paragraph(tmp_path):
    text = "고혈압의 원인\n여러 줄에 걸친 첫 문단.\n\n\n둘째 문단입니다.\n  \n셋째 문단.\r\n\r\n넷째 문단.\n"
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    counts, table, _ = run_load(tmp_path, [tmp_path / "book.txt"])
    assert counts["documents"] == 1
    counts, table, _ = run_load(tmp_path, [tmp_path / "book.txt"], txt_split="paragraph")
    assert counts["documents"] == 4
    rows = sorted(zip(table.column("source").to_pylist(), table.column("text").to_pylist()),
                  key=lambda r: int(r[0].rsplit(":", 1)[1]))
    assert rows == [("book.txt:1", "고혈압의 원인\n여러 줄에 걸친 첫 문단."), ("book.txt:5", "둘째 문단입니다."),
                    ("book.txt:7", "셋째 문단."), ("book.txt:9", "넷째 문단.")]


def test_the_default_txt_split_keeps_every_load_key_and_paragraphs_change_it():
    from tasks.core.config.data import CorpusConfig

    assert "txt_split" not in CorpusConfig(paths=["a"]).key_material()
    assert CorpusConfig(paths=["a"], txt_split="paragraph").key_material()["txt_split"] == "paragraph"


def test_a_split_of_fewer_than_a_handful_of_documents_is_warned_about():
    from tasks.shuffle import Split

    def split(train, validation):
        return Split(stage="shuffle", key="k", path="cache/shuffle/k", counts={
            "train_documents": train, "validation_documents": validation, "validation_copies_held_out": 0})

    warning = split(9, 1).few_documents()
    assert "1 validation documents, fewer than 5" in warning and "corpus.txt_split: paragraph" in warning
    assert split(300, 36).few_documents() is None
    assert split(300, 0).few_documents() is None  # no validation asked for (replay)
    assert "3 train" in split(3, 30).few_documents()


def assembled_reference(ids: list[list[str]], near: set[str]) -> list[list[int]]:
    """The assembly's filters as they were, a Python set of ids seen: per piece, the rows kept."""
    seen, out = set(), []
    for piece in ids:
        out.append([i for i, d in enumerate(piece) if d not in seen and d not in near])
        seen.update(piece)
    return out


@pytest.mark.parametrize("hexed", [True, False])
def test_the_assembly_keeps_what_a_set_of_seen_ids_kept(hexed):
    """The exact dedup across pieces and the near-duplicates' removal, done on arrays of the line's ids, keep the
    rows the sequential set of seen ids kept: a copy in a later piece goes, both copies within one piece stay
    (the first piece holding an id keeps all its rows), near-duplicates go wherever they are; load's ids (16 hex
    digits, as uint64) and any others (strings), the near-duplicates given as strings or as the pass's array."""
    import random

    import numpy as np

    from tasks.data.minhash import sortable_ids
    from tasks.data.pieces import line_filters, line_ids

    rng = random.Random(7)
    pool = [f"{rng.getrandbits(64):016x}" if hexed else f"doc-{k}" for k in range(60)]
    ids = [[rng.choice(pool) for _ in range(rng.randrange(0, 30))] for _ in range(7)]
    near = set(rng.sample(pool, 15))
    arrays = line_ids([pa.chunked_array([pa.array(piece, pa.string())]) for piece in ids])
    for given in (sortable_ids(sorted(near)), np.array(sorted(near), dtype=str)):
        given = np.unique(given)
        got = [np.flatnonzero(first & ~in_near).tolist() for first, in_near in line_filters(arrays, True, given)]
        assert got == assembled_reference(ids, near)
        alone = [np.flatnonzero(first).tolist() for first, _ in line_filters(arrays, True, None)]
        assert alone == assembled_reference(ids, set())


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [True, False])
def test_a_progress_bar_asked_away_imports_no_tqdm(quiet):
    """CPT_NO_PROGRESS=1 (a worker, CI, a benchmark) shows no terminal bar and imports no tqdm (~10 ms of a
    drop run's first stage); without it the bar is tqdm's, on stderr."""
    import subprocess
    import sys

    code = ("import sys\nfrom tasks.core.report import Progress\np = Progress(10, 'tokenize', unit='doc', log_every=0)\n"
            "p.update(4)\np.close()\nprint('tqdm' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("CPT_NO_PROGRESS", None)
    if quiet:
        env["CPT_NO_PROGRESS"] = "1"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(not quiet)
    assert ("tokenize" in done.stderr) is not quiet
