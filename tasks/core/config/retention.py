"""The retention section: what the cache may keep on disk and for how long (tasks/line/retention.py applies it).

Sizes take a number of bytes or a string with a unit (`50GB`, `1.5 TiB`: pydantic's ByteSize); durations a
number of seconds or a string with a unit (`90s`, `30m`, `6h`, `2d`)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from pydantic import ByteSize, Field, TypeAdapter, field_validator

from tasks.core.config.base import Section

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(s|sec|m|min|h|hours?|d|days?)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "hours": 3600, "d": 86400,
                 "day": 86400, "days": 86400}


def parse_duration(value: Any) -> Any:
    """`6h`, `30m`, `2d`, `90s` as a timedelta; anything else is left to pydantic (seconds, ISO 8601 `PT6H`)."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()])
    return value


def parse_bytes(value: str | int, where: str) -> int:
    """A size (`50GB`, `1.5 TiB`, `123`) in bytes; ValueError naming `where`."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(value.strip() if isinstance(value, str) else value))
    except Exception:  # pydantic's ValidationError: say where, in one line
        raise ValueError(f"{where}: {value!r} is not a size (e.g. 50GB, 1.5TiB or a number of bytes)") from None


class RetentionConfig(Section):
    """What garbage collection of the artifacts root keeps (`cpt cache gc`, after each retrain run, and the
    scheduled cache-gc deployment). Whatever the budget, it never deletes: each lineage's last `keep_releases`
    promoted models with their evaluation, gate decision and card; each line's state; the entries the line's
    next nightly run would look up (its last training run's); entries a running build holds or used less than
    `min_age` ago; runs pinned with `cpt cache pin`."""

    keep_releases: int = Field(
        3, ge=1, description="Promoted models kept per lineage (a line, or a push.name), newest first, each with "
        "its evaluation, gate decision and card. At least 1: the next run continues from the last one."
    )
    max_bytes: ByteSize | None = Field(
        None, description="Budget of the root (the store's objects on an object-store root): over it, what no "
        "rule keeps goes, least recently used first, until the root is within it. null: no budget; then "
        "unreferenced entries go once unused for keep_days."
    )
    keep_days: float = Field(
        30.0, gt=0, description="Without max_bytes: an entry nothing keeps goes once it has not been used for "
        "this many days (run summaries likewise)."
    )
    min_age: timedelta = Field(
        timedelta(hours=1), description="Nothing used (built, read or looked up) less than this long ago is "
        "deleted, whatever the budget: room for a run on another host between its lookup and its hold. A number "
        "of seconds or 90s, 30m, 6h, 2d."
    )
    after_retrain: bool = Field(
        True, description="Collect garbage after each `cpt retrain` run (a failure to collect is logged, never "
        "fails the run)."
    )

    @field_validator("min_age", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @field_validator("min_age")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < 0:
            raise ValueError("must not be negative")
        return value

    @property
    def min_age_seconds(self) -> float:
        return self.min_age.total_seconds()
