"""Subscriber: run an async handler for each Letta event on JetStream, the way internal services should.

Source: DESIGN.md, "Subscribers for internal services". A :class:`Subscriber` owns one pull consumer on
``LETTA_EVENTS`` (durable: shared by every instance with the same name, which split the work; ephemeral when the
name is ``None``), fetches only as many messages as it has free handler slots, decodes each into an :class:`Event`
and settles it from the handler's result (see :mod:`subscribers.outcomes`). While a handler runs longer than
``ack_wait_s / 2`` the runner sends ``in_progress()`` every ``ack_wait_s / 2`` seconds, so slow work is not
redelivered to a peer. Delivery is at least once: handlers should be idempotent (``event.event_id`` is unique).

    sub = Subscriber("billing", subjects=["letta.agent.run.completed"])

    @sub.handler
    async def on_run(event: Event) -> None:
        ...

    asyncio.run(sub.run_forever())
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import secrets
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, NotFoundError

from bus.connection import connect
from bus.streams import ERR_STREAM_NOT_FOUND, ensure_consumer
from config.settings import Settings
from subscribers.event import Event, Start, start_config
from subscribers.outcomes import Action, Outcome, Reject, Retry, SubscriberStats, decide

log = logging.getLogger(__name__)

Handler = Callable[["Event"], Awaitable[None]]

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class Subscriber:
    """Runs ``handler(event)`` for every event on ``subjects`` with the outcome rules of
    :mod:`subscribers.outcomes`.

    ``durable``: consumer name shared by every instance (letters, digits, ``-``, ``_``), or ``None`` for an
    ephemeral consumer removed at :meth:`stop`. ``subjects``: filter subjects (default ``letta.>``; several use
    ``filter_subjects``, nats-server 2.10+). ``settings``: default ``Settings()`` from the environment. ``nc``: an
    open connection to use (not closed by the subscriber); otherwise it connects to ``settings.nats_url``.
    ``stream``: default ``settings.events_stream``. ``start``: see :data:`Start`; it applies only when the durable
    is created (an existing durable keeps its position). ``max_in_flight``: handlers running at once.
    ``max_deliver``: deliveries per event, always set (>= 1). ``ack_wait_s``: seconds before an unsettled message
    is redelivered (default ``settings.ack_wait_s``). ``max_backoff_s``: cap of the failure backoff, seconds.
    ``fetch_timeout_s``: seconds one pull request waits, which also bounds how long :meth:`stop` waits for it.

    Raises ``ValueError`` for bad arguments and ``TypeError`` for a handler that is not an async function.
    """

    def __init__(
        self,
        durable: str | None,
        subjects: Sequence[str] | str | None = None,
        *,
        handler: Handler | None = None,
        settings: Settings | None = None,
        nc: Client | None = None,
        stream: str | None = None,
        start: Start = "new",
        max_in_flight: int = 16,
        max_deliver: int = 10,
        ack_wait_s: float | None = None,
        max_backoff_s: float = 60.0,
        fetch_timeout_s: float = 1.0,
        description: str | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        if durable is not None and not _NAME_RE.match(durable):
            raise ValueError(f"durable {durable!r}: use letters, digits, '-' and '_' (e.g. 'billing')")
        if isinstance(subjects, str):
            subjects = [subjects]
        self.subjects = list(subjects) if subjects else [f"{self.settings.subject_prefix}.>"]
        if any(not s or " " in s for s in self.subjects):
            raise ValueError(f"subjects {self.subjects!r}: NATS subjects without spaces, e.g. 'letta.agent.>'")
        if max_in_flight < 1 or max_deliver < 1:
            raise ValueError("max_in_flight and max_deliver must be >= 1")
        self.ack_wait_s = float(ack_wait_s if ack_wait_s is not None else self.settings.ack_wait_s)
        if self.ack_wait_s <= 0 or fetch_timeout_s <= 0 or max_backoff_s < 0:
            raise ValueError("ack_wait_s and fetch_timeout_s must be > 0 seconds, max_backoff_s >= 0")
        self.start_fields = start_config(start)
        self.durable = durable
        self.stream = stream or self.settings.events_stream
        self.max_in_flight = max_in_flight
        self.max_deliver = max_deliver
        self.max_backoff_s = float(max_backoff_s)
        self.fetch_timeout_s = float(fetch_timeout_s)
        self.description = description or f"letta-bus subscriber {durable or '(ephemeral)'}"
        self.stats = SubscriberStats()
        #: Name of the consumer on the server once started (``durable``, or a generated ephemeral name).
        self.consumer_name: str | None = durable
        self._handler: Handler | None = None
        if handler is not None:
            self.handler(handler)
        self._nc = nc
        self._owns_nc = nc is None
        self._js: JetStreamContext | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._beats: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._stopped = asyncio.Event()
        self._started = asyncio.Event()
        self._crash: BaseException | None = None

    # --- configuration -----------------------------------------------------------------------------------------

    def handler(self, fn: Handler) -> Handler:
        """Register the handler (usable as a decorator); returns ``fn`` unchanged. Raises ``TypeError`` unless
        ``fn`` is an async function taking one :class:`Event`."""
        if not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))):
            raise TypeError("the handler must be an async function: async def on_event(event: Event) -> None")
        self._handler = fn
        return fn

    def consumer_config(self) -> ConsumerConfig:
        """The pull consumer this subscriber creates or updates: explicit acks, ``max_deliver`` set, one filter
        subject as ``filter_subject`` and several as ``filter_subjects``."""
        one = len(self.subjects) == 1
        return ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            description=self.description,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=max(self.settings.max_ack_pending, self.max_in_flight),
            filter_subject=self.subjects[0] if one else None,
            filter_subjects=None if one else list(self.subjects),
            **self.start_fields,
        )

    @property
    def in_flight(self) -> int:
        """Handlers running now."""
        return len(self._inflight)

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and the beginning of :meth:`stop`."""
        return self._started.is_set() and not self._stopping.is_set()

    # --- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> "Subscriber":
        """Connect (unless ``nc`` was given), create or update the consumer and start fetching. Returns self.

        Raises ``RuntimeError`` without a handler, when already started, or when the stream does not exist;
        ``ValueError`` when ``nats_url`` is unset and no ``nc`` was given; ``ConnectionError`` when no server
        answers within ``settings.connect_timeout_s`` seconds; ``nats.js.errors.APIError`` when the server refuses
        the consumer (e.g. a filter subject outside the stream).
        """
        if self._handler is None:
            raise RuntimeError("no handler: decorate an async function with @subscriber.handler")
        if self._started.is_set() or self._stopping.is_set():
            raise RuntimeError("this Subscriber was already started; create a new one")
        if self._nc is None:
            if not self.settings.nats_url:
                raise ValueError("set LETTA_BUS_NATS_URL (or pass settings= / nc=) so the subscriber finds NATS")
            self._nc = await connect(
                self.settings.nats_url, name=f"letta-bus-subscriber-{self.durable or 'ephemeral'}",
                timeout_s=self.settings.connect_timeout_s, settings=self.settings, role="subscriber",
            )
        try:
            self._js = self._nc.jetstream()
            self.consumer_name = await self._ensure_consumer()
            self._sub = await self._js.pull_subscribe_bind(self.consumer_name, self.stream)
        except BaseException:
            if self._owns_nc:
                await self._nc.close()
            raise
        self._loop_task = asyncio.create_task(self._fetch_loop(), name=f"subscriber-{self.consumer_name}")
        self._loop_task.add_done_callback(self._loop_ended)
        self._started.set()
        log.info("subscriber %s on %s %s started (max_in_flight=%d)", self.consumer_name, self.stream,
                 ",".join(self.subjects), self.max_in_flight)
        return self

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop gracefully: fetch nothing new, let in-flight handlers finish and settle (ack, nak or term), flush
        the acks, delete an ephemeral consumer and close a connection this subscriber opened.

        The waiting pull request is withdrawn at once (the subscription's inbox is unsubscribed) and the fetch in
        progress ends within ``fetch_timeout_s`` seconds; a message it still returns is released (nak without
        delay) for another instance. ``timeout_s``: seconds to wait for in-flight handlers
        (``None``: as long as they take); handlers still running then are cancelled and their messages released.
        Idempotent; concurrent callers wait for the same stop (a handler calling it returns at once). Never raises
        for broker errors (they are logged).
        """
        if self._stop_task is None:
            self._stopping.set()
            self._wake.set()
            self._stop_task = asyncio.create_task(self._shutdown(timeout_s))
        if asyncio.current_task() in self._inflight:
            return  # called from a handler: it cannot wait for itself; the stop goes on once it returns
        await asyncio.shield(self._stop_task)

    async def run_forever(self) -> None:
        """Start, then run until SIGTERM or SIGINT (Ctrl-C) or :meth:`stop`; a signal stops gracefully and a second
        one cancels the handlers still running. Signal handlers are installed only in the main thread and restored
        on return. Raises like :meth:`start`, and re-raises an unexpected error that ended the fetch loop."""
        await self.start()
        loop = asyncio.get_running_loop()
        installed: list[tuple[signal.Signals, Any]] = []

        def on_signal(sig: signal.Signals) -> None:
            if self._stop_task is None:
                log.info("subscriber %s: %s, draining %d in-flight handlers", self.consumer_name, sig.name,
                         self.in_flight)
                asyncio.ensure_future(self.stop())
            else:
                log.warning("subscriber %s: second %s, cancelling in-flight handlers", self.consumer_name, sig.name)
                self._force.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous = signal.getsignal(sig)
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append((sig, previous))
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
                pass
        try:
            await self._stopped.wait()
        finally:
            for sig, previous in installed:
                loop.remove_signal_handler(sig)
                if previous is not None:
                    signal.signal(sig, previous)
            await self.stop()
        if self._crash is not None:
            raise self._crash

    async def wait_stopped(self) -> None:
        """Return once :meth:`stop` has completed."""
        await self._stopped.wait()

    async def __aenter__(self) -> "Subscriber":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- internals ---------------------------------------------------------------------------------------------

    async def _ensure_consumer(self) -> str:
        assert self._js is not None
        config = self.consumer_config()
        try:
            if self.durable is None:
                config.name = f"ephemeral-{secrets.token_hex(8)}"
                config.inactive_threshold = max(60.0, 2 * self.ack_wait_s)
                config.mem_storage = True
            else:
                self._keep_existing_start(config, await self._existing_config())
            await ensure_consumer(self._js, self.stream, config)
        except APIError as exc:
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                raise RuntimeError(
                    f"stream {self.stream} not found: provision it first (letta-bus up does, or bus.streams.provision)"
                ) from exc
            raise
        return config.name

    async def _existing_config(self) -> ConsumerConfig | None:
        assert self._js is not None and self.durable is not None
        try:
            return (await self._js.consumer_info(self.stream, self.durable)).config
        except NotFoundError as exc:
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                raise
            return None

    def _keep_existing_start(self, config: ConsumerConfig, existing: ConsumerConfig | None) -> None:
        """A durable's start position is fixed when it is created (the server refuses to change it)."""
        if existing is None:
            return
        policy = DeliverPolicy(existing.deliver_policy) if existing.deliver_policy else DeliverPolicy.ALL
        if policy != config.deliver_policy or existing.opt_start_seq != config.opt_start_seq:
            log.info("durable %s exists: it resumes where it left off (start=%s ignored; delete it to start over)",
                     self.durable, config.deliver_policy.value)
        config.deliver_policy = policy
        config.opt_start_seq = existing.opt_start_seq
        config.opt_start_time = existing.opt_start_time

    async def _fetch_loop(self) -> None:
        assert self._sub is not None
        errors = 0
        while not self._stopping.is_set():
            free = self.max_in_flight - len(self._inflight)
            if free <= 0:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                msgs = await self._sub.fetch(min(free, self.settings.fetch_batch), timeout=self.fetch_timeout_s)
            except asyncio.TimeoutError:  # nats.errors.TimeoutError and FetchTimeoutError included: nothing new
                errors = 0
                continue
            except Exception as exc:  # noqa: BLE001 - reconnecting, consumer briefly gone: keep going
                errors += 1
                log.warning("subscriber %s fetch failed (%d in a row): %r", self.consumer_name, errors, exc)
                await self._pause(min(0.25 * errors, 5.0))
                if errors % 4 == 0 and self.durable is not None:
                    await self._recreate_consumer()
                continue
            errors = 0
            if self._stopping.is_set():
                await self._release(msgs)
                break
            for msg in msgs:
                self.stats.received += 1
                task = asyncio.create_task(self._process(msg))
                self._inflight.add(task)
                task.add_done_callback(self._handler_done)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _recreate_consumer(self) -> None:
        try:
            await self._ensure_consumer()
        except Exception as exc:  # noqa: BLE001 - logged; the loop retries
            log.warning("subscriber %s: re-creating the consumer failed: %r", self.consumer_name, exc)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("subscriber %s: internal error settling a message", self.consumer_name,
                      exc_info=task.exception())

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._crash = task.exception()
        log.error("subscriber %s: fetch loop crashed; stopping", self.consumer_name, exc_info=self._crash)
        asyncio.ensure_future(self.stop())

    async def _process(self, msg: Msg) -> None:
        beat = _Heartbeat(self, msg)
        try:
            try:
                event = Event.from_msg(msg)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.stats.undecodable += 1
                log.error("subscriber %s: terminating undecodable message on %s (stream seq %s): %s; body %r",
                          self.consumer_name, msg.subject, _seq(msg), exc, msg.data[:120])
                await _settle(msg, Outcome(Action.TERM))
                return
            try:
                await self._handler(event)  # type: ignore[misc]
                error: BaseException | None = None
            except asyncio.CancelledError:  # forced stop: hand the event to another instance right away
                beat.cancel()
                self.stats.released += 1
                await _settle(msg, Outcome(Action.NAK))
                raise
            except Exception as exc:  # noqa: BLE001 - every handler error has an outcome
                error = exc
            beat.cancel()
            outcome = decide(error, event.num_delivered, self.max_deliver, self.max_backoff_s)
            self._count_and_log(event, error, outcome)
            await _settle(msg, outcome, confirm=self._stopping.is_set())
        finally:
            beat.cancel()

    def _count_and_log(self, event: Event, error: BaseException | None, outcome: Outcome) -> None:
        n, name = event.num_delivered, self.consumer_name
        if error is None:
            self.stats.acked += 1
        elif outcome.gave_up:
            self.stats.gave_up += 1
            log.error("subscriber %s: gave up on %s %s after %d deliveries: %s", name, event.event_type,
                      event.event_id, n, outcome.reason, exc_info=None if isinstance(error, Retry) else error)
        elif isinstance(error, Reject):
            self.stats.rejected += 1
            log.warning("subscriber %s: rejected %s %s: %s", name, event.event_type, event.event_id, outcome.reason)
        elif isinstance(error, Retry):
            self.stats.retried += 1
            log.info("subscriber %s: retry of %s %s in %g s (delivery %d/%d): %s", name, event.event_type,
                     event.event_id, outcome.delay_s, n, self.max_deliver, outcome.reason)
        else:
            self.stats.failed += 1
            log.error("subscriber %s: handler failed on %s %s (delivery %d/%d); redelivery in %g s", name,
                      event.event_type, event.event_id, n, self.max_deliver, outcome.delay_s, exc_info=error)

    async def _release(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            self.stats.released += 1
            await _settle(msg, Outcome(Action.NAK))

    def _drain_pending(self) -> list[Msg]:
        """Messages a timed-out pull request delivered after the client stopped waiting (rare)."""
        queue = getattr(getattr(self._sub, "_sub", None), "_pending_queue", None)
        msgs: list[Msg] = []
        while queue is not None and not queue.empty():
            msg = queue.get_nowait()
            if msg.reply and not JetStreamContext.is_status_msg(msg):
                msgs.append(msg)
        return msgs

    async def _shutdown(self, timeout_s: float | None) -> None:
        try:
            if self._sub is not None:
                # Removing the inbox's interest makes the server drop the waiting pull request, so nothing new is
                # delivered; the fetch in progress then ends by its own timeout.
                try:
                    await self._sub.unsubscribe()
                except Exception as exc:  # noqa: BLE001 - closing anyway
                    log.debug("unsubscribe: %r", exc)
            if self._loop_task is not None:
                await asyncio.gather(self._loop_task, return_exceptions=True)
            await self._wait_handlers(timeout_s)
            if self._sub is not None:
                await self._release(self._drain_pending())
            if self._nc is not None and not self._nc.is_closed:
                try:
                    await self._nc.flush(timeout=5)
                    if self.durable is None and self._js is not None and self._started.is_set():
                        await self._js.delete_consumer(self.stream, self.consumer_name)
                except Exception as exc:  # noqa: BLE001 - the server expires what is left
                    log.warning("subscriber %s: flushing acks at stop failed: %r", self.consumer_name, exc)
                if self._owns_nc:
                    await self._nc.close()
            if self._started.is_set():
                log.info("subscriber %s stopped (%s)", self.consumer_name, self.stats)
        finally:
            self._stopped.set()

    async def _wait_handlers(self, timeout_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        force = asyncio.ensure_future(self._force.wait())
        try:
            while self._inflight and not self._force.is_set():
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                await asyncio.wait(self._inflight | {force}, timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            force.cancel()
        if self._inflight:
            log.warning("subscriber %s: cancelling %d handlers still running", self.consumer_name, self.in_flight)
            for task in list(self._inflight):
                task.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)


class _Heartbeat:
    """Sends ``msg.in_progress()`` every ``ack_wait_s / 2`` seconds until cancelled (a timer, no task when idle)."""

    __slots__ = ("sub", "msg", "interval", "handle")

    def __init__(self, sub: Subscriber, msg: Msg) -> None:
        self.sub = sub
        self.msg = msg
        self.interval = sub.ack_wait_s / 2
        self.handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(self.interval, self._beat)

    def _beat(self) -> None:
        task = asyncio.ensure_future(self._send())
        self.sub._beats.add(task)
        task.add_done_callback(self.sub._beats.discard)
        self.handle = asyncio.get_running_loop().call_later(self.interval, self._beat)

    async def _send(self) -> None:
        try:
            await self.msg.in_progress()
        except Exception as exc:  # noqa: BLE001 - the next beat tries again
            log.warning("in_progress for stream seq %s failed: %r", _seq(self.msg), exc)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


async def _settle(msg: Msg, outcome: Outcome, confirm: bool = False) -> None:
    """Send the outcome to JetStream; a failure is logged (the message is then redelivered after ack_wait).
    ``confirm``: wait for the server to confirm an ack (used while stopping, so stop returns after it counted)."""
    try:
        if outcome.action is Action.ACK and confirm:
            await msg.ack_sync(timeout=2.0)
        elif outcome.action is Action.ACK:
            await msg.ack()
        elif outcome.action is Action.NAK:
            await msg.nak(delay=outcome.delay_s or None)
        else:
            await msg.term()
    except Exception as exc:  # noqa: BLE001 - at least once: JetStream redelivers an unsettled message
        log.warning("could not %s stream seq %s: %r", outcome.action.value, _seq(msg), exc)


def _seq(msg: Msg) -> int | str:
    try:
        return msg.metadata.sequence.stream
    except Exception:  # noqa: BLE001 - not a JetStream message
        return "?"
