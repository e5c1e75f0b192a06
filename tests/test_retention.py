"""Retention: what garbage collection keeps (releases, each line's next run, pins, running builds, the young) and
what it deletes (least recently used first down to the budget, else what is unused for keep_days), on a root made
by hand (fast); the flow-level checks (GC never makes the next run recompute, a vanished input is rebuilt, after
each retrain run) are marked slow."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tasks.core.config.retention import RetentionConfig
from tasks.core.entries import key_lock
from tasks.core.holds import RunHold
from tasks.core.root import EntryUnavailable, open_root
from tasks.line import lines
from tasks.line.promotions import Promotion, Promotions
from tasks.line.retention import collect, pin, usage

DAY = 86400


def policy(**kw) -> RetentionConfig:
    return RetentionConfig(**{"min_age": 0, **kw})


class Root:
    """A local root filled by hand: entries (with pieces), run summaries, promotions, line states."""

    def __init__(self, base: Path):
        self.base = base
        self.root = open_root(base)
        self.n = 0

    def entry(self, stage: str, size: int = 1000, deps: list[str] = (), age_days: float = 0.0) -> str:
        self.n += 1
        key = f"{stage}-{self.n:024x}"

        def build(tmp):
            (tmp / "data.bin").write_bytes(os.urandom(size))
            return {}, {}, {"deps": list(deps)}

        out, _ = self.root.publish(stage, key, build)
        (self.root.records_dir).mkdir(parents=True, exist_ok=True)
        (self.root.records_dir / key).write_text("{}")
        self.age(out.path, age_days)
        return out.path

    def age(self, rel: str, days: float) -> None:
        t = time.time() - days * DAY
        for p in [*(self.base / rel).rglob("*"), self.base / rel]:
            os.utime(p, (t, t))

    def run(self, name: str, stages: dict[str, str], age_days: float = 0.0, **extra) -> None:
        """A run summary naming `stages` (name -> entry rel)."""
        path = self.base / "runs" / name / "summary.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"flow_run": name, "stages": [
            {"name": n, "key": rel.rsplit("/", 1)[-1], "state": "Completed"} for n, rel in stages.items()], **extra}))
        t = time.time() - age_days * DAY
        os.utime(path, (t, t))

    def promoted(self, lineage: str, *records: tuple[str, str, str]) -> None:
        """(model digest, train entry rel, run) per promotion, oldest first."""
        history = [Promotion(model_digest=d, model_path=f"{rel}/model", train_identity=d, parent={}, reference={},
                             flow_run=run) for d, rel, run in records]
        path = self.base / "state" / "promotions" / f"{lineage}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Promotions(lineage=lineage, last=history[-1], history=history).model_dump_json())

    def line(self, name: str, last_run: str) -> None:
        path = self.base / lines.state_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(lines.LineState(line=name, last_training={"pipeline_run": last_run, "corpus": "c"})
                        .model_dump_json())

    def exists(self, rel: str) -> bool:
        return (self.base / rel / "_COMPLETE").is_file()


@pytest.fixture
def made(tmp_path, monkeypatch):
    # The stand-in entries carry no stage's meta: published and read as plain StageOutput, whichever stage modules
    # (and so typed manifests, tasks.core.manifest.register_output) an earlier test imported.
    monkeypatch.setattr("tasks.core.manifest._OUTPUT_TYPES", {})
    return Root(tmp_path / "artifacts")


def season_root(r: Root) -> dict[str, str]:
    """Three nights of one line: run-1 and run-2 promoted, run-3 refused; the line's last training is run-3,
    which started from run-2's model. Pieces are shared between nights. Everything is a week old."""
    piece_a, piece_b, piece_c = (r.entry("load-file", deps=[], age_days=7) for _ in range(3))
    e = {"piece_a": piece_a, "piece_b": piece_b, "piece_c": piece_c}
    for night, pieces in ((1, [piece_a]), (2, [piece_a, piece_b]), (3, [piece_a, piece_b, piece_c])):
        e[f"load{night}"] = r.entry("load", deps=pieces, age_days=7)
        e[f"chunk{night}"] = r.entry("chunk", age_days=7)
        e[f"train{night}"] = r.entry("train", size=5000, age_days=7)
        e[f"eval{night}"] = r.entry("evaluate", age_days=7)
        e[f"gate{night}"] = r.entry("gate", age_days=7)
        stages = {"load": e[f"load{night}"], "chunk": e[f"chunk{night}"], "train": e[f"train{night}"],
                  "evaluate": e[f"eval{night}"], "gate": e[f"gate{night}"]}
        if night < 3:
            e[f"push{night}"] = stages["push"] = r.entry("push", age_days=7)
        parent = {"kind": "promoted", "digest": "2" * 32} if night == 3 else {"kind": "base"}
        r.run(f"run-{night}", stages, age_days=7, parent=parent)
    r.promoted("line-nightly", ("1" * 32, e["train1"], "run-1"), ("2" * 32, e["train2"], "run-2"))
    r.line("nightly", "run-3")
    return e


def test_gc_keeps_releases_the_lines_next_run_and_their_pieces_and_deletes_the_rest(made):
    e = season_root(made)
    old = made.entry("tokenize", size=3000, age_days=40)  # unreferenced, named by no run
    report = collect(made.root, policy(max_bytes=0, keep_releases=1))
    deleted = {r["rel"]: r["why"] for r in report["deleted"]}
    # The last release (run-2) with its evaluation, gate and card; the line's next run (everything of run-3,
    # and run-2's model it started from); the pieces run-3's load refers to.
    for kept in ("train2", "eval2", "gate2", "push2", "load3", "chunk3", "train3", "eval3", "gate3",
                 "piece_a", "piece_b", "piece_c"):
        assert made.exists(e[kept]), kept
    # Release 1 is past keep_releases=1; nights 1 and 2's data entries are nobody's; the refused model of
    # night 3 is kept only because the line's next run looks it up (its last training).
    for gone in ("train1", "eval1", "gate1", "push1", "load1", "load2", "chunk1", "chunk2"):
        assert not made.exists(e[gone]) and e[gone] in deleted, gone
    assert old in deleted and "over retention.max_bytes=0 B" in deleted[old]
    assert not (made.root.records_dir / old.rsplit("/", 1)[1]).exists()  # its Prefect record went first
    assert (made.root.records_dir / e["train2"].rsplit("/", 1)[1]).exists()
    assert report["bytes_after"] < report["bytes_before"] and report["over_budget"]  # what is kept is over 0
    assert not report["skipped"]


def test_a_refused_model_is_reclaimable_once_it_is_not_the_lines_last_training(made):
    e = season_root(made)
    made.line("nightly", "run-2")  # a later night's state: run-3 (refused) is no longer what the line looks up
    report = collect(made.root, policy(max_bytes=0, keep_releases=3))
    assert not made.exists(e["train3"]) and made.exists(e["train1"]) and made.exists(e["train2"])
    assert e["train3"] in {r["rel"] for r in report["deleted"]}


def test_a_release_whose_model_is_kept_keeps_it_there_and_its_train_entry_is_reclaimable(made):
    """A promoted model kept under kept/<lineage>/<digest> (outside the cache, never collected) is the release's
    copy: its train entry, a second copy of the same model, goes under the budget like any other entry, while the
    release's evaluation, gate decision and card stay. A release with no kept copy keeps its train entry."""
    e = season_root(made)
    kept = made.base / "kept" / "line-nightly" / ("1" * 32)
    kept.mkdir(parents=True)
    (kept / "model.safetensors").write_bytes(b"m" * 5000)
    (kept / ".kept.json").write_text("{}")
    made.line("nightly", "run-2")  # run-3 is no longer the line's last: only the releases hold its entries
    collect(made.root, policy(max_bytes=0, keep_releases=3))
    assert not made.exists(e["train1"])  # release 1's model lives on in kept/
    assert all(made.exists(e[k]) for k in ("eval1", "gate1", "push1"))  # its evaluation, decision and card
    assert made.exists(e["train2"])  # release 2 has no kept copy: its train entry is its model
    assert (kept / "model.safetensors").exists()


def test_dry_run_says_the_same_and_deletes_nothing(made):
    season_root(made)
    before = sorted(p for p in made.base.rglob("*") if p.is_file())
    dry = collect(made.root, policy(max_bytes=0, keep_releases=1), dry_run=True)
    assert sorted(p for p in made.base.rglob("*") if p.is_file()) == before
    real = collect(made.root, policy(max_bytes=0, keep_releases=1))
    assert [r["rel"] for r in dry["deleted"]] == [r["rel"] for r in real["deleted"]]
    assert dry["bytes_after"] == real["bytes_after"]


def test_least_recently_used_first_down_to_the_budget(made):
    a = made.entry("tokenize", size=10_000, age_days=9)
    b = made.entry("tokenize", size=10_000, age_days=8)
    c = made.entry("tokenize", size=10_000, age_days=7)
    d = made.entry("tokenize", size=10_000, age_days=6)
    made.run("old-run", {"tokenize": a}, age_days=1)  # a run one day ago used the oldest-built one
    total = usage(made.root)["bytes"]
    report = collect(made.root, policy(max_bytes=total - 15_000))  # room for one deletion short of two
    assert [r["rel"] for r in report["deleted"] if r["kind"] == "entry"] == [b, c]
    assert made.exists(a) and made.exists(d) and report["bytes_after"] <= total - 15_000


def test_without_a_budget_what_is_unused_for_keep_days_goes(made):
    old = made.entry("chunk", age_days=31)
    recent = made.entry("chunk", age_days=29)
    collect(made.root, policy(keep_days=30))
    assert not made.exists(old) and made.exists(recent)


def test_nothing_younger_than_min_age_and_nothing_being_built_is_deleted(made):
    young = made.entry("chunk", age_days=0.01)  # 15 minutes
    busy = made.entry("chunk", age_days=3)
    idle = made.entry("chunk", age_days=3)
    with key_lock(made.base / "cache" / "chunk", busy.rsplit("/", 1)[1]):  # a build of that key is running
        report = collect(made.root, RetentionConfig(max_bytes=0, min_age="1h"))
    assert made.exists(young) and made.exists(busy) and not made.exists(idle)
    assert {r["rel"]: r["why"] for r in report["skipped"]} == {busy: "being built or published now"}


def test_pinned_runs_and_running_builds_are_kept(made):
    pinned = made.entry("train", age_days=10)
    made.run("keep-me", {"train": pinned}, age_days=10)
    held = made.entry("chunk", deps=[made.entry("chunk-file", age_days=10)], age_days=10)
    pin(made.root, "keep-me", note="the paper's model")
    with RunHold(made.root, "in-flight") as hold:
        hold.add(held)
        report = collect(made.root, policy(max_bytes=0))
        assert made.exists(pinned) and made.exists(held) and not report["deleted"]
    assert not list((made.base / "state" / "holds").glob("*.json"))  # the hold went with the run
    pin(made.root, "keep-me", remove=True)
    collect(made.root, policy(max_bytes=0))
    assert not made.exists(pinned) and not made.exists(held)


def test_a_lapsed_hold_keeps_nothing_and_is_removed(made, monkeypatch):
    held = made.entry("chunk", age_days=10)
    monkeypatch.setenv("CPT_HOLD_LEASE_SECONDS", "0.3")
    hold = RunHold(made.root, "killed")
    hold.__enter__()
    hold.add(held)
    hold._stop.set()  # the process died: nothing renews it, nothing removes it
    time.sleep(0.7)
    report = collect(made.root, policy(max_bytes=0))
    assert not made.exists(held) and report["holds_removed"]


def test_a_deleted_entry_is_unavailable_to_a_reader_at_once(made):
    from tasks.core.manifest import read_manifest

    rel = made.entry("chunk", age_days=10)
    out = read_manifest(made.base / rel)
    collect(made.root, policy(max_bytes=0))
    with pytest.raises(EntryUnavailable) as e:
        out.dir(made.root)
    assert e.value.rel == rel
    assert not any(p.name.startswith(".tmp-") for p in (made.base / "cache" / "chunk").iterdir())


def test_two_collectors_at_once_delete_each_entry_once(made):
    import threading

    for _ in range(30):
        made.entry("tokenize", size=2000, age_days=5)
    reports = []
    start = threading.Barrier(2)

    def gc():
        start.wait()
        reports.append(collect(open_root(made.base), policy(max_bytes=0)))

    threads = [threading.Thread(target=gc) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    one, two = ({r["rel"] for r in rep["deleted"] if r["kind"] == "entry"} for rep in reports)
    assert not one & two and len(one | two) == 30


def test_cli_du_gc_and_pin(made, capsys):
    from flows.cli import main

    e = season_root(made)
    args = ["--artifacts", str(made.base)]
    assert main(["cache", "du", *args]) == 0
    out = capsys.readouterr().out
    assert "by stage" in out and "train" in out and "line nightly" in out
    assert main(["cache", "pin", "run-1", "--note", "baseline", *args]) == 0
    assert main(["cache", "pin", "nope", *args]) == 2
    capsys.readouterr()
    assert main(["cache", "gc", "--dry-run", "--set", "retention.max_bytes=0", "--set", "retention.min_age=0",
                 "--set", "retention.keep_releases=1", *args]) == 0
    out = capsys.readouterr().out
    assert f"would delete: {e['load2']}" in out and e["train1"] not in out  # pinned: kept
    assert made.exists(e["load2"])
    assert main(["cache", "gc", "--set", "retention.max_bytes=0", "--set", "retention.min_age=0", *args]) == 0
    assert f"deleted: {e['load2']}" in capsys.readouterr().out and not made.exists(e["load2"])
    assert main(["cache", "gc", "--set", "corpus.paths=[x]", *args]) == 2


def test_retention_settings_validate(tmp_path):
    from tasks.core.config.tree import validate_config

    cfg = validate_config({"corpus": {"paths": ["x"]}, "model": {"id": "m"},
                           "retention": {"max_bytes": "1.5GiB", "min_age": "30m", "keep_days": 7}})
    assert cfg.retention.max_bytes == int(1.5 * 2**30) and cfg.retention.min_age_seconds == 1800
    with pytest.raises(Exception, match="retention.keep_releases"):
        validate_config({"corpus": {"paths": ["x"]}, "model": {"id": "m"}, "retention": {"keep_releases": 0}})
    base = validate_config({"corpus": {"paths": ["x"]}, "model": {"id": "m"}})
    assert cfg.key_material() == base.key_material()  # what the disk keeps is in no stage's key


def test_an_active_drop_not_yet_trained_keeps_its_pieces(made):
    e = season_root(made)
    gated = made.entry("load-file", age_days=5)
    with lines.updating(made.root, "nightly") as state:  # gated by a run that then trained nothing
        state.drops.append(lines.Drop(path="/drops/d9", status="active", profile={"pieces": [gated]}))
    collect(made.root, policy(max_bytes=0))
    assert made.exists(gated) and made.exists(e["load3"])
    with lines.updating(made.root, "nightly") as state:  # trained on: the last training names it
        state.last_training["drops"] = ["/drops/d9"]
    collect(made.root, policy(max_bytes=0))
    assert not made.exists(gated)


def test_the_shipped_cache_gc_deployment_runs_the_gc_flow_on_a_schedule(made, tmp_path):
    """prefect.yaml's cache-gc: a daily schedule, one at a time, an entrypoint that is the gc flow, and parameters
    that flow takes; its body collects with the config file's retention section."""
    import importlib

    import yaml

    from helpers import ROOT

    shipped = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    gc = shipped["cache-gc"]
    assert [s["cron"] for s in gc["schedules"]] == ["30 3 * * *"] and gc["concurrency_limit"]["limit"] == 1
    path, name = gc["entrypoint"].split(":")
    module = path.removesuffix(".py").replace("/", ".")
    flow = getattr(importlib.import_module(module), name)
    assert set(gc["parameters"]) <= set(flow.parameters.properties)
    e = season_root(made)
    config = tmp_path / "line.yaml"
    config.write_text(yaml.safe_dump({"retention": {"max_bytes": 0, "min_age": 0, "keep_releases": 1}}))
    report = flow.fn(config_file=str(config), artifacts=str(made.base))
    assert e["load1"] in {r["rel"] for r in report["deleted"]} and not made.exists(e["load1"])


def test_a_lineage_keeps_the_models_of_its_last_keep_releases_promotions():
    """What `RunLineage.released` keeps in kept/ (with the models the record names): the same releases retention
    keeps by their kept copy, newest first, a model promoted twice counted once."""
    from tasks.line.promotions import recent_models

    history = [Promotion(model_digest=d * 32, model_path="cache/train/x/model", train_identity=d, parent={},
                         reference={}, flow_run=f"run-{i}") for i, d in enumerate("12323")]
    assert recent_models(history, 3) == ["3" * 32, "2" * 32, "1" * 32]
    assert recent_models(history, 2) == ["3" * 32, "2" * 32]
    assert recent_models([], 3) == []


def test_a_stable_lines_stable_model_is_kept_when_its_release_is_kept_by_its_copy(made):
    """A stable line releases its annealed model (kept in kept/) and continues from its stable model, which is never
    released and lives in its train entry alone: that entry stays whatever the budget."""
    train = made.entry("train", size=5000, age_days=7)
    anneal = made.entry("anneal", size=5000, age_days=7)
    digest = "3" * 32
    made.run("run-s", {"train": train, "anneal": anneal}, age_days=7)
    record = Promotion(model_digest=digest, model_path=f"{anneal}/model", train_identity="t", parent={},
                       reference={}, flow_run="run-s", stable={"digest": "4" * 32, "model_path": f"{train}/model"})
    path = made.base / "state" / "promotions" / "line-s.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(Promotions(lineage="line-s", last=record, history=[record]).model_dump_json())
    kept = made.base / "kept" / "line-s" / digest
    kept.mkdir(parents=True)
    (kept / ".kept.json").write_text("{}")
    collect(made.root, policy(max_bytes=0, keep_releases=3))
    assert made.exists(train)  # the stable model: the line's next run starts from it
    assert not made.exists(anneal)  # the release's model lives on in kept/
