"""The flow end to end in a real Prefect run (one harness per session, one artifacts root per test)."""

import json
import shutil
from pathlib import Path

import pytest

from helpers import run_flow as run
from helpers import sample_texts, write_jsonl
from tasks.core.config.tree import validate_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]
DATA_STAGES = ["load", "shuffle", "tokenize", "token-stats", "chunk"]


@pytest.fixture
def corpus(tmp_path):
    texts = sample_texts(80)
    write_jsonl(tmp_path / "corpus" / "part-1.jsonl", [{"content": t} for t in texts[:50]])
    write_jsonl(tmp_path / "corpus" / "part-2.jsonl", [{"content": t} for t in texts[50:]])
    return tmp_path / "corpus"


@pytest.fixture
def config(corpus, tiny_model):
    return {"corpus": {"paths": [str(corpus)]}, "model": {"id": str(tiny_model)},
            "split": {"validation_fraction": 0.1}, "chunk": {"max_seq_length": 64, "overlap": 16}}


def test_first_run_computes_and_identical_rerun_is_all_cached(config, artifacts):
    states, summary = run(config, artifacts)
    assert states == dict.fromkeys(DATA_STAGES, "Completed")
    states, again = run(config, artifacts)
    assert states == dict.fromkeys(DATA_STAGES, "Cached")
    assert [s["key"] for s in again["stages"]] == [s["key"] for s in summary["stages"]]

    on_disk = json.loads((artifacts / "runs" / again["flow_run"] / "summary.json").read_text())
    assert on_disk["config"]["chunk"]["max_seq_length"] == 64 and on_disk["status"] == "Completed"
    for stage in on_disk["stages"]:
        assert set(stage) >= {"name", "state", "seconds", "key", "output", "counts"}
        assert stage["output"].endswith(f"cache/{stage['name']}/{stage['key']}")


def test_changed_chunk_length_recomputes_only_what_depends_on_it(config, artifacts):
    run(config, artifacts)
    states, _ = run(config, artifacts, chunk__max_seq_length=48)
    assert states == {"load": "Cached", "shuffle": "Cached", "tokenize": "Cached",
                      "token-stats": "Completed", "chunk": "Completed"}


def test_edited_corpus_file_recomputes_everything(config, artifacts, corpus):
    run(config, artifacts)
    with open(corpus / "part-2.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"content": "새로 추가된 문서입니다. 혈압은 매일 같은 시간에 잰다."}, ensure_ascii=False) + "\n")
    states, summary = run(config, artifacts)
    assert states == dict.fromkeys(DATA_STAGES, "Completed")
    assert summary["stages"][0]["counts"]["documents"] == 81


def test_deleted_chunk_output_recomputes_chunk_only(config, artifacts):
    _, summary = run(config, artifacts)
    shutil.rmtree(summary["stages"][-1]["output"])
    states, again = run(config, artifacts)
    assert states == {**dict.fromkeys(DATA_STAGES[:-1], "Cached"), "chunk": "Completed"}
    assert again["stages"][-1]["key"] == summary["stages"][-1]["key"]


def test_half_written_output_is_a_miss(config, artifacts):
    from tasks.core.manifest import MANIFEST

    _, summary = run(config, artifacts)
    (Path(summary["stages"][1]["output"]) / MANIFEST).unlink()  # as if the copy had stopped halfway
    states, _ = run(config, artifacts)
    assert states["load"] == "Cached" and states["shuffle"] == "Completed" and states["tokenize"] == "Cached"


def test_failure_inside_a_stage_leaves_no_cache_entry_and_no_temp_dir(config, artifacts, monkeypatch):
    import tasks.chunk

    real = tasks.chunk.window_rows

    def crash_midway(*args, **kwargs):
        real(*args, **kwargs)  # writes a window table, then dies before the stage completes
        raise RuntimeError("disk full")

    monkeypatch.setattr(tasks.chunk, "window_rows", crash_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        run(config, artifacts)
    for stage in ("chunk", "chunk-part"):
        assert [p.name for p in (artifacts / "cache" / stage).glob("*") if not p.name.startswith(".lock-")] == []
    assert not [r for r in (artifacts / "cache" / "_records").iterdir() if r.name.startswith("chunk-")]
    failed = json.loads(next((artifacts / "runs").glob("*/summary.json")).read_text())
    assert failed["status"] == "Failed" and failed["stages"][-1]["state"] == "Failed"

    monkeypatch.setattr(tasks.chunk, "window_rows", real)
    states, _ = run(config, artifacts)
    assert states == {**dict.fromkeys(DATA_STAGES[:-1], "Cached"), "chunk": "Completed"}


def test_leftover_temp_dir_of_a_killed_run_is_cleaned(config, artifacts):
    _, summary = run(config, artifacts, until="tokenize")
    states, summary = run(config, artifacts)
    key = summary["stages"][-1]["key"]
    shutil.rmtree(summary["stages"][-1]["output"])
    debris = artifacts / "cache" / "chunk" / f".tmp-{key}-999999999-deadbeef"
    debris.mkdir(parents=True)
    (debris / "data-00000-of-00001.arrow").write_bytes(b"half")
    states, _ = run(config, artifacts)
    assert states["chunk"] == "Completed" and not debris.exists()


def test_until_stops_after_the_named_stage(config, artifacts):
    states, summary = run(config, artifacts, until="shuffle")
    assert list(states) == ["load", "shuffle"]
    assert not (artifacts / "cache" / "tokenize").exists()


def test_bad_record_fails_the_run_with_its_place(config, artifacts, corpus):
    (corpus / "part-3.jsonl").write_text('{"content": "ok"}\n{"content": 7}\n', encoding="utf-8")
    from tasks.data.records import BadRecordError

    with pytest.raises(BadRecordError, match=r"part-3.jsonl:2: field 'content' is int"):
        run(config, artifacts)
    assert not list((artifacts / "cache" / "load").glob("load-*"))

    states, summary = run(config, artifacts, corpus__on_bad_record="skip")
    load = summary["stages"][0]
    assert load["counts"]["rejected"] == 1
    rejects = (artifacts / "cache" / "load" / load["key"] / "rejects.jsonl").read_text().splitlines()
    assert json.loads(rejects[0])["source"] == f"{corpus / 'part-3.jsonl'}:2"  # the real path, as read


def test_chunk_output_is_windows_into_the_tokens_matching_its_counts(config, artifacts):
    from tasks.chunk import Chunks
    from tasks.core.manifest import read_manifest
    from tasks.core.root import open_root

    _, summary = run(config, artifacts)
    stages = {s["name"]: s for s in summary["stages"]}
    chunks = Chunks.model_validate(read_manifest(Path(stages["chunk"]["output"])).model_dump())
    root = open_root(artifacts)
    # Windows, not rows: the entry holds one small table per split and refers to the token pieces.
    assert sorted(chunks.files) == ["train.arrow", "validation.arrow"]
    assert chunks.deps and all(d.startswith("cache/tokenize-file/") for d in chunks.deps)
    rows = {split: [r for b in chunks.row_batches(root, split) for r in b.to_pylist()]
            for split in ("train", "validation")}
    # The ids in the narrowest type the vocabulary allows; labels are derived (no column).
    assert next(chunks.row_batches(root, "train")).schema.field("input_ids").type.value_type == "uint16"
    counts = stages["chunk"]["counts"]
    assert len(rows["train"]) == counts["train_chunks"] and len(rows["validation"]) == counts["validation_chunks"]
    assert sum(len(r["input_ids"]) for r in rows["train"]) == counts["train_tokens"]
    assert max(len(r["input_ids"]) for r in rows["train"]) <= 64
    # No document in both splits.
    assert not {r["doc_id"] for r in rows["train"]} & {r["doc_id"] for r in rows["validation"]}
    # token-stats predicted the chunk rows exactly.
    assert stages["token-stats"]["counts"]["train_chunks_count"] == counts["train_chunks"]
    out = stages["token-stats"]["output"]
    svg = (Path(out) / "histogram.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 4  # train and validation, documents and chunks


def test_cli_run_writes_the_summary_copy(config, artifacts, tmp_path, monkeypatch):
    import yaml

    from flows.cli import main

    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    rc = main(["run", "--config", str(cfg_path), "--set", "chunk.overlap=8", "--until", "chunk",
               "--artifacts", str(artifacts), "--summary", str(tmp_path / "out" / "summary.json")])
    assert rc == 0
    copy = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert copy["config"]["chunk"]["overlap"] == 8 and [s["name"] for s in copy["stages"]] == DATA_STAGES
    assert (artifacts / "runs" / copy["flow_run"] / "summary.json").exists()


def test_a_process_freezes_its_long_lived_objects_once_before_its_first_stage(config, artifacts, monkeypatch):
    """The first flow of a process moves what its imports made out of the cyclic collector's way (gc.freeze:
    a full collection walked ~550k objects, 0.1 s in the middle of a drop's load stage) before any stage runs;
    a later flow in the same process freezes nothing, so what earlier runs left is still collected."""
    from tasks.core import heap
    from tasks import load as load_module

    calls = []
    monkeypatch.setattr(heap, "_FROZEN", False)
    monkeypatch.setattr(heap.gc, "freeze", lambda: calls.append("freeze"))
    real = load_module.load_pieces
    monkeypatch.setattr(load_module, "load_pieces", lambda *a, **k: calls.append("load") or real(*a, **k))
    run(config, artifacts, until="load")
    shutil.rmtree(artifacts)
    run(config, artifacts, until="load")
    assert calls == ["freeze", "load", "load"]


def test_artifacts_root_from_environment(config, tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_ARTIFACTS", str(tmp_path / "elsewhere"))
    from flows.continued_pretraining import continued_pretraining

    summary = continued_pretraining(config=validate_config(config), until="load")
    assert summary["stages"][0]["output"].startswith(str(tmp_path / "elsewhere"))


def test_run_shows_progress_stats_and_summary_artifacts_in_prefect(config, artifacts, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, \
        FlowRunFilterName

    _, quick = run(config, artifacts)  # every stage under PROGRESS_ARTIFACT_SECONDS: no progress bars
    shutil.rmtree(artifacts)
    monkeypatch.setenv("CPT_PROGRESS_ARTIFACT_SECONDS", "0")  # as a stage that runs long
    _, computed = run(config, artifacts)
    _, cached = run(config, artifacts)  # every stage Cached: the run must still show what it holds
    for summary, progress_bars in ((quick, 0), (computed, 3), (cached, 0)):
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[summary["flow_run"]])))[0]
            arts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
        by_type = {}
        for a in arts:
            by_type.setdefault(a.type, []).append(a)
        # Live progress (load, tokenize, chunk) exists only where the work ran.
        assert len(by_type.get("progress", [])) == progress_bars
        assert all(a.data == 100.0 for a in by_type.get("progress", []))
        assert any(a.key == "token-stats" for a in by_type["table"])
        markdown = {a.key: a.data for a in by_type["markdown"]}
        assert "data:image/svg+xml;base64," in markdown["token-stats-histogram"]
        state = "Cached" if summary is cached else "Completed"
        assert f"| chunk | {state} |" in markdown["run-summary"]


def test_each_stage_task_run_names_the_task_runs_it_took_its_inputs_from(config, artifacts):
    """The Prefect UI draws a run's graph from each task run's inputs: shuffle and tokenize took load's
    documents, token-stats and chunk tokenize's tokens and shuffle's split. The runner passes inputs unexamined
    past their top (a deep visit of every config and manifest cost each stage milliseconds), and that must keep
    the links."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, TaskRunFilter, TaskRunFilterFlowRunId

    _, summary = run(config, artifacts)
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[summary["flow_run"]])))[0]
        task_runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run.id])))
    by_name = {t.name.rsplit("-", 1)[0]: t for t in task_runs}
    ids = {name: t.id for name, t in by_name.items()}
    taken = {name: {i.id for inputs in t.task_inputs.values() for i in inputs} for name, t in by_name.items()}
    assert taken["shuffle"] == taken["tokenize"] == {ids["load"]}
    assert taken["token-stats"] == taken["chunk"] == {ids["tokenize"], ids["shuffle"]}
    assert not taken["load"]  # the corpus fingerprint and config come from the flow, not a task


def test_a_list_input_links_every_task_run_it_holds_and_reaches_the_task_as_itself():
    """mix takes every source's chunks as one list: the runner's `unwalked` passes each item opaque, so each
    still links its producer in the UI's graph, and the task gets the list of the values themselves."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    from flows.continued_pretraining import unwalked

    @task
    def make(i: int) -> dict:
        return {"i": i}

    @task
    def take(items: list, config: dict) -> list:
        return [type(x).__name__ for x in items] + [type(config).__name__]

    @flow
    def pipeline():
        a, b = make(1), make(2)
        return take(**{"items": unwalked([a, b]), "config": unwalked({"seed": 1})})

    state = pipeline(return_state=True)
    assert state.result() == ["dict", "dict", "dict"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    made = {t.id for t in runs if t.name.startswith("make")}
    taker = next(t for t in runs if t.name.startswith("take"))
    assert len(made) == 2 and {i.id for i in taker.task_inputs["items"]} == made


def test_a_new_file_is_the_only_one_read_and_tokenized(config, artifacts, corpus):
    _, before = run(config, artifacts)
    write_jsonl(corpus / "part-3.jsonl", [{"content": t} for t in sample_texts()[80:120]])
    states, after = run(config, artifacts)
    assert states == dict.fromkeys(DATA_STAGES, "Completed")
    load, tokenize = after["stages"][0]["counts"], after["stages"][2]["counts"]
    assert (load["files"], load["files_read"], load["documents"]) == (3, 1, 120)
    assert (tokenize["files_tokenized"], tokenize["files_cached"]) == (1, 2)
    # token-stats measures only the new file, and its statistics are exactly those of a cold run on all three.
    stats = after["stages"][3]
    assert (stats["counts"]["files_measured"], stats["counts"]["files_cached"]) == (1, 2)
    _, cold = run(config, corpus.parent / "cold-artifacts")
    assert cold["stages"][3]["counts"]["files_measured"] == 3
    assert (Path(stats["output"]) / "stats.json").read_text() == \
        (Path(cold["stages"][3]["output"]) / "stats.json").read_text()


def test_split_and_chunks_do_not_depend_on_how_files_are_cut(config, artifacts, corpus, tmp_path):
    """The same documents in one file or in two give the same splits and the same training rows."""
    from helpers import chunk_entry_rows

    _, two_files = run(config, artifacts)
    whole = tmp_path / "whole"
    write_jsonl(whole / "all.jsonl", [{"content": t} for t in sample_texts(80)])
    _, one_file = run({**config, "corpus": {"paths": [str(whole)]}}, tmp_path / "other-artifacts")
    a, b = (chunk_entry_rows(s["stages"][-1]["output"], art)
            for s, art in ((two_files, artifacts), (one_file, tmp_path / "other-artifacts")))
    for split in ("train", "validation"):
        rows = [sorted((r["doc_id"], r["start"], r["input_ids"], r["trained_from"]) for r in d[split]) for d in (a, b)]
        assert rows[0] == rows[1] and rows[0]


def test_moved_corpus_reads_nothing_and_every_stage_below_load_is_cached(config, artifacts, corpus, tmp_path):
    _, first = run(config, artifacts)
    moved = tmp_path / "another" / "place"
    shutil.copytree(corpus, moved)
    states, again = run({**config, "corpus": {"paths": [str(moved)]}}, artifacts)
    # load re-assembles (its `source` column holds the new paths) from cached pieces; what it feeds the
    # stages below is the same content, so they stay Cached.
    assert states == {"load": "Completed", **dict.fromkeys(DATA_STAGES[1:], "Cached")}
    assert again["stages"][0]["counts"]["files_read"] == 0
    assert [s["key"] for s in again["stages"][1:]] == [s["key"] for s in first["stages"][1:]]
    from tasks.data.pieces import entry_documents

    sources = entry_documents(Path(again["stages"][0]["output"]), artifacts).column("source").to_pylist()
    assert all(s.startswith(str(moved)) for s in sources)


def test_a_validation_document_copied_into_a_drop_never_reaches_training(config, artifacts, corpus, tmp_path):
    """A later drop holds copies of validation documents, re-wrapped (other spaces and line breaks). With
    near-dedup off they are held out of training by shuffle (the same text after normalisation as a validation
    document); on (the default), load already removes them as near-duplicates of the documents they copy."""
    from tasks.data.arrow import read_arrow
    from tasks.data.pieces import entry_documents

    config = {**config, "corpus": {**config["corpus"], "near_dedup": {"enabled": False}}}
    _, first = run(config, artifacts, until="shuffle")
    load_dir, split_dir = (Path(s["output"]) for s in first["stages"])
    docs = entry_documents(load_dir, artifacts)
    text_of = dict(zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist()))
    validation = read_arrow(split_dir / "validation.arrow").column("doc_id").to_pylist()
    assert len(validation) >= 5
    copies = [" ".join(text_of[d].split()).replace(" ", "\n ", 1) + "  " for d in validation]
    write_jsonl(tmp_path / "drop" / "d.jsonl", [{"content": t} for t in copies])
    both = [str(corpus), str(tmp_path / "drop")]
    _, on = run({**config, "corpus": {"paths": both}}, artifacts, until="shuffle")
    assert on["stages"][0]["counts"]["near_duplicates"] == len(copies)
    train = set(read_arrow(Path(on["stages"][1]["output"]) / "train.arrow").column("doc_id").to_pylist())
    docs = entry_documents(Path(on["stages"][0]["output"]), artifacts)
    assert not set(docs.column("text").to_pylist()) & set(copies) and len(train) == len(docs) - len(validation)
    _, after = run({**config, "corpus": {**config["corpus"], "paths": both}}, artifacts, until="shuffle")
    load_dir, split_dir = (Path(s["output"]) for s in after["stages"])
    docs = entry_documents(load_dir, artifacts)
    copy_ids = {d for d, t in zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist()) if t in copies}
    assert len(copy_ids) == len(copies)  # different exact text: not removed as exact duplicates
    train = set(read_arrow(split_dir / "train.arrow").column("doc_id").to_pylist())
    assert not copy_ids & train
    # Validation holds the same texts as before (one document per normalised text), no more.
    from tasks.data.records import norm_id_of

    after_validation = read_arrow(split_dir / "validation.arrow")
    assert sorted(after_validation.column("norm_id").to_pylist()) == sorted(norm_id_of(text_of[d]) for d in validation)
    assert after["stages"][1]["counts"]["validation_copies_held_out"] == len(copies)


def test_a_stage_rerun_with_identical_output_leaves_the_stages_below_cached(config, artifacts, monkeypatch):
    """Early cut-off: tokenize's code version is bumped (its key changes, it reruns every file) but the
    tokens it writes are byte-identical, so token-stats and chunk, keyed by its content, stay Cached. A bump
    that does change the output (another EOS) reruns them."""
    import dataclasses

    from tasks import tokenize as tokenize_module
    from tasks.core import keys

    run(config, artifacts)
    spec = keys._SPECS["tokenize-file"]
    monkeypatch.setitem(keys._SPECS, "tokenize-file", dataclasses.replace(spec, version=spec.version + 1))
    keys._VERSIONS.clear()
    states, summary = run(config, artifacts)
    assert states == {"load": "Cached", "shuffle": "Cached", "tokenize": "Completed",
                      "token-stats": "Cached", "chunk": "Cached"}
    assert summary["stages"][2]["counts"]["files_tokenized"] == 2

    real_encode = tokenize_module.encode_batch
    monkeypatch.setattr(tokenize_module, "encode_batch",
                        lambda tok, texts, eos_id, *rest, **kw: real_encode(tok, texts, eos_id + 1, *rest, **kw))
    monkeypatch.setitem(keys._SPECS, "tokenize-file", dataclasses.replace(spec, version=spec.version + 2))
    keys._VERSIONS.clear()
    states, _ = run(config, artifacts)
    assert states == {"load": "Cached", "shuffle": "Cached", "tokenize": "Completed",
                      "token-stats": "Completed", "chunk": "Completed"}
    keys._VERSIONS.clear()


@pytest.mark.parametrize("runner", ["threads", "processes", "dask"])
def test_every_task_runner_gives_the_same_keys_and_outputs(config, artifacts, tmp_path, runner):
    """runtime.task_runner only changes where the per-file pieces run: the pieces appear as their own task runs,
    and every stage's key and content is the sequential path's."""
    from prefect.client.orchestration import get_client

    _, sequential = run(config, tmp_path / "sequential")
    _, fanned = run(config, artifacts, runtime__task_runner=runner, runtime__max_workers=2)
    assert [(s["name"], s["key"]) for s in fanned["stages"]] == [(s["name"], s["key"]) for s in sequential["stages"]]

    def contents(root, summary):
        from tasks.core.manifest import read_manifest

        return {s["name"]: read_manifest(Path(s["output"])).content for s in summary["stages"]}

    assert contents(artifacts, fanned) == contents(tmp_path / "sequential", sequential)
    assert fanned["stages"][0]["counts"]["files_read"] == 2

    async def piece_runs():
        async with get_client() as client:
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fanned_id])))
            return sorted(r.name for r in runs)

    import asyncio

    from prefect.client.orchestration import get_client as _  # noqa: F401

    fanned_id = _flow_run_id(fanned)
    names = asyncio.run(piece_runs())
    for piece in ("load-file", "tokenize-file", "chunk-part"):
        assert sum(n.startswith(piece) for n in names) == 2, names


def test_one_task_runner_serves_every_fanned_out_stage_of_a_run_and_a_cached_run_starts_none(config, artifacts,
                                                                                              monkeypatch):
    from tasks.core import fanout

    started = []
    real = fanout.task_runner

    def counting(runtime):
        started.append(runtime.task_runner)
        return real(runtime)

    monkeypatch.setattr(fanout, "task_runner", counting)
    states, _ = run(config, artifacts, runtime__task_runner="threads", runtime__max_workers=2)
    assert states == dict.fromkeys(DATA_STAGES, "Completed")
    assert started == ["threads"]  # load, tokenize and chunk each fanned out 2 pieces, on one runner
    states, _ = run(config, artifacts, runtime__task_runner="threads", runtime__max_workers=2)
    assert states == dict.fromkeys(DATA_STAGES, "Cached") and started == ["threads"]


def _flow_run_id(summary):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    async def find():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[summary["flow_run"]])))
            return runs[0].id

    return asyncio.run(find())


def test_the_runner_follows_the_pipeline_list_and_stops_after_until(tmp_path):
    """The flow's order is the list's: a pipeline stage called before one listed ahead of it fails, naming both;
    with `until`, no pipeline stage after it runs (a side stage may, when forced: replay's data stages)."""
    import types

    from flows.continued_pretraining import StageRunner
    from flows.stages import PIPELINE
    from tasks.core.root import open_root

    ran = []

    class Task:
        def __init__(self, name):
            self.name = name

        def with_options(self, **_):
            def call(**inputs):
                ran.append(self.name)
                out = types.SimpleNamespace(key=f"{self.name}-k", path=f"cache/{self.name}/k", counts={},
                                            location=lambda root: "", links=lambda root: {}, show=lambda root: None)
                return types.SimpleNamespace(name="Completed", result=lambda: out)
            return call

    run = StageRunner(open_root(tmp_path / "a"), "tokenize")
    for name in PIPELINE:
        run(Task(name))
    assert ran == ["load", "shuffle", "tokenize"] and run.stopped
    assert run(Task("mix"), "mix", force=True) is not None and ran[-1] == "mix"
    assert run(Task("mix"), "mix") is None

    run = StageRunner(open_root(tmp_path / "b"), None)
    run(Task("chunk"))
    with pytest.raises(RuntimeError, match="'tokenize' after 'chunk'"):
        run(Task("tokenize"))
