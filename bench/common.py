"""Helpers shared by the benchmarks that run whole processes: the receiver, `letta-bus up`, the raw baseline, CPU and
memory readings from /proc. Every process is started here and stopped by its PID; nothing else is touched."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nats.js.api import ConsumerConfig, StreamConfig  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from bus.publisher import EventPublisher  # noqa: E402
from bus.streams import provision  # noqa: E402
from config.settings import Settings  # noqa: E402
from dispatcher.store.database import Store  # noqa: E402
from dispatcher.store.models import Delivery  # noqa: E402

BIN = Path(sys.executable).parent
DATA = {"step_id": "step-00000000-0000-4000-8000-000000000000", "status": "success",
        "run_id": "run-00000000-0000-4000-8000-000000000000",
        "usage": {"completion_tokens": 42, "prompt_tokens": 1200, "total_tokens": 1242, "step_count": 1},
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "send_message",
                                                                          "arguments": "{\"message\": \"hi\"}"}}]}
RAW_BODY = json.dumps({"event_id": "evt_x", "event_type": "agent.step.completed",
                       "timestamp": "2026-01-01T00:00:00.000000Z", "agent_id": "agent-x", "organization_id": None,
                       "data": DATA}).encode()


def start_receiver(tmp: Path) -> tuple[subprocess.Popen, str]:
    """bench/receiver.py in its own process; returns it and its base URL."""
    port_file = tmp / f"receiver-{time.monotonic_ns()}.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "receiver.py"), str(port_file)])
    deadline = time.monotonic() + 10
    while not port_file.exists() or not port_file.read_text():
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("bench receiver did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{json.loads(port_file.read_text())['port']}"


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, wait_s: float = 20) -> None:
    """Stop a process this benchmark started, by its PID; kill it if it does not exit within ``wait_s``."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dispatcher_env(settings: Settings, tmp: Path) -> dict[str, str]:
    """Environment for `letta-bus up` joining the benchmark's server and store (no API, no metrics port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETTA_BUS_")}
    env.update({"LETTA_BUS_NATS_URL": settings.nats_url or "", "LETTA_BUS_DATABASE_URL": settings.database_url,
                "LETTA_BUS_SSRF_ALLOW_CIDRS": '["127.0.0.0/8"]', "LETTA_BUS_SECRET_KEY_FILE": str(tmp / "secret.key"),
                "LETTA_BUS_METRICS_PORT": "0", "LETTA_BUS_API_PORT": "0"})
    return env


def start_dispatcher(settings: Settings, tmp: Path, name: str) -> subprocess.Popen:
    """`letta-bus up` (log level warning) in ``tmp``; its output goes to ``tmp/<name>.log``."""
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([str(BIN / "letta-bus"), "up", "--log-level", "warning"], cwd=tmp,
                            env=dispatcher_env(settings, tmp), stdout=log, stderr=subprocess.STDOUT)


def start_raw(url: str, stream: str, durable: str, base: str, count: int) -> subprocess.Popen:
    """bench/raw_dispatcher.py: plain nats-py + aiohttp, no letta-bus code."""
    return subprocess.Popen([sys.executable, str(ROOT / "bench" / "raw_dispatcher.py"), url, stream, durable, base,
                             str(count)])


def proc_stat(pid: int | None) -> tuple[float, int] | None:
    """(CPU seconds used so far, resident set size in bytes) of a process, or None when it is gone."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(v) for v in fields[11:13]) / os.sysconf("SC_CLK_TCK"), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def cpu_of(pids: list[int]) -> float | None:
    stats = [proc_stat(pid) for pid in pids]
    return None if any(s is None for s in stats) else sum(s[0] for s in stats)  # type: ignore[index]


async def receiver_stats(client: httpx.AsyncClient, base: str, percentiles: bool = True) -> dict:
    return (await client.get(f"{base}/stats", params=None if percentiles else {"pct": "0"})).json()


async def wait_count(client: httpx.AsyncClient, base: str, n: int, timeout_s: float, pids: list[int] = (),
                     poll_s: float = 0.1) -> dict:
    """Poll the receiver until it counted ``n`` POSTs (or ``timeout_s`` passed). ``cpu_s``: CPU seconds the
    processes ``pids`` used from the first arrival seen to the last poll."""
    deadline = time.monotonic() + timeout_s
    cpu_start = None
    while True:
        stats = await receiver_stats(client, base, percentiles=False)
        if cpu_start is None and stats["count"] > 0:
            cpu_start = cpu_of(list(pids)) if pids else None
        if stats["count"] >= n or time.monotonic() > deadline:
            cpu_end = cpu_of(list(pids)) if pids else None
            stats = await receiver_stats(client, base)
            stats["cpu_s"] = cpu_end - cpu_start if cpu_start is not None and cpu_end is not None else None
            return stats
        await asyncio.sleep(poll_s)


def rate(stats: dict) -> float:
    """POSTs per second from the first to the last arrival."""
    return stats["count"] / max(stats["last"] - stats["first"], 1e-9)


def per_cpu(stats: dict) -> str:
    return f", {stats['count'] / stats['cpu_s']:,.0f} per CPU-second" if stats.get("cpu_s") else ""


async def publish_events(publisher: EventPublisher, agents: list[str], n: int, window: int = 256) -> None:
    """``n`` agent.step.completed events round-robin over ``agents``, ``window`` publishes in flight."""
    for start in range(0, n, window):
        await asyncio.gather(*(publisher.publish_event(agents[i % len(agents)], "agent.step.completed", DATA,
                                                       strict=True) for i in range(start, min(n, start + window))))


async def publish_raw(js, subject: str, n: int, window: int = 256) -> None:  # noqa: ANN001
    for start in range(0, n, window):
        await asyncio.gather(*(js.publish(subject, RAW_BODY) for _ in range(start, min(n, start + window))))


async def raw_backlog(js, n: int) -> None:  # noqa: ANN001
    """The raw baseline's input: stream ``RAW`` (``raw.>``), durable ``raw``, holding ``n`` envelopes."""
    await js.add_stream(StreamConfig(name="RAW", subjects=["raw.>"]))
    await js.add_consumer("RAW", ConsumerConfig(durable_name="raw", ack_wait=30, max_ack_pending=1000))
    await publish_raw(js, "raw.agent.step.completed", n)


async def agents_with_webhooks(js, settings: Settings, base: str, count: int) -> tuple[Store, list[str]]:  # noqa: ANN001
    """Provision letta-bus's streams and durables, create the store's schema and give ``count`` agents a webhook
    at ``<base>/<agent>``. Returns the store (close it) and the agent ids."""
    await provision(js, settings)
    store = Store.from_settings(settings)
    await store.create_schema()
    agents = [f"agent-{i:04d}" for i in range(count)]
    for agent in agents:
        await store.set_agent_webhook(agent, url=f"{base}/{agent}")
    return store, agents


async def succeeded_rows(store: Store) -> int:
    """Delivery rows with status ``succeeded``."""
    async with store.session() as s:
        return (await s.execute(select(func.count()).select_from(Delivery)
                                .where(Delivery.status == "succeeded"))).scalar_one()
