"""Lineage: the parent and the reference a run chooses from the promotion records, the card's lineage, and
what is recorded after push (tasks/lineage.py), without Prefect: the records are written here by hand."""

from pathlib import Path

import pytest

from tasks.core.manifest import Fingerprint
from tasks.core.root import open_root
from tasks.lineage import LostPromotedModel, choose_parent, choose_reference
from tasks.ml.modeling import model_digest
from tasks.state.promotions import Promotion, Promotions


def test_parent_and_reference_follow_the_promotion_record(tmp_path):
    root = open_root(tmp_path / "artifacts")

    def promoted_model(name: str, weights: bytes) -> tuple[Path, str]:
        def build(tmp: Path):
            (tmp / "model").mkdir()
            (tmp / "model" / "model.safetensors").write_bytes(weights)
            return {}, {}

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
    fp, desc, _ = choose_parent("last_promoted", promos, base, "org/base", "t9", root)
    assert (fp.digest, fp.location, desc["flow_run"]) == (second, str(second_dir), "r2")
    # the same training as the last promotion: start from its parent, so the rerun is Cached
    fp, desc, _ = choose_parent("last_promoted", promos, base, "org/base", "t2", root)
    assert (fp.digest, fp.location) == (first, str(first_dir))

    # The gate's reference: the last promoted model; for that model itself, what it was promoted against.
    ref, record, _ = choose_reference(promos, "some-new-model", root)
    assert ref.digest == second and record.flow_run == "r2"
    ref, record, _ = choose_reference(promos, second, root)
    assert ref.digest == first and record.flow_run == "r1"
    assert choose_reference(None, second, root)[0] is None

    # Weights gone from the cache and no release: continuing stops and says so; the gate falls back to the base.
    (second_dir / "model.safetensors").write_bytes(b"overwritten")
    with pytest.raises(LostPromotedModel, match="is gone.*train.init: base"):
        choose_parent("last_promoted", promos, base, "org/base", "t9", root)
    ref, _, note = choose_reference(promos, "some-new-model", root)
    assert ref is None and "comparing with the base model" in note
