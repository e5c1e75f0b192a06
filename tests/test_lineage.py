"""Lineage: the parent and the reference a run chooses from the promotion records, the card's lineage, and
what is recorded after push (tasks/line/lineage.py), without Prefect: the records are written here by hand."""

from pathlib import Path

import pytest

from tasks.core.manifest import Fingerprint
from tasks.core.root import open_root
from tasks.line.lineage import LostPromotedModel, choose_parent, choose_reference
from tasks.ml.modeling import model_digest
from tasks.line.promotions import Promotion, Promotions


def test_parent_and_reference_follow_the_promotion_record(tmp_path):
    root = open_root(tmp_path / "artifacts")

    def promoted_model(name: str, weights: bytes) -> tuple[Path, str]:
        def build(tmp: Path):
            (tmp / "model").mkdir()
            (tmp / "model" / "model.safetensors").write_bytes(weights)
            # A train entry as train writes it (typed TrainMeta: once tasks.train is imported, whichever test
            # imported it first, a train entry without its model digest does not parse).
            return {}, {"model_digest": model_digest(tmp / "model")}

        out, _ = root.publish("train", f"train-{name}", build)
        return out.dir(root) / "model", model_digest(out.dir(root) / "model")

    base = Fingerprint(kind="model", digest="base-digest", location="/models/base")
    first_dir, first = promoted_model("a", b"first weights")
    second_dir, second = promoted_model("b", b"second weights")
    rec1 = Promotion(model_digest=first, model_path="cache/train/train-a/model", train_identity="t1",
                     parent={"kind": "base", "digest": "base-digest"}, reference={"kind": "base"}, flow_run="r1")
    rec2 = Promotion(model_digest=second, model_path="cache/train/train-b/model", train_identity="t2",
                     parent={"kind": "promoted", "digest": first}, reference={"kind": "promoted", "digest": first},
                     flow_run="r2")
    promos = Promotions(lineage="name-x", last=rec2, history=[rec1, rec2])

    # base, no lineage, nothing promoted yet: the base model
    for init, p in [("base", promos), ("last_promoted", None), ("last_promoted", Promotions(lineage="name-x"))]:
        fp, desc, _ = choose_parent(init, p, base, "org/base", "t9", root)
        assert fp == base and desc["kind"] == "base"
    # new data: continue from the last promoted model
    # (found in its train entry, and kept from now on outside the cache: tasks/line/kept.py)
    fp, desc, _ = choose_parent("last_promoted", promos, base, "org/base", "t9", root)
    assert (fp.digest, fp.location, desc["flow_run"]) == (second, str(root.path(f"kept/name-x/{second}")), "r2")
    assert model_digest(fp.location) == model_digest(second_dir)
    # the same training as the last promotion: start from its parent, so the rerun is Cached
    fp, desc, _ = choose_parent("last_promoted", promos, base, "org/base", "t2", root)
    assert (fp.digest, fp.location) == (first, str(root.path(f"kept/name-x/{first}")))

    # The gate's reference: the last promoted model; for that model itself, what it was promoted against.
    ref, record, _ = choose_reference(promos, "some-new-model", root)
    assert ref.digest == second and record.flow_run == "r2"
    ref, record, _ = choose_reference(promos, second, root)
    assert ref.digest == first and record.flow_run == "r1"
    assert choose_reference(None, second, root)[0] is None

    # Weights gone from the cache and no release: continuing stops and says so; the gate falls back to the base.
    (second_dir / "model.safetensors").write_bytes(b"overwritten")
    (root.path(f"kept/name-x/{second}") / "model.safetensors").write_bytes(b"overwritten too")
    with pytest.raises(LostPromotedModel, match="is gone.*train.init: base"):
        choose_parent("last_promoted", promos, base, "org/base", "t9", root)
    ref, _, note = choose_reference(promos, "some-new-model", root)
    assert ref is None and "comparing with the base model" in note


def _published_model(root, name: str, weights: bytes):
    """A train entry holding a model folder, as the train stage publishes it."""
    from tasks.train import Trained

    def build(tmp: Path):
        (tmp / "model").mkdir()
        (tmp / "model" / "model.safetensors").write_bytes(weights)
        return {}, {"model_digest": model_digest(tmp / "model"), "model_dir": "model"}

    out, _ = root.publish("train", f"train-{name}", build)
    return Trained(**out.model_dump())


def _release(root, trained, name: str):
    """A push entry (its card kept) and the release folder it names, as the push stage leaves them."""
    from tasks.push import RELEASE_CARD, Release, save_release

    dest = root.path(f"models/{name}")

    def build(tmp: Path):
        (tmp / RELEASE_CARD).write_text("# card\n", encoding="utf-8")
        return {"local_path": str(dest), "release": f"models/{name}", "model_digest": trained.model_digest,
                "hub_url": None}, {}

    out, _ = root.publish("push", f"push-{trained.key}", build)
    save_release(trained.model_dir(root), dest, "# card\n")
    return Release(**out.model_dump())


def _decision(promoted=True):
    from tasks.gate import Decision

    return Decision(stage="gate", key="gate-k", path="cache/gate/gate-k",
                    counts={"promoted": promoted, "reason": "better", "reference": "base",
                            "validation_perplexity": 10.0, "general_perplexity": None})


def test_a_run_lineage_starts_from_the_base_records_its_promotion_and_the_next_run_continues_from_it(tmp_path):
    from tasks.core.config.tree import validate_config
    from tasks.core.manifest import StageOutput
    from tasks.line.lineage import RunLineage
    from tasks.line.promotions import read_promotions

    root = open_root(tmp_path / "artifacts")
    config = validate_config({"corpus": {"paths": ["c.jsonl"]}, "model": {"id": "org/base"}, "push": {"name": "med"}, "train": {"init": "last_promoted"}})
    base = Fingerprint(kind="model", digest="base-digest", location="/models/base")
    chunks = StageOutput(stage="chunk", key="chunk-1", path="cache/chunk/chunk-1", content="c-1")

    first = RunLineage(root, config, None)
    assert first.lineage == "name-med"
    model, parent = first.choose_parent(base, chunks)
    assert model == base and parent["kind"] == "base"
    trained = _published_model(root, "a", b"first weights")
    assert first.choose_reference(trained) is None and first.reference_kind == "base"
    card = first.card(Fingerprint(kind="corpus", digest="corpus-digest"), None, chunks, trained,
                      StageOutput(stage="evaluate", key="e", path="cache/evaluate/e", counts={"validation_perplexity_after": 9.0}),
                      StageOutput(stage="evaluate-base", key="b", path="cache/evaluate-base/b", counts={"validation_perplexity": 20.0}),
                      None, _decision())
    assert card["parent"] == {"kind": "base", "id": "org/base", "digest": "base-digest", "flow_run": ""}
    assert card["evaluation"]["validation_base"] == 20.0 and card["evaluation"]["validation_new"] == 9.0
    assert card["gate"] == {"promoted": True, "reason": "better", "reference": "base"}
    release = _release(root, trained, "med")
    assert first.released(release, trained, _decision(), "run-1") is None  # the release was intact
    record = read_promotions(root, "name-med").last
    assert record.model_digest == trained.model_digest and record.flow_run == "run-1"
    assert record.model_path == f"{trained.path}/model" and record.train_identity == first.identity

    # New data: the next run continues from the promoted weights and is gated against them.
    second = RunLineage(root, config, None)
    more = chunks.model_copy(update={"content": "c-2"})
    model, parent = second.choose_parent(base, more)
    assert (model.digest, parent["kind"], parent["flow_run"]) == (trained.model_digest, "promoted", "run-1")
    newer = _published_model(root, "b", b"second weights")
    assert second.choose_reference(newer).digest == trained.model_digest and second.reference_kind == "promoted"

    # The same training again (a rerun): it starts from the promoted model's own parent, so it is Cached.
    rerun = RunLineage(root, config, None)
    model, parent = rerun.choose_parent(base, chunks)
    assert model == base and parent["kind"] == "base"

    # A lost release folder is re-made from the train entry after push, and says so.
    import shutil

    shutil.rmtree(root.path("models/med"))
    assert first.released(release, trained, _decision(), "run-1") == "missing"
    assert model_digest(root.path("models/med")) == trained.model_digest


def test_a_run_without_lineage_records_nothing(tmp_path):
    from tasks.core.config.tree import validate_config
    from tasks.line.lineage import RunLineage

    root = open_root(tmp_path / "artifacts")
    config = validate_config({"corpus": {"paths": ["c.jsonl"]}, "model": {"id": "org/base"}})
    lineage = RunLineage(root, config, None)
    assert lineage.lineage is None
    base = Fingerprint(kind="model", digest="base-digest", location="/models/base")
    from tasks.core.manifest import StageOutput

    model, parent = lineage.choose_parent(base, StageOutput(stage="chunk", key="k", path="cache/chunk/k"))
    assert model == base
    trained = _published_model(root, "a", b"w")
    lineage.choose_reference(trained)
    lineage.released(_release(root, trained, "x"), trained, _decision(), "run-1")
    assert not root.path("state/promotions").exists()


def test_a_promotion_is_a_compare_and_swap_against_what_the_gate_compared_with(tmp_path):
    """Two runs of one lineage gated against the same reference: the first to push is promoted; the second finds
    the last promoted model changed under it and is refused, never promoted blind."""
    from tasks.core.config.tree import validate_config
    from tasks.core.manifest import StageOutput
    from tasks.line.lineage import RunLineage
    from tasks.line.promotions import read_promotions

    root = open_root(tmp_path / "artifacts")
    config = validate_config({"corpus": {"paths": ["c.jsonl"]}, "model": {"id": "org/base"}, "push": {"name": "med"}})
    base = Fingerprint(kind="model", digest="base-digest", location="/models/base")
    chunks = StageOutput(stage="chunk", key="chunk-1", path="cache/chunk/chunk-1", content="c-1")
    runs = [RunLineage(root, config, None) for _ in range(2)]
    models = [_published_model(root, name, weights) for name, weights in (("a", b"one"), ("b", b"two"))]
    for run, model in zip(runs, models):  # both trained and gated against the base model
        run.choose_parent(base, chunks)
        assert run.choose_reference(model) is None
    with runs[0].promoting(models[0], _decision()) as refused:
        assert refused is None
        runs[0].released(_release(root, models[0], "med"), models[0], _decision(), "run-1")
    with runs[1].promoting(models[1], _decision()) as refused:
        assert refused and "changed while this run trained" in refused
    assert read_promotions(root, "name-med").last.flow_run == "run-1"  # the second never became the last
    # A rerun of the promoted model is no new promotion: it goes through.
    with runs[0].promoting(models[0], _decision()) as refused:
        assert refused is None


def test_two_lineages_that_would_write_one_release_folder_are_refused(tmp_path):
    from tasks.core.config.tree import validate_config
    from tasks.line.lineage import RunLineage
    from tasks.line.promotions import ReleaseClaimed

    root = open_root(tmp_path / "artifacts")
    config = validate_config({"corpus": {"paths": ["c.jsonl"]}, "model": {"id": "org/base"}, "push": {"name": "med"}})
    trained = _published_model(root, "a", b"w")
    with RunLineage(root, config, "night").promoting(trained, None) as refused:
        assert refused is None
    with pytest.raises(ReleaseClaimed, match="models/med.*line-night"):
        with RunLineage(root, config, "other").promoting(trained, None):
            pass
    with RunLineage(root, config, "night").promoting(trained, None) as refused:  # its own folder, again: fine
        assert refused is None
