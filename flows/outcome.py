"""How a `cpt` command that ran a flow ends when the flow failed: its --summary written with the error, and one line
on stderr for an expected failure (a config, an input, a conflict found before compute, a push, a training child
that failed with its last lines) instead of Prefect's tracebacks. A traceback is kept for everything else: a bug."""

from __future__ import annotations

import sys
from pathlib import Path


def expected_failures() -> tuple[type[BaseException], ...]:
    """The errors a run ends with whose message is the whole story (a config, an input, a conflict, a push, a
    training child that failed with its last lines): printed as one line, never as a traceback."""
    from tasks.core.config.base import ConfigError
    from tasks.data.records import BadRecordError
    from tasks.line.lineage import LostPromotedModel
    from tasks.line.preflight import RunConflict
    from tasks.line.promotions import ReleaseClaimed
    from tasks.push import PushFailed
    from tasks.train import ModelDamaged, TrainingFailed

    return (ConfigError, BadRecordError, RunConflict, ReleaseClaimed, PushFailed, LostPromotedModel,
            TrainingFailed, ModelDamaged)


def quiet_expected_tracebacks() -> None:
    """Prefect logs a failed task or flow with its traceback; for an expected failure the terminal gets the
    message alone (the Prefect UI keeps the traceback: only the console handlers are filtered)."""
    import logging

    expected = expected_failures()

    class NoTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and isinstance(record.exc_info[1], expected):
                record.exc_info, record.exc_text = None, None
            return True

    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and not any(
                type(f).__name__ == "NoTraceback" for f in handler.filters):
            handler.addFilter(NoTraceback())


def write_json(path: str, data: dict) -> None:
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")


def failed(what: str, error: BaseException, summary_path: str | None, summary: dict | None, where: str = "") -> int:
    """A run that failed: its --summary written with the error, one line on stderr for an expected failure (the
    traceback otherwise: a bug)."""
    if summary_path:
        write_json(summary_path, summary if summary is not None else
                    {"status": "Failed", "error": f"{type(error).__name__}: {error}", "stages": []})
    if not isinstance(error, expected_failures()):
        raise error
    from tasks.data.records import BadRecordError

    # A bad record is the input's fault, named by file:line: said as such, as before a flow ever starts.
    said = f"bad input: {error}" if isinstance(error, BadRecordError) else f"{what} failed: {error}"
    print(f"cpt: {said}" + (f"\nsummary: {where}" if where else ""), file=sys.stderr)
    return 1


def retrain_failed(line: str, error: BaseException, summary_path: str | None, result: dict | None = None,
                   reason: str = "failed") -> int:
    """`cpt retrain` that failed (a conflict before the server, or the flow): its --summary is the retrain result
    (what `write_result` writes) with the error, and the terminal gets `failed`'s one line."""
    result = dict(result or {"trained": False, "reason": reason, "line": line})
    result.setdefault("error", f"{type(error).__name__}: {error}")
    if summary_path:
        write_json(summary_path, result)
    return failed(f"line {line}: retrain", error, None, None)
