"""Read stored messages in batches without a consumer: JetStream's batched direct get.

Source: NATS ADR-31 ("JetStream Direct Get"), batched form of nats-server 2.11+. A request on
``$JS.API.DIRECT.GET.<stream>`` with ``{"batch": n, "next_by_subj": <subject>, "seq" | "start_time": ...}`` is
answered on the requester's inbox by up to ``n`` messages, each with the headers ``Nats-Sequence``,
``Nats-Subject``, ``Nats-Time-Stamp`` and ``Nats-Num-Pending`` (matching messages after it), then a message with
status 204 ``EOB``; status 404 when nothing matches. The stream needs ``allow_direct``.

Reading this way needs only a publish permission on ``$JS.API.DIRECT.GET.<stream>`` and the reader's own inbox,
so a role that reads history (the dispatcher's replay) needs no right to create, pull from or delete consumers on
the stream, which would let it take other services' durables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError

_STATUS = "Status"


class DirectGetError(Exception):
    """The server refused the request (status other than 204/404), or its answer stopped before the end."""


@dataclass(slots=True)
class StoredMsg:
    """A message as stored: stream ``seq``, ``subject``, ``time`` (UTC, when stored), its own ``headers`` (the
    ``Nats-*`` ones of the answer removed) and ``data``."""

    seq: int
    subject: str
    time: datetime
    headers: dict[str, str]
    data: bytes


def parse_time(value: str) -> datetime:
    """``Nats-Time-Stamp`` (RFC 3339 with nanoseconds, ``Z``) as an aware datetime, to the microsecond."""
    head, _, frac = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac or '0')[:6]:0<6}").replace(tzinfo=timezone.utc)


async def get_batch(nc: Client, stream: str, *, subject: str, batch: int, start_seq: int | None = None,
                    start_time: datetime | None = None, timeout_s: float = 5.0,
                    api_prefix: str = "$JS.API") -> tuple[list[StoredMsg], int]:
    """Up to ``batch`` messages of ``stream`` on ``subject`` (wildcards allowed) from stream sequence
    ``start_seq``, or from the first stored at or after ``start_time`` (aware), or from the start.

    Returns ``(messages, pending)``: ``pending`` is how many matching messages follow the last one (0: none).
    Raises ``DirectGetError`` on a refusal (e.g. the stream has no ``allow_direct``), ``nats.errors.TimeoutError``
    when no answer comes within ``timeout_s`` seconds of the previous one."""
    request: dict[str, object] = {"batch": batch, "next_by_subj": subject}
    if start_seq is not None:
        request["seq"] = start_seq
    elif start_time is not None:
        request["start_time"] = start_time.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    msgs: list[StoredMsg] = []
    try:
        await nc.publish(f"{api_prefix}.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox)
        while True:
            try:
                m = await sub.next_msg(timeout=timeout_s)
            except NatsTimeoutError:
                raise NatsTimeoutError(f"direct get on {stream}: no answer in {timeout_s} s "
                                       f"after {len(msgs)} messages") from None
            headers = dict(m.headers or {})
            status = headers.get(_STATUS)
            if status == "404":
                return msgs, 0
            if status == "204":  # EOB
                return msgs, int(headers.get("Nats-Num-Pending", "0"))
            if status == "503":
                raise DirectGetError(f"direct get on {stream} refused: 503 no responders (the stream does not allow "
                                     "direct gets: provision it again, which sets allow_direct)")
            if status is not None:
                description = next((v for k, v in headers.items() if str(k).lower().endswith("description")), "")
                raise DirectGetError(f"direct get on {stream} refused: {status} {description}")
            msgs.append(StoredMsg(
                seq=int(headers.pop("Nats-Sequence")), subject=headers.pop("Nats-Subject"),
                time=parse_time(headers.pop("Nats-Time-Stamp")), headers=headers, data=m.data))
            for key in ("Nats-Num-Pending", "Nats-Stream", "Nats-Last-Sequence"):
                headers.pop(key, None)
    finally:
        await sub.unsubscribe()
