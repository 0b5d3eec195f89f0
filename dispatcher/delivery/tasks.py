"""Delivery tasks: the messages on ``letta_webhooks.deliveries.<endpoint_id>`` that the sender consumes.

A task's body is the event envelope exactly as published (the webhook body, never re-encoded); its headers say
which endpoint and delivery it is for. ``Nats-Msg-Id = <event_id>:<endpoint_id>`` makes a repeated fan-out of the
same event a duplicate that JetStream drops.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from bus.envelope import CONTENT_TYPE, H_AGENT_ID, H_CONTENT_TYPE, H_MSG_ID, EnvelopeHead

H_DELIVERY_ID = "Letta-Delivery-Id"
H_ENDPOINT_ID = "Letta-Endpoint-Id"
H_EVENT_ID = "Letta-Event-Id"
H_EVENT_TYPE = "Letta-Event-Type"
H_EVENT_SEQ = "Letta-Event-Seq"  # the event's sequence in LETTA_EVENTS: where a manual retry reads the body back
H_REPLAY_ID = "Letta-Replay-Id"  # set on tasks made by a replay; their deliveries are marked as replayed


def delivery_id(event_id: str, endpoint_id: str, replay_id: str | None = None) -> str:
    """Deterministic delivery id ``dlv_<32 hex>`` of an (event, endpoint) pair, so a repeated fan-out maps to the
    same delivery row; a replay (``replay_id``) makes a delivery of its own."""
    key = f"{event_id}:{endpoint_id}" + (f":{replay_id}" if replay_id else "")
    return "dlv_" + hashlib.sha256(key.encode()).hexdigest()[:32]


def task_headers(head: EnvelopeHead, endpoint_id: str, event_seq: int, replay_id: str | None = None) -> dict[str, str]:
    """Headers of the delivery task of ``head``'s event (stream sequence ``event_seq`` in LETTA_EVENTS) for one
    endpoint; ``replay_id`` for tasks made by a replay."""
    headers = {
        H_MSG_ID: f"{head.event_id}:{endpoint_id}" + (f":{replay_id}" if replay_id else ""),
        H_DELIVERY_ID: delivery_id(head.event_id, endpoint_id, replay_id),
        H_ENDPOINT_ID: endpoint_id,
        H_EVENT_ID: head.event_id,
        H_EVENT_TYPE: head.event_type,
        H_AGENT_ID: head.agent_id,
        H_EVENT_SEQ: str(event_seq),
        H_CONTENT_TYPE: CONTENT_TYPE,
    }
    if replay_id:
        headers[H_REPLAY_ID] = replay_id
    return headers


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A delivery task's identity, read back from its headers."""

    delivery_id: str
    endpoint_id: str
    event_id: str
    event_type: str
    agent_id: str
    event_seq: int | None = None
    replay_id: str | None = None

    @classmethod
    def from_headers(cls, headers: dict[str, str] | None) -> "TaskInfo":
        """Raises ``KeyError`` naming the missing header when the message is not a delivery task."""
        h = headers or {}
        seq = h.get(H_EVENT_SEQ)
        return cls(h[H_DELIVERY_ID], h[H_ENDPOINT_ID], h[H_EVENT_ID], h[H_EVENT_TYPE], h[H_AGENT_ID],
                   int(seq) if seq and seq.isdigit() else None, h.get(H_REPLAY_ID))
