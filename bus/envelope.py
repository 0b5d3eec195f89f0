"""The event envelope (the JSON body of every event message) and the NATS headers that travel with it.

Source: DESIGN.md, "Events". Body::

    {"event_id": "evt_<uuid7 hex>", "event_type": "agent.step.completed",
     "timestamp": "2026-01-01T12:00:00.000000Z", "agent_id": "agent-...", "organization_id": "org-..." | null,
     "data": {...}}

Headers: ``Nats-Msg-Id`` (= event_id, for JetStream de-duplication), ``Letta-Agent-Id``, ``Letta-Organization-Id``
(when known), ``Content-Type``, and the CloudEvents NATS binding (``ce-specversion``, ``ce-id``, ``ce-type``,
``ce-source``, ``ce-time``) so CloudEvents consumers (Knative, Dapr) read the stream as is.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, TypeVar

import msgspec

from bus.catalog import CATALOG, EVENT_TYPE_RE
from bus.names import EVENT_TYPE_MAX, id_problem, match_agent_id, match_event_id, match_organization_id

CONTENT_TYPE = "application/json"

# Header names, shared by publishers, the dispatcher and subscribers.
H_MSG_ID = "Nats-Msg-Id"
H_AGENT_ID = "Letta-Agent-Id"
H_ORG_ID = "Letta-Organization-Id"
H_CONTENT_TYPE = "Content-Type"


class Envelope(msgspec.Struct, kw_only=True):
    """One event. ``timestamp`` is RFC 3339 UTC with microseconds and a ``Z``; ``data`` is the event's fields."""

    event_id: str
    event_type: str
    timestamp: str
    agent_id: str
    organization_id: str | None = None
    data: dict[str, Any] = {}


class EnvelopeHead(msgspec.Struct, kw_only=True):
    """An envelope with ``data`` left undecoded: what routing needs, at a fraction of the decode cost."""

    event_id: str
    event_type: str
    timestamp: str
    agent_id: str
    organization_id: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"{}")


_E = TypeVar("_E", "Envelope", "EnvelopeHead")

_encoder = msgspec.json.Encoder()
_head_decoder = msgspec.json.Decoder(EnvelopeHead)
_decoder = msgspec.json.Decoder(Envelope)


def utc_timestamp(now: datetime | None = None) -> str:
    """RFC 3339 UTC timestamp with microseconds: ``2026-01-01T12:00:00.000000Z``."""
    now = now or datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode(envelope: Envelope) -> bytes:
    """The envelope as compact JSON bytes, fields in the documented order. Raises ``TypeError`` when ``data``
    holds a value JSON cannot carry or is nested deeper than the recursion limit (about 1,000 levels)."""
    try:
        return _encoder.encode(envelope)
    except RecursionError:
        # msgspec's own error here is RecursionError, which publishers do not expect (they report TypeError)
        raise TypeError("event data is nested too deeply to encode as JSON (about 1,000 levels)") from None


def decode(body: bytes) -> Envelope:
    """Parse an envelope. Raises ``msgspec.DecodeError`` (bad JSON, or nested deeper than the interpreter's
    recursion limit) or ``msgspec.ValidationError`` (wrong shape, naming the field: see :func:`check_head` for what
    besides the types is checked); never anything else, whatever the bytes."""
    try:
        return check_head(_decoder.decode(body))
    except (RecursionError, UnicodeDecodeError) as exc:
        raise _malformed(exc) from None


def decode_head(body: bytes) -> EnvelopeHead:
    """Parse an envelope without decoding ``data`` (its object is kept as raw JSON, checked to be UTF-8). Raises
    like :func:`decode`."""
    try:
        head = check_head(_head_decoder.decode(body))
        str(head.data, "utf-8")  # msgspec skips a Raw value without checking its strings (0.2 us per KB)
        return head
    except (RecursionError, UnicodeDecodeError) as exc:
        raise _malformed(exc) from None


def _malformed(exc: RecursionError | UnicodeDecodeError) -> msgspec.DecodeError:
    # msgspec raises RecursionError for JSON nested about 1,000 levels deep (a 2 KB body, even inside a Raw field)
    # and UnicodeDecodeError for invalid UTF-8 inside a string; left alone either escapes every consumer that
    # catches msgspec's errors (found by tests/unit/test_envelope_properties.py and tests/integration/
    # test_poison.py: both ended the dispatcher's fan-out task)
    if isinstance(exc, UnicodeDecodeError):
        return msgspec.DecodeError(f"JSON is malformed: invalid UTF-8 ({exc.reason})")
    return msgspec.DecodeError("JSON is malformed: nested too deeply")


#: Event types already found well-formed (a few dozen in practice; bounded so garbage cannot grow it).
_well_formed_types: set[str] = set(CATALOG)
_WELL_FORMED_CACHE = 1024


def check_head(envelope: _E) -> _E:
    """What the struct types cannot say about an envelope (poison published around :class:`EventPublisher`):
    ``event_id``, ``agent_id`` and ``organization_id`` (when not null) follow the id grammar of :mod:`bus.names`
    (ASCII letters, digits and ``_ . : -``; at most 64, 128 and 128 characters), ``event_type`` is well-formed (a
    catalog type, or one matching :data:`bus.catalog.EVENT_TYPE_RE` of at most 128 characters, as publishers
    require) and ``data`` is a JSON object. Returns ``envelope``; raises ``msgspec.ValidationError`` naming the
    field (``- at `$.agent_id```).

    Invariant: these are exactly the checks :meth:`bus.publisher.EventPublisher.build` makes (same functions, same
    limits), so an event accepted by a publisher is never refused here, and an event refused here was published
    around letta-bus (raw bytes on ``letta.>``). About 0.8 microseconds for a known event type with three ids (one
    regular-expression ``fullmatch`` per id, :mod:`bus.names`; 0.4 microseconds before the grammar, measured
    best of 7 on a loaded 2-core machine)."""
    event_type = envelope.event_type
    if event_type not in _well_formed_types:
        if len(event_type) > EVENT_TYPE_MAX or not EVENT_TYPE_RE.fullmatch(event_type):
            raise msgspec.ValidationError(
                f"Expected a dot-separated lowercase event type like `agent.step.completed` of at most "
                f"{EVENT_TYPE_MAX} characters, got {event_type[:80]!r} - at `$.event_type`")
        if len(_well_formed_types) < _WELL_FORMED_CACHE:
            _well_formed_types.add(event_type)
    # the ids travel in NATS and HTTP headers (webhook-id) and database columns: the grammar of bus.names
    if not match_event_id(envelope.event_id):
        raise msgspec.ValidationError(f"{id_problem('event_id', envelope.event_id)} - at `$.event_id`")
    if not match_agent_id(envelope.agent_id):
        raise msgspec.ValidationError(f"{id_problem('agent_id', envelope.agent_id)} - at `$.agent_id`")
    org = envelope.organization_id
    if org is not None and not match_organization_id(org):
        raise msgspec.ValidationError(f"{id_problem('organization_id', org)} - at `$.organization_id`")
    data = envelope.data
    if isinstance(data, msgspec.Raw) and memoryview(data)[0] != 0x7B:  # b"{": a Raw value starts at its token
        raise msgspec.ValidationError("Expected `object` - at `$.data`")
    return envelope


def headers_for(envelope: Envelope) -> dict[str, str]:
    """NATS headers for an event message (see the module docstring)."""
    headers = {
        H_MSG_ID: envelope.event_id,
        H_AGENT_ID: envelope.agent_id,
        H_CONTENT_TYPE: CONTENT_TYPE,
        "ce-specversion": "1.0",
        "ce-id": envelope.event_id,
        "ce-type": envelope.event_type,
        "ce-source": f"/letta/agents/{envelope.agent_id}",
        "ce-time": envelope.timestamp,
    }
    if envelope.organization_id:
        headers[H_ORG_ID] = envelope.organization_id
    return headers
