"""A 1,000,000-event backlog: the dispatcher's memory stays flat while it works through it.

    .venv/bin/python bench/backlog.py [--events 1000000] [--agents 64] [--drain-seconds 240] [--raw-seconds 60]

Method (honest about what it covers): one ``letta-bus up`` runs from the start, against a local receiver. The
benchmark publishes ``--events`` events (pipelined, over ``--agents`` agents with a webhook each) while the
dispatcher already works, so a backlog of close to a million events builds up in ``LETTA_EVENTS`` (and fan-out
tasks in ``LETTA_WEBHOOKS``); then it lets the dispatcher drain for ``--drain-seconds`` more. Draining all of it
would take several times longer at this machine's rate, and nothing about the dispatcher's state depends on how
much is still waiting on the server (it never holds more than its read-ahead and its POSTs in flight), so the run
is bounded: it reports the dispatcher's resident memory (RSS, from /proc every second) over the whole publishing
phase and the first minutes of draining, and how much it grew per 100,000 deliveries once warm (a least-squares
slope over the drain phase). The raw baseline of the same run, bench/raw_dispatcher.py (nats-py + aiohttp), then
drains its own durable on the same million-event stream for ``--raw-seconds``: its peak RSS and rate.

Last line: ``RESULT peak_rss_mb=.. warm_rss_mb=.. end_rss_mb=.. growth_mb_per_100k=.. delivered=.. backlog=..
per_s=.. raw_peak_rss_mb=.. raw_per_s=..``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
from nats.js.api import ConsumerConfig, DeliverPolicy

from common import (  # noqa: I001 - bench/ is on sys.path when run as a script
    DATA, agents_with_webhooks, proc_stat, receiver_stats, start_dispatcher, start_raw, start_receiver, stop,
)
from bus.connection import connect
from bus.embedded import EmbeddedServer
from bus.pipeline import prepare, publish_batch
from bus.publisher import EventPublisher
from config.settings import Settings

MB = 1024 * 1024


class Sampler:
    """Every second: (seconds since start, RSS bytes of ``pid``, POSTs the receiver counted)."""

    def __init__(self, client: httpx.AsyncClient, base: str, pid: int) -> None:
        self.client, self.base, self.pid = client, base, pid
        self.samples: list[tuple[float, int, int]] = []
        self.t0 = time.monotonic()

    async def run(self) -> None:
        while True:
            stat = proc_stat(self.pid)
            if stat is None:
                return
            count = (await receiver_stats(self.client, self.base, percentiles=False))["count"]
            self.samples.append((time.monotonic() - self.t0, stat[1], count))
            await asyncio.sleep(1.0)


def slope_mb_per_100k(samples: list[tuple[float, int, int]]) -> float:
    """Least-squares slope of RSS (MB) against deliveries, per 100,000 deliveries."""
    xs = [s[2] for s in samples]
    ys = [s[1] / MB for s in samples]
    if len(xs) < 2 or max(xs) == min(xs):
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs) * 100_000


async def publish_backlog(publisher: EventPublisher, settings: Settings, js, agents: list[str], n: int) -> None:  # noqa: ANN001
    """``n`` events, 1,024 publishes in flight; anything not stored is retried with the same id."""
    window = 1024
    for start in range(0, n, window):
        items = [prepare(settings, publisher.build(agents[i % len(agents)], "agent.step.completed", DATA))
                 for i in range(start, min(n, start + window))]
        while items:
            results = await publish_batch(js, items, settings.publish_timeout_s)
            items = [item for item, result in zip(items, results) if isinstance(result, BaseException)]


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="letta-bus-backlog-"))
    server = EmbeddedServer(workdir=tmp).start()
    receiver, base = start_receiver(tmp)
    dispatcher = raw = None
    settings = Settings(_env_file=None, nats_url=server.url, database_url=f"sqlite+aiosqlite:///{tmp}/letta-bus.db",
                        ssrf_allow_cidrs=["127.0.0.0/8"], secret_key_file=tmp / "secret.key", metrics_port=0)
    nc = await connect(server.url, name="bench-backlog")
    js = nc.jetstream()
    n = args.events
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            store, agents = await agents_with_webhooks(js, settings, base, args.agents)
            await store.close()
            # the raw baseline's own durable on the same stream (deliver_policy all: it sees every event)
            await js.add_consumer(settings.events_stream, ConsumerConfig(
                durable_name="raw-backlog", deliver_policy=DeliverPolicy.ALL, ack_wait=30, max_ack_pending=1000,
                filter_subject=f"{settings.subject_prefix}.>"))

            dispatcher = start_dispatcher(settings, tmp, "dispatcher")
            await asyncio.sleep(3.0)  # started, connected, idle
            idle_rss = proc_stat(dispatcher.pid)[1]  # type: ignore[index]
            sampler = Sampler(client, base, dispatcher.pid)
            sampling = asyncio.create_task(sampler.run())
            t = time.perf_counter()
            await publish_backlog(EventPublisher(settings, nc), settings, js, agents, n)
            published_s = time.perf_counter() - t
            at_published = len(sampler.samples)
            delivered_then = sampler.samples[-1][2] if sampler.samples else 0
            print(f"published {n:,} events in {published_s:.0f} s ({n / published_s:,.0f}/s) while the dispatcher "
                  f"delivered {delivered_then:,}; idle RSS {idle_rss / MB:.1f} MB")
            last_print = time.monotonic()
            deadline = time.monotonic() + args.drain_seconds
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                if time.monotonic() - last_print >= 30 and sampler.samples:
                    last_print = time.monotonic()
                    s = sampler.samples[-1]
                    print(f"  t={s[0]:5.0f} s  RSS {s[1] / MB:6.1f} MB  delivered {s[2]:,}")
            sampling.cancel()
            samples = sampler.samples
            fanout = await js.consumer_info(settings.events_stream, settings.fanout_durable)
            sender = await js.consumer_info(settings.webhooks_stream, settings.sender_durable)
            stop(dispatcher, wait_s=30)
            dispatcher = None
            drain = samples[at_published:]
            delivered = samples[-1][2]
            peak = max(s[1] for s in samples)
            warm = drain[min(len(drain) - 1, 30)][1] if drain else samples[-1][1]  # 30 s into the drain phase
            end = samples[-1][1]
            growth = slope_mb_per_100k(drain[30:] if len(drain) > 60 else drain)
            drain_rate = (drain[-1][2] - drain[0][2]) / max(drain[-1][0] - drain[0][0], 1e-9) if len(drain) > 1 else 0
            backlog = fanout.num_pending + sender.num_pending + sender.num_ack_pending
            print(f"letta-bus: delivered {delivered:,} in {samples[-1][0]:.0f} s ({drain_rate:,.0f}/s while "
                  f"draining); still waiting: {fanout.num_pending:,} events, {sender.num_pending:,} tasks")
            print(f"dispatcher RSS: idle {idle_rss / MB:.1f} MB, peak {peak / MB:.1f} MB, 30 s into draining "
                  f"{warm / MB:.1f} MB, at the end {end / MB:.1f} MB; growth {growth:+.2f} MB per 100k deliveries")

            # raw baseline: its own durable on the same stream
            await client.post(f"{base}/reset")
            raw = start_raw(server.url, settings.events_stream, "raw-backlog", base, n)
            raw_sampler = Sampler(client, base, raw.pid)
            raw_sampling = asyncio.create_task(raw_sampler.run())
            await asyncio.sleep(args.raw_seconds)
            raw_sampling.cancel()
            stop(raw)
            raw = None
            rs = [s for s in raw_sampler.samples if s[2] > 0]
            raw_peak = max(s[1] for s in raw_sampler.samples)
            raw_rate = (rs[-1][2] - rs[0][2]) / max(rs[-1][0] - rs[0][0], 1e-9) if len(rs) > 1 else 0.0
            print(f"raw baseline: {raw_sampler.samples[-1][2]:,} POSTs in {args.raw_seconds:.0f} s "
                  f"({raw_rate:,.0f}/s), peak RSS {raw_peak / MB:.1f} MB")
    finally:
        await nc.close()
        stop(dispatcher)
        stop(raw)
        stop(receiver)
        server.stop()
    print(f"RESULT peak_rss_mb={peak / MB:.1f} warm_rss_mb={warm / MB:.1f} end_rss_mb={end / MB:.1f} "
          f"growth_mb_per_100k={growth:.2f} delivered={delivered} backlog={backlog} per_s={drain_rate:.0f} "
          f"raw_peak_rss_mb={raw_peak / MB:.1f} raw_per_s={raw_rate:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--drain-seconds", type=float, default=240.0)
    parser.add_argument("--raw-seconds", type=float, default=60.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
