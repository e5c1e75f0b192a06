"""The pipeline's stages, in order: the one list the flow's order is checked against, `cpt run --until`'s choices
and the run summary's order come from. A stage's second use (replay-load, evaluate-reference) and the stages a
setting adds (held-out, mix) run beside the stage they belong to and are not listed here; anneal runs only with
train.schedule: stable_anneal."""

from __future__ import annotations

from typing import Literal

PIPELINE: tuple[str, ...] = ("load", "shuffle", "tokenize", "token-stats", "chunk", "evaluate-base", "train",
                             "anneal", "evaluate", "gate", "push")
StageName = Literal[PIPELINE]  # the flow's `until` parameter: a drop-down of these in the Prefect UI


def position(stage: str) -> int:
    """Where `stage` comes in the pipeline (ValueError for a name that is not a pipeline stage)."""
    return PIPELINE.index(stage)
