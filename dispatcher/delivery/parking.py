"""Parking: the backlog of an endpoint whose circuit is open waits in ``LETTA_PARKED``, not in re-published schedules.

Source: issue 11, "Dead endpoints cost O(1) per cool-down, not O(backlog)". When the sender takes a task whose
endpoint's circuit is open, :meth:`ParkingLot.park` publishes it once to ``letta_parked.<endpoint_id>`` (stream
``LETTA_PARKED``, :func:`bus.streams.parked_stream_config`; ``Nats-Msg-Id = park:<stream seq>``, the attempts it
used in ``Letta-Prior-Attempts``) and acks it. Each parked endpoint has one durable pull consumer,
``parked-<endpoint_id>`` (filter its subject, deliver all, explicit ack, ``max_ack_pending`` =
``endpoint_max_concurrency``), PAUSED (nats-server 2.11+ consumer pause, ``$JS.API.CONSUMER.PAUSE``) until the
cool-down ends, so ``nats consumer info LETTA_PARKED parked-<id>`` shows the wait. A :class:`_Drainer` per endpoint
and process then:

* at the end of each cool-down fetches ONE task and delivers it through the sender (its gate and a sender slot:
  the probe is a real attempt). A retryable failure pauses the consumer again for the next (doubled) cool-down;
  a success (or any answer but a retryable failure) closes the circuit;
* drains the backlog at the endpoint's pace: at most ``endpoint_max_concurrency`` of its tasks in flight, each
  through the gate and a sender slot, so healthy endpoints keep their share;
* when the endpoint is disabled (after ``disable_after_s``, a 410, by its owner, or an undecryptable secret) or
  deleted, drains the backlog at once through the sender, which makes each task a ``failed`` delivery with a
  dead letter (deleted: ``skipped``);
* once nothing is pending or unacked: purges the subject up to the consumer's ack floor, deletes the consumer,
  and starts over if a task was parked meanwhile. So the messages on a parked subject are exactly the undelivered
  backlog (plus, for a moment, settled ones above an ack floor), and a durable created again with deliver-all
  never redelivers a settled task.

Cost while an endpoint is down: one publish per task per outage, then per cool-down one probe and one pause
request per process, whatever the backlog. Backlogs parked by a process that died are found by
:meth:`ParkingLot.run`, which lists the subjects of ``LETTA_PARKED`` every cool-down (O(parked endpoints)) and
drains those it has no drainer for. A full ``LETTA_PARKED`` (discard new) refuses a park: the sender then defers the
task as before (a message schedule), so nothing is dropped.

At-least-once: a task another process fetched between this process's last consumer check and the consumer's
deletion loses its ack and is delivered again by the next consumer (rare; the receiver dedups by ``webhook-id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge

from bus.envelope import H_MSG_ID
from config.settings import Settings
from dispatcher.delivery.endpoints import EndpointCache
from dispatcher.delivery.fetching import fetch
from dispatcher.delivery.gates import EndpointGate
from dispatcher.delivery.scheduling import (
    H_BUSY, H_PRIOR_ATTEMPTS, H_RATE_SLOT, SCHEDULE_HEADERS, task_ref,
)

log = logging.getLogger(__name__)

PARKED_ENDPOINTS = Gauge("letta_bus_parked_endpoints", "Endpoints with a parked backlog this process drains.")
PARKED_TASKS = Counter("letta_bus_parked_tasks_total", "Delivery tasks parked in LETTA_PARKED (circuit open).")
PARK_REFUSED = Counter("letta_bus_park_refused_total", "Parks refused (LETTA_PARKED full or unavailable); the task "
                       "was deferred as a message schedule instead.")
PROBES = Counter("letta_bus_parked_probes_total", "Probe attempts of parked endpoints, by result.", ["result"])

#: Outcomes of one delivery handed to the sender (``Sender.submit``): the endpoint answered 2xx; it failed in a
#: way that counts against it (5xx, 408, 429, timeout, connection error); the task was moved (parked again,
#: deferred) without an attempt; anything else (settled: 4xx, dead letter, skipped) is None.
OK, FAILING, MOVED = "ok", "failing", "moved"

Submit = Callable[[Msg], Awaitable[str | None]]


def consumer_name(endpoint_id: str) -> str:
    """The durable of one parked endpoint: ``parked-<endpoint_id>``."""
    return f"parked-{endpoint_id}"


def _rfc3339(wall_s: float) -> str:
    return datetime.fromtimestamp(wall_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _wall(monotonic_s: float) -> float:
    return time.time() + (monotonic_s - time.monotonic())


def _monotonic(rfc3339: str | None) -> float:
    """Monotonic seconds of an RFC 3339 time the server gave (0.0 when none or unreadable)."""
    if not rfc3339:
        return 0.0
    try:
        text = rfc3339.replace("Z", "+00:00")
        if "." in text:  # the server gives nanoseconds; Python parses at most microseconds
            head, _, tail = text.partition(".")
            digits = "".join(c for c in tail if c.isdigit())
            text = f"{head}.{digits[:6]}{tail[len(digits):]}"
        at = datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0
    return time.monotonic() + (at - time.time())


class ParkingLot:
    """Parks tasks of endpoints whose circuit is open and drains them (module docstring).

    ``bind(submit, gate)`` before use: ``submit(msg)`` delivers one parked task through the sender and returns
    its outcome (:data:`OK`, :data:`FAILING`, :data:`MOVED` or None); ``gate(endpoint_id)`` is the endpoint's
    :class:`EndpointGate`. ``await run(stop)`` scans for orphaned backlogs until ``stop`` is set, then stops the
    drainers. Counters: ``parked``, ``refused``, ``probes``."""

    def __init__(self, js: JetStreamContext, settings: Settings, endpoints: EndpointCache) -> None:
        self.js = js
        self.settings = settings
        self.endpoints = endpoints
        self.stream = settings.parked_stream
        self.prefix = settings.parked_subject_prefix
        self._drainers: dict[str, _Drainer] = {}
        self._submit: Submit | None = None
        self._gate: Callable[[str], EndpointGate] | None = None
        self._stopping = False
        self.parked = self.refused = self.probes = 0

    def bind(self, submit: Submit, gate: Callable[[str], EndpointGate]) -> None:
        """Connect the lot to the sender that delivers parked tasks."""
        self._submit, self._gate = submit, gate

    def subject(self, endpoint_id: str) -> str:
        """``letta_parked.<endpoint_id>``."""
        return f"{self.prefix}.{endpoint_id}"

    def has(self, endpoint_id: str) -> bool:
        """True while this process drains a parked backlog of the endpoint."""
        return endpoint_id in self._drainers

    @property
    def endpoints_parked(self) -> int:
        """Endpoints this process has a drainer for."""
        return len(self._drainers)

    async def park(self, msg: Msg, endpoint_id: str, used: int) -> bool:
        """Move the task ``msg`` (its endpoint's circuit is open; ``used``: attempts it used so far) to
        ``letta_parked.<endpoint_id>`` and ack it; True when parked. False (nothing changed: the caller defers it)
        when the stream refuses it (full: discard new) or does not answer within ``publish_timeout_s``."""
        if self._stopping:
            return False
        headers = {k: v for k, v in (msg.headers or {}).items()
                   if k not in SCHEDULE_HEADERS and k not in (H_BUSY, H_RATE_SLOT)}
        headers[H_MSG_ID] = f"park:{task_ref(msg, self.settings)}"  # a redelivered task parks once
        headers[H_PRIOR_ATTEMPTS] = str(max(used, 0))
        try:
            # (no expected-stream header: it would be stored and copied into the task's later re-publishes)
            await self.js.publish(self.subject(endpoint_id), msg.data, headers=headers,
                                  timeout=self.settings.publish_timeout_s)
        except Exception as exc:  # noqa: BLE001 - full, or unavailable: the caller defers instead (never drops)
            self.refused += 1
            PARK_REFUSED.inc()
            log.warning("could not park a task of endpoint %s (deferred instead): %r", endpoint_id, exc)
            return False
        await msg.ack()
        self.parked += 1
        PARKED_TASKS.inc()
        self._drainer(endpoint_id).parked()
        return True

    def wake(self, endpoint_id: str) -> None:
        """The endpoint changed (e.g. disabled): its drainer looks again now instead of at the end of its wait."""
        drainer = self._drainers.get(endpoint_id)
        if drainer is not None:
            drainer.wakeup.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Every cool-down (``circuit_cooldown_s``, at least 1 s) list the subjects of ``LETTA_PARKED`` and start a
        drainer for each backlog this process has none for (parked by a process that died, or by another one).
        When ``stop`` is set, stop the drainers (tasks they fetched and did not hand over are redelivered after
        ``ack_wait``; those handed to the sender finish there)."""
        period = max(self.settings.circuit_cooldown_s, 1.0)
        try:
            while not stop.is_set():
                try:
                    await self.scan()
                except Exception as exc:  # noqa: BLE001 - the server may be unavailable: next period
                    log.warning("scan of %s failed: %r", self.stream, exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), period)
        finally:
            self._stopping = True
            drainers = [d.task for d in self._drainers.values() if d.task is not None]
            for task in drainers:
                task.cancel()
            await asyncio.gather(*drainers, return_exceptions=True)

    async def scan(self) -> int:
        """Start drainers for parked backlogs this process has none for; returns how many it started."""
        info = await self.js.stream_info(self.stream, subjects_filter=f"{self.prefix}.>")
        started = 0
        for subject, count in (info.state.subjects or {}).items():
            endpoint_id = subject[len(self.prefix) + 1:]
            if count and endpoint_id not in self._drainers and not self._stopping:
                self._drainer(endpoint_id)
                started += 1
        return started

    def _drainer(self, endpoint_id: str) -> _Drainer:
        drainer = self._drainers.get(endpoint_id)
        if drainer is None:
            drainer = self._drainers[endpoint_id] = _Drainer(self, endpoint_id)
            drainer.task = asyncio.create_task(drainer.run(), name=f"parked-{endpoint_id}")
            PARKED_ENDPOINTS.inc()
        return drainer

    def _ended(self, drainer: _Drainer) -> None:
        if self._drainers.get(drainer.endpoint_id) is drainer:
            del self._drainers[drainer.endpoint_id]
            PARKED_ENDPOINTS.dec()


class _Drainer:
    """Probes and drains the parked backlog of one endpoint in this process (module docstring)."""

    def __init__(self, lot: ParkingLot, endpoint_id: str) -> None:
        self.lot = lot
        self.endpoint_id = endpoint_id
        self.durable = consumer_name(endpoint_id)
        self.subject = lot.subject(endpoint_id)
        self.wakeup = asyncio.Event()
        self.dirty = True  # a task was parked since the last emptiness check
        self.confirmed = False  # the endpoint answered since this drainer (re)started: drain without probing
        self.task: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._paused_until = 0.0  # monotonic seconds the consumer is paused until (as far as this process knows)

    def parked(self) -> None:
        self.dirty = True

    async def run(self) -> None:
        pause = 0.5
        try:
            while True:
                try:
                    await self._open()
                    await self._drain()
                    if await self._finish():
                        return
                    pause = 0.5
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - server unavailable, consumer gone: try again
                    log.warning("parked backlog of %s: %r; again in %.1f s", self.endpoint_id, exc, pause)
                    await self._close()
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 10.0)
        finally:
            self.lot._ended(self)  # noqa: SLF001 - synchronous with the last emptiness check: no park slips by
            await self._close()

    async def _open(self) -> None:
        """Find or create the durable (paused until the circuit's cool-down ends when it is open here)."""
        if self._sub is not None:
            return
        lot, js = self.lot, self.lot.js
        try:
            info = await js.consumer_info(lot.stream, self.durable)
            self._paused_until = _monotonic(info.config.pause_until) if info.paused else 0.0
        except NotFoundError:
            gate = lot._gate(self.endpoint_id)  # noqa: SLF001
            until = gate.open_until if gate.state == "open" else 0.0
            await js.add_consumer(lot.stream, ConsumerConfig(
                durable_name=self.durable, name=self.durable,
                description=f"letta-bus dispatcher: parked backlog of endpoint {self.endpoint_id} (circuit open)",
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT, ack_wait=lot.settings.ack_wait_s,
                max_ack_pending=lot.settings.endpoint_max_concurrency, filter_subject=self.subject,
                num_replicas=lot.settings.stream_replicas,
                pause_until=_rfc3339(_wall(until)) if until > time.monotonic() else None,
            ))
            self._paused_until = until
        self._sub = await js.pull_subscribe_bind(self.durable, lot.stream)

    async def _close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _state(self) -> str:
        """``enabled``, ``disabled`` (disabled, or its secret cannot be decrypted) or ``unknown`` (not in the view:
        deleted, or not loaded yet; the sender looks it up)."""
        view = self.lot.endpoints.get(self.endpoint_id)
        if view is None:
            return "unknown"
        return "enabled" if view.enabled and self.lot.endpoints.signer(view) is not None else "disabled"

    async def _drain(self) -> None:
        """Return when the consumer has nothing more to give (the backlog looks empty)."""
        lot = self.lot
        cap = lot.settings.endpoint_max_concurrency
        while True:
            gate = lot._gate(self.endpoint_id)  # noqa: SLF001
            if self._state() == "enabled" and gate.state == "open":  # wait for the end of the cool-down
                self.confirmed = False
                await self._pause(gate.open_until)
                # (a probe of the sender's own may be out, past open_until: look again shortly)
                if await self._wait_until(max(gate.open_until, time.monotonic() + 0.2)):
                    continue
            elif self._state() == "enabled" and self._paused_until > time.monotonic():  # paused by another process
                if await self._wait_until(self._paused_until):
                    continue
            self.dirty = False
            if self._state() != "enabled" or self.confirmed:
                if not await self._flow(cap):
                    return
                continue
            msgs = await fetch(self._sub, 1, f"parked {self.endpoint_id}", timeout_s=1.0)  # one probe
            if not msgs:
                return
            lot.probes += 1
            outcome = await lot._submit(msgs[0])  # noqa: SLF001
            PROBES.labels(outcome or "answered").inc()
            if outcome == FAILING:
                if gate.state != "open":  # this process's gate had not seen the outage yet
                    gate.open_circuit()
            elif outcome != MOVED:
                self.confirmed = True

    async def _flow(self, cap: int) -> bool:
        """Hand tasks to the sender, at most ``cap`` in flight, until the consumer has none left (returns False)
        or the circuit opens again (True)."""
        pending: set[asyncio.Task[str | None]] = set()
        lot = self.lot
        try:
            while True:
                gate = lot._gate(self.endpoint_id)  # noqa: SLF001
                if self._state() == "enabled" and gate.state == "open":
                    return True
                room = cap - len(pending)
                if room > 0:
                    msgs = await fetch(self._sub, room, f"parked {self.endpoint_id}",
                                       timeout_s=0.2 if pending else 1.0)
                    for msg in msgs:
                        pending.add(asyncio.create_task(lot._submit(msg)))  # noqa: SLF001
                    if not msgs and not pending:
                        return False
                if pending and (room <= 0 or not msgs):
                    _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if pending:  # each holds a sender delivery that finishes on its own; wait for the outcomes
                await asyncio.wait(pending)

    async def _pause(self, until: float) -> None:
        """Pause the consumer until monotonic ``until`` (one request per cool-down)."""
        if until <= time.monotonic() or abs(until - self._paused_until) < 0.05:
            return
        try:
            await self.lot.js.pause_consumer(self.lot.stream, self.durable, _rfc3339(_wall(until)))
            self._paused_until = until
        except Exception as exc:  # noqa: BLE001 - the wait below still holds the probe back in this process
            log.warning("could not pause %s: %r", self.durable, exc)

    async def _wait_until(self, until: float) -> bool:
        """Sleep until monotonic ``until``, waking early when the endpoint is disabled or :meth:`ParkingLot.wake`
        is called; checks the endpoint's state once a second. True when woken early."""
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return False
            self.wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), min(remaining, 1.0))
            if self._state() != "enabled":
                if self._paused_until > time.monotonic():
                    with contextlib.suppress(Exception):
                        await self.lot.js.resume_consumer(self.lot.stream, self.durable)
                    self._paused_until = 0.0
                return True

    async def _finish(self) -> bool:
        """Purge the drained subject and delete the consumer; True when the backlog is gone, False when tasks
        remain (pending, unacked, or parked meanwhile: drain again)."""
        lot, js = self.lot, self.lot.js
        try:
            info = await js.consumer_info(lot.stream, self.durable)
        except NotFoundError:  # deleted by another process's drainer
            await self._close()
            return not await self._remaining() and not self.dirty
        if info.num_pending or info.num_ack_pending or self.dirty:
            return False
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        await js.purge_stream(lot.stream, subject=self.subject, seq=floor + 1)  # settled ones: seq <= floor
        await self._close()
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(lot.stream, self.durable)
        if await self._remaining() or self.dirty:  # parked after the check: created again, delivers just those
            return False
        log.info("parked backlog of endpoint %s drained; consumer %s deleted", self.endpoint_id, self.durable)
        return True

    async def _remaining(self) -> int:
        info = await self.lot.js.stream_info(self.lot.stream, subjects_filter=self.subject)
        return (info.state.subjects or {}).get(self.subject, 0)

