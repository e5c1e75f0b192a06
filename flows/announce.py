"""Announcing a drop at least once (`cpt emit-drop PATH`): the `corpus.drop.landed` event is emitted, then the
server's events API is asked for it by id until the server has stored it (POST /api/events/filter, Prefect's
`read_events`). Unconfirmed, the same event (same id) is sent again with backoff, and after the last attempt the
command fails saying so. Sending an event twice is harmless: the server stores an event id once (its insert ignores
a conflict) and its triggers skip an event id they have seen (prefect/server/events/triggers.py, 3.9). What no
announcement reached, the scan-drops deployment finds (flows/drops.py).

Kept apart from the scan's flow so that `cpt emit-drop` imports Prefect's client and nothing of the pipeline.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

DROP_EVENT = "corpus.drop.landed"


class AnnounceFailed(RuntimeError):
    """The server did not confirm the event: the drop is not announced."""


def drop_event(path: Path, name: str = DROP_EVENT):
    from prefect.events import Event

    return Event(event=name, resource={"prefect.resource.id": f"cpt.drop.{path}", "prefect.resource.name": path.name},
                 payload={"path": str(path)})


async def _stored(event, seconds: float) -> bool:
    """Whether the server has stored `event` (asked by id, every half second, for up to `seconds`)."""
    import datetime

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventIDFilter, EventOccurredFilter

    hour = datetime.timedelta(hours=1)
    deadline = time.monotonic() + seconds
    async with get_client() as client:
        while True:
            when = EventOccurredFilter(since=event.occurred - hour, until=event.occurred + hour)
            page = await client.read_events(filter=EventFilter(id=EventIDFilter(id=[event.id]), occurred=when),
                                            limit=1)
            if any(e.id == event.id for e in page.events):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.5)


async def _deliver(event, attempts: int, confirm_seconds: float, backoff: float, say) -> int:
    from prefect.events.clients import get_events_client

    why = ""
    for attempt in range(1, attempts + 1):
        try:
            async with get_events_client(reconnection_attempts=1) as events:
                await events.emit(event)
            if await _stored(event, confirm_seconds):
                return attempt
            why = f"the server has not stored it after {confirm_seconds:g} s"
        except Exception as e:  # noqa: BLE001  (unreachable, refused, timed out: each is retried the same way)
            why = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if attempt < attempts:
            wait = backoff * 2 ** (attempt - 1)
            say(f"emit-drop: attempt {attempt}/{attempts} not confirmed ({why}); sending it again in {wait:g} s")
            await asyncio.sleep(wait)
    raise AnnounceFailed(f"the server did not confirm event {event.id} after {attempts} attempts (last: {why}): the "
                         "drop is NOT announced. Run cpt emit-drop again once the server answers; the scan-drops "
                         "deployment also registers it when it next runs")


def announce(path: Path, name: str = DROP_EVENT, attempts: int = 5, confirm_seconds: float = 20.0,
             backoff: float = 2.0, say=print):
    """Emit the drop's event and return it once the server confirms it has stored it (AnnounceFailed otherwise)."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise AnnounceFailed("PREFECT_API_URL is not set: a drop is announced to the Prefect server the deployments "
                             "listen to (export PREFECT_API_URL=http://HOST:4200/api)")
    event = drop_event(path, name)
    attempt = asyncio.run(_deliver(event, attempts, confirm_seconds, backoff, say))
    return event, attempt
