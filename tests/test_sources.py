"""Many sources, one line (issue 32): the `sources` section's config, the mix of several sources exact to the token,
the gate's limits per source, and a stable line's parent (the stable model, never the annealed release). Without
Prefect: the flow-level tests are in tests/test_sources_flow.py."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tasks.core.config.base import ConfigError
from tasks.core.config.tree import validate_config
from tasks.core.manifest import Fingerprint
from tasks.core.root import open_root


# ------------------------------------------------------------------------------------------------ config

def test_an_old_two_source_config_and_a_sources_config_give_the_sources_the_flow_runs():
    old = validate_config({"corpus": {"paths": ["c.jsonl"]}, "model": {"id": "org/base"},
                           "replay": {"paths": ["r.jsonl"], "fraction": 0.25}})
    assert [(d.name, d.label, d.share.weight, d.share.epochs) for d in old.data_sources()] == [
        ("corpus", None, None, 1.0), ("replay", "replay", 0.25, None)]
    assert old.data_sources()[1].split.validation_fraction == 0.0  # replay never had a validation set
    new = validate_config({"model": {"id": "org/base"}, "split": {"validation_fraction": 0.1}, "sources": [
        {"name": "domain", "paths": ["d.jsonl"], "weight": 0.6},
        {"name": "general_ko", "paths": ["g.jsonl"], "weight": 0.3, "validation_fraction": 0.2},
        {"name": "code", "paths": ["c.jsonl"], "weight": 0.1, "validation_fraction": 0}]})
    got = [(d.name, d.label, d.split.validation_fraction) for d in new.data_sources()]
    assert got == [("domain", None, 0.1), ("general_ko", "general_ko", 0.2), ("code", "code", 0.0)]
    assert new.drop_source == "domain"


@pytest.mark.parametrize("change, says", [
    ({"sources": [{"name": "a", "paths": ["a"], "weight": 0.5}, {"name": "b", "paths": ["b"], "weight": 0.4}]},
     "sum to 0.9"),
    ({"sources": [{"name": "general", "paths": ["a"], "weight": 1.0}]}, "reserved"),
    ({"sources": [{"name": "a", "paths": ["a"], "weight": 0.5, "epochs": 1}]}, "exactly one of weight"),
    ({"sources": [{"name": "a", "paths": ["a"], "weight": 1.0}], "corpus": {"paths": ["c"]}}, "replaces corpus"),
    ({"sources": [{"name": "a", "paths": ["a"], "weight": 1.0}], "replay": {"paths": ["r"], "fraction": 0.2}},
     "replaces replay"),
    ({"sources": [{"name": "a", "paths": ["a"], "epochs": 1}, {"name": "a", "paths": ["b"], "weight": 0.2}]},
     "given twice"),
    ({"sources": [{"name": "a", "paths": ["a"], "epochs": 1}], "drops": {"source": "b"}}, "drops.source"),
    ({"sources": [{"name": "a", "paths": ["a"], "epochs": 1}, {"name": "b", "paths": ["b"], "weight": 0.2,
                                                              "validation_fraction": 0}],
      "gate": {"sources": [{"source": "b"}]}}, r"gate.sources\[0\]"),
    ({"sources": [{"name": "a", "paths": ["a"], "epochs": 1}], "anneal": {"sources": [{"name": "a", "epochs": 1}]}},
     "needs train.schedule: stable_anneal"),
    ({"sources": [{"name": "a", "paths": ["a"], "epochs": 1}], "train": {"schedule": "stable_anneal"}},
     "init: last_promoted"),
])
def test_a_sources_config_that_would_fail_later_fails_in_validate(change, says):
    cfg = {"model": {"id": "org/base"}, "split": {"validation_fraction": 0.1}, **change}
    with pytest.raises(ConfigError, match=says):
        validate_config(cfg)


# ------------------------------------------------------------------------------------------------ the mix

@dataclasses.dataclass
class FakeChunks:
    """What mix-sources reads of a chunk output: its window tables, its token pieces, its meta."""

    train: pa.Table
    validation: pa.Table
    token_files: list[str]
    meta: object = dataclasses.field(default_factory=lambda: types.SimpleNamespace(bos_id=1))  # a ChunkMeta's

    def windows(self, root, split):
        return self.train if split == "train" else self.validation


def windows_of(lengths: list[int], name: str) -> pa.Table:
    from tasks.core.config.data import ChunkConfig
    from tasks.data.windows import window_batch, window_plan

    plan = window_plan(ChunkConfig(max_seq_length=16, overlap=4), True)
    ids = pa.array([f"{name}{i}" for i in range(len(lengths))])
    return pa.Table.from_batches([window_batch(ids, np.array(lengths), np.arange(len(lengths)), plan)])


def fake_source(seed: int, n_train: int, n_val: int, name: str, pieces: int = 2) -> FakeChunks:
    rng = np.random.default_rng(seed)
    return FakeChunks(windows_of(rng.integers(3, 60, n_train).tolist(), name),
                      windows_of(rng.integers(3, 60, n_val).tolist(), f"v{name}"),
                      [f"tokens/{name}-{i}" for i in range(pieces)])


@pytest.mark.parametrize("shares", [
    [{"weight": 0.6}, {"weight": 0.3}, {"weight": 0.1}],
    [{"epochs": 1.0}, {"epochs": 0.5}, {"weight": 0.4}],
    [{"weight": 0.5}, {"epochs": 3.0}, {"weight": 0.2}],
], ids=["weights", "epochs+half+weight", "weights+3-epochs"])
def test_three_sources_get_their_shares_exact_to_the_token_a_tiny_pool_repeated(tmp_path, shares):
    from tasks.core.config.sources import MixShare
    from tasks.mix import labelled_per_window, mix_sources_chunks, source_targets

    sources = [fake_source(1, 120, 10, "d"), fake_source(2, 60, 8, "g"), fake_source(3, 4, 3, "c")]
    mix_shares = [MixShare(name=n, **s) for n, s in zip(("domain", "general", "code"), shares)]
    pools = [int(labelled_per_window(s.train, 1).sum()) for s in sources]
    targets, total = source_targets(pools, mix_shares)
    for s, p, t in zip(mix_shares, pools, targets):  # what each asks for, stated independently of the code
        assert t == (round(s.epochs * p) if s.epochs is not None else round(s.weight * total))
    out = tmp_path / "mix"
    out.mkdir()
    counts, table = mix_sources_chunks(sources, mix_shares, None, 7, out)

    import pyarrow.ipc as ipc

    train = ipc.open_file(str(out / "train.arrow")).read_all()
    parts = train.column("part").to_numpy()
    got = labelled_per_window(train, 1)
    for i, (t, row) in enumerate(zip(targets, table)):
        in_source = (parts >= 2 * i) & (parts < 2 * i + 2)  # each source's windows refer to its own token pieces
        assert int(got[in_source].sum()) == t == row["trained_tokens"]  # exact to the token
        assert counts[f"{row['source']}_trained_tokens"] == t
    assert table[2]["passes"] > 1 and table[2]["trained_tokens"] > table[2]["pool_tokens"]  # the tiny pool repeated
    assert sum(r["share"] for r in table) == pytest.approx(1.0)
    for r in table:  # the share each source got is the share asked, up to one token of the total
        assert abs(r["share"] - r["share_asked"]) <= 1.5 / counts["train_trained_tokens"]
    # validation: every source's own windows, in order, where the table says
    validation = ipc.open_file(str(out / "validation.arrow")).read_all()
    ends = np.cumsum([0] + [s.validation.num_rows for s in sources]).tolist()
    assert [r["validation_rows"] for r in table] == [[a, b] for a, b in zip(ends, ends[1:])]
    v_parts = validation.column("part").to_numpy()
    for i, (a, b) in enumerate(zip(ends, ends[1:])):
        assert ((v_parts[a:b] >= 2 * i) & (v_parts[a:b] < 2 * i + 2)).all()
    assert validation.num_rows == sum(s.validation.num_rows for s in sources)
    # seeded: the same mix again
    again = tmp_path / "again"
    again.mkdir()
    mix_sources_chunks(sources, mix_shares, None, 7, again)
    assert ipc.open_file(str(again / "train.arrow")).read_all().equals(train)


def test_a_source_draw_does_not_move_when_another_source_is_added():
    """A source's seed comes from shuffle.seed and its name: adding a source, or reordering, leaves its order."""
    from tasks.mix import draw, source_seed

    labelled = np.arange(1, 40)
    assert (draw(labelled, 500, source_seed(3, "code"))[0] == draw(labelled, 500, source_seed(3, "code"))[0]).all()
    assert not np.array_equal(draw(labelled, 500, source_seed(3, "code"))[0],
                              draw(labelled, 500, source_seed(3, "general"))[0])


# ------------------------------------------------------------------------------------------------ the gate

def test_a_gate_limit_per_source_refuses_a_model_that_broke_one_source_only():
    from tasks.core.config.model import GateConfig
    from tasks.gate import decide

    gate = GateConfig(sources=[{"source": "domain"}, {"source": "general_ko", "max_increase": 0.05},
                               {"source": "code", "max_increase": 0.10}])
    reference = {"domain": 20.0, "general_ko": 10.0, "code": 5.0}

    def decision(new):
        return decide(gate, {"validation": 15.0, "general": None}, {"validation": 20.0},
                      {"validation": 20.0, "general": None}, {"train_loss": 3.0}, "the base model",
                      sources={"new": new, "reference": reference, "base": reference})

    ok = decision({"domain": 15.0, "general_ko": 10.4, "code": 5.4})
    assert ok["promoted"], ok["reason"]
    assert [c["source"] for c in ok["checks"] if "source" in c] == ["domain", "general_ko", "code"]
    broke_code = decision({"domain": 15.0, "general_ko": 10.4, "code": 5.6})  # +12% on code only
    assert not broke_code["promoted"]
    failed = [c for c in broke_code["checks"] if not c["passed"]]
    assert [c["source"] for c in failed] == ["code"] and "source code perplexity" in broke_code["reason"]
    tie = decision({"domain": 20.0, "general_ko": 10.0, "code": 5.0})  # the domain must improve: a tie refuses
    assert [c["source"] for c in tie["checks"] if not c["passed"]] == ["domain"]
    missing = decision({"domain": 15.0, "general_ko": float("nan"), "code": 5.0})
    assert not missing["promoted"] and "general_ko" in missing["reason"]


# ------------------------------------------------------------------------------------------------ stable line

def _published_model(root, name: str, weights: bytes):
    from tasks.ml.modeling import model_digest
    from tasks.train import Trained

    def build(tmp: Path):
        (tmp / "model").mkdir()
        (tmp / "model" / "model.safetensors").write_bytes(weights)
        return {}, {"model_digest": model_digest(tmp / "model"), "model_dir": "model"}

    out, _ = root.publish("train", f"train-{name}", build)
    return Trained(**out.model_dump())


def _pushed(root, trained, name: str):
    from tasks.push import RELEASE_CARD, Release, save_release

    dest = root.path(f"models/{name}")

    def build(tmp: Path):
        (tmp / RELEASE_CARD).write_text("# card\n", encoding="utf-8")
        return {"local_path": str(dest), "release": f"models/{name}", "model_digest": trained.model_digest,
                "hub_url": None}, {}

    out, _ = root.publish("push", f"push-{trained.key}", build)
    save_release(trained.model_dir(root), dest, "# card\n")
    return Release(**out.model_dump())


def _promoted():
    from tasks.gate import Decision

    return Decision(stage="gate", key="gate-k", path="cache/gate/gate-k",
                    counts={"promoted": True, "reason": "better", "reference": "base",
                            "validation_perplexity": 10.0, "general_perplexity": None})


def _stable_run(root, config, base, chunks, run: int):
    """One run of a stable line as the flow drives the lineage: parent, the stable model (train), the annealed
    release (anneal), the gate's reference, push and the record. Returns (lineage, parent, stable, release)."""
    from tasks.line.lineage import RunLineage

    lineage = RunLineage(root, config, None)
    model, parent = lineage.choose_parent(base, chunks)
    stable = _published_model(root, f"stable-{run}", f"stable weights {run}".encode())
    lineage.note_stable(stable)
    release = _published_model(root, f"release-{run}", f"annealed weights {run}".encode())
    lineage.choose_reference(release)
    with lineage.promoting(release, _promoted()) as refused:
        assert refused is None
        lineage.released(_pushed(root, release, "med"), release, _promoted(), f"run-{run}")
    return lineage, model, parent, stable, release


def test_the_stable_parent_of_run_k_plus_1_is_run_ks_stable_model_never_its_release(tmp_path):
    from tasks.core.manifest import StageOutput
    from tasks.line.lineage import RunLineage
    from tasks.line.promotions import read_promotions

    root = open_root(tmp_path / "artifacts")
    config = validate_config({"corpus": {"paths": ["c.jsonl"]}, "model": {"id": "org/base"}, "push": {"name": "med"},
                              "train": {"init": "last_promoted", "schedule": "stable_anneal"}})
    base = Fingerprint(kind="model", digest="base-digest", location="/models/base")
    runs = []
    for k in range(3):
        chunks = StageOutput(stage="chunk", key=f"chunk-{k}", path=f"cache/chunk/chunk-{k}", content=f"c-{k}")
        runs.append(_stable_run(root, config, base, chunks, k))
    first, second, third = runs
    assert first[1] == base and first[2]["kind"] == "base" and first[0].warm_start  # the line's first run warms up
    for before, after in ((first, second), (second, third)):
        lineage, model, parent, _, _ = after
        stable, release = before[3], before[4]
        assert model.digest == stable.model_digest != release.model_digest
        assert model.location == str(stable.model_dir(root))
        assert parent["kind"] == "stable" and not lineage.warm_start  # at the peak rate, no second warmup
    record = read_promotions(root, "name-med").last
    assert record.model_digest == third[4].model_digest  # what was released is the annealed model
    assert record.stable["digest"] == third[3].model_digest  # ... and the stable one it came from is recorded
    # average: the stable models this run's stable phase descends from, newest first
    fourth = RunLineage(root, config.model_copy(update={"train": config.train.model_copy(
        update={"anneal": "average", "anneal_checkpoints": 3})}), None)
    fourth.choose_parent(base, StageOutput(stage="chunk", key="chunk-9", path="cache/chunk/chunk-9", content="c-9"))
    assert [f.digest for f in fourth.previous_stables()] == [third[3].model_digest, second[3].model_digest]
    # A rerun of the last run's training (same identity) starts from what that one started from: Cached.
    rerun = RunLineage(root, config, None)
    model, parent = rerun.choose_parent(base, StageOutput(stage="chunk", key="chunk-2", path="cache/chunk/chunk-2",
                                                          content="c-2"))
    assert model.digest == second[3].model_digest and parent["kind"] == "stable"


# ------------------------------------------------------------------------------------------------ drops

@pytest.mark.parametrize("drops_source, joins", [(None, "domain"), ("general_ko", "general_ko")])
def test_a_lines_drops_join_the_named_source_and_no_other(tmp_path, drops_source, joins):
    from tasks.data.files import fingerprint_files
    from tasks.line import lines
    from tasks.line.sources import line_sources

    for name in ("domain", "general", "drop", "old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.jsonl").write_text('{"content": "문서"}\n', encoding="utf-8")
    config = validate_config({"model": {"id": "m"}, "drops": {"source": drops_source}, "sources": [
        {"name": "domain", "paths": [str(tmp_path / "domain")], "weight": 0.7},
        {"name": "general_ko", "paths": [str(tmp_path / "general")], "weight": 0.3}]})
    drop = str((tmp_path / "drop").resolve())
    identity = lines.DropIdentity.of(drop, fingerprint_files([Path(drop) / "a.jsonl"]).items)
    state = lines.LineState(line="l", drops=[lines.Drop(path=drop, status="active", identity=identity),
                                             lines.Drop(path=str(tmp_path / "old"), status="removed")])
    fingerprint, configured = line_sources(config, state)  # the corpus of the source the drops join
    own = {"domain": ["domain"], "general_ko": ["general"]}
    assert sorted(Path(i["path"]).parent.name for i in fingerprint.items) == sorted([*own[joins], "drop"])
    assert sorted(p.parent.name for p in configured) == own[joins]


def test_a_change_to_a_source_the_drops_do_not_join_is_a_change_of_the_line(tmp_path):
    """A line retrains when any of its sources changed, not only the one its drops join (flows/retrain.py compares
    `other_sources` with the last training's): the general or code text replaced is a new line to train."""
    from tasks.line.sources import other_sources, sources_changed

    from helpers import write_jsonl

    for name in ("domain", "general", "code"):
        write_jsonl(tmp_path / name / "x.jsonl", [{"content": f"{name} text {i}, long enough to keep"}
                                                  for i in range(5)])
    config = validate_config({"model": {"id": "org/base"}, "sources": [
        {"name": "domain", "paths": [str(tmp_path / "domain")], "weight": 0.6},
        {"name": "general_ko", "paths": [str(tmp_path / "general")], "weight": 0.3},
        {"name": "code", "paths": [str(tmp_path / "code")], "weight": 0.1}]})
    before = other_sources(config)
    assert set(before) == {"general_ko", "code"}  # the drop source is the line's own fingerprint
    last = {"corpus": "c", "sources": before}
    assert sources_changed(last, other_sources(config)) == []
    write_jsonl(tmp_path / "code" / "x.jsonl", [{"content": "def g():\n    return 42  # a new helper"}])
    assert sources_changed(last, other_sources(config)) == ["code"]
    assert sources_changed({"corpus": "c", "sources": {"general_ko": before["general_ko"]}}, before) == ["code"]
    assert sources_changed({"corpus": "c"}, other_sources(config)) == []  # recorded before: nothing known
    replay = validate_config({"corpus": {"paths": [str(tmp_path / "domain")]}, "model": {"id": "org/base"},
                              "replay": {"paths": [str(tmp_path / "general")], "fraction": 0.25}})
    assert set(other_sources(replay)) == {"replay"}
