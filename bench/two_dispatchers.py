"""Two dispatcher processes on the same durables: deliveries/s and no duplicate deliveries.

    .venv/bin/python bench/two_dispatchers.py [--events 20000] [--agents 64] [--database-url URL]

What runs, each in its own process: nats-server (bus.embedded), the receiver (bench/receiver.py, which counts
``webhook-id`` headers), and two ``letta-bus up`` joining the same server and the same store, so both pull from the
``webhook-fanout`` and ``webhook-sender`` durables (DESIGN.md, "Running it": several dispatcher processes on the
same durables). The SQLite store is shared by both processes (WAL, busy timeout); ``--database-url`` points them at
PostgreSQL instead (production's database).

1. raw baseline: two bench/raw_dispatcher.py processes (plain nats-py + aiohttp) on one durable of a plain stream
   holding N envelopes: deliveries/s.
2. letta-bus: a backlog of N events over ``--agents`` agents with a webhook each, drained by the two dispatchers:
   deliveries/s (first to last arrival), then 3 s more for any late duplicate. Reports: distinct webhook-ids (all
   N expected), duplicate POSTs (0 expected), succeeded rows in the delivery history (N expected) and the CPU each
   process used (both take a share of the work).

Last line: ``RESULT deliveries_per_s=.. raw_per_s=.. ratio=.. unique=.. duplicates=.. events=.. history_rows=..``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx

from common import (  # noqa: I001 - bench/ is on sys.path when run as a script
    agents_with_webhooks, cpu_of, per_cpu, publish_events, raw_backlog, rate, start_dispatcher, start_raw,
    start_receiver, stop, succeeded_rows, wait_count,
)
from bus.connection import connect
from bus.embedded import EmbeddedServer
from bus.publisher import EventPublisher
from config.settings import Settings


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="letta-bus-two-"))
    server = EmbeddedServer(workdir=tmp).start()
    receiver, base = start_receiver(tmp)
    procs: list = []
    database_url = args.database_url or f"sqlite+aiosqlite:///{tmp}/letta-bus.db"
    settings = Settings(_env_file=None, nats_url=server.url, database_url=database_url,
                        ssrf_allow_cidrs=["127.0.0.0/8"], secret_key_file=tmp / "secret.key", metrics_port=0)
    nc = await connect(server.url, name="bench-two")
    js = nc.jetstream()
    n = args.events
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            # 1. raw baseline: two processes on one durable
            await raw_backlog(js, n)
            procs = [start_raw(server.url, "RAW", "raw", base, n) for _ in range(2)]
            stats = await wait_count(client, base, n, 300, [p.pid for p in procs])
            raw_per_s = rate(stats)
            for p in procs:
                stop(p)
            procs = []
            print(f"raw baseline, 2 processes: {stats['count']} POSTs, {raw_per_s:,.0f}/s{per_cpu(stats)}")
            await client.post(f"{base}/reset")

            # 2. letta-bus: two dispatcher processes
            store, agents = await agents_with_webhooks(js, settings, base, args.agents)
            publisher = EventPublisher(settings, nc)
            t = time.perf_counter()
            await publish_events(publisher, agents, n)
            print(f"published {n} events in {time.perf_counter() - t:.2f} s")
            procs = [start_dispatcher(settings, tmp, f"dispatcher-{i}") for i in range(2)]
            stats = await wait_count(client, base, n, 600, [p.pid for p in procs])
            per_s = rate(stats)
            shares = [cpu_of([p.pid]) for p in procs]
            await asyncio.sleep(3.0)  # a duplicate would come now at the latest (acks are written within 50 ms)
            final = (await client.get(f"{base}/stats")).json()
            rows = await succeeded_rows(store)
            await store.close()
            for i, p in enumerate(procs):
                stop(p, wait_s=30)
            print(f"letta-bus, 2 processes: {stats['count']} deliveries, {per_s:,.0f}/s{per_cpu(stats)}; "
                  f"CPU seconds per process {', '.join(f'{c:.1f}' for c in shares if c is not None)}")
            print(f"webhook-ids: {final['unique']} distinct of {n} events, {final['duplicates']} duplicate POSTs; "
                  f"delivery history: {rows} succeeded rows")
    finally:
        await nc.close()
        for p in procs:
            stop(p)
        stop(receiver)
        server.stop()
    print(f"RESULT deliveries_per_s={per_s:.0f} raw_per_s={raw_per_s:.0f} ratio={per_s / raw_per_s:.2f} "
          f"unique={final['unique']} duplicates={final['duplicates']} events={n} history_rows={rows}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--database-url", help="shared store of both dispatchers (default: SQLite in a temp dir)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
