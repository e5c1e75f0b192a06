"""Attacks from outside, performed through the stage functions and the CLI: a bucket writer rewriting what a
manifest names, a record payload naming a class, a forged entry with signing on, a drop swapped or symlinked, a
drop-borne task file, a Hub head that moved. Each test says what it attacks; each fails without its fix (the
mutations are named in docs/trust.md)."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import pytest

from helpers import S3_KEY, S3_SECRET, new_bucket, s3_env, sample_texts, write_jsonl


# ----------------------------------------------------------------------------- a shared data path

def _tokenizer(tmp_path: Path):
    from tasks.core.config.model import ModelConfig
    from tasks.ml.tiny_model import train_tokenizer
    from tasks.tokenize import resolve_tokenizer

    tok_dir = tmp_path / "tokenizer"
    if not tok_dir.is_dir():
        train_tokenizer(sample_texts(60), vocab_size=320).save_pretrained(tok_dir)
        (tok_dir / "config.json").write_text("{}")
    return resolve_tokenizer(ModelConfig(id=str(tok_dir)))


def data_stages(tmp_path: Path, artifacts: str, max_seq_length: int = 32) -> dict:
    """load → shuffle → tokenize → chunk through the stage functions on `artifacts` (a folder or a store URL),
    as `cpt run --until chunk` calls them; returns the outputs by stage."""
    from tasks.chunk import chunk
    from tasks.core.config.data import ChunkConfig, CorpusConfig, ShuffleConfig, SplitConfig, TokenizeConfig
    from tasks.data.files import fingerprint_corpus
    from tasks.load import load, load_inputs
    from tasks.shuffle import shuffle
    from tasks.tokenize import tokenize

    corpus_dir = tmp_path / "corpus"
    if not corpus_dir.is_dir():
        texts = sample_texts(40)
        write_jsonl(corpus_dir / "a.jsonl", [{"content": t} for t in texts[:20]])
        write_jsonl(corpus_dir / "b.jsonl", [{"content": t} for t in texts[20:]])
    corpus = CorpusConfig(paths=[str(corpus_dir)], near_dedup={"enabled": False})
    docs = load.fn(**load_inputs(corpus, fingerprint_corpus(corpus)), artifacts=artifacts)
    split = shuffle.fn(shuffle=ShuffleConfig(), split=SplitConfig(validation_fraction=0.2), docs=docs,
                       artifacts=artifacts)
    tokens = tokenize.fn(tokenize=TokenizeConfig(), tokenizer=_tokenizer(tmp_path), docs=docs, artifacts=artifacts)
    chunks = chunk.fn(chunk=ChunkConfig(max_seq_length=max_seq_length, overlap=8), tokens=tokens, split=split,
                      artifacts=artifacts)
    return {"load": docs, "shuffle": split, "tokenize": tokens, "chunk": chunks}


@contextlib.contextmanager
def cpt_warnings(caplog):
    """caplog's records of the "cpt" logger: its handler attached there (Prefect's logging setup, run when a test
    first imports Prefect, replaces the root logger's handlers, caplog's included)."""
    logger = logging.getLogger("cpt")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            yield
    finally:
        logger.removeHandler(caplog.handler)


def _s3fs(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs={"endpoint_url": endpoint},
                             skip_instance_cache=True, use_listings_cache=False)


# ------------------------------------------------------------------ 1. nothing stored is a path

@pytest.mark.slow
def test_a_bucket_writer_who_rewrites_piece_references_makes_no_host_write_outside_its_mirror(
        any_s3, tmp_path, monkeypatch, caplog):
    """The load, tokenize and chunk manifests' piece references are rewritten to an absolute folder outside the
    mirror, and complete-looking entries are planted at the keys those names make (`<prefix>//<abs path>`,
    which moto keeps and SeaweedFS folds or refuses). A fresh host that reruns chunk (a new window), and another
    that runs the first config again, write nothing outside their mirrors: each rewritten manifest is a damaged
    entry, logged and rebuilt."""
    for k, v in s3_env(any_s3).items():
        monkeypatch.setenv(k, v)
    url = f"s3://{new_bucket(any_s3)}/team"
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "host-a"))
    first = data_stages(tmp_path, url)

    fs, base = _s3fs(any_s3), url.removeprefix("s3://")
    outside = tmp_path / "outside"
    rewritten = []
    for stage in ("load", "tokenize", "chunk"):
        out = first[stage]
        manifest = json.loads(fs.cat_file(f"{base}/{out.path}/_COMPLETE"))
        refs = manifest["meta"].get("parts") or [{} for _ in out.deps]
        pieces = [d for d in out.deps if d.startswith(("cache/load-file/", "cache/tokenize-file/"))]
        for i, (ref, piece) in enumerate(zip(refs, pieces)):
            target = str(outside / f"{stage}-{i}")  # an absolute folder: joined to the mirror, itself
            ref["path"] = target
            for obj in fs.find(f"{base}/{piece}"):  # a complete entry planted where that name leads in the store
                try:
                    fs.pipe_file(f"{base}/{target}/{obj.rsplit('/', 1)[-1]}", fs.cat_file(obj))
                except OSError:
                    pass  # SeaweedFS refuses the key: the rewritten manifest alone is the attack there
        if stage == "chunk":
            manifest["meta"]["token_files"] = [{"path": str(outside / f"chunk-{i}"), "name": "tokens.arrow"}
                                               for i in range(len(pieces))]
        else:
            manifest["meta"]["parts"] = refs
        fs.pipe_file(f"{base}/{out.path}/_COMPLETE", json.dumps(manifest).encode())
        rewritten.append(out.path)

    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "host-b"))  # a fresh host reruns chunk (a new window)
    with cpt_warnings(caplog):
        second = data_stages(tmp_path, url, max_seq_length=24)
        monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "host-c"))  # another one runs the first config again
        third = data_stages(tmp_path, url)
    assert not outside.exists() or not any(outside.rglob("*")), sorted(outside.rglob("*"))
    assert second["chunk"].counts["train_chunks"] > first["chunk"].counts["train_chunks"]
    assert third["chunk"].counts["train_chunks"] == first["chunk"].counts["train_chunks"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    for rel in rewritten:
        assert f"{rel}: its manifest is unreadable" in warned, warned
    from tasks.core.root import open_root

    for out in (second["chunk"], third["chunk"]):
        rows = list(out.row_batches(open_root(url), "train"))
        assert sum(b.num_rows for b in rows) == out.counts["train_chunks"]


def test_a_root_names_nothing_but_an_entry_of_its_cache(tmp_path):
    """Whatever a manifest, a record or a listing says, `entry`/`file`/`location` take `cache/<stage>/<key>` and
    a name inside it, before anything is fetched, written or moved aside."""
    from tasks.core.root import open_root

    root = open_root(tmp_path / "artifacts")
    for bad in ("/etc", str(tmp_path / "x"), "cache//tmp/x", "cache/load-file/../../x", "cache/_records/k",
                "cache/load-file/.tmp-k", "state/lines/l.json", "cache/load-file", "cache/a/b/c"):
        for call in (lambda: root.entry(bad), lambda: root.file(bad, "x")):
            with pytest.raises(ValueError, match="not an entry"):
                call()
    with pytest.raises(ValueError, match="inside its folder"):
        root.file("cache/load-file/load-file-k", "../../../x")


def test_a_manifest_with_a_reference_that_is_not_a_dep_or_not_a_key_is_damage(tmp_path):
    from tasks.core.manifest import parse_manifest
    from tasks.load import Docs  # noqa: F401  (registers load's manifest type)

    good = {"stage": "load", "key": "load-1", "path": "cache/load/load-1", "deps": ["cache/load-file/load-file-a"],
            "meta": {"parts": [{"name": "a.jsonl", "key": "load-file-a", "documents": 1, "files": 1, "records": 1,
                                "rejected": 0, "duplicates": 0, "too_short": 0, "characters": 5}]}}
    assert parse_manifest(json.dumps(good)).parts[0].rel == "cache/load-file/load-file-a"
    bad = [
        {**good, "path": "cache/load/load-2"},  # another entry's manifest copied here
        {**good, "deps": []},  # a piece the verified deps do not name
        {**good, "meta": {"parts": [{**good["meta"]["parts"][0], "path": "/tmp/x"}]}},  # a path: no such field
        {**good, "meta": {"parts": [{**good["meta"]["parts"][0], "key": "load-file-a/../../x"}]}},
        {**good, "meta": {"parts": [{**good["meta"]["parts"][0], "key": "tokenize-file-a"}]}},  # another kind
    ]
    for doc in bad:
        with pytest.raises(ValueError):
            parse_manifest(json.dumps(doc))


@pytest.mark.slow
def test_a_record_written_from_a_manifest_naming_a_class_builds_nothing(tmp_path, monkeypatch, tiny_model,
                                                                         prefect_harness):
    """A manifest's counts carry `{"__class__": "<a module>.X"}` and `{"__exc_type__": …}` objects; a cached run
    writes the stage's record from that manifest and Prefect reads it back. Prefect's JSON decoder would import
    the module (it writes a marker when imported) and build the class; the manifest serializer builds nothing
    but the stage's own manifest type."""
    from helpers import run_flow

    corpus = write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"content": t} for t in sample_texts(30)])
    config = {"corpus": {"paths": [str(corpus)], "near_dedup": {"enabled": False}}, "model": {"id": str(tiny_model)}}
    artifacts = tmp_path / "artifacts"
    states, summary = run_flow(config, artifacts, until="load")
    assert states == {"load": "Completed"}
    marker = tmp_path / "imported"
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "cpt_canary.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\nclass X:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    entry = Path(summary["stages"][0]["output"])
    manifest = json.loads((entry / "_COMPLETE").read_text())
    manifest["counts"]["planted"] = {"__class__": "cpt_canary.X", "data": {}}
    manifest["counts"]["raised"] = {"__exc_type__": "cpt_canary.X", "message": "boom"}
    (entry / "_COMPLETE").write_text(json.dumps(manifest))

    states, summary = run_flow(config, artifacts, until="load")
    assert not marker.exists(), "reading the record imported a module the manifest named"
    assert states == {"load": "Cached"}
    assert summary["stages"][0]["counts"]["planted"] == {"__class__": "cpt_canary.X", "data": {}}


# --------------------------------------------------------------------- 2. signed entries, signing on

@pytest.mark.slow
def test_with_signing_on_a_forged_entry_and_a_forged_state_are_never_used(s3_endpoint, tmp_path, monkeypatch,
                                                                          caplog):
    """Host a signs what it publishes; host b trusts a's public key. A writer without the key replaces a load
    piece's texts with a canary (its manifest's sizes and digests made to match, as anyone who can write the
    bucket can) and rewrites the line state. Host b's run never reads the canary: the forged piece is a miss,
    logged with its key, and rebuilt from the corpus; the forged line state is refused."""
    import pyarrow as pa

    from tasks.core.manifest import hash_file
    from tasks.core.root import open_root
    from tasks.core.signing import Unsigned, generate
    from tasks.data.layout import DOCS_FILE, PIECE_SCHEMA
    from tasks.line import lines

    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    url = f"s3://{new_bucket(s3_endpoint)}/team"
    secret, public = generate("host-a")
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "host-a"))
    monkeypatch.setenv("CPT_STORE_SIGNING_KEY", secret)
    first = data_stages(tmp_path, url)
    lines.announce(open_root(url), "night", tmp_path / "corpus")

    fs, base = _s3fs(s3_endpoint), url.removeprefix("s3://")
    piece = first["load"].parts[0].rel
    canary = "CANARY forged by a bucket writer without the key"
    forged = tmp_path / "forged.arrow"
    original = pa.ipc.open_file(pa.BufferReader(fs.cat_file(f"{base}/{piece}/{DOCS_FILE}"))).read_all()
    texts = [canary] * original.num_rows
    table = original.set_column(original.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    with pa.OSFile(str(forged), "wb") as sink, pa.ipc.new_file(sink, PIECE_SCHEMA) as w:
        w.write_table(table)
    stored = json.loads(fs.cat_file(f"{base}/{piece}/_COMPLETE"))
    manifest = json.loads(stored["payload"]) if "payload" in stored else stored  # sealed, or plain (signing off)
    manifest["files"][DOCS_FILE] = forged.stat().st_size
    manifest["digests"][DOCS_FILE] = hash_file(forged)
    fs.pipe_file(f"{base}/{piece}/{DOCS_FILE}", forged.read_bytes())
    fs.pipe_file(f"{base}/{piece}/_COMPLETE", json.dumps(manifest).encode())  # unsigned
    fs.pipe_file(f"{base}/state/lines/night.json", json.dumps({"line": "night", "drops": []}).encode())

    monkeypatch.delenv("CPT_STORE_SIGNING_KEY")
    monkeypatch.setenv("CPT_STORE_TRUSTED_KEYS", public)
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "host-b"))
    with cpt_warnings(caplog):
        second = data_stages(tmp_path, url)
    root = open_root(url)
    assert canary not in second["load"].documents(root).column("text").to_pylist()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert piece in warned and "not trusted" in warned and "not signed" in warned, warned
    with pytest.raises(Unsigned, match="state/lines/night.json"):
        lines.read_line(root, "night")


# ------------------------------------------------------------------------------- 3. trained = gated

def _settled(folder: Path) -> Path:
    import os
    import time

    old = time.time() - 3600
    for f in folder.rglob("*"):
        os.utime(f, (old, old))
    return folder


def _docs(folder: Path, texts: list[str]) -> Path:
    write_jsonl(folder / "a.jsonl", [{"content": t} for t in texts])
    return _settled(folder)


@pytest.fixture
def line_config(tmp_path, tiny_model):
    from tasks.core.config.tree import validate_config

    texts = sample_texts()
    for i in range(3):
        write_jsonl(tmp_path / "corpus" / f"part-{i}.jsonl", [{"content": t} for t in texts[i * 40:(i + 1) * 40]])
    _settled(tmp_path / "corpus")
    return validate_config({
        "corpus": {"paths": [str(tmp_path / "corpus")], "near_dedup": {"enabled": False}},
        "model": {"id": str(tiny_model)}, "drops": {"roots": [str(tmp_path / "drops")]},
        "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 96, "overlap": 16},
        "train": {"max_steps": 1, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                  "eval_steps": 1, "save_steps": 1, "logging_steps": 1, "early_stopping_patience": None},
        "evaluate": {"max_eval_rows": 8}, "gate": {"enabled": False}, "push": {"name": "attacked"}}), texts


def _trained_texts(result, artifacts) -> list[str]:
    from tasks.data.pieces import entry_documents

    load = next(s for s in result["pipeline"]["stages"] if s["name"] == "load")["output"]
    return entry_documents(Path(load), artifacts).column("text").to_pylist()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_gated_drop_swapped_for_a_symlink_while_another_is_profiled_is_trained_as_gated(
        line_config, tmp_path, artifacts, monkeypatch):
    """Drop 1 passed the gate. While drop 2 is profiled in the next run, drop 1's folder is replaced by a symlink
    to a folder outside drops.roots holding canary documents. That run trains drop 1 as it was gated (its
    recorded files, from its pieces), never the canary; the run after that finds drop 1's path a symlink and
    gates it again (rejected), and the line goes on without it."""
    import tasks.line.drop_gate as drop_gate
    from flows.retrain import retrain

    config, texts = line_config
    d1 = _docs(tmp_path / "drops" / "d1", texts[120:160])
    d2 = _docs(tmp_path / "drops" / "d2", texts[160:200])
    outside = _docs(tmp_path / "outside", [f"CANARY {i}: 밖에서 온 문서는 학습되면 안 된다." for i in range(40)])

    def run(drop=None):
        return retrain(config=config, drop=str(drop) if drop else None, line="swap", settle_seconds=60,
                       artifacts=str(artifacts))

    assert run(d1)["trained"]
    real_profile = drop_gate.profile_drop

    def swap_while_profiling(files, *args, **kwargs):
        if any(str(d2) in str(f) for f in files) and not d1.is_symlink():
            d1.rename(tmp_path / "drops" / "d1-was")
            d1.symlink_to(outside)
        return real_profile(files, *args, **kwargs)

    monkeypatch.setattr(drop_gate, "profile_drop", swap_while_profiling)
    second = run(d2)
    assert second["trained"] and d1.is_symlink()
    trained = _trained_texts(second, artifacts)
    assert not any("CANARY" in t for t in trained), "the run trained on what the symlink points to"
    assert len(trained) == 120 + 40 + 40

    # A drop can fail, its line cannot (a season unattended): the rejected drop is left out and the line trains
    # on the rest at once, never on the canary.
    third = run()
    entry = {d["path"]: d for d in third["drops"]}[str(d1)]
    assert entry["status"] == "rejected" and "now a symlink" in entry["reason"]
    assert third["trained"] and third["rejected"] == [str(d1)]
    assert not any("CANARY" in t for t in _trained_texts(third, artifacts))
    assert len(_trained_texts(third, artifacts)) == 120 + 40
    fourth = run()
    assert fourth["trained"] is False and fourth["reason"] == "unchanged"


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_symlink_at_a_rejected_drops_path_takes_nothing_out_of_the_line(line_config, tmp_path, artifacts,
                                                                          capsys):
    """A rejected drop's path becomes a symlink to the line's corpus folder. The next nightly run neither fails
    nor loses the corpus; a later good drop trains with the whole line; `cpt drops --remove PATH` finds the drop
    by the path it was announced at."""
    from flows.cli import main
    from flows.retrain import retrain

    config, texts = line_config

    def run(drop=None):
        return retrain(config=config, drop=str(drop) if drop else None, line="sym", settle_seconds=60,
                       artifacts=str(artifacts))

    assert run()["trained"]
    bad = _docs(tmp_path / "drops" / "bad", texts[0:40])  # every document already in the line
    assert run(bad)["reason"] == "drop-rejected"
    import shutil

    shutil.rmtree(bad)
    bad.symlink_to(tmp_path / "corpus")
    nightly = run()
    assert nightly["reason"] == "unchanged", nightly["reason"]
    good = _docs(tmp_path / "drops" / "good", texts[120:159])
    with_good = run(good)
    assert with_good["trained"] and len(_trained_texts(with_good, artifacts)) == 120 + 39
    assert main(["drops", "--line", "sym", "--remove", str(bad), "--artifacts", str(artifacts)]) == 0
    assert "removed" in capsys.readouterr().out
    assert run()["reason"] == "unchanged"


# ------------------------------------------------------------------------------- 4. nothing in a drop runs

@pytest.mark.slow  # lm-eval's simple_evaluate records its environment: git, pip, uname, nvcc as child processes
def test_a_drop_borne_task_yaml_of_the_configured_name_is_never_indexed_nor_its_function_run(
        tiny_model, tmp_path, monkeypatch):
    """The configured task is data/health_cloze.yaml; a drop under data/drops/ and a sibling folder each hold a
    YAML naming the same task, whose `!function` imports a helpers.py beside it (it writes a marker when
    imported). lm-eval (which indexes every YAML of a folder, the first of two same-named tasks winning) runs the
    configured task, and no marker is ever written: by evaluate's harness call, nor by held-out's."""
    from tasks.core.config.model import EvaluateConfig, ModelConfig
    from tasks.evaluate import evaluate_model, write_cloze_task
    from tasks.held_out import registry_task_texts

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    configured = write_cloze_task(sample_texts(), data, "health_cloze", n=12)
    markers = []
    for where in (data / "drops" / "2026-12-01", data / "aaa-sibling"):
        where.mkdir(parents=True)
        marker = where / "IMPORTED"
        markers.append(marker)
        (where / "helpers.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
                                          "def doc_to_text(doc):\n    return 'x'\n")
        (where / "a.yaml").write_text(configured.read_text().replace('doc_to_text: "{{context}}"',
                                                                     "doc_to_text: !function helpers.doc_to_text"))
        assert "!function" in (where / "a.yaml").read_text()
    cfg = EvaluateConfig(tasks=[str(configured)], task_limit=4, num_fewshot=0, task_batch_size=4)
    rows = [{"input_ids": [1, 5, 6, 7, 8], "labels": [-100, 5, 6, 7, 8]}]
    result = evaluate_model(str(tiny_model), ModelConfig(id=str(tiny_model)), cfg, rows, None)
    assert result["tasks"]["health_cloze"]["examples"] == 4
    found, not_checked = registry_task_texts(["health_cloze"], [str(configured)])
    assert not not_checked and found
    assert not [m for m in markers if m.exists()], "a drop's task file ran code"


# ------------------------------------------------------------------------------- 5. every push has a lineage

@pytest.fixture
def hub_config(tmp_path, tiny_model):
    write_jsonl(tmp_path / "corpus" / "corpus.jsonl", [{"content": t} for t in sample_texts()])
    return {"corpus": {"paths": [str(tmp_path / "corpus")], "near_dedup": {"enabled": False}},
            "model": {"id": str(tiny_model)}, "split": {"validation_fraction": 0.1},
            "chunk": {"max_seq_length": 96, "overlap": 16},
            "train": {"max_steps": 12, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                      "learning_rate": 3e-3, "warmup_ratio": 0.0, "logging_steps": 1, "eval_steps": 6,
                      "save_steps": 6, "early_stopping_patience": None},
            "evaluate": {"max_eval_rows": 32}, "push": {"repo_id": "test-user/m"}}


def _run(config, artifacts, **sections):
    from flows.continued_pretraining import continued_pretraining
    from tasks.core.config.tree import validate_config

    cfg = json.loads(json.dumps(config))
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    summary = continued_pretraining(config=validate_config(cfg), artifacts=str(artifacts))
    return {s["name"]: s for s in summary["stages"]}, summary


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_push_to_a_repo_alone_has_a_lineage_and_a_worse_model_never_replaces_the_head(hub_config, artifacts,
                                                                                        monkeypatch):
    """push.repo_id without a line or push.name: the first run pushes a model trained 12 steps; a second run
    (2 steps: better than the base model, worse than the first) is gated against the first, refused, and the
    Hub head stays the first run's commit."""
    from fake_hub import FakeHub, online

    with FakeHub() as hub:
        online(monkeypatch, hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token_for_the_lineage_test")
        first, _ = _run(hub_config, artifacts)
        assert first["push"]["state"] == "Completed" and first["gate"]["counts"]["reference"] == "base"
        head = hub.head("test-user/m")
        second, summary = _run(hub_config, artifacts, train={"max_steps": 2})
        g = second["gate"]["counts"]
        assert g["reference"] == "promoted", "the second run was not compared with what the Hub holds"
        assert g["promoted"] is False and second["push"]["state"] == "Skipped"
        assert g["validation_perplexity"] < second["evaluate-base"]["counts"]["validation_perplexity"]
        assert hub.head("test-user/m") == head and len(hub.commits) == 1


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_hub_head_replaced_after_the_gate_read_it_is_never_pushed_over(hub_config, artifacts, monkeypatch):
    """Someone else pushes to the repo after this lineage's last push: the next run's push is refused with that
    reason and their commit stays the head. Someone pushes between the moment the head is read and the commit:
    the compare-and-swap (create_commit's parent_commit) refuses it."""
    from fake_hub import FakeHub, online
    from huggingface_hub import HfApi

    import tasks.push
    from tasks.core.root import open_root
    from tasks.line.promotions import read_promotions, record_promotion

    theirs = artifacts.parent / "theirs"
    theirs.mkdir()

    def someone_pushes(weights: bytes, message: str) -> str:
        (theirs / "model.safetensors").write_bytes(weights)
        return HfApi(token="hf_someone_else").upload_folder(repo_id="test-user/m", folder_path=str(theirs),
                                                            commit_message=message).oid

    with FakeHub() as hub:
        online(monkeypatch, hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token_for_the_cas_test")
        first, _ = _run(hub_config, artifacts)
        assert first["push"]["state"] == "Completed"
        other = someone_pushes(b"their weights", "someone else's model")
        second, _ = _run(hub_config, artifacts, train={"max_steps": 3}, gate={"enabled": False})
        assert second["push"]["state"] == "Skipped" and "someone else pushed" in second["push"]["reason"]
        assert hub.head("test-user/m") == other

        # A person accepts their commit as the lineage's head; then a push lands between the read and the commit.
        root = open_root(artifacts)
        last = read_promotions(root, "hub-test-user--m").last
        record_promotion(root, "hub-test-user--m", last.model_copy(update={"hub": {**last.hub, "commit": other}}))
        real_save = tasks.push.save_release

        def save_then_someone_pushes(*args, **kwargs):
            out = real_save(*args, **kwargs)
            someone_pushes(b"their newer weights", "a push in between")
            return out

        monkeypatch.setattr(tasks.push, "save_release", save_then_someone_pushes)
        third, summary = _run(hub_config, artifacts, train={"max_steps": 4}, gate={"enabled": False})
        assert third["push"]["state"] == "Skipped" and "moved since the gate" in third["push"]["reason"]
        assert hub.commits[-1]["message"] == "a push in between" and hub.head("test-user/m") == hub.commits[-1]["oid"]


# ------------------------------------------------------------------------ 6. the promoted model is kept

@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_with_its_cache_entry_discarded_a_lineage_still_gates_against_its_promoted_model(hub_config, artifacts):
    """The train entry of the promoted model is discarded (as `cpt cache verify --discard` or an eviction does)
    and the release folder is gone (a host that never had it, or a user cleaned it). The next run is still
    compared with the promoted model (its kept copy) and, better, promoted over it."""
    import shutil

    from tasks.core.root import open_root
    from tasks.line.promotions import read_promotions

    config = {**hub_config, "push": {"name": "kept-test"}}
    first, _ = _run(config, artifacts)
    assert first["push"]["state"] == "Completed"
    root = open_root(artifacts)
    promoted = read_promotions(root, "name-kept-test").last
    root.discard_entry(root.path(promoted.model_path.rsplit("/", 1)[0]))
    shutil.rmtree(artifacts / "models" / "kept-test")
    second, _ = _run(config, artifacts, train={"max_steps": 24})
    g = second["gate"]["counts"]
    assert g["reference"] == "promoted", "with its train entry gone the gate compared with the base model"
    assert g["reference_validation_perplexity"] == first["gate"]["counts"]["validation_perplexity"]
    assert g["promoted"] and second["push"]["state"] == "Completed"
    assert read_promotions(root, "name-kept-test").last.reference["digest"] == promoted.model_digest


@pytest.mark.slow
def test_a_kept_model_is_fetched_on_another_host_only_as_it_was_kept(s3_endpoint, tmp_path, monkeypatch):
    from tasks.core.root import open_root
    from tasks.line.kept import keep, kept_model, kept_rel
    from tasks.ml.modeling import model_digest

    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    url = f"s3://{new_bucket(s3_endpoint)}/team"
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"promoted weights" * 100)
    (model / "config.json").write_text("{}")
    digest = model_digest(model)
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "host-a"))
    keep(open_root(url), "line-a", model, digest)
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "host-b"))
    got = kept_model(open_root(url), "line-a", digest)
    assert got is not None and model_digest(got) == digest
    fs, base = _s3fs(s3_endpoint), url.removeprefix("s3://")
    fs.pipe_file(f"{base}/{kept_rel('line-a', digest)}/model.safetensors", b"PROMOTED weights" * 100)  # same size
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "host-c"))
    assert kept_model(open_root(url), "line-a", digest) is None  # never the tampered bytes


# ------------------------------------------------------------------------------------------------ 7.

@pytest.mark.slow
def test_an_arrow_file_from_the_store_that_would_crash_a_reader_is_damage(s3_endpoint, tmp_path, monkeypatch,
                                                                          caplog):
    """A bucket writer replaces an entry's Arrow file by one whose string offsets point 1 GiB past its data (the
    manifest's size and digest made to match). Memory-mapped and read unchecked, it crashes the process
    (SIGSEGV); fetched, it is validated in full first: a damaged entry, discarded and rebuilt."""
    import numpy as np
    import pyarrow as pa

    from tasks.core.manifest import hash_file
    from tasks.core.root import open_root

    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    url = f"s3://{new_bucket(s3_endpoint)}/team"

    def build(tmp: Path):
        table = pa.table({"text": ["a", "bb", "ccc"]})
        with pa.OSFile(str(tmp / "x.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        return {"n": 3}, {}

    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "host-a"))
    a = open_root(url)
    out, _ = a.publish("unit", "unit-arrow", build)
    crafted = tmp_path / "crafted.arrow"
    good = (out.dir(a) / "x.arrow").read_bytes()
    old = np.array([0, 1, 3, 6], dtype=np.int32).tobytes()
    crafted.write_bytes(good.replace(old, np.array([0, 1, 3, 1 << 30], dtype=np.int32).tobytes()))
    fs, base = _s3fs(s3_endpoint), url.removeprefix("s3://")
    manifest = json.loads(fs.cat_file(f"{base}/{out.path}/_COMPLETE"))
    manifest["digests"]["x.arrow"] = hash_file(crafted)
    fs.pipe_file(f"{base}/{out.path}/x.arrow", crafted.read_bytes())
    fs.pipe_file(f"{base}/{out.path}/_COMPLETE", json.dumps(manifest).encode())

    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "host-b"))
    b = open_root(url)
    with cpt_warnings(caplog):
        path = b.file(out.path, "x.arrow")
    assert not path.exists(), "the crafted Arrow file reached the mirror"
    assert "not a valid Arrow file" in caplog.text and out.path in caplog.text
    rebuilt, built = b.publish("unit", "unit-arrow", build)
    assert built and pa.ipc.open_file(str(rebuilt.dir(b) / "x.arrow")).read_all()["text"].to_pylist() == [
        "a", "bb", "ccc"]


def test_the_evaluation_key_follows_the_revision_of_a_registry_tasks_dataset(tmp_path, monkeypatch):
    """A registry task's results depend on its dataset's revision: the snapshot the Hub cache holds (offline)
    is in the key, so a new snapshot re-evaluates instead of reusing results of the old data."""
    import tasks.ml.lm_tasks as lm_tasks
    from huggingface_hub import constants
    from tasks.core.config.model import EvaluateConfig
    from tasks.evaluate import task_fingerprint

    monkeypatch.setattr(lm_tasks, "_registry_index", lambda: {
        "kormedmcqa": {"datasets": [], "members": ["kormedmcqa_doctor"]},
        "kormedmcqa_doctor": {"datasets": [["sean0042/KorMedMCQA", "doctor", None]], "members": []}})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    cfg = EvaluateConfig(tasks=["kormedmcqa"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the revision is the cached snapshot's, no request
    ref = tmp_path / "hub" / "datasets--sean0042--KorMedMCQA" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    first = task_fingerprint(cfg).digest
    assert task_fingerprint(cfg).digest == first
    ref.write_text("b" * 40)
    assert task_fingerprint(cfg).digest != first
    assert lm_tasks.registry_revisions(["kormedmcqa"]) == [("kormedmcqa_doctor:sean0042/KorMedMCQA/doctor",
                                                            "cached:" + "b" * 40)]


@pytest.mark.parametrize("line", ["../escape", "a/b", "", ".hidden"])
def test_a_line_name_is_checked_before_any_lock_is_named_by_it(line, tmp_path):
    from tasks.line.lines import run_lock

    with pytest.raises(ValueError, match="not a valid line name"):
        run_lock(line)


def test_a_store_lock_name_that_leaves_its_folder_is_refused_before_any_request(tmp_path):
    from tasks.core.objectstore import Lock

    class NoRequests:  # any request would fail the test
        def __getattr__(self, name):
            raise AssertionError(f"a request ({name}) was made")

    store = type("S", (), {"remote": lambda self, rel: f"b/{rel}", "fs": NoRequests(), "lease": 60.0})()
    for bad in ("../x", "/etc/x", "a//b", ""):
        with pytest.raises(ValueError):
            Lock(store, bad)


@pytest.mark.slow
def test_the_line_run_lock_is_fenced_a_lapsed_lease_stops_what_runs_under_it(s3_endpoint, tmp_path, monkeypatch):
    """The line's run lock is a store lease like a build lock's: when its renewals fail past the lease, what runs
    under it (a stage build, a training child) stops at its next check, and no state is written back."""
    import time

    from tasks.core import fence
    from tasks.core.objectstore import LockLost
    from tasks.core.root import open_root
    from tasks.line import lines

    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CPT_STORE_LEASE_SECONDS", "1.5")
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "host-a"))
    root = open_root(f"s3://{new_bucket(s3_endpoint)}/team")
    store = root.store
    real = store.fs.pipe_file
    with pytest.raises(LockLost, match="lapsed"):
        with root.exclusive(lines.run_lock("night")):
            monkeypatch.setattr(store.fs, "pipe_file", lambda path, value, **kw: (_ for _ in ()).throw(
                PermissionError("ExpiredToken")) if "/locks/" in path else real(path, value, **kw))
            started = time.monotonic()
            while time.monotonic() - started < 30:
                fence.check()  # what a stage build does between pieces
                time.sleep(0.05)
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_a_store_that_does_not_refuse_a_second_create_is_refused_at_start(s3_endpoint, tmp_path, monkeypatch):
    import tasks.core.root as root_module
    from tasks.core.config.base import ConfigError
    from tasks.core.objectstore import Store

    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CPT_SCRATCH", str(tmp_path / "host"))
    url = f"s3://{new_bucket(s3_endpoint)}/team"
    assert root_module.open_root(url).store is not None  # this server honours it
    real_init = Store.__init__

    def careless(self, *a, **k):  # a store that ignores If-None-Match: *
        real_init(self, *a, **k)
        put = self.fs.pipe_file
        self.fs.pipe_file = lambda path, value, mode="overwrite", **kw: put(path, value, **kw)

    monkeypatch.setattr(Store, "__init__", careless)
    monkeypatch.setattr("tasks.core.locks._PROBED", {})
    with pytest.raises(ConfigError, match="accepted a second create"):
        root_module.open_root(url).store
    monkeypatch.setenv("CPT_STORE_WITHOUT_CONDITIONAL_CREATE", "1")
    assert root_module.open_root(url).store is not None
