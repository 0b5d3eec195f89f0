"""CPU per webhook POST: the sender's client (dispatcher/delivery/webhook_http.py) against aiohttp's ClientSession.

    .venv/bin/python bench/http_client.py [--requests 20000] [--concurrency 64] [--compare-with OLD.py]

Both send the same signed 1 KB POST (the sender's nine headers) to bench/receiver.py (its own process) over
keep-alive connections, one after the other, twice each (ABAB), and report requests/s and the CPU seconds this
process used per request (``resource.getrusage``): the figure that decides how many deliveries one dispatcher
process can make, and which other load on the machine disturbs much less than the wall-clock rate.
Last line: ``RESULT client_us_per_post=.. aiohttp_us_per_post=.. ratio=.. client_per_s=.. aiohttp_per_s=..``.

``--compare-with OLD.py`` measures another version of ``webhook_http.py`` (e.g. ``git show HEAD:dispatcher/delivery/
webhook_http.py > /tmp/old.py``) in place of aiohttp, in the same run (ABAB), so that a change to the client is
judged against its predecessor under the same load: ``RESULT client_us_per_post=.. baseline_us_per_post=..
change=+..%``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yarl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dispatcher.delivery.webhook_http import WebhookHTTPClient  # noqa: E402

HEADERS = {
    "Content-Type": "application/json", "User-Agent": "Letta-Webhook/1.0", "X-Letta-Event": "agent.step.completed",
    "X-Letta-Delivery": "dlv_0123456789abcdef0123456789abcdef", "X-Letta-Signature": "sha256=" + "a" * 64,
    "webhook-id": "evt_0123456789abcdef0123456789abcdef", "webhook-timestamp": "1790000000",
    "webhook-signature": "v1," + "b" * 44, "traceparent": "00-" + "c" * 32 + "-" + "d" * 16 + "-01",
}
BODY = json.dumps({"event_id": "evt_x", "event_type": "agent.step.completed",
                   "timestamp": "2026-01-01T00:00:00.000000Z", "agent_id": "agent-x", "data": {"x": "y" * 800}}).encode()


def load_client_class(path: str) -> type:
    """``WebhookHTTPClient`` of another version of the module, loaded from ``path``."""
    spec = importlib.util.spec_from_file_location("webhook_http_baseline", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.WebhookHTTPClient


async def measure(kind: str, url: yarl.URL, n: int, concurrency: int, client_class: type = WebhookHTTPClient,
                  ) -> tuple[float, float]:
    """(requests per second, CPU microseconds per request)."""
    slots = asyncio.Semaphore(concurrency)
    if kind == "aiohttp":
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), cookie_jar=aiohttp.DummyCookieJar(),
                                        timeout=aiohttp.ClientTimeout(total=5), auto_decompress=False)

        async def one() -> None:
            async with slots, session.post(url, data=BODY, headers=HEADERS, allow_redirects=False) as resp:
                await resp.content.read(16384)
                assert resp.status == 200
    else:
        client = client_class(None, timeout_s=5, max_idle_per_origin=256)

        async def one() -> None:
            async with slots:
                assert (await client.post(url, BODY, HEADERS)).status == 200

    await asyncio.gather(*(one() for _ in range(min(n, 1000))))  # warm-up: connections open
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if kind == "aiohttp":
        await session.close()
    else:
        await client.close()
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return n / (t1 - t0), cpu / n * 1e6


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="letta-bus-http-"))
    port_file = tmp / "receiver.json"
    receiver = subprocess.Popen([sys.executable, str(ROOT / "bench" / "receiver.py"), str(port_file)])
    try:
        deadline = time.monotonic() + 10
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("bench receiver did not start")
            await asyncio.sleep(0.05)
        url = yarl.URL(f"http://127.0.0.1:{json.loads(port_file.read_text())['port']}/agent-0001")
        other = "baseline" if args.compare_with else "aiohttp"
        baseline = load_client_class(args.compare_with) if args.compare_with else WebhookHTTPClient
        results: dict[str, list[tuple[float, float]]] = {"client": [], other: []}
        for kind in ("client", other, "client", other):
            per_s, us = await measure("client" if kind == "baseline" else kind, url, args.requests,
                                      args.concurrency, baseline if kind == "baseline" else WebhookHTTPClient)
            results[kind].append((per_s, us))
            print(f"{kind:8s} {per_s:8,.0f} POST/s  {us:6.0f} us CPU per POST")
    finally:
        receiver.terminate()
        receiver.wait(10)
    mean = {k: (sum(r[0] for r in v) / len(v), sum(r[1] for r in v) / len(v)) for k, v in results.items()}
    if args.compare_with:
        print(f"RESULT client_us_per_post={mean['client'][1]:.0f} baseline_us_per_post={mean['baseline'][1]:.0f} "
              f"change={(mean['client'][1] / mean['baseline'][1] - 1) * 100:+.0f}% client_per_s={mean['client'][0]:.0f}"
              f" baseline_per_s={mean['baseline'][0]:.0f}")
        return
    print(f"RESULT client_us_per_post={mean['client'][1]:.0f} aiohttp_us_per_post={mean['aiohttp'][1]:.0f} "
          f"ratio={mean['aiohttp'][1] / mean['client'][1]:.1f} client_per_s={mean['client'][0]:.0f} "
          f"aiohttp_per_s={mean['aiohttp'][0]:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--compare-with", metavar="OLD.py",
                        help="another webhook_http.py to measure instead of aiohttp")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
