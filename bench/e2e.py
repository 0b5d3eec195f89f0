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
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from nats.js.api import ConsumerConfig, StreamConfig
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bus.connection import connect  # noqa: E402
from bus.embedded import EmbeddedServer  # noqa: E402
from bus.publisher import EventPublisher  # noqa: E402
from bus.streams import provision  # noqa: E402
from config.settings import Settings  # noqa: E402
from dispatcher.models import Delivery  # noqa: E402
from dispatcher.store import Store  # noqa: E402

BIN = Path(sys.executable).parent
DATA = {"step_id": "step-00000000-0000-4000-8000-000000000000", "status": "success",
        "run_id": "run-00000000-0000-4000-8000-000000000000",
        "usage": {"completion_tokens": 42, "prompt_tokens": 1200, "total_tokens": 1242, "step_count": 1},
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "send_message",
                                                                          "arguments": "{\"message\": \"hi\"}"}}]}


def start_receiver(tmp: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp / "receiver.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "receiver.py"), str(port_file)])
    deadline = time.monotonic() + 10
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("bench receiver did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{json.loads(port_file.read_text())['port']}"


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds a process (and its reaped children) used so far; None when unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


async def wait_count(client: httpx.AsyncClient, base: str, n: int, timeout_s: float, pid: int | None = None) -> dict:
    """Poll the receiver until it counted ``n`` POSTs. With ``pid``: ``cpu_s``, the CPU seconds that process used
    from the first arrival seen to the last poll (a figure that other load on the machine disturbs much less)."""
    deadline = time.monotonic() + timeout_s
    cpu_start = None
    while True:
        stats = (await client.get(f"{base}/stats")).json()
        if cpu_start is None and stats["count"] > 0:
            cpu_start = cpu_seconds(pid)
        if stats["count"] >= n or time.monotonic() > deadline:
            cpu_end = cpu_seconds(pid)
            stats["cpu_s"] = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
            return stats
        await asyncio.sleep(0.1)


def per_cpu(stats: dict) -> str:
    return f", {stats['count'] / stats['cpu_s']:,.0f} per CPU-second of that process" if stats.get("cpu_s") else ""


async def watch(js, settings: Settings) -> None:  # noqa: ANN001
    """Print both durables' pending and ack-pending counts every second (--verbose)."""
    while True:
        fan = await js.consumer_info(settings.events_stream, settings.fanout_durable)
        snd = await js.consumer_info(settings.webhooks_stream, settings.sender_durable)
        print(f"  fan-out pending {fan.num_pending:6d} ack-pending {fan.num_ack_pending:5d} | "
              f"sender pending {snd.num_pending:6d} ack-pending {snd.num_ack_pending:5d}")
        await asyncio.sleep(1.0)


async def publish_backlog(publisher: EventPublisher, agents: list[str], n: int) -> None:
    for start in range(0, n, 256):
        await asyncio.gather(*(publisher.publish_event(agents[i % len(agents)], "agent.step.completed", DATA,
                                                       strict=True) for i in range(start, min(n, start + 256))))


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="letta-bus-e2e-"))
    server = EmbeddedServer(workdir=tmp).start()
    receiver, base = start_receiver(tmp)
    dispatcher = raw = None
    settings = Settings(
        _env_file=None, nats_url=server.url, database_url=f"sqlite+aiosqlite:///{tmp}/letta-bus.db",
        ssrf_allow_cidrs=["127.0.0.0/8"], secret_key_file=tmp / "secret.key", metrics_port=0,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETTA_BUS_")}
    env.update({"LETTA_BUS_NATS_URL": server.url, "LETTA_BUS_DATABASE_URL": settings.database_url,
                "LETTA_BUS_SSRF_ALLOW_CIDRS": '["127.0.0.0/8"]', "LETTA_BUS_SECRET_KEY_FILE": str(tmp / "secret.key"),
                "LETTA_BUS_METRICS_PORT": "0", "LETTA_BUS_API_PORT": "0"})
    nc = await connect(server.url, name="bench-e2e")
    js = nc.jetstream()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            # 1. raw baseline
            await js.add_stream(StreamConfig(name="RAW", subjects=["raw.>"]))
            await js.add_consumer("RAW", ConsumerConfig(durable_name="raw", ack_wait=30, max_ack_pending=1000))
            body = json.dumps({"event_id": "evt_x", "event_type": "agent.step.completed",
                               "timestamp": "2026-01-01T00:00:00.000000Z", "agent_id": "agent-x",
                               "organization_id": None, "data": DATA}).encode()
            for start in range(0, args.events, 256):
                await asyncio.gather(*(js.publish("raw.agent.step.completed", body)
                                       for _ in range(start, min(args.events, start + 256))))
            raw = subprocess.Popen([sys.executable, str(ROOT / "bench" / "raw_dispatcher.py"), server.url, "RAW",
                                    "raw", base, str(args.events)])
            stats = await wait_count(client, base, args.events, 300, raw.pid)
            raw_per_s = stats["count"] / max(stats["last"] - stats["first"], 1e-9)
            stop(raw)
            print(f"raw baseline: {stats['count']} POSTs, {raw_per_s:,.0f}/s{per_cpu(stats)}")
            await client.post(f"{base}/reset")

            # 2. letta-bus, backlog
            await provision(js, settings)
            store = Store.from_settings(settings)
            await store.create_schema()
            agents = [f"agent-{i:04d}" for i in range(args.agents)]
            for agent in agents:
                await store.set_agent_webhook(agent, url=f"{base}/{agent}")
            publisher = EventPublisher(settings, nc)
            t = time.perf_counter()
            await publish_backlog(publisher, agents, args.events)
            print(f"published {args.events} events in {time.perf_counter() - t:.2f} s")
            cmd = [str(BIN / "letta-bus"), "up", "--log-level", "warning"]
            if args.profile:  # py-spy's collapsed stacks of the dispatcher process
                cmd = [str(BIN / "py-spy"), "record", "--format", "raw", "-o", args.profile, "--rate", "200", "--",
                       *cmd]
            dispatcher = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL)
            monitor = asyncio.create_task(watch(js, settings)) if args.verbose else None
            stats = await wait_count(client, base, args.events, 600, None if args.profile else dispatcher.pid)
            if monitor:
                monitor.cancel()
            per_s = stats["count"] / max(stats["last"] - stats["first"], 1e-9)
            print(f"letta-bus: {stats['count']} deliveries, {per_s:,.0f}/s{per_cpu(stats)}")
            await asyncio.sleep(1.0)
            async with store.session() as s:
                recorded = (await s.execute(select(func.count()).select_from(Delivery)
                                            .where(Delivery.status == "succeeded"))).scalar_one()
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
