"""What ``letta-bus status`` and ``GET /v1/status`` report: streams and consumers as ``nats stream info`` /
``nats consumer info`` show them, and per endpoint its backlog, recent failures and circuit state.

Streams and consumers are read from JetStream (the source of truth); backlog and failures from the delivery
history; the circuit state from the dispatcher running in this process (``None`` when there is none: each
dispatcher process keeps its own breakers).
"""

from __future__ import annotations

import json
from typing import Any

from nats.aio.client import Client

from config.settings import Settings
from dispatcher.store.database import Store
from dispatcher.store.queries import aware, endpoint_stats


async def stream_report(nc: Client, settings: Settings, timeout_s: float = 2.0) -> dict[str, Any]:
    """``{"streams": [{name, messages, bytes, first_seq, last_seq, first_time, last_time, consumers}],
    "consumers": [{stream, name, pending, ack_pending, redelivered, waiting, last_delivered_seq}]}``, read with
    the JetStream API's own JSON (``$JS.API.STREAM.INFO``, ``$JS.API.CONSUMER.INFO``) as the nats CLI does, so
    first/last times are there too (nats-py's StreamState drops them). A missing stream or consumer appears with
    ``"missing": true``. Raises ``nats.errors.Error`` (e.g. a timeout) when NATS does not answer."""
    streams, consumers = [], []
    for stream, durable in ((settings.events_stream, settings.fanout_durable),
                            (settings.webhooks_stream, settings.sender_durable)):
        info = await _api(nc, f"$JS.API.STREAM.INFO.{stream}", timeout_s)
        if "error" in info:
            streams.append({"name": stream, "missing": True, "error": info["error"].get("description")})
        else:
            st = info.get("state", {})
            streams.append({
                "name": stream, "messages": st.get("messages", 0), "bytes": st.get("bytes", 0),
                "first_seq": st.get("first_seq", 0), "last_seq": st.get("last_seq", 0),
                "first_time": _ts(st.get("first_ts")), "last_time": _ts(st.get("last_ts")),
                "consumers": st.get("consumer_count", 0),
            })
        ci = await _api(nc, f"$JS.API.CONSUMER.INFO.{stream}.{durable}", timeout_s)
        if "error" in ci:
            consumers.append({"stream": stream, "name": durable, "missing": True,
                              "error": ci["error"].get("description")})
            continue
        consumers.append({
            "stream": stream, "name": durable, "pending": ci.get("num_pending", 0),
            "ack_pending": ci.get("num_ack_pending", 0), "redelivered": ci.get("num_redelivered", 0),
            "waiting": ci.get("num_waiting", 0), "last_delivered_seq": ci.get("delivered", {}).get("stream_seq"),
        })
    return {"streams": streams, "consumers": consumers}


async def _api(nc: Client, subject: str, timeout_s: float) -> dict[str, Any]:
    msg = await nc.request(subject, b"", timeout=timeout_s)
    return json.loads(msg.data)


async def endpoint_report(store: Store, circuits: dict[str, str] | None) -> list[dict[str, Any]]:
    """One entry per endpoint: id, scope, owner (agent or organization id), url, enabled, disabled_reason,
    failing_since, backlog (deliveries pending or retrying), failed_24h and circuit (``closed``, ``open``,
    ``half-open``; ``None`` when unknown to this process)."""
    stats = await endpoint_stats(store)
    out = []
    for e in await store.list_endpoints():
        s = stats.get(e.id, {"backlog": 0, "failed": 0})
        out.append({
            "id": e.id, "scope": e.scope, "owner": e.agent_id or e.organization_id, "url": e.url,
            "enabled": e.enabled, "disabled_reason": e.disabled_reason,
            "failing_since": aware(e.failing_since).isoformat() if e.failing_since else None,
            "backlog": s["backlog"], "failed_24h": s["failed"],
            "circuit": None if circuits is None else circuits.get(e.id, "closed"),
        })
    return out


def _ts(value: Any) -> str | None:
    """A stream timestamp as RFC 3339 text (nats-py gives strings; the zero time means none)."""
    if not value:
        return None
    text = str(value)
    return None if text.startswith("0001-01-01") else text
