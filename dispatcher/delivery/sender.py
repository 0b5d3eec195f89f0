"""Stage 2, send: POST each delivery task to its endpoint, signed, and ack/nak/term by the outcome table.

Source: DESIGN.md, "Delivery" and "HTTP". Tasks stream in (:class:`dispatcher.delivery.fetching.PullStream`, read
ahead by at most ``pull_batch``) and start as slots free up (``sender_concurrency`` POSTs in flight), so a task
waits at most briefly between arriving and its POST while its ack_wait runs. The endpoint's url, secret and
enabled flag are read at send time. The attempt number is JetStream's ``num_delivered``. The ack/nak/term runs
after the attempt's history is committed (:mod:`dispatcher.store.history`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple, TypeVar

import yarl
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bus.tracing import copy_trace_headers
from config.settings import Settings
from dispatcher.delivery import metrics
from dispatcher.delivery.endpoints import EndpointCache, EndpointView
from dispatcher.delivery.fetching import PullStream
from dispatcher.delivery.gates import EndpointGate, RateLimiter
from dispatcher.delivery.health import EndpointHealth
from dispatcher.delivery.parking import FAILING, MOVED, OK, ParkingLot
from dispatcher.delivery.outcome import Verdict, classify, parse_retry_after, retry_delay
from dispatcher.delivery.scheduling import H_BUSY, H_RATE_SLOT, Rescheduler, attempt_number, round_attempt
from dispatcher.delivery.signing import Signer
from dispatcher.delivery.tasks import TaskInfo
from dispatcher.delivery.webhook_http import LocalRequestError, WebhookHTTPClient, WebhookHTTPError
from dispatcher.rules.ssrf import BlockedAddressError, parse_allow_cidrs, vet_url_for_request
from dispatcher.store.history import DeliveryRecord, HistoryWriter
from dispatcher.store.models import DeliveryStatus

log = logging.getLogger(__name__)

USER_AGENT = "Letta-Webhook/1.0"
_OUTCOMES: dict[str, object] = {}  # outcome -> its child of metrics.OUTCOMES (labels() takes a lock per call)
_attempt_log = logging.getLogger("letta_bus.attempts")
_T = TypeVar("_T")


def request_headers(signer: Signer, task: TaskInfo, body: bytes, now: int,
                    trace: dict[str, str] | None = None) -> dict[str, str]:
    """Headers of one webhook POST (DESIGN.md, "HTTP"), signed by ``signer`` (the endpoint's, from
    :meth:`EndpointCache.signer`); ``now`` is Unix seconds (``webhook-timestamp``); ``trace``: the task's headers,
    whose W3C ``traceparent``/``tracestate`` are passed on."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Letta-Event": task.event_type,
        "X-Letta-Delivery": task.delivery_id,
        "X-Letta-Signature": signer.letta_signature(body),
        "webhook-id": task.event_id,
        "webhook-timestamp": str(now),
        "webhook-signature": signer.standard_signature(task.event_id, now, body),
    }
    return copy_trace_headers(trace, headers)


class Sender:
    """Runs the ``webhook-sender`` durable until ``stop`` is set. Counters: ``succeeded``, ``retried``,
    ``failed``, ``skipped``, ``deferred``, ``parked``, ``blocked`` (refused by the SSRF guard), ``evicted`` (idle
    gates and rate limiters dropped).

    ``parking``: where tasks of an endpoint whose circuit is open wait (:mod:`dispatcher.delivery.parking`); the
    sender delivers what it drains (:meth:`submit`). Without it they are deferred as message schedules."""

    def __init__(
        self, js: JetStreamContext, settings: Settings, endpoints: EndpointCache, history: HistoryWriter,
        health: EndpointHealth, rescheduler: Rescheduler, http: WebhookHTTPClient,
        parking: ParkingLot | None = None,
    ) -> None:
        self.js = js
        self.settings = settings
        self.endpoints = endpoints
        self.history = history
        self.health = health
        self.rescheduler = rescheduler
        self.http = http
        self.gates: dict[str, EndpointGate] = {}
        self.limiters: dict[str, RateLimiter] = {}
        self.rate_share: Callable[[], int] = lambda: 1  # live dispatchers sharing the agent rate limit (peers.py)
        self._free = settings.sender_concurrency  # delivery slots not in use
        self._slot_freed: asyncio.Future[None] | None = None
        self._slot_event = asyncio.Event()  # set when a slot frees up (parked-backlog drainers wait on it)
        self._inflight: set[asyncio.Task[None]] = set()
        self.ssrf_allow = parse_allow_cidrs(settings.ssrf_allow_cidrs)
        self._urls: dict[str, yarl.URL] = {}  # endpoint URL -> parsed once
        self._vetted: set[str] = set()  # endpoint URLs the SSRF guard let through (fixed allowlist: no change)
        self.succeeded = self.retried = self.failed = self.skipped = self.deferred = self.blocked = 0
        self.parked = self.evicted = 0
        self.parking = parking
        if parking is not None:
            parking.bind(self.submit, self.gate)

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and deliver tasks until ``stop`` is set, then wait for the POSTs in flight to finish (at most
        ``http_timeout_s`` + 1 seconds; deliveries unfinished by then are cancelled, unacked: JetStream redelivers)."""
        s = self.settings
        pull = await PullStream(self.js, s.webhooks_stream, s.sender_durable, read_ahead=s.pull_batch,
                                who="sender").start()
        sweeper = asyncio.create_task(self._sweep(stop), name="gate-sweep")
        try:
            while not stop.is_set():
                if self._free <= 0 and not await self._slot(1.0):  # no free slot within a second: check stop
                    continue
                msgs = await pull.take(min(self._free, s.pull_batch))
                self._free -= len(msgs)
                taken = time.monotonic()
                for msg in msgs:
                    task = asyncio.create_task(self._deliver(msg, taken))
                    self._inflight.add(task)
                    task.add_done_callback(self._done)
            if self._inflight:
                await asyncio.wait(self._inflight, timeout=self.settings.http_timeout_s + 1)
            for task in list(self._inflight):  # still waiting for a gate or a slow POST: redelivered later
                task.cancel()
        finally:
            sweeper.cancel()
            await pull.close()

    async def submit(self, msg: Msg) -> str | None:
        """Deliver one task read from elsewhere than the sender's durable (a parked backlog): wait for a free
        delivery slot, deliver it as :meth:`run` does, and return its outcome (``parking.OK``, ``FAILING``,
        ``MOVED`` or None: see :mod:`dispatcher.delivery.parking`). The delivery runs to its end even if the
        caller is cancelled (the sender's stop waits for it)."""
        while self._free <= 0:
            self._slot_event.clear()
            await self._slot_event.wait()
        self._free -= 1
        task = asyncio.create_task(self._deliver(msg, time.monotonic()))
        self._inflight.add(task)
        task.add_done_callback(self._done)
        await asyncio.wait([task])
        return None if task.cancelled() or task.exception() is not None else task.result()

    async def _sweep(self, stop: asyncio.Event) -> None:
        """Every ``endpoint_idle_evict_s`` / 2 seconds drop idle gates and full rate limiters
        (:meth:`evict_idle`)."""
        idle_s = self.settings.endpoint_idle_evict_s
        while not stop.is_set():
            await asyncio.sleep(max(idle_s / 2, 0.05))
            self.evict_idle(idle_s)

    def evict_idle(self, idle_s: float) -> int:
        """Drop the gates of endpoints idle for more than ``idle_s`` seconds (closed circuit, nothing in flight,
        waiting, deferred or parked) and the rate limiters whose bucket is full again; returns how many were
        dropped. Cost: O(gates + limiters in memory). A dropped one is made again, fresh, on next use."""
        now = time.monotonic()
        parking = self.parking
        idle = [endpoint_id for endpoint_id, gate in self.gates.items()
                if (gate.idle_for(now) or 0.0) > idle_s and not (parking is not None and parking.has(endpoint_id))]
        for endpoint_id in idle:
            del self.gates[endpoint_id]
        full = [agent_id for agent_id, limiter in self.limiters.items() if limiter.is_full()]
        for agent_id in full:
            del self.limiters[agent_id]
        self.evicted += len(idle) + len(full)
        return len(idle) + len(full)

    async def _slot(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` seconds for a delivery slot to free up; True when one did."""
        loop = asyncio.get_running_loop()
        self._slot_freed = waiter = loop.create_future()
        timer = loop.call_later(timeout_s, lambda: waiter.done() or waiter.set_result(None))
        try:
            await waiter
        finally:
            timer.cancel()
            self._slot_freed = None
        return self._free > 0

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._give_slot()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery crashed: %r", task.exception())

    def _give_slot(self) -> None:
        self._free += 1
        self._slot_event.set()
        waiter = self._slot_freed
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _unslotted(self, wait: Awaitable[_T]) -> _T:
        """Await ``wait`` without holding a delivery slot (issue 10, finding 5): a task waiting for its endpoint's
        gate or its agent's rate slot leaves the sender's slots to tasks that can POST now, so one endpoint holds
        at most its own concurrency cap of them. The slot is taken back after (``_free`` may dip below zero for a
        moment; the fetch loop then waits)."""
        self._give_slot()
        try:
            return await wait
        finally:
            self._free -= 1

    def gate(self, endpoint_id: str) -> EndpointGate:
        """The concurrency cap and circuit breaker of an endpoint (created on first use)."""
        gate = self.gates.get(endpoint_id)
        if gate is None:
            s = self.settings
            gate = self.gates[endpoint_id] = EndpointGate(
                s.endpoint_max_concurrency, s.circuit_failure_threshold, s.circuit_cooldown_s,
                max_cooldown_s=s.circuit_max_cooldown_s, initial_latency_s=s.http_timeout_s / 5)
        return gate

    async def _deliver(self, msg: Msg, taken: float) -> str | None:
        """Deliver one task (``taken``: ``time.monotonic()`` when the sender took it off the pull stream). Returns
        ``OK`` (2xx), ``FAILING`` (a failure counted against the endpoint), ``MOVED`` (parked or deferred, no
        attempt) or None (otherwise settled)."""
        try:
            task = TaskInfo.from_headers(msg.headers)
        except KeyError as exc:
            log.error("terminating a message without delivery task header %s on %s", exc, msg.subject)
            await msg.term()
            return
        attempt = attempt_number(msg)
        endpoint = self.endpoints.get(task.endpoint_id)
        if endpoint is None:  # deleted, or created a moment ago and not loaded by this process yet (finding 6)
            try:
                endpoint = await self.endpoints.lookup(task.endpoint_id)
            except Exception as exc:  # noqa: BLE001 - the database is unavailable: try again later, no attempt used
                log.warning("endpoint %s not in the view and its lookup failed: %r", task.endpoint_id, exc)
                self.deferred += 1
                await self.rescheduler.defer(msg, task.endpoint_id, 5.0)
                return MOVED
        if endpoint is None:  # deleted: nothing can bring its tasks back
            self.skipped += 1
            self._record(task, msg, attempt, DeliveryStatus.SKIPPED, None, 0.0, None, "endpoint deleted")
            return None
        signer = self.endpoints.signer(endpoint) if endpoint.enabled else None
        if signer is None:  # disabled (410, failing too long, by its owner) or its secret cannot be decrypted
            self._disabled(msg, task, endpoint, attempt)
            return None
        if endpoint.url not in self._vetted:
            try:
                vet_url_for_request(endpoint.url, self.ssrf_allow)  # the HTTP client does not resolve IP literals
            except BlockedAddressError as exc:
                self._blocked(msg, task, endpoint, attempt, exc)
                return None
            if len(self._vetted) > 10_000:
                self._vetted.clear()
            self._vetted.add(endpoint.url)
        gate = self.gate(endpoint.id)
        if msg.headers.pop(H_BUSY, None):
            gate.returned()
        wait = gate.blocked_for()
        if wait is not None:  # the circuit is open
            return await self._park(msg, endpoint.id, wait)
        if not gate.can_wait():
            msg.headers[H_BUSY] = "1"
            wait = gate.busy_delay()
        if wait is None:
            wait = await self._rate_wait(msg, task.agent_id)
        if wait is None:
            wait = await self._acquire(gate, msg, taken)
            if wait == _CIRCUIT_OPEN:
                return await self._park(msg, endpoint.id, gate.blocked_for() or gate.cooldown_s)
        if wait is not None:
            self._defer_count()
            await self.rescheduler.defer(msg, endpoint.id, wait)
            return MOVED
        try:
            status_code, excerpt, error, retry_after, duration_ms, local = await self._post(
                endpoint, signer, task, msg)
        except BlockedAddressError as exc:
            gate.release(None)
            self._blocked(msg, task, endpoint, attempt, exc)
            return None
        metrics.ATTEMPT_SECONDS.observe(duration_ms / 1000)
        verdict = classify(status_code)
        gate.release(None if local else True if verdict is Verdict.SUCCEEDED else
                     False if verdict is Verdict.RETRY else None, duration_ms / 1000)
        if verdict is Verdict.SUCCEEDED:
            self.succeeded += 1
            self._record(task, msg, attempt, DeliveryStatus.SUCCEEDED, status_code, duration_ms, excerpt, error)
            self.health.succeeded(endpoint)
            return OK
        if verdict is Verdict.RETRY:
            if not local:  # this process's fault (LocalRequestError): retried, but not the endpoint's failure
                self.health.failed(endpoint)
            n = round_attempt(msg)
            if n < self.settings.max_attempts:
                self.retried += 1
                delay = retry_delay(self.settings.retry_schedule_s, n, parse_retry_after(retry_after))
                self._record(task, msg, attempt, DeliveryStatus.RETRYING, status_code, duration_ms, excerpt, error,
                             lambda: self.rescheduler.retry(msg, endpoint.id, delay))
                return None if local else FAILING
            error = f"attempts exhausted ({attempt}); last: {error or f'HTTP {status_code}'}"
        elif verdict is Verdict.GONE:
            error = "410 Gone: endpoint disabled"
            self.health.disable(endpoint, f"answered 410 Gone to delivery {task.delivery_id}")
        else:
            error = error or f"HTTP {status_code}: not retried (only 408, 429 and 5xx are)"
        self.failed += 1
        self._record(task, msg, attempt, DeliveryStatus.FAILED, status_code, duration_ms, excerpt, error,
                     lambda: self.rescheduler.dead_letter(msg, endpoint.id, attempt, error))
        return FAILING if verdict is Verdict.RETRY and not local else None

    def _defer_count(self) -> None:
        self.deferred += 1
        metrics.OUTCOMES.labels("deferred").inc()

    async def _park(self, msg: Msg, endpoint_id: str, wait_s: float) -> str:
        """The endpoint's circuit is open: park the task (one publish per task per outage), or, without parking
        or when ``LETTA_PARKED`` refuses it (full), defer it by ``wait_s`` seconds as before."""
        if self.parking is not None and await self.parking.park(msg, endpoint_id, attempt_number(msg) - 1):
            self.parked += 1
            return MOVED
        self._defer_count()
        await self.rescheduler.defer(msg, endpoint_id, wait_s)
        return MOVED

    def _disabled(self, msg: Msg, task: TaskInfo, endpoint: EndpointView, attempt: int) -> None:
        """The endpoint is disabled, or its secret cannot be decrypted: no request; the delivery becomes
        ``failed`` with a dead letter, so ``retry-failed`` or ``dead-letters resend`` brings it back once the owner
        fixes and re-enables the endpoint (issue 11). Only a deleted endpoint's tasks are ``skipped``."""
        self.failed += 1
        if endpoint.enabled:
            error = "endpoint's secret cannot be decrypted with any configured key: endpoint being disabled"
        else:
            error = "endpoint disabled: re-enable it, then retry-failed or dead-letters resend"
        self._record(task, msg, attempt, DeliveryStatus.FAILED, None, 0.0, None, error,
                     lambda: self.rescheduler.dead_letter(msg, endpoint.id, attempt, error))

    def _blocked(self, msg: Msg, task: TaskInfo, endpoint: EndpointView, attempt: int, exc: BlockedAddressError) -> None:
        """The SSRF guard refused the target: a final failure, no request was made, nothing is retried."""
        self.failed += 1
        self.blocked += 1
        error = f"SSRF guard: {exc}"
        log.warning("delivery %s to %s refused: %s", task.delivery_id, endpoint.url, exc)
        self._record(task, msg, attempt, DeliveryStatus.FAILED, None, 0.0, None, error,
                     lambda: self.rescheduler.dead_letter(msg, endpoint.id, attempt, error))

    async def _acquire(self, gate: EndpointGate, msg: Msg, taken: float) -> float | None:
        """Take a slot of the endpoint's gate: None when this task holds one, :data:`_CIRCUIT_OPEN` when the
        circuit opened meanwhile (or its probe is out), else the seconds to defer it. A task
        waits for the gate only while its POST can still finish within ``ack_wait_s`` (counted from ``taken``, with
        ``http_timeout_s`` + 2 s kept for the POST and the ack), so a slowing endpoint's queue is deferred instead
        of being redelivered and POSTed twice."""
        s = self.settings
        budget = s.ack_wait_s - s.http_timeout_s - 2.0 - (time.monotonic() - taken)
        try:
            if gate.has_slot():
                granted = await gate.acquire()
            elif budget > 0:
                granted = await self._unslotted(gate.acquire(timeout_s=budget))
            else:
                raise TimeoutError
        except TimeoutError:
            msg.headers[H_BUSY] = "1"
            return gate.busy_delay()
        if not granted:  # the circuit opened while this delivery waited
            return _CIRCUIT_OPEN
        return None

    async def _rate_wait(self, msg: Msg, agent_id: str) -> float | None:
        """Apply the per-agent rate limit: None when the delivery may go now (after a short sleep, at most 1 s),
        else the seconds to defer it. A task deferred for its rate slot does not reserve a second one."""
        rate = self.settings.agent_rate_limit_per_s
        if rate is None:
            return None
        slot = msg.headers.get(H_RATE_SLOT) if msg.headers else None
        if slot is not None:  # deferred earlier: it holds a reserved slot; schedules fire at whole seconds
            early = float(slot) - time.time()
            if early > 0:
                await self._unslotted(asyncio.sleep(min(early, 2.0)))
            return None
        limiter = self.limiters.get(agent_id)
        if limiter is None:
            limiter = self.limiters[agent_id] = RateLimiter(rate, self.settings.agent_rate_burst, self.rate_share)
        wait = limiter.reserve()
        if wait <= 1.0:
            if wait > 0:
                await self._unslotted(asyncio.sleep(wait))
            return None
        msg.headers[H_RATE_SLOT] = f"{time.time() + wait:.3f}"
        return wait

    async def _post(self, endpoint: EndpointView, signer: Signer, task: TaskInfo, msg: Msg) -> _Response:
        """POST once, signed by ``signer``. Raises only :class:`dispatcher.rules.ssrf.BlockedAddressError`."""
        body = msg.data
        headers = request_headers(signer, task, body, int(time.time()), msg.headers)
        url = self._urls.get(endpoint.url)
        if url is None:
            if len(self._urls) > 10_000:
                self._urls.clear()
            url = self._urls[endpoint.url] = yarl.URL(endpoint.url)
        start = time.perf_counter()
        try:
            result = await self.http.post(url, body, headers)
        except TimeoutError:
            return _Response(None, None, f"timeout after {self.settings.http_timeout_s:g} s", None, _ms(start))
        except BlockedAddressError:
            raise
        except LocalRequestError as exc:
            log.warning("delivery %s not sent, a local error: %s", task.delivery_id, exc)
            return _Response(None, None, f"local error, not the endpoint's: {exc}", None, _ms(start), True)
        except (WebhookHTTPError, OSError, ValueError) as exc:
            return _Response(None, None, f"{type(exc).__name__}: {exc}", None, _ms(start))
        if result.resent:
            log.info("delivery %s re-sent on a new connection: the kept-alive one was closed unanswered",
                     task.delivery_id)
        excerpt = result.excerpt.decode("utf-8", "replace") if result.excerpt else None
        return _Response(result.status, excerpt, result.incomplete, result.retry_after, _ms(start))

    def _record(
        self, task: TaskInfo, msg: Msg, attempt: int, status: str, status_code: int | None, duration_ms: float,
        excerpt: str | None, error: str | None, then: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Count, log and queue the attempt's history; ``then`` (default: a plain ack of ``msg``) runs after the
        history is committed, and ``msg`` is kept alive while the database is unavailable."""
        outcome = _OUTCOMES.get(status)
        if outcome is None:
            outcome = _OUTCOMES[status] = metrics.OUTCOMES.labels(status)
        outcome.inc()
        if _attempt_log.isEnabledFor(logging.INFO):
            metrics.log_attempt(
                delivery_id=task.delivery_id, event_id=task.event_id, endpoint_id=task.endpoint_id,
                agent_id=task.agent_id, event_type=task.event_type, attempt=attempt, outcome=status,
                status_code=status_code, duration_ms=round(duration_ms, 2), error=error,
            )
        self.history.add(DeliveryRecord(
            delivery_id=task.delivery_id, event_id=task.event_id, endpoint_id=task.endpoint_id,
            agent_id=task.agent_id, event_type=task.event_type, status=status, attempt=attempt,
            status_code=status_code, duration_ms=duration_ms, response_excerpt=excerpt, error=error, then=then,
            ack=msg if then is None else None, msg=msg, event_seq=task.event_seq, replay_id=task.replay_id,
        ))


#: What :meth:`Sender._acquire` returns when the circuit refused the task (not a delay).
_CIRCUIT_OPEN = -1.0


class _Response(NamedTuple):
    """What one POST gave: status code (None: no response), response excerpt, error (or why the body was cut),
    Retry-After header, duration in ms, and ``local``: the failure was this process's (not counted against the
    endpoint)."""

    status_code: int | None
    excerpt: str | None
    error: str | None
    retry_after: str | None
    duration_ms: float
    local: bool = False


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
