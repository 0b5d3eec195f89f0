"""Messages JetStream stopped delivering (``max_deliver`` exhausted) end in a dead letter and a ``failed`` row.

Source: issue 10 ("No silent loss"), DESIGN.md "Delivery" (dead letters). When the last allowed delivery of a
message is not settled (a nak, a deferral that could not be stored, a crash or a lost ack before ``ack_wait``),
nats-server stops delivering it and publishes ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>``
(``{"stream", "consumer", "stream_seq", "deliveries"}``). ``LETTA_ADVISORIES`` captures the advisories of the
dispatcher's two durables on file (:func:`bus.streams.advisories_stream_config`), and :class:`ExhaustionHandler`
reads them with the durable ``webhook-exhausted``, so one published while no dispatcher runs is processed later.

For each advisory, the message is read back by its stream sequence, then:

* ``webhook-sender`` (a delivery task): the task is copied to ``letta_webhooks.dead.<endpoint_id>`` as
  :meth:`dispatcher.delivery.scheduling.Rescheduler.dead_letter` does (same headers, ``Nats-Msg-Id =
  dead:<task seq>``, so a dead letter the sender already wrote for it is dropped as a duplicate), and its delivery
  row becomes ``failed`` with ``max_deliver (N) exhausted; ...``. Nothing is written when the row says the task was
  settled after all (``succeeded``, ``skipped``, or ``failed`` since this task was stored: the sender's own dead
  letter, or this advisory processed before).
* ``webhook-fanout`` (an event): its tasks were never stored. The event is matched against the endpoints as the
  fan-out does; for each matching endpoint without a delivery row, a dead letter of the task the fan-out would
  have stored (its headers, ``Letta-Attempts: 0``, ``Nats-Msg-Id = dead:fanout:<event seq>:<endpoint id>``) and a
  ``failed`` row (attempts 0). An endpoint whose delivery has a row is left alone: its task was stored (the fan-out
  failed for another endpoint, or only its ack was lost) and the sender owns it. The event itself is never
  dead-lettered: matching is in memory and cannot fail on an event the fan-out could decode (an undecodable event
  is terminated, not exhausted); an advisory whose handling raises is retried (below), not dropped.

Dead letters are written before the row, and the advisory is acked after both, so a crash in between repeats the
work: a repeated dead letter is dropped by its ``Nats-Msg-Id`` within the duplicate window (2 min), and after it
by the row check. Dead letters and ``failed`` rows made here work with ``letta-bus dead-letters resend`` and
``retry-failed`` like any other. A failure (the webhooks stream or the database refuses) naks the advisory with a
delay doubling from 1 s to 60 s; one that cannot be acted on (its message left the stream, not a delivery task,
another durable) is logged, counted and acked.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Counter
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bus.envelope import H_MSG_ID, decode_head
from bus.tracing import copy_trace_headers
from config.settings import Settings
from dispatcher.delivery.endpoints import EndpointCache
from dispatcher.delivery.fetching import PullStream, reply_numbers
from dispatcher.delivery.scheduling import (
    H_ATTEMPTS, H_BUSY, H_FAILED_AT, H_LAST_ERROR, H_RATE_SLOT, prior_attempts,
)
from dispatcher.delivery.tasks import H_DELIVERY_ID, TaskInfo, task_headers
from dispatcher.store.database import Store
from dispatcher.store.models import Delivery, DeliveryStatus, utcnow
from dispatcher.store.queries import aware

log = logging.getLogger(__name__)

#: Served with the delivery metrics from the process-wide registry. ``durable``: ``sender`` or ``fanout``;
#: ``outcome``: ``dead_lettered`` (deliveries dead-lettered and failed), ``settled`` (nothing to do: the delivery
#: was settled after all), ``gone`` (the message left its stream), ``invalid`` (not a task or event).
EXHAUSTED = Counter("letta_bus_max_deliver_exhausted_total",
                    "Messages JetStream stopped delivering at max_deliver, by durable and what the dispatcher did.",
                    ["durable", "outcome"])

_NOT_CARRIED = (H_BUSY, H_RATE_SLOT, H_ATTEMPTS, H_LAST_ERROR, H_FAILED_AT)  # deferral bookkeeping, old dead letter


class MaxDeliveries(msgspec.Struct):
    """The advisory body (nats-server ``JSConsumerDeliveryExceededAdvisory``): ``deliveries`` = max_deliver."""

    stream: str = ""
    consumer: str = ""
    stream_seq: int = 0
    deliveries: int = 0


_decode = msgspec.json.Decoder(MaxDeliveries)


class ExhaustionHandler:
    """Processes the ``webhook-exhausted`` durable until ``stop`` is set (see the module docstring). Counters:
    ``dead_lettered`` (deliveries), ``settled``, ``unusable``, ``failures`` (advisories nak'ed for a retry)."""

    def __init__(self, js: JetStreamContext, settings: Settings, endpoints: EndpointCache, store: Store) -> None:
        self.js = js
        self.settings = settings
        self.endpoints = endpoints
        self.store = store
        self.dead_lettered = self.settled = self.unusable = self.failures = 0
        self._insert = sqlite_insert if store.is_sqlite else pg_insert

    async def run(self, stop: asyncio.Event) -> None:
        """Read and process advisories one at a time until ``stop`` is set (checked at least every second). Waits
        first for the durable to exist (a dispatcher started before ``letta-bus provision`` created it)."""
        s = self.settings
        if not await self._provisioned(stop):
            return
        pull = await PullStream(self.js, s.advisories_stream, s.exhausted_durable, read_ahead=8,
                                who="max-deliver advisories").start()
        try:
            while not stop.is_set():
                for msg in await pull.take(8):
                    await self._process(msg)
        finally:
            await pull.close()

    async def _provisioned(self, stop: asyncio.Event, recheck_s: float = 30.0) -> bool:
        """True once ``webhook-exhausted`` exists on ``LETTA_ADVISORIES``; False when ``stop`` is set first. Logs
        one error naming the fix, then checks again every ``recheck_s`` seconds."""
        s = self.settings
        warned = False
        while not stop.is_set():
            try:
                await self.js.consumer_info(s.advisories_stream, s.exhausted_durable)
                if warned:
                    log.warning("durable %s on %s exists now: max_deliver exhaustion is handled again",
                                s.exhausted_durable, s.advisories_stream)
                return True
            except Exception as exc:  # noqa: BLE001 - not found, no permission (timeout), reconnecting
                if not warned:
                    warned = True
                    log.error("durable %s on stream %s is not available (%r): messages JetStream stops delivering "
                              "(max_deliver) are not dead-lettered until it is; run `letta-bus provision` (or "
                              "`letta-bus up` with LETTA_BUS_PROVISION=true) with the admin role", s.exhausted_durable,
                              s.advisories_stream, exc)
            try:
                await asyncio.wait_for(stop.wait(), recheck_s)
            except asyncio.TimeoutError:
                pass
        return False

    async def _process(self, msg: Msg) -> None:
        try:
            advisory = _decode.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("terminating an undecodable MAX_DELIVERIES advisory on %s: %s", msg.subject, exc)
            await _settle(msg.term())
            return
        try:
            await self.handle(advisory)
        except Exception as exc:  # noqa: BLE001 - the webhooks stream or the database refused: try again later
            self.failures += 1
            delay = min(2.0 ** (reply_numbers(msg)[1] - 1), 60.0)
            log.warning("max_deliver advisory of %s/%s seq %d not processed (%r); retrying in %.0f s",
                        advisory.stream, advisory.consumer, advisory.stream_seq, exc, delay)
            await _settle(msg.nak(delay=delay))
            return
        await _settle(msg.ack())

    async def handle(self, advisory: MaxDeliveries) -> list[str]:
        """Dead-letter and fail what one advisory names; returns the delivery ids dead-lettered (``[]`` when there
        was nothing to do). Raises what the stream read, the dead-letter publish or the database raise: the
        caller retries the advisory then, and a repeat writes nothing twice."""
        s = self.settings
        if (advisory.stream, advisory.consumer) == (s.webhooks_stream, s.sender_durable):
            return await self._task(advisory)
        if (advisory.stream, advisory.consumer) == (s.events_stream, s.fanout_durable):
            return await self._event(advisory)
        log.info("ignoring the MAX_DELIVERIES advisory of %s/%s (not a dispatcher durable)", advisory.stream,
                 advisory.consumer)
        return []

    async def _task(self, advisory: MaxDeliveries) -> list[str]:
        s = self.settings
        seq = advisory.stream_seq
        try:
            raw = await self.js.get_msg(s.webhooks_stream, seq)
        except NotFoundError:
            return self._unusable("sender", advisory, f"task {seq} is no longer in {s.webhooks_stream}")
        headers = dict(raw.headers or {})
        try:
            task = TaskInfo.from_headers(headers)
        except KeyError as exc:
            return self._unusable("sender", advisory, f"message {seq} has no delivery task header {exc}")
        row = await self._row(task.delivery_id)
        stored_at = raw.time or datetime.now(timezone.utc)
        if row is not None and (row.status in (DeliveryStatus.SUCCEEDED, DeliveryStatus.SKIPPED) or (
                row.status == DeliveryStatus.FAILED and aware(row.updated_at) >= aware(stored_at))):
            self.settled += 1
            EXHAUSTED.labels("sender", "settled").inc()
            log.info("delivery %s reached max_deliver but is %s already: nothing to dead-letter", task.delivery_id,
                     row.status)
            return []
        attempts = max(row.attempts if row is not None else 0, prior_attempts(raw))  # reads raw.headers
        error = (f"max_deliver ({advisory.deliveries}) exhausted; last delivery was not settled (nak, deferral, "
                 f"crash or no ack within ack_wait {s.ack_wait_s:g} s)")
        letter = {k: v for k, v in headers.items() if not k.startswith("Nats-") and k not in _NOT_CARRIED}
        letter[H_MSG_ID] = f"dead:{seq}"  # = Rescheduler.dead_letter's: the sender's own dead letter wins
        await self._dead_letter(task.endpoint_id, raw.data or b"", letter, attempts, error)
        await self._fail(task.delivery_id, task.event_id, task.endpoint_id, task.agent_id, task.event_type,
                         attempts=attempts, error=error, event_seq=task.event_seq, replay_id=task.replay_id,
                         insert_only=False)
        self.dead_lettered += 1
        EXHAUSTED.labels("sender", "dead_lettered").inc()
        log.warning("delivery %s to %s dead-lettered: %s", task.delivery_id, task.endpoint_id, error)
        return [task.delivery_id]

    async def _event(self, advisory: MaxDeliveries) -> list[str]:
        s = self.settings
        seq = advisory.stream_seq
        try:
            raw = await self.js.get_msg(s.events_stream, seq)
        except NotFoundError:
            return self._unusable("fanout", advisory, f"event {seq} is no longer in {s.events_stream}")
        try:
            head = decode_head(raw.data or b"")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return self._unusable("fanout", advisory, f"event {seq} is undecodable: {exc}")
        error = (f"fan-out: max_deliver ({advisory.deliveries}) exhausted; the event's delivery task was never "
                 "stored (every fan-out of it failed)")
        done = []
        for endpoint in self.endpoints.match(head):
            headers = copy_trace_headers(raw.headers, task_headers(head, endpoint.id, seq))
            dlv = headers[H_DELIVERY_ID]
            if await self._row(dlv) is not None:
                continue  # its task was stored after all, or this advisory was processed before
            headers[H_MSG_ID] = f"dead:fanout:{seq}:{endpoint.id}"
            await self._dead_letter(endpoint.id, raw.data or b"", headers, 0, error)
            await self._fail(dlv, head.event_id, endpoint.id, head.agent_id, head.event_type, attempts=0,
                             error=error, event_seq=seq, replay_id=None, insert_only=True)
            done.append(dlv)
        self.dead_lettered += len(done)
        EXHAUSTED.labels("fanout", "dead_lettered" if done else "settled").inc(max(len(done), 1))
        if done:
            log.warning("event %s (seq %d) dead-lettered for %d endpoints: %s", head.event_id, seq, len(done), error)
        else:
            self.settled += 1
        return done

    def _unusable(self, durable: str, advisory: MaxDeliveries, why: str) -> list[str]:
        self.unusable += 1
        EXHAUSTED.labels(durable, "gone" if "no longer" in why else "invalid").inc()
        log.error("max_deliver (%d) exhausted on %s/%s seq %d, nothing to dead-letter: %s", advisory.deliveries,
                  advisory.stream, advisory.consumer, advisory.stream_seq, why)
        return []

    async def _row(self, delivery_id: str) -> Delivery | None:
        async with self.store.session() as s:
            return (await s.execute(select(Delivery).where(Delivery.id == delivery_id))).scalar_one_or_none()

    async def _dead_letter(self, endpoint_id: str, body: bytes, headers: dict[str, str], attempts: int,
                           error: str) -> None:
        """Publish a dead letter in :meth:`Rescheduler.dead_letter`'s shape; raises when it is not stored."""
        headers[H_ATTEMPTS] = str(attempts)
        headers[H_LAST_ERROR] = error[:1000].replace("\r", " ").replace("\n", " ")
        headers[H_FAILED_AT] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        await self.js.publish(self.settings.dead_letter_subject(endpoint_id), body, headers=headers,
                              timeout=self.settings.publish_timeout_s)

    async def _fail(self, delivery_id: str, event_id: str, endpoint_id: str, agent_id: str, event_type: str, *,
                    attempts: int, error: str, event_seq: int | None, replay_id: str | None,
                    insert_only: bool) -> None:
        """Write the delivery row ``failed`` with ``error``: insert it, or (``insert_only`` False) turn an
        existing row that is not ``succeeded`` or ``skipped`` into ``failed``, keeping its attempts."""
        now = utcnow()
        stmt = self._insert(Delivery).values(
            id=delivery_id, event_id=event_id, endpoint_id=endpoint_id, agent_id=agent_id, event_type=event_type,
            status=DeliveryStatus.FAILED, attempts=attempts, last_status_code=None, last_error=error,
            event_seq=event_seq, replay_id=replay_id, created_at=now, updated_at=now)
        if insert_only:
            stmt = stmt.on_conflict_do_nothing(index_elements=[Delivery.id])
        else:
            table = Delivery.__table__
            stmt = stmt.on_conflict_do_update(
                index_elements=[Delivery.id],
                set_={"status": DeliveryStatus.FAILED, "last_error": error, "updated_at": now},
                where=table.c.status.notin_((DeliveryStatus.SUCCEEDED, DeliveryStatus.SKIPPED)))
        async with self.store.session.begin() as s:
            await s.execute(stmt)


async def _settle(action) -> None:  # noqa: ANN001 - a Msg.ack()/nak()/term() coroutine
    """Ack, nak or term; a failure (connection lost) is logged: the advisory is redelivered after ack_wait."""
    try:
        await action
    except Exception as exc:  # noqa: BLE001
        log.warning("max-deliver advisory ack/nak failed: %r", exc)
