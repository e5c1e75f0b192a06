import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_jsonl
from flows.cli import main
from tasks.core.root import open_root

ROOT = Path(__file__).resolve().parents[1]


def cpt(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.slow  # `cpt` in a child process
def test_help_lists_the_commands():
    out = cpt("--help")
    assert out.returncode == 0 and "run" in out.stdout and "init-tiny-model" in out.stdout
    assert "--until" in cpt("run", "--help").stdout


@pytest.mark.slow  # `cpt` in a child process
def test_validate_prints_the_resolved_config():
    out = cpt("validate", "--config", "configs/demo.yaml", "--set", "chunk.overlap=10",
              "--set", "model.id=example/tiny-ko")  # a hub id (not fetched): the demo's folder may not be built
    assert out.returncode == 0 and "overlap: 10" in out.stdout and "text_field: content" in out.stdout, out.stderr


def test_a_model_id_that_cannot_load_here_is_refused_by_validate_and_before_a_run_starts(tmp_path, capsys,
                                                                                        monkeypatch):
    """A model.id that is neither a folder here nor a hub id, or a folder without a saved model, is an error of
    `cpt validate` (exit 2, naming the key and the fix) and of `cpt run` / `cpt retrain` before Prefect starts; a
    hub id is not fetched to be checked, and a run that stops before tokenize does not need the model."""
    from flows import cli

    monkeypatch.chdir(tmp_path)
    started = []
    monkeypatch.setattr(cli, "_run_server", lambda: started.append(1) or 1 / 0)
    corpus = ["--set", f"corpus.paths=[{ROOT / 'samples/medical_ko.jsonl'}]", "--artifacts", str(tmp_path / "art")]
    (tmp_path / "empty").mkdir()
    for model, words in (("artifacts/models/tiny-ko", "`cpt init-tiny-model artifacts/models/tiny-ko`"),
                         ("./tiny", "is not a folder here"), ("a b", "nor a Hugging Face hub id"),
                         ("empty", "a folder without config.json")):
        for command in ("validate", "run", "retrain"):
            assert main([command, *corpus, "--set", f"model.id={model}"]) == 2, (command, model)
            err = capsys.readouterr().err
            assert f"model.id: {model!r}" in err and words in err, (command, err)
    assert started == []
    assert main(["validate", *corpus, "--set", "model.id=example/tiny-ko"]) == 0
    with pytest.raises(ZeroDivisionError):  # past the check: the run went on to start its server
        main(["run", *corpus, "--set", "model.id=artifacts/models/tiny-ko", "--until", "shuffle"])
    assert started == [1]


def test_config_errors_exit_2_with_the_key(capsys):
    assert main(["validate", "--config", str(ROOT / "configs/demo.yaml"), "--set", "chunk.overlapp=1"]) == 2
    assert "chunk.overlapp: unknown key" in capsys.readouterr().err


def test_a_missing_corpus_path_is_a_config_error_exit_2_before_any_flow_starts(tmp_path, capsys, monkeypatch):
    """Checked before Prefect starts (the flow is never called, and no server waits seconds to start for it)."""
    import types

    def flow(**kw):
        raise AssertionError("the flow was called before the corpus paths were checked")

    # A stand-in for the flow's module (importing the real one would import Prefect, which binds its console log
    # handler to this test's captured stderr); cmd_run imports the flow from it.
    monkeypatch.setitem(sys.modules, "flows.continued_pretraining", types.SimpleNamespace(continued_pretraining=flow))
    missing = tmp_path / "missing.jsonl"
    rc = main(["run", "--set", f"corpus.paths=[{missing}]", "--set", "model.id=m", "--artifacts",
               str(tmp_path / "art")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == f"cpt: config error: corpus.paths[0] ('{missing}'): no such file or folder\n"


@pytest.mark.slow  # `cpt run` in a child process: a bad record is found by reading the file, in the flow's load
def test_a_bad_record_exits_1_naming_its_file_and_line(tmp_path, tiny_model):
    corpus = tmp_path / "a.jsonl"
    corpus.write_text('{"content": "a first document that is long enough to keep"}\n{"content": 7}\n')
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)  # the command's own temporary server
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--set", f"corpus.paths=[{corpus}]", "--set",
                          f"model.id={tiny_model}", "--until", "load", "--artifacts", str(tmp_path / "art")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    said = [line for line in out.stderr.splitlines() if line.startswith("cpt: ")]
    assert said == [f"cpt: bad input: {corpus}:2: field 'content' is int, expected a string "
                    "(set corpus.on_bad_record: skip to keep going without such records)"], out.stderr[-3000:]


@pytest.mark.slow  # a fresh interpreter shows what the command imports
def test_drops_answers_without_prefect_or_torch_and_removal_is_recorded(tmp_path):
    from tasks.line import lines

    lines.announce(open_root(tmp_path), "l", tmp_path / "d1")
    probe = ("import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
             "heavy = [m for m in ('prefect', 'torch', 'transformers', 'datasets') if m in sys.modules]; "
             "print('HEAVY', heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", probe, "drops", "--line", "l", "--artifacts", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "pending" in out.stdout and "HEAVY []" in out.stdout, out.stderr
    out = cpt("drops", "--line", "l", "--remove", str(tmp_path / "nope"), "--artifacts", str(tmp_path))
    assert out.returncode == 2 and "has no drop" in out.stderr
    assert cpt("drops", "--line", "l", "--remove", str(tmp_path / "d1"), "--artifacts", str(tmp_path)).returncode == 0
    assert [h["status"] for h in lines.read_line(open_root(tmp_path), "l").drops[0].history] == ["pending", "removed"]


@pytest.mark.slow  # a fresh interpreter shows what the command imports
def test_promotions_lists_a_lineage_without_prefect_or_torch(tmp_path):
    from tasks.line.promotions import Promotion, record_promotion

    record = Promotion(model_digest="d" * 32, model_path="cache/train/k/model", train_identity="t",
                       parent={"kind": "base", "id": "org/base", "digest": "b"}, reference={"kind": "base"},
                       validation_perplexity=12.5, reason="validation perplexity 12.5 vs the base model 20",
                       flow_run="brave-otter", at="2026-11-26T02:00:00Z")
    record_promotion(open_root(tmp_path), "line-night", record)
    record_promotion(open_root(tmp_path), "line-night", record)  # the same promotion seen again is not a new entry
    probe = ("import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
             "heavy = [m for m in ('prefect', 'torch', 'transformers', 'datasets') if m in sys.modules]; "
             "print('HEAVY', heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", probe, "promotions", "--line", "night", "--artifacts", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "HEAVY []" in out.stdout, out.stderr
    assert "line-night: 1 promoted" in out.stdout and "run brave-otter  model dddddddddddd  parent base" in out.stdout
    out = cpt("promotions", "--name", "other", "--artifacts", str(tmp_path))
    assert out.returncode == 0 and "name-other: nothing promoted yet" in out.stdout


@pytest.mark.slow  # fresh interpreters
def test_run_and_retrain_start_pyarrows_pandas_import_in_the_background(tmp_path):
    """pyarrow imports pandas on its first array (0.4-1.3 s): the commands that run stages begin it in a thread
    before the flow starts, so a drop's gate or load does not pay it inside the data path."""
    corpus = write_jsonl(tmp_path / "a.jsonl", [{"content": "ok"}])
    probe = ("import sys, flows.cli as cli; assert 'pandas' not in sys.modules; "
             "called = []; cli._warm_arrow = lambda real=cli._warm_arrow: (called.append(1), real()); "
             "import flows.continued_pretraining as fc, flows.retrain as fr; "
             "fc.continued_pretraining = fr.retrain = lambda **kw: sys.exit(0 if called else 3); "
             "sys.exit(cli.main(sys.argv[1:]))")
    for command in (["run"], ["retrain", "--line", "l"]):
        out = subprocess.run([sys.executable, "-c", probe, *command, "--set", f"corpus.paths=[{corpus}]",
                              "--set", "model.id=org/model", "--artifacts", str(tmp_path / "art")],
                             cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, (command, out.returncode, out.stderr[-2000:])
    warm = ("import sys, threading, flows.cli as cli; cli._warm_arrow(); "
            "[t.join() for t in threading.enumerate() if t.name == 'arrow-warm']; print('pandas' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", warm], cwd=ROOT, capture_output=True, text=True).stdout == "True\n"


def published_chunks(artifacts):
    """A chunk entry published under `artifacts` (a folder or a store URL) as the chunk stage lays it out (no
    flow): a token piece of 5 documents and windows of 12 with an overlap of 4 into it, so later windows have
    their overlap masked."""
    import numpy as np
    import pyarrow as pa

    from tasks.chunk import Chunks, window_rows, windows_file
    from tasks.data.windows import window_plan
    from tasks.core.config.data import ChunkConfig

    root = open_root(artifacts)
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 100, n).tolist() for n in (3, 17, 40, 9, 25)]
    tokens = pa.table({"doc_id": [f"d{i}" for i in range(len(docs))],
                       "input_ids": pa.array(docs, pa.list_(pa.uint16()))})
    cfg = ChunkConfig(max_seq_length=12, overlap=4)

    def write_tokens(tmp):
        with pa.OSFile(str(tmp / "tokens.arrow"), "wb") as sink, pa.ipc.new_file(sink, tokens.schema) as w:
            w.write_table(tokens, max_chunksize=2)
        return {}, {"bos_id": 1, "eos_id": 2, "vocab_size": 100, "id_limit": 100, "token_type": "uint16"}

    piece, _ = root.publish("tokenize-file", "tokenize-file-" + "70ce" * 6, write_tokens)

    def build(tmp):
        counts = {}
        for name, rows in (("train", [0, 1, 2, 4]), ("validation", [3])):
            c = window_rows(tokens, np.array(rows), window_plan(cfg, True), tmp / windows_file(name))
            counts.update({f"{name}_{k}": v for k, v in c.items()})
        meta = {"window": 11, "stride": 7, "bos": 1, "masked_overlap": 4, "bos_id": 1, "eos_id": 2,
                "token_type": "uint16", "token_pieces": [piece.key]}
        return counts, meta, {"deps": [piece.path]}

    manifest, _ = root.publish("chunk", "c0ffee" * 5 + "00", build)
    return root, Chunks.model_validate(manifest.model_dump())


def stored_rows(root, chunks, split):
    """The chunk rows the entry stands for, as dicts (input_ids, trained_from, doc_id, start)."""
    return [r for b in chunks.row_batches(root, split) for r in b.to_pylist()]


def rule_labels(row):
    """docs/stages.md's label rule, written out independently of the package."""
    return [-100] * row["trained_from"] + row["input_ids"][row["trained_from"]:]


def test_export_chunks_writes_a_standalone_dataset_with_labels_by_the_rule(tmp_path, capsys):
    """`cpt export-chunks` from a cache entry folder and from a run's summary: load_from_disk reads input_ids,
    attention_mask and labels, labels = input_ids with -100 before trained_from, row for row; a non-empty folder
    is replaced only with --force, and a missing source is a clear error."""
    from datasets import load_from_disk

    root, chunks = published_chunks(tmp_path / "art")
    stored = {split: stored_rows(root, chunks, split) for split in ("train", "validation")}
    out = tmp_path / "export"
    assert main(["export-chunks", str(out), "--entry", str(chunks.dir(root))]) == 0
    exported = load_from_disk(str(out))
    assert sorted(exported) == ["train", "validation"]
    masked = 0
    for split in ("train", "validation"):
        assert exported[split].column_names == ["input_ids", "attention_mask", "labels"]
        assert len(exported[split]) == len(stored[split]) > 0
        for row, got in zip(stored[split], exported[split]):
            assert got["input_ids"] == row["input_ids"]
            assert got["labels"] == rule_labels(row)
            assert got["attention_mask"] == [1] * len(row["input_ids"])
            masked += row["trained_from"] > 1
    assert masked  # the overlap of later windows is masked, not only the BOS
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".export")]  # no temp folder left

    # A non-empty folder: refused, untouched; replaced with --force.
    (out / "mine.txt").write_text("keep")
    assert main(["export-chunks", str(out), "--entry", str(chunks.dir(root))]) == 2
    assert "not empty (--force replaces it)" in capsys.readouterr().err and (out / "mine.txt").exists()
    summary = root.path("runs/some-run/summary.json")
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({"stages": [{"name": "chunk", "key": chunks.key}]}))
    assert main(["export-chunks", str(out), "--run", "some-run", "--artifacts", str(root.local), "--force"]) == 0
    assert not (out / "mine.txt").exists()
    assert load_from_disk(str(out))["train"]["labels"] == exported["train"]["labels"]

    # Clear errors: no such run, no mix in the run, two sources at once, an entry under the root by its name.
    capsys.readouterr()
    assert main(["export-chunks", str(tmp_path / "e2"), "--run", "nope", "--artifacts", str(root.local)]) == 2
    assert "--run nope: no run summary at" in capsys.readouterr().err
    assert main(["export-chunks", str(tmp_path / "e2"), "--run", "some-run", "--stage", "mix",
                 "--artifacts", str(root.local)]) == 2
    assert "the run has no mix output" in capsys.readouterr().err
    assert main(["export-chunks", str(tmp_path / "e2"), "--run", "x", "--entry", "y"]) == 2
    assert "give one of --run, --entry or --config/--set" in capsys.readouterr().err
    assert main(["export-chunks", str(tmp_path / "e2"), "--entry", "cache/chunk/0000",
                 "--artifacts", str(root.local)]) == 2
    assert "no complete chunk entry 0000" in capsys.readouterr().err
    assert main(["export-chunks", str(tmp_path / "e3"), "--entry", f"cache/chunk/{chunks.key}",
                 "--artifacts", str(root.local)]) == 0
    assert load_from_disk(str(tmp_path / "e3"))["validation"]["labels"] == exported["validation"]["labels"]


@pytest.mark.slow
def test_export_chunks_fetches_the_entry_from_an_object_store_root(tmp_path, monkeypatch, s3_endpoint):
    """A host that never built the chunks exports them from the store: the entry is fetched into its own mirror,
    and the export holds the same rows and labels as the building host's."""
    from datasets import load_from_disk

    from helpers import new_bucket, s3_env

    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    url = f"s3://{new_bucket(s3_endpoint)}/team"
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "builder"))
    root, chunks = published_chunks(url)
    # The exporting host has neither the chunk entry nor the token piece: both come from the store.
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "exporter"))
    out = tmp_path / "export"
    assert main(["export-chunks", str(out), "--entry", f"{url}/cache/chunk/{chunks.key}", "--artifacts", url]) == 0
    assert (tmp_path / "exporter").is_dir()
    exported = load_from_disk(str(out))
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "builder"))
    for split in ("train", "validation"):
        assert exported[split]["labels"] == [rule_labels(r) for r in stored_rows(open_root(url), chunks, split)]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_export_chunks_from_a_config_exports_what_train_reads(tmp_path, tiny_model, capsys):
    """`cpt export-chunks` with the config and --set of `cpt run`: the data stages run (here with replay), and
    the export is mix's training set by default, chunk's with --stage chunk; labels by the rule."""
    from datasets import load_from_disk

    from helpers import sample_texts

    texts = sample_texts(60)
    write_jsonl(tmp_path / "corpus.jsonl", [{"content": t} for t in texts[:40]])
    write_jsonl(tmp_path / "general.jsonl", [{"content": t} for t in texts[40:]])
    art = tmp_path / "art"
    sets = ["--set", f"corpus.paths=[{tmp_path / 'corpus.jsonl'}]", "--set", f"model.id={tiny_model}",
            "--set", "chunk.max_seq_length=64", "--set", "chunk.overlap=16", "--set", "split.validation_fraction=0.2",
            "--set", f"replay.paths=[{tmp_path / 'general.jsonl'}]", "--set", "replay.fraction=0.3"]
    assert main(["export-chunks", str(tmp_path / "mixed"), *sets, "--artifacts", str(art)]) == 0
    assert main(["export-chunks", str(tmp_path / "domain"), *sets, "--stage", "chunk", "--artifacts", str(art)]) == 0
    import re

    said = dict(re.findall(r" from (mix|chunk) ([\w-]+) \(", capsys.readouterr().out))
    assert set(said) == {"mix", "chunk"}
    from tasks.chunk import Chunks
    from tasks.core.manifest import read_manifest

    root = open_root(art)
    entries = {stage: Chunks.model_validate(read_manifest(art / "cache" / stage / key).model_dump())
               for stage, key in said.items()}
    for name, stage in (("mixed", "mix"), ("domain", "chunk")):
        exported = load_from_disk(str(tmp_path / name))
        for split in ("train", "validation"):
            assert exported[split]["labels"] == [rule_labels(r) for r in stored_rows(root, entries[stage], split)]
    assert len(load_from_disk(str(tmp_path / "mixed"))["train"]) > len(load_from_disk(str(tmp_path / "domain"))["train"])
