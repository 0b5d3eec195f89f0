"""Live updates of the console: ``GET /console/stream``, server-sent events of new attempts.

No bus subject carries attempts (the sender hands them to the history writer, :mod:`dispatcher.store.history`,
which writes them to the database in batches), so one poller per process (:class:`LiveHub`, one per app) reads
``attempts`` with an id above its cursor every :data:`POLL_S` seconds (a primary-key range, at most
:data:`POLL_BATCH` rows, joined to their delivery and endpoint) while at least one stream is open, and hands each
row to every stream whose principal sees the endpoint and whose filters match: one query per second whatever the
number of pages open. Each stream has a bounded queue (:data:`QUEUE_SIZE`); a stream that falls behind loses
the updates that do not fit and gets one ``lagged`` event (the page says to reload). At most :data:`MAX_STREAMS`
streams per process (503 past it); a comment line every :data:`HEARTBEAT_S` seconds keeps proxies from closing
an idle stream; a stream ends when its client leaves.

Events (``data`` is one line of JSON): ``attempt`` ``{"delivery_id", "number", "status", "row", "item"}`` where
``row`` is the delivery's ``<tr>`` for the deliveries table and ``item`` the attempt's ``<li>`` for a delivery's
timeline, both rendered (escaped) by the server; ``lagged`` ``{}``.

Attempt ids are allocated at insert; on PostgreSQL a transaction that took a lower id may commit after one with a
higher id (several dispatchers writing at once), and such an attempt is then not streamed (the page shows it on
reload).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import func, select

from dispatcher.api.auth import Principal, get_principal
from dispatcher.api.context import ApiContext, get_ctx
from dispatcher.api.scoping import sees
from dispatcher.api.console.reading import attempt_headers
from dispatcher.api.console.rendering import SECURITY_HEADERS, ConsoleRoute, fragment
from dispatcher.store.database import Store
from dispatcher.store.models import Attempt, Delivery, Endpoint

log = logging.getLogger(__name__)

#: Most concurrent streams per process.
MAX_STREAMS = 100
#: Updates queued per stream before it is marked lagged.
QUEUE_SIZE = 256
#: Seconds between two polls of ``attempts``.
POLL_S = 1.0
#: Most attempts read per poll.
POLL_BATCH = 500
#: Seconds between two heartbeat comments of an idle stream.
HEARTBEAT_S = 15.0

router = APIRouter(route_class=ConsoleRoute)


@dataclass(frozen=True)
class Filters:
    """What one page wants; None matches anything."""

    delivery_id: str | None = None
    endpoint_id: str | None = None
    agent_id: str | None = None
    event_type: str | None = None
    status: str | None = None

    def match(self, delivery: Delivery) -> bool:
        pairs = ((self.delivery_id, delivery.id), (self.endpoint_id, delivery.endpoint_id),
                 (self.agent_id, delivery.agent_id), (self.event_type, delivery.event_type),
                 (self.status, delivery.status))
        return all(want is None or want == have for want, have in pairs)


@dataclass(eq=False)
class Subscriber:
    """One open stream: who, what it wants, and its bounded queue of event lines."""

    principal: Principal
    filters: Filters
    queue: asyncio.Queue[str] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    lagged: bool = False

    def sees(self, delivery: Delivery, endpoint: Endpoint | None) -> bool:
        return (self.principal.is_operator or sees(self.principal.grant, endpoint)) and self.filters.match(delivery)

    def offer(self, line: str) -> None:
        """Queue an event line, or mark the stream lagged when it is full (never blocks the poller)."""
        if self.lagged:
            return
        try:
            self.queue.put_nowait(line)
        except asyncio.QueueFull:
            self.lagged = True
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()  # room for the notice
            self.queue.put_nowait(sse("lagged", {}))


def sse(event: str, data: dict) -> str:
    """One server-sent event: ``event:`` and a single ``data:`` line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def attempt_event(delivery: Delivery, attempt: Attempt) -> str:
    """The ``attempt`` event of one new attempt (its delivery's table row and its timeline item, rendered)."""
    return sse("attempt", {
        "delivery_id": delivery.id, "number": attempt.number, "status": delivery.status,
        "row": fragment("_delivery_row.html", d=delivery),
        "item": fragment("_attempt.html", a=attempt, headers=attempt_headers(delivery, attempt)),
    })


class StreamsFull(Exception):
    """:data:`MAX_STREAMS` streams are open in this process."""


class LiveHub:
    """The poller of one app and its subscribers (see the module docstring)."""

    def __init__(self, store: Store, *, max_streams: int = MAX_STREAMS, poll_s: float = POLL_S) -> None:
        self.store = store
        self.max_streams = max_streams
        self.poll_s = poll_s
        self.subscribers: set[Subscriber] = set()
        self.cursor: int | None = None  # the highest attempt id handed out (None: not read yet)
        self._task: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()

    async def subscribe(self, principal: Principal, filters: Filters) -> Subscriber:
        """A new stream; raises :class:`StreamsFull`. Starts the poller with the first one."""
        if len(self.subscribers) >= self.max_streams:
            raise StreamsFull()
        async with self._starting:
            if self._task is None or self._task.done():
                await self._start()
        subscriber = Subscriber(principal, filters)
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """End a stream; the poller stops with the last one."""
        self.subscribers.discard(subscriber)
        if not self.subscribers and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _start(self) -> None:
        async with self.store.session() as s:
            self.cursor = (await s.execute(select(func.max(Attempt.id)))).scalar() or 0
        self._task = asyncio.create_task(self._run(), name="console-live")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database may be away; the next poll tries again
                log.warning("console live poll failed: %r", exc)

    async def poll(self) -> int:
        """Read the attempts after the cursor and hand them out; returns how many were read."""
        stmt = (select(Attempt, Delivery, Endpoint).join(Delivery, Delivery.id == Attempt.delivery_id)
                .outerjoin(Endpoint, Endpoint.id == Delivery.endpoint_id)
                .where(Attempt.id > (self.cursor or 0)).order_by(Attempt.id).limit(POLL_BATCH))
        async with self.store.session() as s:
            rows = (await s.execute(stmt)).all()
        for attempt, delivery, endpoint in rows:
            self.cursor = attempt.id
            wanting = [sub for sub in self.subscribers if sub.sees(delivery, endpoint)]
            if wanting:
                line = attempt_event(delivery, attempt)
                for sub in wanting:
                    sub.offer(line)
        return len(rows)


def hub_of(request: Request, ctx: ApiContext) -> LiveHub:
    """The app's hub, made on first use."""
    hub = getattr(request.app.state, "console_live", None)
    if hub is None:
        hub = request.app.state.console_live = LiveHub(ctx.store)
    return hub


async def events(request: Request, hub: LiveHub, subscriber: Subscriber) -> AsyncIterator[str]:
    """The lines of one stream until the client leaves: queued events, a heartbeat comment when idle."""
    try:
        yield "retry: 3000\n\n"
        while not await request.is_disconnected():
            try:
                yield await asyncio.wait_for(subscriber.queue.get(), HEARTBEAT_S)
            except asyncio.TimeoutError:
                yield ": heartbeat\n\n"
    finally:
        hub.unsubscribe(subscriber)


@router.get("/stream")
async def stream(request: Request, delivery_id: str | None = None, endpoint_id: str | None = None,
                 agent_id: str | None = None, event_type: str | None = None, status: str | None = None,
                 ctx: ApiContext = Depends(get_ctx), principal: Principal = Depends(get_principal),
                 ) -> StreamingResponse:
    """Server-sent events of new attempts the principal sees (filters as the deliveries page's)."""
    hub = hub_of(request, ctx)
    try:
        subscriber = await hub.subscribe(principal, Filters(delivery_id, endpoint_id, agent_id, event_type, status))
    except StreamsFull:
        raise HTTPException(503, f"too many live streams ({hub.max_streams}); reload later",
                            headers={"Retry-After": "30"}) from None
    headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
    return StreamingResponse(events(request, hub, subscriber), media_type="text/event-stream", headers=headers)
