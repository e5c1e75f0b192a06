"""What stages show: a terminal progress bar plus, inside a Prefect run, progress/table/markdown artifacts.

Outside a Prefect run (unit tests calling pure functions or `task.fn`) the artifact calls are skipped, so
nothing here needs a server.
"""

from __future__ import annotations

import base64
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("cpt")


def in_prefect_run() -> bool:
    if "prefect" not in sys.modules:
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def run_logger():
    if in_prefect_run():
        from prefect.logging import get_run_logger

        return get_run_logger()
    return log


# A stage's progress artifact is made once it has run this long (CPT_PROGRESS_ARTIFACT_SECONDS): each artifact
# call is a round trip to the Prefect server, and a bar for work done in a fraction of a second says nothing (a
# drop's load, tokenize and chunk made three, about 35 ms each, of a drop run's ~0.4 s of data stages).
PROGRESS_ARTIFACT_SECONDS = 2.0


class _NoBar:
    """The terminal bar when CPT_NO_PROGRESS=1 (a worker, a benchmark, CI): counts nothing, prints nothing."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """How far a stage is: tqdm in the terminal, a Prefect progress artifact in the UI (made once the work has
    run PROGRESS_ARTIFACT_SECONDS, then updated at most every `every` s) and, for a stage that runs long, a log
    line every `log_every` s with the rate and the time left, so a run on a worker (no terminal, no UI open)
    still says how far along it is. `unit="B"` counts bytes and prints them scaled (MB, GB)."""

    def __init__(self, total: int, desc: str, unit: str = "it", every: float = 2.0, log_every: float | None = None):
        self.total = max(total, 1)
        self.done = 0
        self.desc = desc
        self.unit = unit
        self.every = every
        self.log_every = float(os.environ.get("CPT_PROGRESS_LOG_SECONDS", 60.0)) if log_every is None else log_every
        self._start = self._last = self._logged = time.monotonic()
        if os.environ.get("CPT_NO_PROGRESS") == "1":
            self._bar = _NoBar()  # tqdm not imported at all: ~10 ms of a drop run's first stage that shows nothing
        else:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", dynamic_ncols=True,
                             leave=False)
        self._artifact = None
        self._shows = in_prefect_run()
        self._after = float(os.environ.get("CPT_PROGRESS_ARTIFACT_SECONDS", PROGRESS_ARTIFACT_SECONDS))

    def update(self, n: int) -> None:
        self.done += n
        self._bar.update(n)
        now = time.monotonic()
        if self._shows and now - self._start >= self._after and (self._artifact is None or
                                                                  now - self._last >= self.every):
            self._push()
            self._last = now
        if self.log_every > 0 and now - self._logged >= self.log_every and self.done < self.total:
            run_logger().info(self.status(now))
            self._logged = now

    def _amount(self, n: float, unit: bool = True) -> str:
        if self.unit == "B":
            for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
                if n >= scale:
                    return f"{n / scale:,.1f} {name}"
            return f"{n:,.0f} B"
        return f"{n:,.0f} {self.unit}" if unit else f"{n:,.0f}"

    def status(self, now: float | None = None) -> str:
        """`desc: done/total (pct), rate, about T left`, the rate over the whole stage so far."""
        elapsed = max((now or time.monotonic()) - self._start, 1e-9)
        done = min(self.done, self.total)
        text = f"{self.desc}: {self._amount(done, unit=False)}/{self._amount(self.total)} ({100.0 * done / self.total:.0f}%)"
        if done:
            rate = done / elapsed
            left = (self.total - done) / rate
            text += f", {self.rate(rate)}, about {_duration(left)} left"
        return text

    def rate(self, per_second: float) -> str:
        """A rate that reads right at any speed: `1,234 doc/s`, `3.4 step/s`, or `2.5 s/step` under one a second
        (`0 step/s` said nothing about a training at 0.4 steps a second)."""
        if self.unit == "B":
            return f"{self._amount(per_second)}/s"
        if per_second >= 10:
            return f"{per_second:,.0f} {self.unit}/s"
        if per_second >= 1:
            return f"{per_second:.1f} {self.unit}/s"
        return f"{1 / per_second:.1f} s/{self.unit}" if per_second > 0 else f"0 {self.unit}/s"

    def final(self) -> str:
        """How the stage ended: the whole count, or where it stopped short of it (early stopping, a failure)."""
        elapsed = max(time.monotonic() - self._start, 1e-9)
        done = min(self.done, self.total)
        how = "done" if done >= self.total else "stopped at"
        text = f"{self.desc}: {how} {self._amount(done, unit=False)}/{self._amount(self.total)}"
        return text + (f" in {_duration(elapsed)}, {self.rate(done / elapsed)}" if done else "")

    def _push(self) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        done = min(100.0, 100.0 * self.done / self.total)
        if self._artifact is None:
            self._artifact = create_progress_artifact(done, description=self.status())
        else:
            update_progress_artifact(self._artifact, done, description=self.status())

    def close(self) -> None:
        self._bar.close()
        if self._shows and (self._artifact is not None or time.monotonic() - self._start >= self._after):
            # Finished, at the count it reached: a training that stopped early says the step it stopped at.
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self._artifact is None:
                self._artifact = create_progress_artifact(100.0, description=self.final())
            else:
                update_progress_artifact(self._artifact, 100.0, description=self.final())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds // 3600} h {round(seconds % 3600 / 60)} min"


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    raw = "-".join(parts).lower()
    return "".join(ch if ch.isalnum() and ch.isascii() else "-" for ch in raw).strip("-")[:100]


def table_artifact(rows: list[dict[str, Any]], key: str, description: str) -> None:
    if in_prefect_run():
        from prefect.artifacts import create_table_artifact

        create_table_artifact(rows, key=artifact_key(key), description=description)


def markdown_artifact(markdown: str, key: str, description: str) -> None:
    if in_prefect_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown, key=artifact_key(key), description=description)


def image_data_uri(path: Path) -> str:
    """The UI does not serve local files; an image embedded in markdown as a data URI renders inline."""
    mime = "image/svg+xml" if Path(path).suffix == ".svg" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()



def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return "" if v is None else str(v).replace("|", "\\|")
