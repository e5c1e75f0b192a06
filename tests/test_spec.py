"""The train stage and its training child talk through one typed spec (tasks/ml/spec.py), checked on both
sides: a field the parent gets wrong fails before any process starts, one the child reads wrong fails in the
child at once, naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from helpers import ROOT
from tasks.core.config.model import ModelConfig, TrainConfig
from tasks.ml.spec import TrainSpec


def spec(tmp_path, **changes) -> TrainSpec:
    fields = dict(model_location=str(tmp_path / "model"), model=ModelConfig(id="org/base"), train=TrainConfig(),
                  max_seq_length=64, chunks_dir=str(tmp_path / "chunks"), output_dir=str(tmp_path / "out"),
                  checkpoint_dir=str(tmp_path / "ckpt"), tensorboard_dir=str(tmp_path / "tb"),
                  artifacts=str(tmp_path / "artifacts"), work_rel="work/train/train-k")
    return TrainSpec(**{**fields, **changes})


def test_the_spec_round_trips_through_its_file(tmp_path):
    s = spec(tmp_path)
    assert TrainSpec.read(s.write(tmp_path / "spec.json")) == s


def test_the_parent_refuses_a_spec_with_a_wrong_field_before_launching(tmp_path):
    from tasks.train import train_model

    good = spec(tmp_path).model_dump(mode="json")
    with pytest.raises(ValidationError, match="max_seq_length"):
        train_model({**good, "max_seq_length": 0}, 1)
    with pytest.raises(ValidationError, match="chunk_dir"):
        train_model({**good, "chunk_dir": "typo"}, 1)
    assert not (tmp_path / "out").exists()  # nothing was written, nothing started


@pytest.mark.slow  # the training child's entry point, as a child process
def test_the_child_refuses_a_spec_it_cannot_read_naming_the_field(tmp_path):
    path = tmp_path / "spec.json"
    s = spec(tmp_path).model_dump(mode="json")
    s["train"]["learning_rate"] = "fast"
    import json

    path.write_text(json.dumps(s))
    out = subprocess.run([sys.executable, "-m", "tasks.ml.train_worker", str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "train.learning_rate" in out.stderr, out.stderr[-2000:]
