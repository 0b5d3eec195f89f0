"""The bridge's enricher: reads each stored Letta notification back from Letta's REST API and publishes the events
(durable ``bridge-enricher`` on ``LETTA_BRIDGE``, :mod:`dispatcher.bridge.notifications`).

Nothing in a notification's body is trusted beyond the id it names: every event field comes from what Letta shows
for that id (:mod:`dispatcher.bridge.events`). Per notification, one of (``Outcome``):

* ``ack``: the events are stored in ``LETTA_EVENTS`` (PubAck), or there is nothing to publish;
* ``nak`` with a delay: not ready yet (a ``pending`` step, a successful step whose messages Letta has not saved
  yet, a run that is not finished or has a ``pending`` step) while the notification is younger than
  ``settings.bridge_settle_s`` seconds, or a transient failure (Letta unreachable or 5xx, NATS not storing):
  those retry until the stream's 24 h limit, with delays doubling from 0.5 s to 30 s;
* ``term``: Letta does not know the id (400/404/422: a forged or mistyped notification), a run or job that is
  still not finished after ``bridge_settle_s`` (unconfirmed), or data the bus cannot carry. Logged with the reason.

A step still without messages after ``bridge_settle_s`` is published with the tool calls Letta has (none).
Events of one agent can be published out of Letta's order when an earlier step waits for its messages longer than
a later one (``bridge_concurrency`` notifications are handled at once); each carries its Letta ids.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bus.catalog import EventValidationError
from bus.names import id_problem
from bus.publisher import EventPublisher, PublishError
from config.settings import Settings
from dispatcher.bridge import events as be
from dispatcher.bridge import notifications as bn
from dispatcher.bridge.letta_client import LettaClient, LettaError, LettaNotFound
from dispatcher.delivery.fetching import fetch

log = logging.getLogger(__name__)

#: Letta's terminal run and job statuses (letta/schemas/enums.py, ``RunStatus`` and ``JobStatus``).
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})

#: Delays (seconds) of a notification that is not ready yet: 0.25, 0.5, 1, 2, 2, ... (the settle window is 30 s).
NOT_READY_MIN_S, NOT_READY_MAX_S = 0.25, 2.0
#: Delays (seconds) after a transient failure: 0.5, 1, 2, ... 30.
TRANSIENT_MIN_S, TRANSIENT_MAX_S = 0.5, 30.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What becomes of a notification: ``action`` ``ack`` | ``nak`` | ``term``; ``delay_s`` (seconds) of a nak;
    ``reason`` for the log; ``published``: the event ids stored."""

    action: str
    delay_s: float = 0.0
    reason: str = ""
    published: tuple[str, ...] = ()


def _backoff(attempt: int, low: float, high: float) -> float:
    return min(high, low * 2 ** max(0, attempt - 1))


class _NotReady(Exception):
    """Letta has not finished writing what the notification announced."""


class _Unconfirmed(Exception):
    """Letta does not confirm the notification: terminate it."""


class Enricher:
    """Turns notifications into events. ``settings``: ``bridge_settle_s``, ``bridge_concurrency``, stream names;
    ``publisher``: stores the events; ``letta``: Letta's REST API. :meth:`handle` decides one notification (no
    JetStream message involved, so it is testable alone); :meth:`run` consumes the durable until ``stop`` is set."""

    def __init__(self, settings: Settings, publisher: EventPublisher, letta: LettaClient) -> None:
        self.settings = settings
        self.publisher = publisher
        self.letta = letta
        self._user_orgs: dict[str, str] = {}

    async def handle(self, note: bn.Notification, age_s: float, attempt: int) -> Outcome:
        """The outcome for ``note``, stored ``age_s`` seconds ago and now delivered for the ``attempt``-th time."""
        handler: Callable[[str, bool], Awaitable[list[be.BridgeEvent]]] = getattr(self, f"_{note.kind}")
        settled = age_s >= self.settings.bridge_settle_s
        try:
            events = await handler(note.id, settled)
            published = tuple([await self._publish(event) for event in events])
        except _NotReady as exc:
            if settled:
                return Outcome("term", reason=f"{exc}, still after {self.settings.bridge_settle_s:g} s: unconfirmed")
            return Outcome("nak", _backoff(attempt, NOT_READY_MIN_S, NOT_READY_MAX_S), str(exc))
        except (_Unconfirmed, LettaNotFound, be.BadLettaData, EventValidationError) as exc:
            return Outcome("term", reason=str(exc))
        except (LettaError, PublishError) as exc:
            return Outcome("nak", _backoff(attempt, TRANSIENT_MIN_S, TRANSIENT_MAX_S), str(exc))
        return Outcome("ack", published=published)

    # --- one kind each ------------------------------------------------------------------------------------------

    async def _step(self, step_id: str, settled: bool) -> list[be.BridgeEvent]:
        step = await self.letta.get_step(step_id)
        if step.get("id") != step_id:
            raise _Unconfirmed(f"Letta answered GET /v1/steps/{step_id} with step {step.get('id')!r}")
        status = step.get("status") or ("failed" if step.get("error_type") else "success")  # older servers: none
        if status == "pending":
            raise _NotReady(f"step {step_id} is pending")
        messages: list[Any] = []
        if status == "success":
            messages = await self.letta.get_step_messages(step_id)
            if not messages and not settled:
                raise _NotReady(f"step {step_id}: Letta has not saved its messages yet")
        return [be.step_event(step, messages)]

    @staticmethod
    def _finished(kind: str, letta_id: str, obj: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(status, metadata) of a run or job Letta shows as finished; raises otherwise."""
        if obj.get("id") != letta_id:
            raise _Unconfirmed(f"Letta answered GET /v1/{kind}s/{letta_id} with {kind} {obj.get('id')!r}")
        status = obj.get("status")
        if status not in TERMINAL:
            raise _NotReady(f"{kind} {letta_id} is {status!r}, not finished")
        return status, obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}

    async def _run(self, run_id: str, settled: bool) -> list[be.BridgeEvent]:
        run = await self.letta.get_run(run_id)
        status, metadata = self._finished("run", run_id, run)
        steps = await self.letta.get_run_steps(run_id)
        if any(isinstance(s, dict) and s.get("status") == "pending" for s in steps):
            raise _NotReady(f"run {run_id} has a pending step")  # its usage is not final yet
        agent_id = be.nonempty_str(run.get("agent_id")) or be.nonempty_str(metadata.get("agent_id"))
        if agent_id is None:
            raise be.BadLettaData(f"agent_id: Letta run {run_id} names no agent")
        organization_id = next((be.nonempty_str(s.get("organization_id")) for s in steps
                                if isinstance(s, dict) and s.get("organization_id")), None)
        usage = be.usage_from(await self.letta.get_run_usage(run_id), run_id=run_id, step_count=len(steps))
        events = [be.run_event(run_id, status, be.rfc3339(run.get("completed_at"), "completed_at"), metadata,
                               agent_id=agent_id, organization_id=organization_id, usage=usage,
                               stop_reason=be.nonempty_str(run.get("stop_reason")))]
        if status == "cancelled" and steps and isinstance(steps[-1], dict):
            events.append(be.cancelled_step_event(steps[-1], run_id))
        return events

    async def _job(self, job_id: str, settled: bool) -> list[be.BridgeEvent]:
        job = await self.letta.get_job(job_id)
        status, metadata = self._finished("job", job_id, job)
        agent_id = be.nonempty_str(job.get("agent_id")) or be.nonempty_str(metadata.get("agent_id"))
        organization_id = be.nonempty_str(job.get("organization_id")) or await self._user_org(job.get("user_id"))
        job_type = be.nonempty_str(job.get("job_type")) or be.nonempty_str(metadata.get("job_type"))
        return [be.job_event(job_id, status, be.rfc3339(job.get("completed_at"), "completed_at"), metadata,
                             agent_id=agent_id, organization_id=organization_id, job_type=job_type)]

    async def _user_org(self, user_id: Any) -> str | None:
        """The organization of a Letta user (a job names only its user), from ``GET /v1/admin/users/``; cached.
        ``None`` when Letta does not tell (the event then reaches global endpoints only)."""
        if not isinstance(user_id, str):
            return None
        if user_id not in self._user_orgs:
            try:
                users = await self.letta.get_users()
            except LettaError as exc:
                log.warning("bridge: organization of Letta user %s not read (%s)", user_id, exc)
                return None
            self._user_orgs.update({u["id"]: u["organization_id"] for u in users if isinstance(u, dict)
                                    and isinstance(u.get("id"), str) and isinstance(u.get("organization_id"), str)})
        return self._user_orgs.get(user_id)

    async def _publish(self, event: be.BridgeEvent) -> str:
        for field, value in (("agent_id", event.agent_id), ("organization_id", event.organization_id)):
            if value is not None and (problem := id_problem(field, value)) is not None:
                raise be.BadLettaData(f"{field}: {event.event_type} not published: {problem}")
        envelope = self.publisher.build(event.agent_id, event.event_type, event.data,
                                        organization_id=event.organization_id, event_id=event.event_id)
        ack = await self.publisher.publish_envelope(envelope)
        log.info("bridge: %s %s for agent %s%s", event.event_type, event.event_id, event.agent_id,
                 " (duplicate)" if ack.duplicate else "")
        return event.event_id

    # --- the durable ----------------------------------------------------------------------------------------------

    async def run(self, js: JetStreamContext, stop: asyncio.Event) -> None:
        """Consume ``bridge-enricher`` (bound; the consumer must exist) with up to ``bridge_concurrency``
        notifications in hand, until ``stop`` is set; then wait for those in hand (at most 10 s)."""
        s = self.settings
        sub = await js.pull_subscribe_bind(s.bridge_durable, s.bridge_stream)
        busy: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                room = s.bridge_concurrency - len(busy)
                if room <= 0:
                    await asyncio.wait(busy, return_when=asyncio.FIRST_COMPLETED)
                    continue
                for msg in await fetch(sub, room, "bridge-enricher", timeout_s=0.5):
                    task = asyncio.create_task(self._one(msg))
                    busy.add(task)
                    task.add_done_callback(busy.discard)
        finally:
            if busy:
                await asyncio.wait(busy, timeout=10)
            await sub.unsubscribe()

    async def _one(self, msg: Msg) -> None:
        try:
            note = bn.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("bridge: %s: not a notification (%s); terminated", msg.subject, exc)
            await msg.term()
            return
        metadata = msg.metadata
        age_s = max(0.0, time.time() - metadata.timestamp.timestamp())
        outcome = await self.handle(note, age_s, metadata.num_delivered)
        try:
            if outcome.action == "ack":
                await msg.ack()
            elif outcome.action == "nak":
                log.debug("bridge: %s %s: retry in %.2f s (%s)", note.kind, note.id, outcome.delay_s, outcome.reason)
                await msg.nak(delay=outcome.delay_s)
            else:
                log.warning("bridge: %s %s dropped: %s", note.kind, note.id, outcome.reason)
                await msg.term()
        except Exception as exc:  # noqa: BLE001 - connection lost: JetStream redelivers after ack_wait
            log.warning("bridge: %s %s: %s not sent (%r)", note.kind, note.id, outcome.action, exc)
