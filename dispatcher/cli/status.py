"""``letta-bus status``: streams and consumers read from NATS (as ``nats stream info`` / ``nats consumer info``
report them), fleet totals, and the endpoints needing attention (at most ``--limit``, then healthy ones while there
is room) with their backlog, failures and circuit state from the API (the circuit lives in the dispatcher's
process); without an API, endpoints come from the database and the circuit shows ``?``."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
from rich.table import Table

from dispatcher.cli.support import console, err, fail, settings_or_exit, with_store


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def status(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="most endpoints listed")] = 100,
) -> None:
    """Streams, consumers, fleet totals and the endpoints that need attention, at a glance."""
    from bus.connection import connect
    from dispatcher.cli.api_client import ApiClient, ApiError, ApiUnreachable
    from dispatcher.ops.status import endpoint_report, stream_report

    settings = settings_or_exit()

    async def read_nats() -> dict[str, Any]:
        nc = await connect(settings.client_url, name="letta-bus-status", timeout_s=settings.connect_timeout_s,
                           settings=settings, role="dispatcher")
        try:
            return await stream_report(nc, settings)
        finally:
            await nc.close()

    try:
        report = asyncio.run(read_nats())
    except ConnectionError as exc:
        raise fail(str(exc)) from None
    try:
        with ApiClient(settings, timeout_s=10) as client:
            body = client.call("GET", "/v1/status", params={"limit": limit})
        for key in ("endpoints", "endpoint_totals", "endpoints_truncated"):
            report[key] = body[key]
    except (ApiUnreachable, ApiError) as exc:
        err.print(f"API: {exc}; endpoints from the database (circuit state unknown)", highlight=False)
        report.update(asyncio.run(with_store(settings, lambda store: endpoint_report(store, None, limit=limit))))
    if as_json:
        console.print_json(data=report)
        return
    streams = Table(title="streams")
    for col in ("stream", "messages", "bytes", "first seq", "last seq", "first time", "last time", "consumers"):
        streams.add_column(col)
    for s in report["streams"]:
        if s.get("missing"):
            streams.add_row(s["name"], "missing", "", "", "", "", "", "")
            continue
        streams.add_row(s["name"], f"{s['messages']:,}", _size(s["bytes"]), str(s["first_seq"]), str(s["last_seq"]),
                        (s["first_time"] or "-")[:23], (s["last_time"] or "-")[:23], str(s["consumers"]))
    consumers = Table(title="consumers")
    for col in ("stream", "consumer", "pending", "ack pending", "redelivered", "waiting", "last delivered seq"):
        consumers.add_column(col)
    for c in report["consumers"]:
        if c.get("missing"):
            consumers.add_row(c["stream"], c["name"], "missing", "", "", "", "")
            continue
        consumers.add_row(c["stream"], c["name"], f"{c['pending']:,}", f"{c['ack_pending']:,}",
                          f"{c['redelivered']:,}", str(c["waiting"]), str(c["last_delivered_seq"]))
    endpoints = Table(title="endpoints")
    for col in ("endpoint", "scope", "owner", "url", "enabled", "backlog", "failed 24h", "failing since", "circuit",
                "attention"):
        endpoints.add_column(col)
    for e in report["endpoints"]:
        endpoints.add_row(e["id"], e["scope"], e["owner"] or "-", e["url"], "yes" if e["enabled"] else "no",
                          str(e["backlog"]), str(e["failed_24h"]), (e["failing_since"] or "-")[:19],
                          e["circuit"] or "?", ", ".join(e.get("attention") or []) or "-")
    t = report["endpoint_totals"]
    summary = (f"{t['endpoints']:,} endpoints ({t['enabled']:,} enabled, {t['disabled']:,} disabled, "
               f"{t['failing']:,} failing); {t['attention']:,} need attention; backlog {t['backlog']:,} deliveries, "
               f"{t['failed_24h']:,} failed in 24 h")
    if report["endpoints_truncated"]:
        summary += f"; {len(report['endpoints']):,} listed (--limit), needing attention first"
    console.print(streams, consumers, endpoints)
    console.print(summary, highlight=False)
