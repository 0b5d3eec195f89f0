"""What a subscriber handler receives (:class:`Event`) and where a new consumer starts (:data:`Start`).

Source: DESIGN.md, "Subscribers for internal services"; the start positions map onto JetStream's deliver policies
(nats-py ``DeliverPolicy``: ``new``, ``all``, ``by_start_time``, ``by_start_sequence``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, Union

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from bus.catalog import decode_data
from bus.envelope import decode

#: Where a new consumer starts: ``"new"`` (events published after it is created), ``"all"`` (the whole replay
#: window), a ``datetime`` (timezone-aware: events stored at or after it), a ``timedelta`` (that long ago) or an
#: ``int`` stream sequence (>= 1).
Start = Union[Literal["new", "all"], datetime, timedelta, int]


def start_config(start: Start) -> dict[str, Any]:
    """ConsumerConfig fields for a start position: ``{"deliver_policy": ..., "opt_start_seq"?: int,
    "opt_start_time"?: datetime}``. Raises ``ValueError`` for anything else (a naive datetime included: pass
    ``tzinfo``, e.g. ``datetime.now(timezone.utc)``)."""
    if start == "new":
        return {"deliver_policy": DeliverPolicy.NEW}
    if start == "all":
        return {"deliver_policy": DeliverPolicy.ALL}
    if isinstance(start, timedelta):
        start = datetime.now(timezone.utc) - start
    if isinstance(start, datetime):
        if start.tzinfo is None:
            raise ValueError("start datetime must be timezone-aware, e.g. datetime.now(timezone.utc)")
        return {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": start.astimezone(timezone.utc)}
    if isinstance(start, int) and not isinstance(start, bool) and start >= 1:
        return {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start}
    raise ValueError(
        f"start={start!r} is not a start position: use 'new', 'all', a timezone-aware datetime, a timedelta "
        "or a stream sequence >= 1"
    )


@dataclass(slots=True, eq=False)
class Event:
    """One decoded event handed to a handler: the envelope fields, ``data_typed`` and the raw JetStream message.

    ``data`` is the payload mapping as published (unknown fields included); ``data_typed`` is the catalog Struct of
    ``event_type`` (``bus.catalog``, e.g. ``RunCompleted`` with ``.usage``) or ``data`` itself for event types
    outside the catalog. ``timestamp`` is RFC 3339 UTC text. ``msg`` is the nats-py message: settle it only
    through the handler's result, never by calling ``ack()``/``nak()`` yourself.
    """

    event_id: str
    event_type: str
    timestamp: str
    agent_id: str
    organization_id: str | None
    data: dict[str, Any]
    data_typed: Any
    msg: Msg = field(repr=False)

    @classmethod
    def from_msg(cls, msg: Msg) -> "Event":
        """Decode a message. Raises ``msgspec.DecodeError`` (not JSON) or ``msgspec.ValidationError`` (not an
        envelope, or ``data`` not fitting the catalog schema of its event type)."""
        env = decode(msg.data)
        return cls(
            event_id=env.event_id, event_type=env.event_type, timestamp=env.timestamp, agent_id=env.agent_id,
            organization_id=env.organization_id, data=env.data, data_typed=decode_data(env.event_type, env.data),
            msg=msg,
        )

    @property
    def subject(self) -> str:
        """The NATS subject, ``letta.<event_type>``."""
        return self.msg.subject

    @property
    def headers(self) -> dict[str, str]:
        """The message headers (``Nats-Msg-Id``, ``Letta-Agent-Id``, ``ce-*``, ``traceparent``...)."""
        return self.msg.headers or {}

    @property
    def metadata(self) -> Msg.Metadata:
        """JetStream metadata: ``sequence.stream``, ``sequence.consumer``, ``num_delivered``, ``num_pending``,
        ``timestamp`` (when stored), ``stream``, ``consumer``."""
        return self.msg.metadata

    @property
    def num_delivered(self) -> int:
        """1 on the first delivery, 2 on the first redelivery, ..."""
        return self.msg.metadata.num_delivered

    @property
    def stream_seq(self) -> int:
        """Sequence of the event in the stream (usable as a ``start`` position)."""
        return self.msg.metadata.sequence.stream

    async def in_progress(self) -> None:
        """Tell JetStream the handler is still working (resets ``ack_wait``). The runner already does this every
        ``ack_wait_s / 2`` seconds; call it yourself only to be explicit."""
        await self.msg.in_progress()
