"""EventPublisher: the one call Letta makes at each integration point.

Source: DESIGN.md, "Publishing". ``publish_event`` validates, encodes with msgspec and publishes to
``letta.<event_type>`` with ``Nats-Msg-Id = event_id``. A publish that times out may still have been stored (the
request stays buffered across a reconnect), so it is retried with the same id and JetStream's duplicate window
turns a late success into ``PubAck.duplicate``. Webhook and bus failures must not fail an agent step: unless
``strict=True``, nothing raises into the caller; failures are logged and reported by a ``None`` return.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError

from bus import envelope as env
from bus.catalog import EventValidationError, validate_data
from bus.connection import close_client, open_client
from bus.ids import new_event_id
from bus.names import EVENT_TYPE_MAX, id_problem
from bus.tracing import current_trace_headers
from config.settings import Settings

log = logging.getLogger(__name__)

#: Errors after which the same publish is tried again (same Nats-Msg-Id).
RETRYABLE = (nats.errors.TimeoutError, NoStreamResponseError, nats.errors.ConnectionReconnectingError)


def check_entry_ids(agent_id: object, organization_id: object, event_id: object, event_type: object) -> None:
    """The id checks of :meth:`EventPublisher.build` (``organization_id`` and ``event_id`` may be ``None``):
    raises :class:`EventValidationError` naming the first bad field (:func:`bus.names.id_problem`), or naming
    ``event_type`` when it is longer than :data:`bus.names.EVENT_TYPE_MAX` (its shape is checked by the catalog)."""
    problem = id_problem("agent_id", agent_id)
    if problem is None and organization_id is not None:
        problem = id_problem("organization_id", organization_id)
    if problem is None and event_id is not None:
        problem = id_problem("event_id", event_id)
    if problem is not None:
        raise EventValidationError(problem)
    if isinstance(event_type, str) and len(event_type) > EVENT_TYPE_MAX:
        raise EventValidationError(f"event_type is {len(event_type)} characters, over {EVENT_TYPE_MAX}: use a short "
                                   "dot-separated type like 'agent.memory.updated'")


class PublishError(RuntimeError):
    """An event could not be stored in JetStream after every attempt (raised only with ``strict=True``).
    ``event_id`` is the id that was tried: retrying with it is safe."""

    def __init__(self, message: str, event_id: str) -> None:
        super().__init__(message)
        self.event_id = event_id


class EventPublisher:
    """Publishes Letta lifecycle events to JetStream.

    Use ``EventPublisher(settings, nc)`` with an open connection, or ``await EventPublisher(settings).start()``
    to let it connect (and keep reconnecting) on its own without ever blocking the caller for long.
    """

    def __init__(self, settings: Settings, nc: Client | None = None) -> None:
        self.settings = settings
        self._nc = nc
        self._js: JetStreamContext | None = nc.jetstream() if nc else None
        self._connector: asyncio.Task[Client] | None = None
        self._owns_connection = nc is None

    async def start(self, wait_s: float | None = None) -> "EventPublisher":
        """Connect to ``settings.nats_url`` in the background, waiting at most ``wait_s`` seconds (default:
        ``connect_timeout_s``). Returns even when no server answered yet: publishes fail (and are reported) until
        the background connect succeeds. Raises ``ValueError`` when ``nats_url`` is unset."""
        if self._nc is not None or self._connector is not None:
            return self
        if not self.settings.nats_url:
            raise ValueError("EventPublisher.start needs LETTA_BUS_NATS_URL (the broker letta-bus up runs or joins)")
        self._connector = asyncio.create_task(open_client(self.settings.nats_url, name="letta-bus-publisher",
                                                                  settings=self.settings, role="publisher"))
        self._connector.add_done_callback(self._connected)
        await asyncio.wait({self._connector}, timeout=wait_s if wait_s is not None else self.settings.connect_timeout_s)
        return self

    def _connected(self, task: asyncio.Task[Client]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._nc = task.result()
            self._js = self._nc.jetstream()

    @property
    def connected(self) -> bool:
        """True while the NATS connection is up."""
        return self._nc is not None and self._nc.is_connected

    def build(
        self, agent_id: str, event_type: str, data: dict[str, Any], *, organization_id: str | None = None,
        event_id: str | None = None,
    ) -> env.Envelope:
        """Validate and wrap an event. ``agent_id``, ``organization_id`` and ``event_id`` follow the id grammar of
        :mod:`bus.names` (ASCII letters, digits and ``_ . : -``, first a letter or digit; at most 128, 128 and 64
        characters); ``organization_id`` ``None`` or ``""``: none; ``event_id`` ``None`` or ``""``: a new
        ``evt_<uuid7 hex>``. ``event_type``: a catalog type or one like ``agent.memory.updated`` (at most 128
        characters), ``data`` per the catalog.

        Raises :class:`bus.catalog.EventValidationError` (a ``ValueError``) naming the field and the rule. The
        same checks run at decode (:func:`bus.envelope.check_head`): what this accepts is never refused there."""
        organization_id = organization_id or None
        check_entry_ids(agent_id, organization_id, event_id or None, event_type)
        validate_data(event_type, data)
        return env.Envelope(
            event_id=event_id or new_event_id(),
            event_type=event_type,
            timestamp=env.utc_timestamp(),
            agent_id=agent_id,
            organization_id=organization_id,
            data=data,
        )

    async def publish_event(
        self,
        agent_id: str,
        event_type: str,
        data: dict[str, Any],
        *,
        organization_id: str | None = None,
        event_id: str | None = None,
        traceparent: str | None = None,
        strict: bool = False,
    ) -> str | None:
        """Publish one event; returns its ``event_id``, or ``None`` when it was not stored (the reason is logged).

        ``data`` follows the catalog schema of ``event_type`` (bus.catalog); pass ``event_id`` to make a retry
        of your own idempotent. ``traceparent`` (W3C) links the event to a trace; by default the current
        OpenTelemetry span's is used when there is one. With ``strict=True`` raises :class:`EventValidationError`
        for bad input (ids outside :mod:`bus.names` included) and
        :class:`PublishError` when the broker did not store it after ``publish_attempts`` tries of
        ``publish_timeout_s`` seconds each.
        """
        try:
            envelope = self.build(agent_id, event_type, data, organization_id=organization_id, event_id=event_id)
            await self.publish_envelope(envelope, trace={"traceparent": traceparent} if traceparent else None)
            return envelope.event_id
        except (EventValidationError, PublishError, TypeError) as exc:
            if strict:
                raise
            log.error("event %s for agent %s not published: %s", event_type, agent_id, exc)
            return None

    async def publish_envelope(self, envelope: env.Envelope, trace: dict[str, str] | None = None) -> PubAck:
        """Publish a built envelope, retrying with the same ``Nats-Msg-Id``. Returns the PubAck
        (``duplicate=True`` when JetStream already had it). ``trace``: W3C trace headers (default: the current
        OpenTelemetry context's). Raises :class:`EventValidationError` for an id outside :mod:`bus.names` or when
        the encoded event exceeds ``max_event_bytes``, and :class:`PublishError` when it was not stored."""
        check_entry_ids(envelope.agent_id, envelope.organization_id, envelope.event_id, envelope.event_type)
        body = env.encode(envelope)
        if len(body) > self.settings.max_event_bytes:
            raise EventValidationError(
                f"event {envelope.event_type} is {len(body)} bytes, over LETTA_BUS_MAX_EVENT_BYTES="
                f"{self.settings.max_event_bytes}: send ids and fetch the rest, or raise the limit"
            )
        headers = env.headers_for(envelope)
        headers.update(trace if trace is not None else current_trace_headers())
        return await self.publish_raw(self.settings.event_subject(envelope.event_type), body, headers,
                                      envelope.event_id)

    async def publish_raw(self, subject: str, body: bytes, headers: dict[str, str], event_id: str) -> PubAck:
        """Publish prepared bytes with retries (same headers, so the same ``Nats-Msg-Id``). Raises
        :class:`PublishError`."""
        last: BaseException | None = None
        for attempt in range(self.settings.publish_attempts):
            js = self._js
            if js is None or self._nc is None or self._nc.is_closed:
                raise PublishError(f"not connected to NATS ({self.settings.nats_url}); event {event_id} not stored",
                                   event_id)
            try:
                return await js.publish(subject, body, timeout=self.settings.publish_timeout_s, headers=headers)
            except RETRYABLE as exc:
                last = exc
                log.warning("publish %s attempt %d/%d: %s", event_id, attempt + 1, self.settings.publish_attempts,
                            type(exc).__name__)
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
            except (APIError, nats.errors.Error) as exc:
                raise PublishError(f"JetStream refused event {event_id}: {exc}", event_id) from exc
        hint = (f": no stream stores {subject} on {self.settings.nats_url} (letta-bus up provisions "
                f"{self.settings.events_stream}; is LETTA_BUS_NATS_URL its server?)"
                if isinstance(last, NoStreamResponseError) else f": {type(last).__name__}")
        raise PublishError(
            f"event {event_id} not acknowledged after {self.settings.publish_attempts} attempts{hint}", event_id)

    async def close(self) -> None:
        """Flush and close the connection if this publisher opened it; stop a pending background connect.
        Never raises (a close during a broker outage is logged)."""
        if self._connector is not None and not self._connector.done():
            self._connector.cancel()
        if self._owns_connection:
            await close_client(self._nc, what="the publisher's NATS connection")
