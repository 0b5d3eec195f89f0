"""A webhook receiver for benchmarks, run as its own process so it does not share a CPU with what is measured.

``python bench/receiver.py PORT_FILE``: listens on 127.0.0.1 (a free port, written to PORT_FILE), answers every
POST with 200 at once and records, per POST, the latency from the envelope's ``timestamp`` (set at publish) to
arrival, and its ``webhook-id`` header (the event id, stable across retries). ``GET /stats`` returns ``{"count",
"p50_ms", "p99_ms", "first", "last", "unique", "duplicates"}`` (``first``/``last``: Unix seconds of the first and
last arrival; ``unique``: distinct webhook-ids; ``duplicates``: POSTs whose webhook-id had come before);
``POST /reset`` clears them. Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from aiohttp import web

arrivals: list[float] = []
latencies_ms: list[float] = []
webhook_ids: set[str] = set()
duplicates = 0
_TS = b'"timestamp":"'


def _published_at(body: bytes) -> float | None:
    i = body.find(_TS)
    if i < 0:
        return None
    raw = body[i + len(_TS): i + len(_TS) + 27].decode()
    return datetime.strptime(raw, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


async def receive(request: web.Request) -> web.Response:
    global duplicates
    body = await request.read()
    now = time.time()
    arrivals.append(now)
    webhook_id = request.headers.get("webhook-id")
    if webhook_id is not None:
        if webhook_id in webhook_ids:
            duplicates += 1
        else:
            webhook_ids.add(webhook_id)
    sent = _published_at(body)
    if sent is not None:
        latencies_ms.append((now - sent) * 1000)
    return web.Response(text="ok")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def stats(request: web.Request) -> web.Response:
    pct = request.query.get("pct") != "0"  # ?pct=0: skip the percentiles (a sort of every latency) while polling
    return web.json_response({
        "count": len(arrivals), "p50_ms": _pct(latencies_ms, 0.50) if pct else 0.0,
        "p99_ms": _pct(latencies_ms, 0.99) if pct else 0.0,
        "first": arrivals[0] if arrivals else 0.0, "last": arrivals[-1] if arrivals else 0.0,
        "unique": len(webhook_ids), "duplicates": duplicates,
    })


async def reset(_: web.Request) -> web.Response:
    global duplicates
    arrivals.clear()
    latencies_ms.clear()
    webhook_ids.clear()
    duplicates = 0
    return web.json_response({"ok": True})


async def main(port_file: Path) -> None:
    app = web.Application()
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    app.router.add_post("/{tail:.*}", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port_file.write_text(json.dumps({"port": site._server.sockets[0].getsockname()[1]}))  # type: ignore[union-attr]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
