"""What the console shows beyond database rows: a delivery's event body read back from ``LETTA_EVENTS`` (as a
manual retry does, :mod:`dispatcher.ops.manual_retry`), the request headers of an attempt with its signatures
redacted, and the circuit state of endpoints in this process's dispatcher."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from nats.js.errors import NotFoundError

from bus.envelope import decode_head
from dispatcher.api.context import ApiContext
from dispatcher.delivery.sender import request_headers
from dispatcher.delivery.tasks import TaskInfo
from dispatcher.store.models import Attempt, Delivery
from dispatcher.store.queries import aware

#: Most characters of an event body shown on a delivery page.
PAYLOAD_CHARS = 64 * 1024
#: How long a delivery page waits for the stream to hand back an event, seconds.
PAYLOAD_TIMEOUT_S = 2.0
REDACTED = "(redacted)"


@dataclass(frozen=True)
class Payload:
    """An event body as text (pretty JSON when it parses), cut at :data:`PAYLOAD_CHARS`; or why there is none."""

    text: str | None
    truncated: bool = False
    unavailable: str | None = None


async def event_payload(ctx: ApiContext, delivery: Delivery) -> Payload:
    """The event of ``delivery`` as it was published, from the events stream at its ``event_seq``."""
    if delivery.event_seq is None:
        return Payload(None, unavailable="this delivery has no stream sequence (a test event, or recorded before "
                                         "sequences were kept)")
    try:
        raw = await asyncio.wait_for(ctx.js.get_msg(ctx.settings.events_stream, delivery.event_seq),
                                     PAYLOAD_TIMEOUT_S)
        if decode_head(raw.data).event_id != delivery.event_id:
            raise NotFoundError()
    except NotFoundError:
        return Payload(None, unavailable=f"the event left {ctx.settings.events_stream} (older than its retention)")
    except Exception as exc:  # noqa: BLE001 - shown, not raised: the page is still useful without it
        return Payload(None, unavailable=f"could not read the event ({type(exc).__name__})")
    text = raw.data.decode("utf-8", errors="replace")
    try:
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        pass
    return Payload(text[:PAYLOAD_CHARS], truncated=len(text) > PAYLOAD_CHARS)


class _RedactingSigner:
    """Stands in for :class:`dispatcher.delivery.signing.Signer`: every signature is :data:`REDACTED`."""

    def letta_signature(self, body: bytes) -> str:
        return REDACTED

    def standard_signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        return REDACTED


def attempt_headers(delivery: Delivery, attempt: Attempt) -> dict[str, str]:
    """The headers the sender puts on a POST of ``delivery`` (:func:`dispatcher.delivery.sender.request_headers`),
    signatures redacted; ``webhook-timestamp`` is the attempt's recorded time (within its duration of the one
    sent). Trace headers are not kept, so they are not shown."""
    task = TaskInfo(delivery.id, delivery.endpoint_id, delivery.event_id, delivery.event_type, delivery.agent_id)
    return request_headers(_RedactingSigner(), task, b"", int(aware(attempt.at).timestamp()))  # type: ignore[arg-type]


def circuits(ctx: ApiContext) -> dict[str, str] | None:
    """Endpoint id -> circuit state (``closed``, ``open``, ``half-open``) in this process's dispatcher; None when
    the API runs without one (other processes' circuits are their own). Endpoints without a gate are closed."""
    sender = ctx.dispatcher.sender if ctx.dispatcher is not None else None
    if sender is None:
        return None
    return {endpoint_id: gate.state for endpoint_id, gate in list(sender.gates.items())}
