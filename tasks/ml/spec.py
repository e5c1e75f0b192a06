"""The typed seam between the train stage and its training child: what one training attempt is.

The stage writes a `TrainSpec` as JSON next to its output; the child (`accelerate launch -m
tasks.ml.train_worker SPEC.json`) reads it back through the same model, so a field renamed or mistyped on
either side fails at once with the field's name instead of deep inside training. pydantic only: the stage
builds it without importing torch.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tasks.core.config.model import ModelConfig, TrainConfig
from tasks.core.tracking import TrackerRun


class TrainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_location: str = Field(description="The folder of the model training starts from (base or promoted).")
    model: ModelConfig
    train: TrainConfig
    max_seq_length: int = Field(gt=0, description="chunk.max_seq_length: the longest row the trainer sees.")
    chunks_dir: str = Field(description="A DatasetDict folder of training rows: input_ids and labels (what "
                            "`Chunks.write_training_set` writes), or chunk rows with trained_from (labels derived).")
    output_dir: str = Field(description="The train entry's temp folder: model/, metrics.json, logs.")
    checkpoint_dir: str = Field(description="The key's work folder for checkpoints, kept across attempts.")
    tensorboard_dir: str
    artifacts: str | None = Field(None, description="The artifacts root (a path or a store URL), opened again in "
                                  "the child: checkpoints are copied to its store, when it has one. None: a "
                                  "training outside any root (a benchmark).")
    work_rel: str = Field("", description="The work folder relative to the root (its name in the store).")
    tracker: TrackerRun | None = Field(None, description="The tracker run's name and tags (train.report_to); no "
                                       "credentials: the trackers read those from the environment.")

    def write(self, path: Path) -> Path:
        path.write_text(self.model_dump_json(indent=2), encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: str | Path) -> TrainSpec:
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
