"""Isolation benchmark: does one endpoint that never answers slow down deliveries to the healthy ones?

DESIGN.md, "Isolation": "One endpoint timing out must not take the others' throughput down." Run::

    .venv/bin/python bench/isolation.py                 # 4 runs of 10,000 events (ABBA), about 70-80 s idle
    .venv/bin/python bench/isolation.py --events 5000 --scenarios baseline,with_dead -v

Two scenarios, run in one process with the same settings and load (by default in the order baseline, with_dead,
with_dead, baseline, and averaged per scenario, because the machine may be shared):

* ``baseline``: 51 agents; 50 have a webhook each on its own healthy receiver port (answers 200 at once), the 51st
  agent has no webhook (its events are fanned out to nobody);
* ``with_dead``: the same, but the 51st agent's webhook points at a "dead" endpoint that accepts the connection,
  reads the request and never answers, so every POST to it runs into the dispatcher's HTTP timeout (5 s).

Each scenario starts its own nats-server (``bus.embedded.EmbeddedServer``, free port, store in a temporary
directory), its own SQLite store and a dispatcher with production defaults (only what a local run needs is changed:
the NATS and database URLs, the SSRF allowlist ``127.0.0.0/8`` and the development key file). The healthy receivers
run in a child process (webhook receivers are other machines; this keeps their CPU out of the dispatcher's event
loop); the dead endpoint is a raw asyncio server in this process. N events are published with
``bus.publisher.EventPublisher``, pipelined (``asyncio.gather`` in windows of 256), round-robin over the 51 agents,
while the dispatcher runs.

Measured: healthy deliveries per second = 2xx POSTs at the healthy receivers over the window from the first to the
last of them. ``healthy_ratio = with_dead / baseline``; target >= 0.9. Everything is bounded (``--deadline-s`` per
scenario) and everything started is stopped (nats-server by its PID, the receiver process by its PID). Only
127.0.0.1 is used.

Also printed: deliveries per CPU-second of this process (the dispatcher is CPU-bound here, so this separates the
dead endpoint's own cost from other processes' load on a shared machine) and the CPU other processes used.

Last line: ``RESULT healthy_ratio=<x> healthy_per_s=<with_dead> baseline_per_s=<baseline>``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/isolation.py` from anywhere
    sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402

HEALTHY_AGENTS = 50
WINDOW = 256
SECRET = "bench-secret-" + "s" * 24
RUN_DATA = {"run_id": "run-bench", "status": "completed", "completed_at": "2026-01-01T12:00:03.120000Z",
            "usage": {"completion_tokens": 42, "prompt_tokens": 1200, "total_tokens": 1242, "step_count": 1,
                      "run_ids": ["run-bench"]}}


# --- healthy receivers: a child process with one aiohttp server and one port per endpoint ------------------------

def _receiver_main(conn, ports_wanted: int, latency_s: float) -> None:  # noqa: ANN001 - multiprocessing Connection
    asyncio.run(_receiver_serve(conn, ports_wanted, latency_s))


async def _receiver_serve(conn, ports_wanted: int, latency_s: float) -> None:  # noqa: ANN001
    times: list[float] = []
    per_port: Counter[int] = Counter()
    ids: set[str] = set()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if latency_s:
            await asyncio.sleep(latency_s)
        times.append(time.monotonic())  # CLOCK_MONOTONIC: system-wide, comparable with the parent's
        per_port[request.transport.get_extra_info("sockname")[1]] += 1
        ids.add(request.headers.get("X-Letta-Delivery", ""))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    ports = []
    for _ in range(ports_wanted):
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    conn.send(ports)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, conn.recv)  # "stop" (or EOFError when the parent went away)
    except EOFError:
        pass
    await runner.cleanup()
    try:
        conn.send({"times": times, "per_port": dict(per_port), "distinct": len(ids)})
    except (BrokenPipeError, OSError):
        pass


class HealthyReceivers:
    """The child process serving ``count`` healthy endpoints; stopped by its PID."""

    def __init__(self, count: int, latency_s: float = 0.0) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_receiver_main, args=(child, count, latency_s), name="bench-receivers",
                                   daemon=True)
        self.ports: list[int] = []
        self.result: dict | None = None

    def start(self, timeout_s: float = 20.0) -> "HealthyReceivers":
        self.process.start()
        if not self._conn.poll(timeout_s):
            self.kill()
            raise RuntimeError(f"healthy receivers did not start in {timeout_s:g} s")
        self.ports = self._conn.recv()
        return self

    def stop(self, timeout_s: float = 15.0) -> dict:
        """Stop serving and return what was received: ``times`` (monotonic s of each 2xx), ``per_port``,
        ``distinct`` delivery ids."""
        if self.process.pid is None:  # never started
            return {"times": [], "per_port": {}, "distinct": 0}
        if self.result is None and self.process.is_alive():
            self._conn.send("stop")
            if self._conn.poll(timeout_s):
                self.result = self._conn.recv()
        self.process.join(5)
        self.kill()
        return self.result or {"times": [], "per_port": {}, "distinct": 0}

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.terminate()  # SIGTERM to this child's PID only
            self.process.join(5)


# --- the dead endpoint: accepts, reads, never answers ------------------------------------------------------------

class DeadEndpoint:
    """Raw asyncio server on 127.0.0.1 that reads requests and never writes a byte; with ``answer_after_s`` it
    is merely slow instead: it answers 200 that many seconds after each request (``--dead-answers-after``)."""

    def __init__(self, answer_after_s: float | None = None) -> None:
        self.answer_after_s = answer_after_s
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.connections = 0
        self.requests = 0
        self.answered = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task] = set()

    async def start(self) -> "DeadEndpoint":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        self._handlers.add(asyncio.current_task())
        try:
            if self.answer_after_s is None:
                while data := await reader.read(65536):
                    self.requests += data.count(b"POST ")
                return
            while True:  # one request at a time per connection, as aiohttp's client sends them
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                await reader.readexactly(length)
                await asyncio.sleep(self.answer_after_s)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                self.answered += 1
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:  # stop(): end quietly (asyncio logs a stream handler that ends cancelled)
            pass
        finally:
            self._handlers.discard(asyncio.current_task())
            self._writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self._writers):
                w.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self.server.wait_closed()


# --- one scenario --------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    name: str
    events: int
    published_s: float = 0.0
    expected_healthy: int = 0
    healthy: int = 0
    distinct: int = 0
    per_s: float = 0.0
    window_s: float = 0.0
    complete: bool = False
    deferred: int = 0
    succeeded: int = 0
    retried: int = 0
    rescheduled: int = 0
    dead_requests: int = 0
    dead_connections: int = 0
    dead_answered: int = 0
    circuit: str = "-"
    duration_s: float = 0.0  # publish start -> last healthy delivery seen by the sender (or the deadline)
    wall_s: float = 0.0  # including start-up and stop of everything
    cpu_s: float = 0.0
    nats_cpu_s: float = 0.0
    receiver_cpu_s: float = 0.0
    backlog_note: str = ""
    other_cpu_s: float = 0.0  # CPU-seconds used by processes this benchmark did not start (machine contention)
    per_port_min: int = 0
    per_port_max: int = 0
    timeline: list[int] = field(default_factory=list)  # healthy 2xx per second of the window
    samples: list[str] = field(default_factory=list)


def make_settings(nats_url: str, tmp: Path):
    from config.settings import Settings

    overrides: dict = {"nats_url": nats_url, "database_url": f"sqlite+aiosqlite:///{tmp}/letta-bus.db"}
    fields = Settings.model_fields
    if "ssrf_allow_cidrs" in fields:
        overrides["ssrf_allow_cidrs"] = ["127.0.0.0/8"]
    if "secret_key_file" in fields:
        overrides["secret_key_file"] = tmp / "secret.key"
    return Settings(_env_file=None, **overrides)


def make_store(settings):
    from dispatcher.store.database import Store

    if hasattr(Store, "from_settings"):
        return Store.from_settings(settings)
    return Store(settings.database_url)


def _machine_busy_s() -> float:
    """CPU-seconds all cores spent busy since boot (Linux /proc/stat: user+nice+system+irq+softirq+steal)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def publish_all(publisher, agents: list[str], events: int) -> None:
    for start in range(0, events, WINDOW):
        await asyncio.gather(*(
            publisher.publish_event(agents[i % len(agents)], "agent.run.completed", RUN_DATA, strict=True)
            for i in range(start, min(start + WINDOW, events))
        ))


async def park_backlog(out: Outcome, dispatcher, nc, settings, publisher, dead_agent: str, dead_id: str,
                       backlog: int, deadline_s: float, slow: bool = False) -> None:
    """``--dead-backlog``: give the dead endpoint ``backlog`` queued tasks, as after an outage of some length, and
    return when its circuit is open, every task has been fetched and parked (deferred) and the first of them are
    about to come back (the circuit's cool-down ends). The measured phase then sees their return wave. For a
    ``slow`` endpoint (its circuit stays closed) return once every task was fetched at least once."""
    started = time.monotonic()
    await publish_all(publisher, [dead_agent], backlog)
    js = nc.jetstream()
    end = started + deadline_s
    gate = None
    while time.monotonic() < end:
        await asyncio.sleep(0.5)
        gate = dispatcher.sender.gates.get(dead_id)
        info = await js.consumer_info(settings.webhooks_stream, settings.sender_durable)
        if slow and gate is not None and info.num_pending == 0 and dispatcher.fanout.tasks >= backlog:
            break
        if (gate is not None and gate.state == "open" and info.num_pending == 0 and info.num_ack_pending == 0
                and dispatcher.fanout.tasks >= backlog):
            break
    else:
        raise RuntimeError(f"the dead endpoint's backlog of {backlog} was not parked within {deadline_s:g} s")
    parked_s = time.monotonic() - started
    wait = 0.0 if slow else max(gate.open_until - time.monotonic(), 0.0)
    out.samples.append(f"backlog of {backlog} parked in {parked_s:.1f}s ({dispatcher.sender.deferred} deferrals); "
                       f"waiting {wait:.1f}s for the cool-down to end")
    out.backlog_note = (f"backlog {backlog} parked in {parked_s:.1f}s with {dispatcher.sender.deferred} deferrals; "
                        f"measured from the end of the cool-down")
    await asyncio.sleep(wait)


async def run_scenario(name: str, with_dead: bool, events: int, base: Path, deadline_s: float,
                       backlog: int = 0, answer_after_s: float | None = None, dead_count: int = 1,
                       healthy_latency_s: float = 0.0) -> Outcome:
    from bus.connection import connect
    from bus.embedded import EmbeddedServer
    from bus.publisher import EventPublisher
    from bus.streams import provision, supports_schedules
    from dispatcher.delivery.service import Dispatcher

    out = Outcome(name=name, events=events)
    tmp = base / name
    tmp.mkdir(parents=True)
    healthy_agents = [f"agent-bench-{i:03d}" for i in range(HEALTHY_AGENTS)]
    dead_agents = ["agent-bench-dead"] if dead_count == 1 else [f"agent-bench-dead-{j}" for j in range(dead_count)]
    dead_agent = dead_agents[0]
    agents = healthy_agents + dead_agents
    out.expected_healthy = sum(1 for i in range(events) if agents[i % len(agents)] not in dead_agents)

    server = EmbeddedServer(workdir=tmp / "nats", port=-1)
    receivers = HealthyReceivers(HEALTHY_AGENTS, healthy_latency_s)
    dead = DeadEndpoint(answer_after_s)
    nc = pub_nc = store = dispatcher = None
    wall0 = time.monotonic()
    try:
        server.start()
        receivers.start()
        await dead.start()
        settings = make_settings(server.url, tmp)
        nc = await connect(settings.nats_url, name="bench-dispatcher")
        pub_nc = await connect(settings.nats_url, name="bench-publisher")
        await provision(nc.jetstream(), settings, schedules=supports_schedules(nc))
        store = make_store(settings)
        await store.create_schema()
        for agent, port in zip(healthy_agents, receivers.ports):
            await store.set_agent_webhook(agent, url=f"http://127.0.0.1:{port}/hooks/{agent}", secret=SECRET)
        dead_ids: list[str] = []
        for agent in dead_agents if with_dead else ():
            endpoint, _ = await store.set_agent_webhook(agent, url=f"http://127.0.0.1:{dead.port}/hooks/{agent}",
                                                        secret=SECRET)
            dead_ids.append(endpoint.id)
        dead_id = dead_ids[0] if dead_ids else None

        dispatcher = Dispatcher(settings, nc, store)
        await dispatcher.start()
        publisher = EventPublisher(settings, pub_nc)
        if dead_id and backlog:
            await park_backlog(out, dispatcher, nc, settings, publisher, dead_agent, dead_id, backlog, deadline_s,
                               slow=answer_after_s is not None)
        deferred0 = dispatcher.sender.deferred
        cpu0, nats_cpu0 = time.process_time(), _proc_cpu_s(server.process.pid)
        recv_cpu0, busy0 = _proc_cpu_s(receivers.process.pid), _machine_busy_s()
        t0 = time.monotonic()
        pub_task = asyncio.create_task(publish_all(publisher, agents, events))
        end = t0 + deadline_s
        last_sample = 0.0
        while time.monotonic() < end:
            await asyncio.sleep(0.1)
            if pub_task.done() and not out.published_s:
                pub_task.result()  # raise a publish failure now
                out.published_s = time.monotonic() - t0
            s = dispatcher.sender
            if time.monotonic() - last_sample >= 1.0:
                last_sample = time.monotonic()
                gate = s.gates.get(dead_id) if dead_id else None
                out.samples.append(
                    f"t={last_sample - t0:5.1f}s ok={s.succeeded:6d} deferred={s.deferred:5d} "
                    f"inflight={len(s._inflight):3d} fanout={dispatcher.fanout.tasks:6d}"
                    + (f" dead[{gate.state} inflight={gate.inflight}]" if gate else ""))
            if s.succeeded - dead.answered >= out.expected_healthy and pub_task.done():
                break
        out.duration_s = time.monotonic() - t0
        out.cpu_s = time.process_time() - cpu0
        out.nats_cpu_s = _proc_cpu_s(server.process.pid) - nats_cpu0
        out.receiver_cpu_s = _proc_cpu_s(receivers.process.pid) - recv_cpu0
        out.other_cpu_s = max(_machine_busy_s() - busy0 - out.cpu_s - out.nats_cpu_s - out.receiver_cpu_s, 0.0)
        if not pub_task.done():
            pub_task.cancel()
        s = dispatcher.sender
        out.deferred, out.succeeded, out.retried = s.deferred - deferred0, s.succeeded, s.retried
        out.rescheduled = s.rescheduler.rescheduled
        gates = [s.gates.get(i) for i in dead_ids]
        if len(gates) == 1:
            gate = gates[0]
            out.circuit = f"{gate.state} (consecutive failures {gate.consecutive_failures})" if gate else "never used"
        elif gates:
            out.circuit = ", ".join(f"{n} {state}" for state, n in Counter(
                g.state if g else "never used" for g in gates).items()) + " (of the dead endpoints)"
    finally:
        if dispatcher is not None:
            await dispatcher.stop()  # waits at most http_timeout_s + 1 for POSTs to the dead endpoint
        for client in (pub_nc, nc):
            if client is not None:
                await client.close()
        if store is not None:
            await store.close()
        got = receivers.stop()
        await dead.stop()
        server.stop()
    out.dead_requests, out.dead_connections, out.dead_answered = dead.requests, dead.connections, dead.answered
    times = sorted(t for t in got["times"] if t >= t0)
    out.healthy, out.distinct = len(times), got["distinct"]
    out.complete = out.distinct >= out.expected_healthy
    counts = list(got["per_port"].values())
    out.per_port_min, out.per_port_max = (min(counts), max(counts)) if counts else (0, 0)
    if len(times) >= 2:
        out.window_s = times[-1] - times[0]
        out.per_s = (len(times) - 1) / out.window_s if out.window_s > 0 else 0.0
        out.timeline = [0] * (int(out.window_s) + 1)
        for t in times:
            out.timeline[int(t - times[0])] += 1
    out.wall_s = time.monotonic() - wall0
    return out


def describe(o: Outcome, verbose: bool) -> str:
    lines = [
        f"[{o.name}] events={o.events} published_in={o.published_s:.1f}s "
        f"healthy_2xx={o.healthy} distinct={o.distinct}/{o.expected_healthy}"
        f"{'' if o.complete else ' INCOMPLETE'} per_endpoint={o.per_port_min}..{o.per_port_max}",
        f"[{o.name}] healthy_per_s={o.per_s:.0f} over {o.window_s:.2f}s; sender succeeded={o.succeeded} "
        f"retried={o.retried} deferred={o.deferred} (in the measured phase) rescheduled={o.rescheduled}",
        f"[{o.name}] dead endpoint: requests={o.dead_requests} answered={o.dead_answered} "
        f"connections={o.dead_connections} circuit={o.circuit}"
        + (f"; {o.backlog_note}" if o.backlog_note else ""),
        f"[{o.name}] duration={o.duration_s:.1f}s (wall {o.wall_s:.1f}s with start/stop); CPU-s: dispatcher+publisher "
        f"process {o.cpu_s:.1f} ({o.cpu_s / max(o.healthy, 1) * 1e6:.0f} us/delivery, busy "
        f"{o.cpu_s / max(o.duration_s, 1e-9):.0%}), nats-server {o.nats_cpu_s:.1f}, receivers {o.receiver_cpu_s:.1f}, "
        f"other processes on this machine {o.other_cpu_s:.1f} ({o.other_cpu_s / max(o.duration_s, 1e-9):.2f} cores)",
        f"[{o.name}] healthy 2xx per second of the window: {o.timeline}",
    ]
    if verbose:
        lines += [f"[{o.name}]   {s}" for s in o.samples]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000, help="events per scenario run (default 10000)")
    parser.add_argument("--deadline-s", type=float, default=40.0,
                        help="bound on each scenario run's delivery phase, seconds (default 40)")
    parser.add_argument("--scenarios", default="baseline,with_dead,with_dead,baseline",
                        help="run order; repeated names are averaged. Default ABBA, so a drift in machine load "
                        "during the run hits both scenarios alike")
    parser.add_argument("--dead-backlog", type=int, default=0, metavar="N",
                        help="with_dead only: first queue N tasks for the dead endpoint and let its circuit open "
                        "(a long outage), then measure while they come back (default 0: no backlog)")
    parser.add_argument("--dead-answers-after", type=float, default=None, metavar="S",
                        help="make the 'dead' endpoint slow instead: it answers 200 after S seconds (S below the "
                        "5 s HTTP timeout, so its circuit never opens)")
    parser.add_argument("--dead-endpoints", type=int, default=1, metavar="K",
                        help="K dead endpoints (K agents, one each) instead of 1; all their agents get events")
    parser.add_argument("--healthy-latency-ms", type=float, default=0.0, metavar="MS",
                        help="healthy receivers answer after MS milliseconds, like endpoints across a network "
                        "(default 0: at once)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print a per-second dispatcher trace")
    args = parser.parse_args()
    if not 0 < args.events <= 200_000 or not 0 <= args.dead_backlog <= 200_000:
        parser.error("--events and --dead-backlog must be in 1..200000")
    if not 0 <= args.healthy_latency_ms <= 2000:
        parser.error("--healthy-latency-ms must be in 0..2000")
    if not 1 <= args.dead_endpoints <= 100:
        parser.error("--dead-endpoints must be in 1..100")
    if args.dead_answers_after is not None and not 0 <= args.dead_answers_after < 5.0:
        parser.error("--dead-answers-after must be in [0, 5) seconds (the dispatcher's HTTP timeout is 5 s)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dispatcher.store.secrets").setLevel(logging.ERROR)  # "using the development key file"

    order = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    if not {"baseline", "with_dead"} <= set(order) or not set(order) <= {"baseline", "with_dead"}:
        parser.error("--scenarios lists baseline and with_dead, e.g. baseline,with_dead,with_dead,baseline")

    started = time.monotonic()
    results: dict[str, list[Outcome]] = {"baseline": [], "with_dead": []}
    with tempfile.TemporaryDirectory(prefix="letta-bus-bench-") as tmp:
        for i, name in enumerate(order):
            o = await run_scenario(name, name == "with_dead", args.events, Path(tmp) / str(i), args.deadline_s,
                                   backlog=args.dead_backlog, answer_after_s=args.dead_answers_after,
                                   dead_count=args.dead_endpoints, healthy_latency_s=args.healthy_latency_ms / 1000)
            print(describe(o, args.verbose), flush=True)
            results[name].append(o)
    base_per_s = sum(o.per_s for o in results["baseline"]) / len(results["baseline"])
    dead_per_s = sum(o.per_s for o in results["with_dead"]) / len(results["with_dead"])
    complete = all(o.complete for group in results.values() for o in group)
    ratio = dead_per_s / base_per_s if base_per_s else 0.0

    def per_cpu(group: list[Outcome]) -> float:
        return sum(o.healthy for o in group) / max(sum(o.cpu_s for o in group), 1e-9)

    def other_cores(group: list[Outcome]) -> float:
        return sum(o.other_cpu_s for o in group) / max(sum(o.duration_s for o in group), 1e-9)

    print(f"per dispatcher CPU-second: {per_cpu(results['with_dead']):.0f} healthy deliveries with the dead endpoint, "
          f"{per_cpu(results['baseline']):.0f} without -> CPU-normalized ratio "
          f"{per_cpu(results['with_dead']) / max(per_cpu(results['baseline']), 1e-9):.3f}; other processes used "
          f"{other_cores(results['with_dead']):.2f} / {other_cores(results['baseline']):.2f} of {os.cpu_count()} cores "
          "during the with_dead / baseline runs")
    verdict = "OK" if ratio >= 0.9 and complete else "BELOW TARGET (0.9)" if complete else "INCOMPLETE"
    k = args.dead_endpoints
    what = (f"{k} slow (answers after {args.dead_answers_after:g} s)" if args.dead_answers_after is not None
            else f"{k} dead (never answers; 5 s timeout)")
    if args.dead_backlog:
        what += f" with a backlog of {args.dead_backlog}"
    if args.healthy_latency_ms:
        what += f"; healthy endpoints answer after {args.healthy_latency_ms:g} ms"
    print(f"isolation: {HEALTHY_AGENTS} healthy endpoints + {what}: healthy throughput "
          f"{dead_per_s:.0f}/s vs {base_per_s:.0f}/s without it -> ratio {ratio:.3f} {verdict}; "
          f"total {time.monotonic() - started:.0f}s")
    print(f"RESULT healthy_ratio={ratio:.3f} healthy_per_s={dead_per_s:.1f} baseline_per_s={base_per_s:.1f}")

if __name__ == "__main__":
    asyncio.run(main())
