"""Replay: deliver an agent's past events again to its webhook, read back from ``LETTA_EVENTS``.

Events are read with an ephemeral, unacknowledged pull consumer that starts at ``since`` (or at a stream sequence
when a replay is continued) and filters on the event subjects of the wanted patterns, so replay changes nothing
for the dispatcher's durables and reaches as far back as the stream keeps events (``events_max_age_s``): events
from before the endpoint existed or while it was disabled are replayed too. Each matching event becomes a delivery
task with a ``replay_id`` (:func:`dispatcher.tasks.task_headers`), so its delivery is a row of its own
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
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError

from bus.envelope import H_AGENT_ID, EnvelopeHead, decode_head
from bus.ids import uuid7_hex
from config.settings import Settings
from dispatcher.delivery_queries import add_pending, aware
from dispatcher.fetching import fetch
from dispatcher.matching import check_patterns, pattern_matches, wants
from dispatcher.models import DeliveryStatus, Endpoint, utcnow
from dispatcher.store import Store
from dispatcher.tasks import delivery_id, task_headers

PUBLISH_WINDOW = 128  # task publishes in flight at once


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


def filter_subjects(prefix: str, patterns: list[str]) -> list[str]:
    """Consumer filter subjects for ``webhook_events`` patterns (``letta.>`` for none), without patterns that
    another one already covers (the server refuses overlapping filters)."""
    if not patterns:
        return [f"{prefix}.>"]
    kept = [p for p in patterns if not any(q != p and pattern_matches(q, p) for q in patterns)]
    return [f"{prefix}.{p}" for p in dict.fromkeys(kept)]


async def replay(
    js: JetStreamContext, settings: Settings, store: Store, endpoint: Endpoint, *, since: datetime | None = None,
    until: datetime | None = None, events: list[str] | None = None, replay_id: str | None = None,
    start_seq: int | None = None, end_seq: int | None = None, limit: int | None = None,
) -> ReplayPage:
    """Queue one delivery task per event of the endpoint's agent published in [``since``, ``until``) whose type
    matches ``events`` (default: the endpoint's own ``webhook_events``). ``start_seq`` / ``end_seq`` /
    ``replay_id`` continue an earlier page; ``limit`` bounds the events scanned by this call.

    Raises ``ValueError`` naming ``since`` (neither it nor ``start_seq`` given) or ``events`` (a bad pattern).
    """
    if since is None and start_seq is None:
        raise ValueError("since is required: the time to replay from (RFC 3339, e.g. 2026-01-01T00:00:00Z)")
    patterns = check_patterns(events) if events is not None else list(endpoint.events or [])
    replay_id = replay_id or new_replay_id()
    if end_seq is None:
        end_seq = (await js.stream_info(settings.events_stream)).state.last_seq
    page = ReplayPage(replay_id=replay_id, scanned=0, queued=0, done=True, next_seq=None, end_seq=end_seq)
    if end_seq == 0 or (start_seq is not None and start_seq > end_seq):
        return page
    start = ({"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start_seq} if start_seq else
             {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": aware(since)})
    name, sub = await _subscribe(js, settings, patterns, start)
    until = aware(until)
    try:
        while True:
            msgs = await fetch(sub, 256, "replay", timeout_s=1.0)
            if not msgs:
                return page
            batch: list[tuple[EnvelopeHead, bytes, int]] = []
            finished = False
            for m in msgs:
                seq = m.metadata.sequence.stream
                if seq > end_seq or (until is not None and aware(m.metadata.timestamp) >= until):
                    finished = True
                    break
                page.scanned += 1
                head = _wanted(m.headers, m.data, endpoint.agent_id, patterns)
                if head is not None:
                    batch.append((head, m.data, seq))
                if seq >= end_seq:
                    finished = True
                    break
                if limit is not None and page.scanned >= limit:
                    page.done, page.next_seq = False, seq + 1
                    finished = True
                    break
            await _queue(js, settings, store, endpoint, batch, replay_id)
            page.queued += len(batch)
            if finished or msgs[-1].metadata.num_pending == 0:
                return page
    finally:
        await sub.unsubscribe()
        try:
            await js.delete_consumer(settings.events_stream, name)
        except Exception:  # noqa: BLE001 - the server removes it after inactive_threshold anyway
            pass


def _wanted(headers: dict | None, body: bytes, agent_id: str | None, patterns: list[str]) -> EnvelopeHead | None:
    """The event's head when it is ``agent_id``'s and its type matches ``patterns``; None otherwise (undecodable
    events included: the fan-out terminated those too). The agent header spares decoding other agents' events."""
    if (headers or {}).get(H_AGENT_ID, agent_id) != agent_id:
        return None
    try:
        head = decode_head(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return head if head.agent_id == agent_id and wants(patterns, head.event_type) else None


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


async def _subscribe(js: JetStreamContext, settings: Settings, patterns: list[str], start: dict):
    """An ephemeral pull consumer on the events stream (no acks, removed by the server 30 s after last use)."""
    subjects = filter_subjects(settings.subject_prefix, patterns)
    for attempt in (subjects, [f"{settings.subject_prefix}.>"]):
        config = ConsumerConfig(
            name=f"replay-{uuid7_hex()[:16]}", description="letta-bus replay", ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0, mem_storage=True, num_replicas=1, **start,
            **({"filter_subject": attempt[0]} if len(attempt) == 1 else {"filter_subjects": attempt}),
        )
        try:
            info = await js.add_consumer(settings.events_stream, config)
        except APIError:
            if attempt[0] == f"{settings.subject_prefix}.>":
                raise
            continue  # e.g. overlapping filters the cover check missed: read everything, filter here
        return info.name, await js.pull_subscribe_bind(info.name, settings.events_stream)
    raise AssertionError("unreachable")
