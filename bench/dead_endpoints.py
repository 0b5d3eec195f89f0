"""Dead endpoints benchmark (issue 11): do 100 dead endpoints with 10,000 queued deliveries each cost the dispatcher
O(1) per cool-down, leave the healthy endpoints' throughput alone, and end as recoverable ``failed`` deliveries?

Run::

    .venv/bin/python bench/dead_endpoints.py                              # full size: 100 x 10,000 (long)
    .venv/bin/python bench/dead_endpoints.py --dead 100 --per-dead 200 --healthy-events 10000   # a few minutes

Two scenarios in one run, each with its own nats-server (``bus.embedded.EmbeddedServer``, free port), SQLite store
and an in-process dispatcher (so its CPU is this process's ``time.process_time()``), time compressed through
settings (``circuit_cooldown_s`` 5 s doubling to 10 s, against 30 s doubling to 900 s by default,
``circuit_failure_threshold`` 3, ``disable_after_failures`` 3); 50 healthy endpoints on a receiver child process
(bench/isolation.py ``HealthyReceivers``, 200 at once):

* ``baseline``: only the 50 healthy endpoints;
* ``with_dead``: plus ``--dead`` endpoints whose URL is a closed port on 127.0.0.1 (connection refused). First
  ``--per-dead`` events per dead endpoint are published and the run waits until every one is parked
  (LETTA_PARKED, dispatcher/delivery/parking.py); the one-time cost of parking (one publish per task) is printed.

Then in both: ``--healthy-events`` events round-robin over the healthy agents (healthy deliveries/s = healthy
successes over the time from the first publish to the last success), then an idle window of ``--idle-s`` seconds
(several cool-downs). ``dead_cpu_share`` = the dispatcher's CPU-seconds per second in the idle window of
``with_dead`` minus that of ``baseline``: what the parked dead endpoints cost (probes, pauses, scans), in cores.
``healthy_ratio`` = healthy deliveries/s with_dead / baseline. Then the disable window is shortened
(``disable_after_s`` = 1 s: the compressed 5 days), the next probes disable the dead endpoints, and the run waits
(``--disable-deadline-s``) until each dead endpoint's deliveries are ``failed`` rows with a dead letter each:
``recoverable`` = that fraction of the dead endpoints' tasks. Targets: dead_cpu_share <= 0.05, healthy_ratio >= 0.9,
recoverable = 1.0.

Last line: ``RESULT dead_cpu_share=<cores> healthy_ratio=<x> recoverable=<fraction>``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from bench.isolation import HEALTHY_AGENTS, RUN_DATA, SECRET, HealthyReceivers, make_settings, make_store  # noqa: E402

WINDOW = 512


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then closed): a POST there is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def publish(publisher, agents: list[str], n: int) -> None:
    for start in range(0, n, WINDOW):
        await asyncio.gather(*(publisher.publish_event(agents[i % len(agents)], "agent.run.completed", RUN_DATA,
                                                       strict=True) for i in range(start, min(start + WINDOW, n))))


async def scenario(name: str, args: argparse.Namespace, base: Path) -> dict:
    from bus.connection import connect
    from bus.embedded import EmbeddedServer
    from bus.publisher import EventPublisher
    from bus.streams import provision, supports_schedules
    from dispatcher.delivery.service import Dispatcher
    from dispatcher.ops.dead_letters import list_dead_letters
    from dispatcher.store.models import Delivery

    with_dead = name == "with_dead"
    tmp = base / name
    tmp.mkdir(parents=True)
    out: dict = {"name": name}
    server = EmbeddedServer(workdir=tmp / "nats", port=-1)
    receivers = HealthyReceivers(HEALTHY_AGENTS)
    nc = pub_nc = store = d = None
    try:
        server.start()
        receivers.start()
        settings = make_settings(server.url, tmp).model_copy(update={
            "circuit_cooldown_s": 5.0, "circuit_max_cooldown_s": 10.0, "circuit_failure_threshold": 3,
            "disable_after_s": 10 * 86400.0, "disable_after_failures": 3, "retry_schedule_s": [0.5] * 8,
            "max_attempts": 10,
        })
        nc = await connect(settings.nats_url, name="bench-dispatcher")
        pub_nc = await connect(settings.nats_url, name="bench-publisher")
        await provision(nc.jetstream(), settings, schedules=supports_schedules(nc))
        store = make_store(settings)
        await store.create_schema()
        healthy = [f"agent-ok-{i:03d}" for i in range(HEALTHY_AGENTS)]
        for agent, port in zip(healthy, receivers.ports):
            await store.set_agent_webhook(agent, url=f"http://127.0.0.1:{port}/hooks/{agent}", secret=SECRET)
        dead_agents = [f"agent-dead-{j:03d}" for j in range(args.dead)] if with_dead else []
        dead_ids = []
        for agent in dead_agents:
            endpoint, _ = await store.set_agent_webhook(agent, url=f"http://127.0.0.1:{closed_port()}/h",
                                                        secret=SECRET)
            dead_ids.append(endpoint.id)
        d = Dispatcher(settings, nc, store)
        await d.start()
        publisher = EventPublisher(settings, pub_nc)
        js = nc.jetstream()
        total_dead = len(dead_agents) * args.per_dead
        if with_dead:
            t0, cpu0 = time.monotonic(), time.process_time()
            await publish(publisher, dead_agents, total_dead)
            deadline = t0 + args.park_deadline_s
            while True:
                info = await js.stream_info(settings.parked_stream)
                parked = info.state.messages
                if parked >= total_dead - 3 * len(dead_agents):  # the failed first attempts wait for a retry
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {parked} of {total_dead} tasks parked in {args.park_deadline_s:g} s")
                await asyncio.sleep(0.5)
            out["park_s"], out["park_cpu_s"] = time.monotonic() - t0, time.process_time() - cpu0
            out["parked"] = parked
            await asyncio.sleep(3.0)  # the last retries come back and are parked too
        s = d.sender
        ok0, t0 = s.succeeded, time.monotonic()
        cpu0 = time.process_time()
        pub = asyncio.create_task(publish(publisher, healthy, args.healthy_events))
        last = t0
        while s.succeeded - ok0 < args.healthy_events:
            if time.monotonic() - t0 > args.deadline_s:
                raise RuntimeError(f"{s.succeeded - ok0} of {args.healthy_events} healthy deliveries in "
                                   f"{args.deadline_s:g} s")
            await asyncio.sleep(0.02)
            last = time.monotonic()
        await pub
        out["healthy_s"] = last - t0
        out["healthy_per_s"] = args.healthy_events / out["healthy_s"]
        out["healthy_cpu_s"] = time.process_time() - cpu0
        await asyncio.sleep(1.0)
        parked0, probes0, resched0 = d.parking.parked, d.parking.probes, d.rescheduler.rescheduled
        cpu0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(args.idle_s)
        out["idle_cpu_per_s"] = (time.process_time() - cpu0) / (time.monotonic() - t0)
        out["idle_probes"] = d.parking.probes - probes0
        out["idle_parks"] = d.parking.parked - parked0
        out["idle_reschedules"] = d.rescheduler.rescheduled - resched0
        out["parked_endpoints"] = d.parking.endpoints_parked
        out["gates"] = len(s.gates)
        if with_dead:
            t0 = time.monotonic()
            d.settings.disable_after_s = 1.0  # time compression: the 5-day window is over
            deadline = t0 + args.disable_deadline_s
            while True:
                async with store.session() as session:
                    failed = (await session.execute(select(func.count()).select_from(Delivery).where(
                        Delivery.endpoint_id.in_(dead_ids), Delivery.status == "failed"))).scalar_one()
                if failed >= total_dead or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
            await asyncio.sleep(1.0)
            letters = await list_dead_letters(js, settings, None, limit=total_dead + 1000)
            lettered = {dl.task.delivery_id for dl in letters if dl.task.endpoint_id in set(dead_ids)}
            async with store.session() as session:
                rows = (await session.execute(select(Delivery.id, Delivery.status).where(
                    Delivery.endpoint_id.in_(dead_ids)))).all()
            recoverable = sum(1 for r in rows if r.status == "failed" and r.id in lettered)
            endpoints = [await store.get_endpoint(i) for i in dead_ids]
            out["disabled"] = sum(1 for e in endpoints if not e.enabled)
            out["recoverable"] = recoverable / max(total_dead, 1)
            out["disable_s"] = time.monotonic() - t0
            out["parked_left"] = (await js.stream_info(settings.parked_stream)).state.messages
    finally:
        if d is not None:
            await d.stop()
        for client in (pub_nc, nc):
            if client is not None:
                await client.close()
        if store is not None:
            await store.close()
        receivers.stop()
        server.stop()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dead", type=int, default=100, help="dead endpoints (default 100)")
    parser.add_argument("--per-dead", type=int, default=10_000, help="queued deliveries per dead endpoint")
    parser.add_argument("--healthy-events", type=int, default=20_000, help="events to the 50 healthy endpoints")
    parser.add_argument("--idle-s", type=float, default=20.0, help="idle window, seconds (several cool-downs)")
    parser.add_argument("--deadline-s", type=float, default=300.0, help="bound on the healthy phase, seconds")
    parser.add_argument("--park-deadline-s", type=float, default=3600.0, help="bound on parking the backlog")
    parser.add_argument("--disable-deadline-s", type=float, default=3600.0, help="bound on disable -> failed")
    parser.add_argument("-v", action="store_true", help="log warnings of the dispatcher")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.v else logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="letta-bus-dead-") as tmp:
        base = await scenario("baseline", args, Path(tmp))
        dead = await scenario("with_dead", args, Path(tmp))
    for o in (base, dead):
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in o.items()))
    share = max(dead["idle_cpu_per_s"] - base["idle_cpu_per_s"], 0.0)
    ratio = dead["healthy_per_s"] / base["healthy_per_s"]
    print(f"parking {dead.get('parked', 0)} tasks took {dead.get('park_s', 0):.1f} s and "
          f"{dead.get('park_cpu_s', 0):.1f} CPU-s once (one publish per task per outage); idle window: "
          f"{dead['idle_probes']} probes, {dead['idle_parks']} re-parks, {dead['idle_reschedules']} schedules in "
          f"{args.idle_s:g} s for {args.dead} dead endpoints")
    print(f"RESULT dead_cpu_share={share:.3f} healthy_ratio={ratio:.2f} recoverable={dead.get('recoverable', 0):.3f}")


if __name__ == "__main__":
    asyncio.run(main())
