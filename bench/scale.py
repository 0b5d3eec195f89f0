"""Endpoint-table scale benchmark (issue 11): 100,000 agent endpoints with distinct secrets, 1,000 of them receiving.

    .venv/bin/python bench/scale.py [--endpoints 100000] [--receiving 1000] [--events 20000] [--changes-per-s 100]

Each part runs in its own process: nats-server (bus.embedded), the receiver (bench/receiver.py) and the dispatcher
(this file with ``--child``: a :class:`dispatcher.delivery.service.Dispatcher` plus an event-loop lag probe that
sleeps 10 ms and records the overshoot). The benchmark itself writes the endpoint changes, through
:class:`dispatcher.store.database.Store` and :func:`dispatcher.delivery.control.announce_change`, as the API does.

1. baseline: a SQLite database with only the ``--receiving`` endpoints; a backlog of ``--events`` events over those
   agents, drained by a fresh dispatcher: deliveries/s (first to last arrival), start-up time to first delivery.
2. scale: a database with ``--endpoints`` endpoints (bulk insert, a distinct secret each, the receiving ones among
   them); the same backlog, drained while ``--changes-per-s`` other endpoints change (URL updates) per second:
   deliveries/s; then ``--lag-seconds`` of events paced at ``--paced-rate`` with the changes still running: loop
   lag p99 (the baseline run measures the same window without changes); dispatcher RSS after it; start-up time
   (dispatcher launch to first delivery at the receiver).

Last line: ``RESULT ratio=.. loop_lag_p99_ms=.. rss_mb=.. startup_s=.. deliveries_per_s=.. baseline_per_s=..``.
Targets: ratio >= 0.9, loop_lag_p99_ms <= 20.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx

from common import DATA, ROOT, proc_stat, publish_events, rate, start_receiver, stop, wait_count  # noqa: I001
from sqlalchemy import insert

from bus.connection import connect
from bus.embedded import EmbeddedServer
from bus.publisher import EventPublisher
from bus.streams import provision
from config.settings import Settings
from dispatcher.delivery.control import announce_change
from dispatcher.store.database import Store
from dispatcher.store.models import Endpoint, utcnow
from dispatcher.store.secrets import generate_secret


def _settings(nats_url: str, db: Path, tmp: Path) -> Settings:
    return Settings(_env_file=None, nats_url=nats_url, database_url=f"sqlite+aiosqlite:///{db}",
                    ssrf_allow_cidrs=["127.0.0.0/8"], secret_key_file=tmp / "secret.key", metrics_port=0)


async def child(config: dict) -> None:
    """The dispatcher process: run until SIGTERM, then write lag samples (ms) and counters to ``config['out']``."""
    from dispatcher.delivery.service import Dispatcher

    tmp = Path(config["tmp"])
    settings = _settings(config["nats_url"], Path(config["db"]), tmp)
    store = Store.from_settings(settings)
    nc = await connect(settings.nats_url, name="bench-scale-dispatcher")
    lags: list[tuple[float, float]] = []  # (Unix seconds, overshoot ms)

    async def probe() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append((time.time(), (time.perf_counter() - t - 0.01) * 1000))

    prober = asyncio.create_task(probe())
    d = Dispatcher(settings, nc, store)
    started = time.time()
    await d.start()
    ready = time.time()
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()
    prober.cancel()
    out = {"lags": lags, "start_s": ready - started, "full_loads": d.endpoints.full_loads,
           "applied": d.endpoints.applied, "reconciles": d.endpoints.reconciles, "endpoints": len(d.endpoints),
           "load_slices": d.endpoints.load_slices}
    await d.stop()
    await nc.close()
    await store.close()
    Path(config["out"]).write_text(json.dumps(out))


async def fill(store: Store, base: str, endpoints: int, receiving: int) -> list[str]:
    """Bulk insert ``endpoints`` agent endpoints with distinct encrypted secrets; the first ``receiving`` point at
    the receiver, the rest at a closed port. Returns the receiving agent ids."""
    # created over the past hour, one microsecond apart (as endpoints created one by one are), so the first
    # reconciliations do not re-read the whole table (see the report: rows sharing one updated_at)
    created = utcnow() - timedelta(hours=1)
    box = store.secret_box
    for start in range(0, endpoints, 5000):
        rows = [{"id": f"ep_scale{i:08d}", "scope": "agent", "agent_id": f"agent-{i:06d}",
                 "url": f"{base}/agent-{i:06d}" if i < receiving else f"http://127.0.0.1:9/agent-{i:06d}",
                 "secret": box.encrypt(generate_secret()), "events": [], "enabled": True, "created_at": created,
                 "updated_at": created + timedelta(microseconds=i)} for i in range(start, min(endpoints, start + 5000))]
        async with store.session.begin() as s:
            await s.execute(insert(Endpoint), rows)
    return [f"agent-{i:06d}" for i in range(receiving)]


async def changer(store: Store, nc, settings: Settings, first: int, last: int, per_s: float,  # noqa: ANN001
                  stop_at: asyncio.Event) -> int:
    """Change ``per_s`` non-receiving endpoints per second (URL update + change notice, each in its own task so a
    slow write does not lower the rate) until ``stop_at``. Returns how many changes were made."""
    n, t0, tasks = 0, time.perf_counter(), set()
    writers = asyncio.Semaphore(4)  # SQLite has one writer at a time: a few in flight, not a hundred

    async def one(k: int) -> None:
        endpoint_id = f"ep_scale{first + k % max(last - first, 1):08d}"
        async with writers:
            await store.update_endpoint(endpoint_id, url=f"http://127.0.0.1:9/changed-{k}")
        await announce_change(nc, settings.control_subject, endpoint_id, "updated")

    while not stop_at.is_set():
        task = asyncio.create_task(one(n))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        delay = t0 + n / per_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    await asyncio.gather(*tasks, return_exceptions=True)
    return n


async def paced(settings: Settings, nc, agents: list[str], rate_per_s: float, seconds: float) -> int:  # noqa: ANN001
    """Publish events at ``rate_per_s`` for ``seconds`` (ticks of 10 ms); returns how many."""
    publisher = EventPublisher(settings, nc)
    per_tick = max(1, int(rate_per_s * 0.01))
    total, sent, start = int(rate_per_s * seconds), 0, time.perf_counter()
    while sent < total:
        await asyncio.gather(*(publisher.publish_event(agents[(sent + i) % len(agents)], "agent.step.completed",
                                                       DATA) for i in range(min(per_tick, total - sent))))
        sent += per_tick
        delay = start + (sent / per_tick) * 0.01 - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    return sent


async def phase(args, tmp: Path, server: EmbeddedServer, base: str, client: httpx.AsyncClient, name: str,
                endpoints: int, changes_per_s: float) -> dict:  # noqa: ANN001
    db = tmp / f"{name}.db"
    settings = _settings(server.url, db, tmp)
    nc = await connect(server.url, name=f"bench-scale-{name}")
    js = nc.jetstream()
    await provision(js, settings)
    await js.purge_stream(settings.events_stream)
    await js.purge_stream(settings.webhooks_stream)
    store = Store.from_settings(settings)
    await store.create_schema()
    t = time.perf_counter()
    agents = await fill(store, base, endpoints, args.receiving)
    print(f"[{name}] {endpoints} endpoints inserted in {time.perf_counter() - t:.1f} s")
    await publish_events(EventPublisher(settings, nc), agents, args.events)
    await client.post(f"{base}/reset")
    out = tmp / f"{name}-child.json"
    config = {"tmp": str(tmp), "nats_url": server.url, "db": str(db), "out": str(out)}
    launched = time.time()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(config)], cwd=tmp)
    stop_changes = asyncio.Event()
    changes = None
    try:
        while (await client.get(f"{base}/stats", params={"pct": "0"})).json()["count"] == 0:
            if proc.poll() is not None or time.time() - launched > 300:
                raise RuntimeError(f"[{name}] dispatcher exited or never delivered")
            await asyncio.sleep(0.02)
        first_delivery_s = time.time() - launched
        if changes_per_s > 0:
            changes = asyncio.create_task(changer(store, nc, settings, args.receiving, endpoints, changes_per_s,
                                                  stop_changes))
        drain_start = time.time()
        stats = await wait_count(client, base, args.events, 600, [proc.pid])
        # loop lag: a paced flow of events (not a saturating backlog), with the changes still running
        await client.post(f"{base}/reset")
        window_start = time.time()
        offered = await paced(settings, nc, agents, args.paced_rate, args.lag_seconds)
        window_end = time.time()
        await wait_count(client, base, offered, 60)
        stop_changes.set()
        changed = await changes if changes else 0
        rss = proc_stat(proc.pid)[1]
    finally:
        stop_changes.set()
        stop(proc)
        await nc.close()
        await store.close()
    result = json.loads(out.read_text())
    lags = sorted(ms for at, ms in result["lags"] if window_start <= at <= window_end)
    p99 = lags[int(len(lags) * 0.99)] if lags else float("nan")
    per_s = rate(stats)
    print(f"[{name}] {stats['count']} deliveries, {per_s:,.0f}/s; start-up {result['start_s']:.2f} s, first delivery "
          f"{first_delivery_s:.2f} s after launch; RSS {rss / 1e6:.0f} MB; loop lag p99 {p99:.1f} ms, max "
          f"{lags[-1] if lags else float('nan'):.1f} ms over {len(lags)} samples; {changed} changes "
          f"({changed / max(window_end - drain_start, 1e-9):.0f}/s); full loads {result['full_loads']}, applied "
          f"{result['applied']}, reconciles {result['reconciles']}, load slices {result['load_slices']}")
    return {"per_s": per_s, "p99": p99, "rss_mb": rss / 1e6, "startup_s": first_delivery_s}


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="letta-bus-scale-"))
    server = EmbeddedServer(workdir=tmp).start()
    receiver, base = start_receiver(tmp)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            baseline = await phase(args, tmp, server, base, client, "baseline", args.receiving, 0)
            scale = await phase(args, tmp, server, base, client, "scale", args.endpoints, args.changes_per_s)
    finally:
        stop(receiver)
        server.stop()
    print(f"baseline loop lag p99 (same paced window, no changes): {baseline['p99']:.1f} ms; baseline RSS "
          f"{baseline['rss_mb']:.0f} MB, start-up {baseline['startup_s']:.2f} s")
    print(f"RESULT ratio={scale['per_s'] / baseline['per_s']:.2f} loop_lag_p99_ms={scale['p99']:.1f} "
          f"rss_mb={scale['rss_mb']:.0f} startup_s={scale['startup_s']:.2f} deliveries_per_s={scale['per_s']:.0f} "
          f"baseline_per_s={baseline['per_s']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoints", type=int, default=100_000, help="endpoints in the scale run")
    parser.add_argument("--receiving", type=int, default=1000, help="endpoints that receive events (both runs)")
    parser.add_argument("--events", type=int, default=20_000, help="backlog drained in each run")
    parser.add_argument("--changes-per-s", type=float, default=100.0, help="endpoint changes per second (scale run)")
    parser.add_argument("--paced-rate", type=float, default=500.0, help="events/s while loop lag is measured")
    parser.add_argument("--lag-seconds", type=float, default=10.0, help="length of the loop-lag window")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(json.loads(args.child)))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
