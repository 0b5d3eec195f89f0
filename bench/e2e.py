"""End-to-end benchmark: events published to JetStream -> one dispatcher process -> signed POSTs to a receiver.

    .venv/bin/python bench/e2e.py [--events 20000] [--agents 64] [--rate 2000] [--paced-seconds 10]

Each part runs in its own process, as in production: nats-server (bus.embedded), the receiver
(bench/receiver.py), the dispatcher (`letta-bus up` joining the benchmark's server, SQLite history on), and the
raw baseline (bench/raw_dispatcher.py: plain nats-py + aiohttp, no letta-bus code) measured in the same run.

1. raw: a backlog of N envelopes on a plain stream, drained by the raw baseline: deliveries/s.
2. letta-bus throughput: a backlog of N events over ``--agents`` agents, each with its own webhook, drained by the
   dispatcher: deliveries/s (first to last arrival at the receiver); the delivery history is checked afterwards.
3. letta-bus latency: events published at ``--rate`` per second for ``--paced-seconds``: publish-to-receiver p50
   and p99 (the receiver compares arrival with the envelope's timestamp).

Last line: ``RESULT deliveries_per_s=.. raw_per_s=.. ratio=.. paced_p50_ms=.. paced_p99_ms=..``.
Targets (issue 6): >= 4,000 deliveries/s, >= 70 % of raw, paced p50 <= 10 ms and p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from common import (  # noqa: I001 - bench/ is on sys.path when run as a script
    BIN, DATA, agents_with_webhooks, dispatcher_env, per_cpu, publish_events, raw_backlog, rate, start_raw,
    start_receiver, stop, succeeded_rows, wait_count,
)
from bus.connection import connect
from bus.embedded import EmbeddedServer
from bus.publisher import EventPublisher
from config.settings import Settings


async def watch(js, settings: Settings) -> None:  # noqa: ANN001
    """Print both durables' pending and ack-pending counts every second (--verbose)."""
    while True:
        fan = await js.consumer_info(settings.events_stream, settings.fanout_durable)
        snd = await js.consumer_info(settings.webhooks_stream, settings.sender_durable)
        print(f"  fan-out pending {fan.num_pending:6d} ack-pending {fan.num_ack_pending:5d} | "
              f"sender pending {snd.num_pending:6d} ack-pending {snd.num_ack_pending:5d}")
        await asyncio.sleep(1.0)


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="letta-bus-e2e-"))
    server = EmbeddedServer(workdir=tmp).start()
    receiver, base = start_receiver(tmp)
    dispatcher = raw = None
    settings = Settings(
        _env_file=None, nats_url=server.url, database_url=f"sqlite+aiosqlite:///{tmp}/letta-bus.db",
        ssrf_allow_cidrs=["127.0.0.0/8"], secret_key_file=tmp / "secret.key", metrics_port=0,
    )
    nc = await connect(server.url, name="bench-e2e")
    js = nc.jetstream()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            # 1. raw baseline
            await raw_backlog(js, args.events)
            raw = start_raw(server.url, "RAW", "raw", base, args.events)
            stats = await wait_count(client, base, args.events, 300, [raw.pid])
            raw_per_s = rate(stats)
            stop(raw)
            print(f"raw baseline: {stats['count']} POSTs, {raw_per_s:,.0f}/s{per_cpu(stats)}")
            await client.post(f"{base}/reset")

            # 2. letta-bus, backlog
            store, agents = await agents_with_webhooks(js, settings, base, args.agents)
            publisher = EventPublisher(settings, nc)
            t = time.perf_counter()
            await publish_events(publisher, agents, args.events)
            print(f"published {args.events} events in {time.perf_counter() - t:.2f} s")
            cmd = [str(BIN / "letta-bus"), "up", "--log-level", "warning"]
            if args.profile:  # py-spy's collapsed stacks of the dispatcher process
                cmd = [str(BIN / "py-spy"), "record", "--format", "raw", "-o", args.profile, "--rate", "200", "--",
                       *cmd]
            dispatcher = subprocess.Popen(cmd, cwd=tmp, env=dispatcher_env(settings, tmp),
                                          stdout=subprocess.DEVNULL)
            monitor = asyncio.create_task(watch(js, settings)) if args.verbose else None
            stats = await wait_count(client, base, args.events, 600, [] if args.profile else [dispatcher.pid])
            if monitor:
                monitor.cancel()
            per_s = rate(stats)
            print(f"letta-bus: {stats['count']} deliveries, {per_s:,.0f}/s{per_cpu(stats)}")
            await asyncio.sleep(1.0)
            recorded = await succeeded_rows(store)
            print(f"delivery history: {recorded} succeeded rows")

            # 3. letta-bus, paced
            await client.post(f"{base}/reset")
            total = int(args.rate * args.paced_seconds)
            tick, per_tick = 0.01, max(1, int(args.rate * 0.01))
            start = time.perf_counter()
            sent = 0
            while sent < total:
                await asyncio.gather(*(publisher.publish_event(agents[(sent + i) % len(agents)],
                                                               "agent.step.completed", DATA)
                                       for i in range(min(per_tick, total - sent))))
                sent += per_tick
                delay = start + (sent / per_tick) * tick - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            offered = sent / (time.perf_counter() - start)
            paced = await wait_count(client, base, total, 120)
            print(f"paced: offered {offered:,.0f}/s, delivered {paced['count']}, p50 {paced['p50_ms']:.1f} ms, "
                  f"p99 {paced['p99_ms']:.1f} ms")
            await store.close()
    finally:
        await nc.close()
        for proc in (dispatcher, raw):
            if proc is not None:
                stop(proc, signal.SIGINT)
        stop(receiver)
        server.stop()
    ratio = per_s / raw_per_s
    print(f"RESULT deliveries_per_s={per_s:.0f} raw_per_s={raw_per_s:.0f} ratio={ratio:.2f} "
          f"paced_p50_ms={paced['p50_ms']:.1f} paced_p99_ms={paced['p99_ms']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second in the paced phase")
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument("--verbose", action="store_true", help="print the durables' pending counts every second")
    parser.add_argument("--profile", help="write py-spy collapsed stacks of the dispatcher here (needs py-spy)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
