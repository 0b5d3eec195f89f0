"""What ``letta-bus status`` and ``GET /v1/status`` report: streams and consumers as ``nats stream info`` /
``nats consumer info`` show them, fleet totals, and the endpoints that need attention with their backlog, recent
failures and circuit state.

Streams and consumers are read from JetStream (the source of truth); backlog and failures from the delivery
history; the circuit state from the dispatcher running in this process (``None`` when there is none: each
dispatcher process keeps its own breakers).

The report's cost does not grow with the history and its size does not grow with the fleet (issue 11): backlog
and failures are read from partial indexes (:func:`dispatcher.store.queries.endpoint_stats`), and at most
``limit`` endpoints are listed (default :data:`ENDPOINT_LIMIT`): first those that need attention, worst first (a
backlog, failures in the last 24 h, disabled, a failure clock running, a circuit not closed), then, while there is
room, the others by id; so a small fleet is listed whole. ``endpoints_truncated`` says some were left out.
"""

from __future__ import annotations

import json
from typing import Any

from nats.aio.client import Client

from config.settings import Settings
from dispatcher.store.database import Store
from dispatcher.store.models import Endpoint
from dispatcher.store.queries import (
    aware, endpoint_stats, endpoint_totals, endpoints_by_id, first_endpoints, history_totals, troubled_endpoints,
)

#: Most endpoints ``/v1/status`` lists (``?limit=`` up to :data:`MAX_ENDPOINT_LIMIT`).
ENDPOINT_LIMIT = 100
MAX_ENDPOINT_LIMIT = 1000


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


async def endpoint_report(store: Store, circuits: dict[str, str] | None,
                          limit: int = ENDPOINT_LIMIT) -> dict[str, Any]:
    """``{"endpoints": [...], "endpoint_totals": {...}, "endpoints_truncated": bool}``.

    ``endpoints``: at most ``limit`` entries (module docstring for which), each with id, scope, owner (agent or
    organization id), url, enabled, disabled_reason, failing_since, backlog (deliveries pending or retrying),
    failed_24h, circuit (``closed``, ``open``, ``half-open``; ``None`` when unknown to this process) and
    ``attention`` (why it is listed first: ``backlog``, ``failures``, ``disabled``, ``failing``, ``circuit``; empty
    for a healthy one). ``endpoint_totals``: ``endpoints``, ``enabled``, ``disabled``, ``failing`` (endpoint
    counts), ``backlog`` and ``failed_24h`` (delivery counts over every endpoint), ``attention`` (endpoints found
    needing attention, at most ``2 * limit`` + the disabled/failing and circuit ones looked at). ``circuits``:
    endpoint id -> circuit state, as this process's dispatcher has them (None: no dispatcher here)."""
    stats = await endpoint_stats(store, limit=limit)
    troubled = await troubled_endpoints(store, limit=limit)
    open_circuits = [] if circuits is None else sorted(i for i, state in circuits.items() if state != "closed")
    wanted = set(stats) | set(open_circuits[:limit])
    rows: dict[str, Endpoint] = {e.id: e for e in troubled}
    rows.update({e.id: e for e in await endpoints_by_id(store, sorted(wanted - set(rows)))})
    entries = [_entry(e, stats, circuits) for e in rows.values()]
    entries.sort(key=lambda x: (-x["backlog"], -x["failed_24h"], not x["attention"], x["id"]))
    attention = [x for x in entries if x["attention"]]
    shown = attention[:limit]
    totals = {**await endpoint_totals(store)}
    history = await history_totals(store)
    totals.update(backlog=history["backlog"], failed_24h=history["failed"], attention=len(attention))
    if len(shown) < limit:  # room left: the healthy ones too, by id (a small fleet is listed whole)
        listed = {x["id"] for x in shown}
        for e in await first_endpoints(store, limit=limit + len(shown)):
            if len(shown) >= limit:
                break
            if e.id not in listed:
                shown.append(_entry(e, stats, circuits))
    return {"endpoints": shown, "endpoint_totals": totals, "endpoints_truncated": totals["endpoints"] > len(shown)}


def _entry(e: Endpoint, stats: dict[str, dict[str, int]], circuits: dict[str, str] | None) -> dict[str, Any]:
    s = stats.get(e.id, {"backlog": 0, "failed": 0})
    circuit = None if circuits is None else circuits.get(e.id, "closed")
    attention = [why for why, yes in (("backlog", s["backlog"] > 0), ("failures", s["failed"] > 0),
                                      ("disabled", not e.enabled), ("failing", e.failing_since is not None),
                                      ("circuit", circuit not in (None, "closed"))) if yes]
    return {
        "id": e.id, "scope": e.scope, "owner": e.agent_id or e.organization_id, "url": e.url,
        "enabled": e.enabled, "disabled_reason": e.disabled_reason,
        "failing_since": aware(e.failing_since).isoformat() if e.failing_since else None,
        "backlog": s["backlog"], "failed_24h": s["failed"], "circuit": circuit, "attention": attention,
    }


def _ts(value: Any) -> str | None:
    """A stream timestamp as RFC 3339 text (nats-py gives strings; the zero time means none)."""
    if not value:
        return None
    text = str(value)
    return None if text.startswith("0001-01-01") else text
