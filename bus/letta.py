"""LettaEventBus: the object Letta's server holds where it would hold a ``WebhookManager``.

Source: DESIGN.md, "Publishing"; the integration points and the call shape follow the WebhookManager of Letta's
webhook work (``await webhook_manager.publish_event(agent_id=..., event_type=..., payload=...)``), see
docs/letta-integration.md. Webhook and bus failures must not fail a step, so nothing here raises into the agent
loop: failures are logged and counted (:attr:`LettaEventBus.stats`).

Two modes (``mode``):

``"awaited"``
    ``publish_event`` validates and builds the event with :meth:`EventPublisher.build` and returns its event_id
    once JetStream acknowledged it (one ``js.publish`` round trip, p50 about 0.3 ms on this project's machine). It
    makes one attempt of at most ``publish_timeout_s`` seconds; when the broker is unreachable it does not even
    try, and when the attempt fails (timeout, 503, connection lost) the event goes to the background buffer below
    (same event_id, so a late first attempt and the retry are one message) and the call returns ``None`` ("not
    confirmed"). Retries live in the buffer, so an outage never holds an agent step for more than one attempt.
``"fire_and_forget"``
    ``publish_event`` (and the synchronous :meth:`LettaEventBus.enqueue`) validate, encode and append the event to
    a bounded in-memory buffer and return its event_id at once (tens of microseconds); a background task publishes
    the buffer in pipelined batches (:func:`bus.pipeline.publish_batch`) and retries what the broker did not
    acknowledge with the same ``Nats-Msg-Id``. :meth:`LettaEventBus.close` flushes it (bounded by a timeout).

Buffer bound and drop policy: at most ``buffer_max`` events (default 10,000) are held, counting those in flight.
When it is full a new event is **refused** (the call returns ``None``, ``stats.dropped_full`` grows and a warning
with the count is logged at the first refusal, then at most every ``DROP_REPORT_EVERY_S`` seconds and once more
when the broker acknowledges again). Refusing new rather than evicting the
oldest was chosen because (1) the caller learns at call time that its event was not taken, instead of holding an
event_id whose event is later evicted silently, (2) what is kept is a gap-free prefix of the event history, so
subscribers see one gap at the end of an outage instead of holes spread over it, and (3) events already in flight
are never evicted mid-publish. Events whose loss is not acceptable belong in the outbox (:mod:`bus.outbox`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Literal

from nats.aio.client import Client
from nats.js import JetStreamContext

from bus import envelope as env
from bus.catalog import EventValidationError
from bus.connection import close_client, open_client
from bus.pipeline import Prepared, is_refusal, is_retryable, prepare, publish_batch
from bus.publisher import EventPublisher
from config.settings import Settings

log = logging.getLogger(__name__)

Mode = Literal["awaited", "fire_and_forget"]

#: Seconds between two warnings about refused (dropped) events or a broker that stays unreachable.
DROP_REPORT_EVERY_S = 5.0
#: Backoff between publish rounds while the broker does not acknowledge (seconds, doubled up to the max).
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0


@dataclass
class BusStats:
    """Counters since start. ``accepted``: valid events received, whatever became of them (so ``accepted ==
    published + dropped + pending``, ``deferred`` being part of one of those); ``published``: acknowledged by
    JetStream (``duplicates`` of them were already stored); ``invalid``: refused by validation (caller error);
    ``dropped_full``: refused because the buffer was full; ``dropped_refused``: refused by JetStream (e.g. over the
    stream's max_msg_size); ``dropped_on_close``: still unconfirmed when ``close`` gave up; ``deferred``: awaited
    publishes handed to the buffer because the broker did not answer in time; ``retries``: backoff pauses of the
    background publisher (broker unreachable, or a round not fully acknowledged) before it tried again."""

    accepted: int = 0
    published: int = 0
    duplicates: int = 0
    invalid: int = 0
    dropped_full: int = 0
    dropped_refused: int = 0
    dropped_on_close: int = 0
    deferred: int = 0
    retries: int = 0

    @property
    def dropped(self) -> int:
        """Events that will not be stored: buffer full + refused by JetStream + unconfirmed at close."""
        return self.dropped_full + self.dropped_refused + self.dropped_on_close

    def as_dict(self) -> dict[str, int]:
        """The counters plus ``dropped`` (for health endpoints and logs)."""
        return {**asdict(self), "dropped": self.dropped}


class LettaEventBus:
    """WebhookManager-compatible facade over :class:`bus.publisher.EventPublisher` (see the module docstring).

    ``LettaEventBus(settings)`` connects to ``settings.nats_url`` itself in :meth:`start` (in the background,
    reconnecting forever); ``LettaEventBus(settings, nc=client)`` uses an open connection and leaves it open at
    :meth:`close`. ``mode``, ``buffer_max`` (events), ``batch_size`` (events per pipelined round) and
    ``close_timeout_s`` (seconds) default to the settings ``publish_mode``, ``publish_buffer_max``,
    ``publish_batch`` and ``publish_close_timeout_s``.
    Raises ``ValueError`` for an unknown mode or a bound below 1.

    Use from one event loop (the one Letta's server runs on).
    """

    def __init__(
        self,
        settings: Settings,
        nc: Client | None = None,
        *,
        mode: Mode | None = None,
        buffer_max: int | None = None,
        batch_size: int | None = None,
        close_timeout_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.mode: Mode = mode or settings.publish_mode
        if self.mode not in ("awaited", "fire_and_forget"):
            raise ValueError(f"mode must be 'awaited' or 'fire_and_forget' (LETTA_BUS_PUBLISH_MODE), not {self.mode!r}")
        self.buffer_max = int(buffer_max or settings.publish_buffer_max)
        self.batch_size = int(batch_size or settings.publish_batch)
        if self.buffer_max < 1 or self.batch_size < 1:
            raise ValueError("buffer_max (LETTA_BUS_PUBLISH_BUFFER_MAX) and batch_size (LETTA_BUS_PUBLISH_BATCH) "
                             "must be >= 1")
        self.close_timeout_s = float(
            close_timeout_s if close_timeout_s is not None
            else settings.publish_close_timeout_s)
        self.stats = BusStats()
        self._nc = nc
        self._owns_connection = nc is None
        self.publisher = EventPublisher(settings, nc)
        self._js: JetStreamContext | None = nc.jetstream() if nc is not None else None
        self._connector: asyncio.Task[Client] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._queue: deque[Prepared] = deque()
        self._inflight = 0
        self._wakeup = asyncio.Event()  # set by a new buffered event
        self._resume = asyncio.Event()  # set by a (re)connect or close(): ends a backoff pause early
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._closed = False
        self._dropped_reported = 0
        self._last_drop_report = 0.0
        self._last_outage_report = 0.0

    # --- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self, wait_s: float | None = None) -> "LettaEventBus":
        """Start the background publisher and, without ``nc``, connect to ``settings.nats_url`` in the background,
        waiting at most ``wait_s`` seconds (default ``connect_timeout_s``). Returns even when no server answered:
        awaited publishes are then deferred to the buffer until the connection is up. Call once at server startup.
        Raises ``ValueError`` when it must connect and ``nats_url`` is unset."""
        if self._nc is None and self._connector is None:
            if not self.settings.nats_url:
                raise ValueError("LettaEventBus.start needs LETTA_BUS_NATS_URL (the broker letta-bus up runs or joins)")
            self._connector = asyncio.create_task(open_client(self.settings.nats_url, name="letta-bus-letta",
                                                                      settings=self.settings, role="publisher"))
            self._connector.add_done_callback(self._connected)
            await asyncio.wait({self._connector},
                               timeout=wait_s if wait_s is not None else self.settings.connect_timeout_s)
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="letta-bus-publish-buffer")
        return self

    def _connected(self, task: asyncio.Task[Client]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._nc = task.result()
            self._js = self._nc.jetstream()
            self.publisher = EventPublisher(self.settings, self._nc)
            self._resume.set()

    @property
    def connected(self) -> bool:
        """True while the NATS connection is up."""
        return self._nc is not None and self._nc.is_connected

    @property
    def pending(self) -> int:
        """Events buffered or in flight, not yet acknowledged."""
        return len(self._queue) + self._inflight

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every buffered event was acknowledged (or dropped); at most ``timeout_s`` seconds
        (default ``close_timeout_s``). Returns True when the buffer is empty. Never raises."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s if timeout_s is not None else self.close_timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self, timeout_s: float | None = None) -> None:
        """Refuse new events, flush the buffer for at most ``timeout_s`` seconds (default ``close_timeout_s``),
        count what is left in ``stats.dropped_on_close`` (logged as a warning), then close the connection if this
        facade opened it. Call at server shutdown. Never raises; idempotent."""
        if self._closed:
            return
        self._closing = True
        timeout_s = self.close_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        worker = self._worker
        if worker is not None:
            self._wakeup.set()
            self._resume.set()
            done, _ = await asyncio.wait({worker}, timeout=timeout_s)
            if not done:
                worker.cancel()
                await asyncio.gather(worker, return_exceptions=True)
        left = self.pending
        if left:
            self.stats.dropped_on_close += left
            self._queue.clear()
            self._inflight = 0
            log.warning("letta-bus: %d events not confirmed by the broker within %.1f s of close were dropped "
                        "(total dropped %d)", left, timeout_s, self.stats.dropped)
        self._closed = True
        if self._connector is not None and not self._connector.done():
            self._connector.cancel()
        if self._owns_connection:
            await close_client(self._nc, what="letta-bus's NATS connection",
                               timeout_s=max(0.1, deadline - time.monotonic()))

    async def __aenter__(self) -> "LettaEventBus":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- publishing --------------------------------------------------------------------------------------------

    def build(
        self, agent_id: str, event_type: str, data: dict[str, Any], *, organization_id: str | None = None,
        event_id: str | None = None,
    ) -> env.Envelope:
        """Validate and wrap an event (:meth:`EventPublisher.build`); lets this facade serve as the builder of
        :func:`bus.outbox.add_event`. Raises :class:`EventValidationError` naming the field."""
        return self.publisher.build(agent_id, event_type, data, organization_id=organization_id, event_id=event_id)

    async def publish_event(
        self, *, agent_id: str, event_type: str, payload: dict[str, Any], organization_id: str | None = None,
    ) -> str | None:
        """Publish one Letta event; the drop-in for ``WebhookManager.publish_event``.

        ``event_type``: a catalog type such as ``"agent.step.completed"`` (an Enum whose ``value`` is one is
        accepted too); ``payload``: the event's ``data`` per bus/catalog.py (unknown fields pass through);
        ``organization_id``: the actor's organization when known.

        Returns the ``event_id`` (``evt_<uuid7 hex>``): in ``"awaited"`` mode once JetStream stored it, in
        ``"fire_and_forget"`` mode once it is buffered. Returns ``None`` when it was refused (invalid event,
        buffer full, closed; logged and counted in :attr:`stats`) or, in awaited mode, when the broker did not
        confirm it in time (the event was then handed to the buffer, ``stats.deferred``). Never raises, except
        ``asyncio.CancelledError`` when the calling task is cancelled.
        """
        if self.mode == "fire_and_forget":
            return self.enqueue(agent_id=agent_id, event_type=event_type, payload=payload,
                                organization_id=organization_id)
        item = self._prepare(agent_id, event_type, payload, organization_id)
        if item is None:
            return None
        self.stats.accepted += 1
        if not self.connected or self.pending:  # do not wait on a broker that is down, nor overtake the buffer
            return self._defer(item)
        js = self._js
        try:  # one attempt bounded by publish_timeout_s; retries (same Nats-Msg-Id) belong to the buffer
            ack = await js.publish(item.subject, item.body, timeout=self.settings.publish_timeout_s,
                                   headers=item.headers)
        except Exception as exc:  # noqa: BLE001 - never fail the agent loop
            if is_refusal(exc):  # JetStream (or the client) refused it: a retry would not help
                self.stats.dropped_refused += 1
                log.error("letta-bus: event %s (%s) refused, dropped: %r", item.event_id, event_type, exc)
                return None
            if not is_retryable(exc):
                log.warning("letta-bus: publishing event %s (%s): %r; retrying in the background",
                            item.event_id, event_type, exc)
            return self._defer(item)
        self.stats.published += 1
        self.stats.duplicates += bool(ack.duplicate)
        return item.event_id

    def enqueue(
        self, *, agent_id: str, event_type: str, payload: dict[str, Any], organization_id: str | None = None,
    ) -> str | None:
        """Fire-and-forget, callable from sync code on the loop's thread: validate, encode and buffer one event
        for the background publisher. Returns its ``event_id``, or ``None`` when it was refused (invalid event,
        buffer full, facade closed; logged and counted). Never raises."""
        item = self._prepare(agent_id, event_type, payload, organization_id)
        if item is None:
            return None
        self.stats.accepted += 1
        return self._buffer(item)

    def _prepare(self, agent_id: str, event_type: Any, payload: Any, organization_id: str | None) -> Prepared | None:
        if self._closing:
            self.stats.accepted += 1
            self.stats.dropped_on_close += 1
            log.warning("letta-bus: event %s for agent %s refused: the bus is closing", event_type, agent_id)
            return None
        if isinstance(event_type, Enum):
            event_type = event_type.value
        try:
            return prepare(self.settings, self.publisher.build(agent_id, event_type, payload,
                                                               organization_id=organization_id))
        except (EventValidationError, TypeError, ValueError) as exc:
            self.stats.invalid += 1
            log.error("letta-bus: event %s for agent %s not published: %s", event_type, agent_id, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - never fail the agent loop
            self.stats.invalid += 1
            log.error("letta-bus: event %s for agent %s not published: %r", event_type, agent_id, exc)
            return None

    def _defer(self, item: Prepared) -> None:
        if self._buffer(item) is not None:
            self.stats.deferred += 1
        return None

    def _buffer(self, item: Prepared) -> str | None:
        if len(self._queue) + self._inflight >= self.buffer_max:
            self.stats.dropped_full += 1
            self._report_drops()
            return None
        self._queue.append(item)
        if self._idle.is_set():
            self._idle.clear()
        if not self._wakeup.is_set():
            self._wakeup.set()
        return item.event_id

    def _report_drops(self, force: bool = False) -> None:
        """Warn about refused events: at the first refusal, then at most every ``DROP_REPORT_EVERY_S`` seconds,
        and (``force``) once the broker acknowledges again, so the log always ends with the full count."""
        now = time.monotonic()
        new = self.stats.dropped_full - self._dropped_reported
        if not new or (not force and now - self._last_drop_report < DROP_REPORT_EVERY_S):
            return
        self._dropped_reported = self.stats.dropped_full
        self._last_drop_report = now
        log.warning("letta-bus: publish buffer full (%d events, broker %s): refused %d new events since the last "
                    "report (total dropped %d). Raise LETTA_BUS_PUBLISH_BUFFER_MAX or use the outbox for events "
                    "that must not be lost.", self.buffer_max, "connected" if self.connected else "unreachable",
                    new, self.stats.dropped)

    # --- background publisher ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            if not self._queue:
                if self._inflight == 0:
                    self._idle.set()
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            js = self._js if self.connected else None
            if js is None:
                backoff = await self._pause(backoff, "not connected")
                continue
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            self._inflight = len(batch)
            try:
                results = await publish_batch(js, batch, self.settings.publish_timeout_s)
            except Exception as exc:  # noqa: BLE001 - the background publisher must keep running; retry the batch
                log.error("letta-bus: publishing a batch of %d events failed: %r", len(batch), exc)
                results = [exc] * len(batch)
            retry: list[Prepared] = []
            reason = ""
            for item, result in zip(batch, results):
                if isinstance(result, BaseException):
                    if not is_refusal(result):  # transient or unknown: retried (same id), bounded by the buffer
                        retry.append(item)
                        reason = type(result).__name__
                    else:
                        self.stats.dropped_refused += 1
                        log.error("letta-bus: event %s refused, dropped: %r", item.event_id, result)
                else:
                    self.stats.published += 1
                    self.stats.duplicates += bool(result.duplicate)
            self._queue.extendleft(reversed(retry))  # same items, same Nats-Msg-Id, same order
            self._inflight = 0
            if retry:
                backoff = await self._pause(backoff, reason)
            else:
                backoff = 0.0
                if self.stats.dropped_full != self._dropped_reported:
                    self._report_drops(force=True)

    async def _pause(self, backoff: float, reason: str) -> float:
        self.stats.retries += 1
        now = time.monotonic()
        if now - self._last_outage_report >= DROP_REPORT_EVERY_S:
            self._last_outage_report = now
            log.warning("letta-bus: broker not acknowledging (%s); %d events buffered (max %d), retrying with the "
                        "same event ids", reason, self.pending, self.buffer_max)
        backoff = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, backoff * 2))
        self._resume.clear()
        try:  # the first connect or close() ends the pause early
            await asyncio.wait_for(self._resume.wait(), backoff)
        except asyncio.TimeoutError:
            pass
        return backoff
