"""Letta's notifications as the bridge stores them: one small JetStream message per notification, so the bridge can
answer Letta at once (``202``, after the PubAck) and read Letta back later (:mod:`dispatcher.bridge.enricher`).

Stream ``LETTA_BRIDGE`` (``settings.bridge_stream``), subjects ``letta_bridge.notifications.<kind>`` with ``kind``
``step``, ``run`` or ``job``; the body is ``{"kind", "id"}`` (JSON: ``nats stream view LETTA_BRIDGE`` reads it) and
``Nats-Msg-Id`` is ``<kind>:<id>``, so a notification Letta repeats within the duplicate window (2 min) is stored
once. Work-queue retention: an enriched notification leaves the stream. Limits: 1,000,000 messages, 256 MiB,
24 h (a Letta that stays unreadable longer loses its notifications, oldest first), 1 KiB per message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec
from nats.js.api import (AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType,
                         StreamConfig)

from config.settings import Settings

Kind = Literal["step", "run", "job"]
KINDS: tuple[Kind, ...] = ("step", "run", "job")

MAX_MSGS = 1_000_000
MAX_BYTES = 256 * 1024 * 1024
MAX_AGE_S = 24 * 3600.0
MAX_MSG_SIZE = 1024
DUPLICATE_WINDOW_S = 120.0
#: Seconds a fetched notification is the enricher's before JetStream gives it to another enricher process.
ACK_WAIT_S = 60.0


class Notification(msgspec.Struct, frozen=True):
    """One notification: ``kind`` (``step`` | ``run`` | ``job``) and the Letta ``id`` it names."""

    kind: Kind
    id: str


@dataclass(frozen=True, slots=True)
class Stored:
    """A stored notification (``note``), its stream ``seq`` and whether JetStream already had it."""

    note: Notification
    seq: int
    duplicate: bool


def subject(settings: Settings, kind: Kind) -> str:
    """``letta_bridge.notifications.<kind>``."""
    return f"{settings.bridge_subject_prefix}.notifications.{kind}"


def msg_id(note: Notification) -> str:
    """``Nats-Msg-Id`` of a notification: ``<kind>:<id>`` (JetStream's duplicate detection)."""
    return f"{note.kind}:{note.id}"


def encode(note: Notification) -> bytes:
    """The message body: ``{"kind":"step","id":"step-..."}``."""
    return msgspec.json.encode(note)


def decode(data: bytes) -> Notification:
    """Parse a stored body; raises ``msgspec.ValidationError`` / ``msgspec.DecodeError`` for anything else (only
    the bridge writes this stream, so that is a foreign publisher: the enricher terminates such a message)."""
    return msgspec.json.decode(data, type=Notification)


def stream_config(settings: Settings) -> StreamConfig:
    """``LETTA_BRIDGE``: work queue of Letta's notifications, file storage, the limits of this module."""
    return StreamConfig(
        name=settings.bridge_stream, subjects=[f"{settings.bridge_subject_prefix}.notifications.>"],
        retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE, discard=DiscardPolicy.OLD,
        max_msgs=MAX_MSGS, max_bytes=MAX_BYTES, max_age=MAX_AGE_S, max_msg_size=MAX_MSG_SIZE,
        duplicate_window=DUPLICATE_WINDOW_S, num_replicas=settings.stream_replicas,
        description="Letta notifications awaiting enrichment by letta-bus bridge",
    )


def consumer_config(settings: Settings) -> ConsumerConfig:
    """The enricher's durable (``bridge-enricher``): explicit acks, every notification, redelivered after
    :data:`ACK_WAIT_S` seconds, no delivery limit (the enricher itself gives up: ``term``)."""
    return ConsumerConfig(
        durable_name=settings.bridge_durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
        ack_wait=ACK_WAIT_S, max_deliver=-1, max_ack_pending=4 * max(settings.bridge_concurrency, 64),
        filter_subject=f"{settings.bridge_subject_prefix}.notifications.>",
        description="letta-bus bridge: reads Letta back and publishes the events",
    )
