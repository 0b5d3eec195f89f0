"""Stage 1, fan-out: each event on ``LETTA_EVENTS`` becomes one delivery task per endpoint that wants it.

Source: DESIGN.md, "Delivery: two stages". The event is acked only after every task's PubAck; a failed publish naks
the event and a redelivered event fans out again idempotently (task ``Nats-Msg-Id = <event_id>:<endpoint_id>``).
No endpoint: ack. Undecodable: term, logged and counted in ``poison``.

Events are read as a stream (:class:`dispatcher.delivery.fetching.PullStream`) and handled in batches of whatever has
arrived: every task of a batch is published before any PubAck is awaited (:class:`PipelinedPublisher`), then the
acks are awaited together under one timeout. Measured on the project's 2-core machine this is what lets one process
fan out several thousand events per second; awaiting ``js.publish`` per task (a request with its own timer) was a
third of that.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError

from bus.envelope import decode_head
from bus.streams import fanout_retry_delay_s
from bus.tracing import copy_trace_headers
from config.settings import Settings
from dispatcher.delivery import metrics
from dispatcher.delivery.endpoints import EndpointCache
from dispatcher.delivery.fetching import PullStream, reply_numbers
from dispatcher.delivery.tasks import H_DELIVERY_ID, task_headers
from dispatcher.store.history import DeliveryRecord, HistoryWriter
from dispatcher.store.models import DeliveryStatus

log = logging.getLogger(__name__)


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish: ``{"stream", "seq", "duplicate"}`` or ``{"error": {...}}``."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict | None = None


_puback = msgspec.json.Decoder(_PubAck)


class PipelinedPublisher:
    """JetStream publishes whose PubAcks are awaited later, together: one reply subscription, a future per message.

    Like nats-py's ``publish_async`` without its per-message random token and semaphore, and without leaking a
    pending slot when the publish itself raises. ``await start()`` first; ``forget()`` the futures given up on.
    """

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._prefix = ""
        self._futures: dict[str, asyncio.Future[_PubAck]] = {}
        self._next = 0
        self._sub = None

    async def start(self) -> "PipelinedPublisher":
        self._prefix = self.nc.new_inbox() + "."
        self._sub = await self.nc.subscribe(self._prefix + "*", cb=self._on_reply, pending_msgs_limit=0,
                                            pending_bytes_limit=0)
        return self

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # noqa: BLE001 - the connection may be closed already
                log.debug("fan-out publisher unsubscribe: %r", exc)
            self._sub = None
        for future in self._futures.values():
            future.cancel()
        self._futures.clear()

    async def publish(self, subject: str, body: bytes, headers: dict[str, str]) -> tuple[str, asyncio.Future[_PubAck]]:
        """Send one message; returns its token and the future of its PubAck. Raises what ``nc.publish`` raises."""
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[_PubAck] = asyncio.get_running_loop().create_future()
        self._futures[token] = future
        try:
            await self.nc.publish(subject, body, reply=self._prefix + token, headers=headers)
        except BaseException:
            del self._futures[token]
            raise
        return token, future

    def forget(self, token: str) -> None:
        """Give up on a PubAck (timed out): a late answer is ignored."""
        future = self._futures.pop(token, None)
        if future is not None and not future.done():
            future.cancel()

    async def _on_reply(self, msg: Msg) -> None:
        future = self._futures.pop(msg.subject[len(self._prefix):], None)
        if future is None or future.done():
            return
        if not msg.data:  # a status message, e.g. 503 no responders: no stream takes this subject
            future.set_exception(NoStreamResponseError())
            return
        try:
            ack = _puback.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            future.set_exception(exc)
            return
        if ack.error is not None:
            future.set_exception(APIError.from_error(ack.error))
        else:
            future.set_result(ack)


class FanOut:
    """Runs the ``webhook-fanout`` durable until ``stop`` is set. Counters: ``events``, ``tasks``, ``poison``."""

    def __init__(self, js: JetStreamContext, settings: Settings, endpoints: EndpointCache, history: HistoryWriter):
        self.js = js
        self.settings = settings
        self.endpoints = endpoints
        self.history = history
        self.events = 0
        self.tasks = 0
        self.poison = 0
        self.publisher = PipelinedPublisher(js._nc)  # noqa: SLF001 - the connection of the JetStream context

    async def run(self, stop: asyncio.Event) -> None:
        """Read and route events in batches until ``stop`` is set (checked at least every second)."""
        s = self.settings
        pull = await PullStream(self.js, s.events_stream, s.fanout_durable, read_ahead=s.pull_batch,
                                who="fan-out").start()
        await self.publisher.start()
        try:
            while not stop.is_set():
                if not self.history.has_room:  # the history writer is behind: read no more events until it catches up
                    try:
                        await asyncio.wait_for(self.history.room(), 1.0)
                    except asyncio.TimeoutError:
                        continue
                msgs = await pull.take(s.pull_batch)
                if msgs:
                    await self.route(msgs)
        finally:
            await pull.close()
            await self.publisher.close()

    async def route(self, msgs: list[Msg]) -> None:
        """Fan out a batch of events: publish all their tasks, await the PubAcks together, then ack each event
        whose tasks were all stored (nak the others) and queue the pending delivery rows."""
        routed = []  # (msg, head, targets, headers of each task, first index in `sent`)
        sent: list[tuple[str, asyncio.Future[_PubAck]] | BaseException] = []
        empty: list[Msg] = []
        events = 0
        for msg in msgs:
            try:
                head = decode_head(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.poison += 1
                metrics.POISON.inc()
                log.error("terminating undecodable event on %s (seq %s): %s", msg.subject, _seq(msg), exc)
                await _settle(msg.term())
                continue
            events += 1
            targets = self.endpoints.match(head)
            if not targets:
                empty.append(msg)
                continue
            seq = reply_numbers(msg)[0]
            first = len(sent)
            all_headers = []
            for e in targets:
                headers = copy_trace_headers(msg.headers, task_headers(head, e.id, seq))
                all_headers.append(headers)
                try:
                    sent.append(await self.publisher.publish(self.settings.delivery_subject(e.id), msg.data, headers))
                except Exception as exc:  # noqa: BLE001 - this event is retried
                    sent.append(exc)
            routed.append((msg, head, targets, all_headers, seq, first))
        self.events += events
        metrics.EVENTS.inc(events)
        pending = [s[1] for s in sent if isinstance(s, tuple)]
        if pending:
            await asyncio.wait(pending, timeout=self.settings.publish_timeout_s)
        for msg in empty:
            await _settle(msg.ack())
        at = datetime.now(timezone.utc)
        tasks = 0
        for msg, head, targets, all_headers, seq, first in routed:
            error = None
            for result in sent[first:first + len(targets)]:
                if isinstance(result, BaseException):
                    error = result
                    break
                token, future = result
                if not future.done():
                    self.publisher.forget(token)
                    error = asyncio.TimeoutError("no PubAck in time")
                elif not future.cancelled() and future.exception() is not None:
                    error = future.exception()
            if error is not None:
                for result in sent[first:first + len(targets)]:
                    if isinstance(result, tuple):
                        self.publisher.forget(result[0])
                delay = fanout_retry_delay_s(reply_numbers(msg)[1])
                log.warning("fan-out of %s failed (%r); retrying in %.0f s", head.event_id, error, delay)
                await _settle(msg.nak(delay=delay))
                continue
            tasks += len(targets)
            for e, headers in zip(targets, all_headers):
                self.history.add(DeliveryRecord(
                    delivery_id=headers[H_DELIVERY_ID], event_id=head.event_id, endpoint_id=e.id,
                    agent_id=head.agent_id, event_type=head.event_type, status=DeliveryStatus.PENDING, event_seq=seq,
                    at=at,
                ))
            await _settle(msg.ack())
        if tasks:
            self.tasks += tasks
            metrics.TASKS.inc(tasks)


async def _settle(action) -> None:  # noqa: ANN001 - a Msg.ack()/nak()/term() coroutine
    """Ack, nak or term; a failure (connection lost) is logged: JetStream redelivers the event after ack_wait."""
    try:
        await action
    except Exception as exc:  # noqa: BLE001
        log.warning("fan-out ack/nak failed: %r", exc)


def _seq(msg: Msg) -> int | str:
    try:
        return msg.metadata.sequence.stream
    except Exception:  # noqa: BLE001 - not a JetStream message
        return "?"
