"""Replay: deliver an agent's past events again to its webhook, read back from ``LETTA_EVENTS``.

Events are read with batched direct gets (:mod:`bus.direct_get`) from ``since`` (or from a stream sequence when a
replay is continued) on the event subject of the wanted patterns, so replay needs no consumer (the dispatcher's
role may not create, pull from or delete consumers on ``LETTA_EVENTS`` other than its own durable), changes
nothing for the dispatcher's durables and reaches as far back as the stream keeps events (``events_max_age_s``):
events from before the endpoint existed or while it was disabled are replayed too. Each matching event becomes a
delivery task with a ``replay_id`` (:func:`dispatcher.delivery.tasks.task_headers`), so its delivery is a row of its own
(``deliveries.replay_id`` set) beside the original delivery, with its own attempts.

A replay reads up to the stream's last sequence when it started (``end_seq``), so events published meanwhile,
which the fan-out delivers anyway, are not delivered twice. Big replays go page by page: ``limit`` events scanned
per call; the result says where to continue (``next_seq``) with the same ``replay_id`` and ``end_seq``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from bus.direct_get import get_batch
from bus.envelope import H_AGENT_ID, EnvelopeHead, decode_head
from bus.ids import uuid7_hex
from config.settings import Settings
from dispatcher.delivery.tasks import delivery_id, task_headers
from dispatcher.rules.matching import check_patterns, pattern_matches, wants
from dispatcher.store.database import Store
from dispatcher.store.models import DeliveryStatus, Endpoint, utcnow
from dispatcher.store.queries import add_pending, aware

PUBLISH_WINDOW = 128  # task publishes in flight at once
READ_BATCH = 256  # events per direct get


def new_replay_id() -> str:
    """A new replay id: ``rpl_<uuid7 hex>``."""
    return "rpl_" + uuid7_hex()


@dataclass
class ReplayPage:
    """What one call did: events ``scanned`` (read from the stream), tasks ``queued``; ``done`` when it reached
    ``end_seq`` or ``until``; else continue at ``next_seq``."""

    replay_id: str
    scanned: int
    queued: int
    done: bool
    next_seq: int | None
    end_seq: int


def read_subject(prefix: str, patterns: list[str]) -> str:
    """The subject to read for ``webhook_events`` patterns: ``<prefix>.<pattern>`` when one pattern covers the
    others, else ``<prefix>.>`` (none = every event; the events read are matched by :func:`dispatcher.rules.matching.
    wants` anyway)."""
    kept = [p for p in patterns if not any(q != p and pattern_matches(q, p) for q in patterns)]
    return f"{prefix}.{kept[0]}" if len(set(kept)) == 1 else f"{prefix}.>"  # [] -> letta.>


async def replay(
    nc: Client, settings: Settings, store: Store, endpoint: Endpoint, *, since: datetime | None = None,
    until: datetime | None = None, events: list[str] | None = None, replay_id: str | None = None,
    start_seq: int | None = None, end_seq: int | None = None, limit: int | None = None,
) -> ReplayPage:
    """Queue one delivery task per event for the endpoint (its agent's, its organization's, or every event for a
    global one; :func:`_wanted`) published in [``since``, ``until``) whose type
    matches ``events`` (default: the endpoint's own ``webhook_events``). ``start_seq`` / ``end_seq`` /
    ``replay_id`` continue an earlier page; ``limit`` bounds the events scanned by this call.

    Raises ``ValueError`` naming ``since`` (neither it nor ``start_seq`` given) or ``events`` (a bad pattern);
    ``bus.direct_get.DirectGetError`` when the stream refuses direct gets (provision it again: ``allow_direct``).
    """
    if since is None and start_seq is None:
        raise ValueError("since is required: the time to replay from (RFC 3339, e.g. 2026-01-01T00:00:00Z)")
    patterns = check_patterns(events) if events is not None else list(endpoint.events or [])
    replay_id = replay_id or new_replay_id()
    js = nc.jetstream()
    if end_seq is None:
        end_seq = (await js.stream_info(settings.events_stream)).state.last_seq
    page = ReplayPage(replay_id=replay_id, scanned=0, queued=0, done=True, next_seq=None, end_seq=end_seq)
    if end_seq == 0 or (start_seq is not None and start_seq > end_seq):
        return page
    subject = read_subject(settings.subject_prefix, patterns)
    until = aware(until)
    next_seq, start_time = start_seq, None if start_seq else aware(since)
    while True:
        size = READ_BATCH if limit is None else min(READ_BATCH, limit - page.scanned)
        msgs, pending = await get_batch(nc, settings.events_stream, subject=subject, batch=size,
                                        start_seq=next_seq, start_time=start_time)
        if not msgs:
            return page
        batch: list[tuple[EnvelopeHead, bytes, int]] = []
        finished = False
        for m in msgs:
            if m.seq > end_seq or (until is not None and m.time >= until):
                finished = True
                break
            page.scanned += 1
            head = _wanted(m.headers, m.data, endpoint, patterns)
            if head is not None:
                batch.append((head, m.data, m.seq))
            if m.seq >= end_seq:
                finished = True
                break
            if limit is not None and page.scanned >= limit:
                page.done, page.next_seq = False, m.seq + 1
                finished = True
                break
        await _queue(js, settings, store, endpoint, batch, replay_id)
        page.queued += len(batch)
        if finished or pending == 0:
            return page
        next_seq, start_time = msgs[-1].seq + 1, None


def _wanted(headers: dict | None, body: bytes, endpoint: Endpoint, patterns: list[str]) -> EnvelopeHead | None:
    """The event's head when the fan-out would give it to ``endpoint`` (:meth:`EndpointIndex.match`: its agent's
    events, of its organization when it names one; an organization endpoint its organization's; a global one
    every event) and its type matches ``patterns``; None otherwise (undecodable events included: the fan-out
    terminated those too). The agent header spares decoding other agents' events."""
    agent_id = endpoint.agent_id if endpoint.scope == "agent" else None
    if agent_id is not None and (headers or {}).get(H_AGENT_ID, agent_id) != agent_id:
        return None
    try:
        head = decode_head(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if agent_id is not None and head.agent_id != agent_id:
        return None
    if endpoint.scope != "global" and endpoint.organization_id is not None \
            and head.organization_id != endpoint.organization_id:
        return None
    return head if wants(patterns, head.event_type) else None


async def _queue(js: JetStreamContext, settings: Settings, store: Store, endpoint: Endpoint,
                 batch: list[tuple[EnvelopeHead, bytes, int]], replay_id: str) -> None:
    """Record the batch's deliveries as pending (one transaction), then publish their tasks, a window at a time."""
    if not batch:
        return
    now = utcnow()
    await add_pending(store, [{
        "id": delivery_id(head.event_id, endpoint.id, replay_id), "event_id": head.event_id,
        "endpoint_id": endpoint.id, "agent_id": head.agent_id, "event_type": head.event_type,
        "status": DeliveryStatus.PENDING, "attempts": 0, "event_seq": seq, "replay_id": replay_id,
        "created_at": now, "updated_at": now,
    } for head, _, seq in batch])
    subject = settings.delivery_subject(endpoint.id)
    for i in range(0, len(batch), PUBLISH_WINDOW):
        await asyncio.gather(*(
            js.publish(subject, body, headers=task_headers(head, endpoint.id, seq, replay_id),
                       timeout=settings.publish_timeout_s)
            for head, body, seq in batch[i:i + PUBLISH_WINDOW]))
