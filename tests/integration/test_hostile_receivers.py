"""Hostile receivers (issue 10): every webhook URL is a tenant's, so every byte that comes back is untrusted.

Each attack is a real TCP server on 127.0.0.1 (``asyncio.start_server``, raw bytes) registered as one agent's
webhook, run through the real dispatcher (real nats-server, SQLite store) beside 20 healthy endpoints on a real
receiver. For every attack: the dispatcher's memory (this process: the ``dispatcher`` fixture runs in-process)
grows by less than 50 MB, every healthy endpoint gets every event exactly once, and the attack's first attempt row
names what went wrong (its ``error``, or the status that is the verdict).

Sections are by attack surface; database-side attacks (bad bytes that reach the history) belong in their own
section below the HTTP ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from bus.publisher import EventPublisher
from tests.helpers import attempts, deliveries, wait_until

pytestmark = pytest.mark.timeout(60)
log = logging.getLogger(__name__)

RUN = {"run_id": "run-1", "status": "completed"}
HEALTHY = 20  # healthy endpoints beside each attack
EVENTS = 5  # events per endpoint
RSS_BUDGET = 50 * 1024 * 1024  # bytes the dispatcher may grow by during one attack


def rss_bytes() -> int:
    """This process's resident set size now (VmRSS of /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class RssWatch:
    """Samples this process's RSS every 20 ms from ``start()`` until ``stop()``; ``growth``: peak minus start."""

    def __init__(self) -> None:
        self.start_rss = self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.start_rss = self.peak = rss_bytes()
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            await asyncio.sleep(0.02)

    async def stop(self) -> int:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, rss_bytes())
        return self.peak - self.start_rss


# --- the attackers -------------------------------------------------------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Attacker"], Awaitable[None]]
BIG = 60 * 1024 * 1024 * 1024  # bytes an endless stream would send at most (it stops when the client closes)


class Attacker:
    """A raw TCP server: reads each POST, records its ``webhook-id`` (``ids``), and runs ``script`` for the
    answer. ``closed_by_client`` counts connections the client closed while the script was still writing."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.ids: list[str] = []
        self.connections = 0
        self.closed_by_client = 0
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task] = set()

    async def start(self) -> "Attacker":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def read_request(self, reader: asyncio.StreamReader) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
        await reader.readexactly(int(fields[b"Content-Length"]))
        self.ids.append(fields[b"webhook-id"].decode())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        self.connections += 1
        try:
            await self.script(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_by_client += 1
        finally:
            writer.close()
            self._handlers.discard(asyncio.current_task())  # type: ignore[arg-type]


async def stream(writer: asyncio.StreamWriter, chunk: bytes, total: int = BIG, every_s: float = 0.0) -> None:
    """Write ``chunk`` again and again (``total`` bytes at most, 30 s at most) until the client closes."""
    deadline = time.monotonic() + 30
    sent = 0
    while sent < total and time.monotonic() < deadline:
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)
        if every_s:
            await asyncio.sleep(every_s)
    if writer.transport.is_closing():
        raise ConnectionResetError("closed by the client")


def answer(data: bytes, then: Callable[[asyncio.StreamWriter], Awaitable[None]] | None = None) -> Script:
    """An attacker that answers every POST on a connection with ``data`` (then ``then``, e.g. an endless stream)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, attacker: Attacker) -> None:
        while True:
            await attacker.read_request(reader)
            writer.write(data)
            await writer.drain()
            if then is not None:
                await then(writer)
                return

    return script


async def slowloris(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, attacker: Attacker) -> None:
    await attacker.read_request(reader)
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":  # 1 byte per second
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(1.0)


async def close_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, attacker: Attacker) -> None:
    await attacker.read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
    await writer.drain()  # and close: 993 bytes never come


async def idle_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, attacker: Attacker) -> None:
    """A correct answer, then (once the connection sits idle in the pool) fake responses streamed into it: read
    as the next POST's response, they would turn it into a 500 and a retry (a duplicate)."""
    await attacker.read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    await asyncio.sleep(0.1)
    await stream(writer, b"HTTP/1.1 500 Injected\r\nContent-Length: 0\r\n\r\n" * 100, every_s=0.001)


@dataclasses.dataclass
class Attack:
    script: Script
    error: str | None = None  # words the first attempt's error must contain
    status: int | None = None  # or the status that is the verdict
    excerpt: bytes | None = None  # and the excerpt it must have kept (None: not checked)
    once: bool = False  # each event reached the attacker exactly once (no retry, no silent re-send)
    sequential: bool = False  # publish one event at a time, after the client closed the previous connection


OK_HEAD = b"HTTP/1.1 200 OK\r\n"
ATTACKS = {
    "endless body": Attack(answer(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n",
                                  lambda w: stream(w, b"10000\r\n" + b"x" * 65536 + b"\r\n")),
                           status=200, excerpt=b"x" * 16384, once=True),
    "endless headers": Attack(answer(OK_HEAD, lambda w: stream(w, b"X-Pad: " + b"a" * 4000 + b"\r\n")),
                              error="response head is over 65536 bytes"),
    "1 byte per second": Attack(slowloris, error="timeout after 2 s"),
    "negative chunk size": Attack(answer(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"),
                                  error="invalid response from the receiver: Invalid character in chunk size"),
    "overflowing chunk size": Attack(
        answer(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\nhello\r\n"),
        error="invalid response from the receiver: Chunk size overflow"),
    "10 GB Content-Length": Attack(answer(OK_HEAD + b"Content-Length: 10000000000\r\n\r\n",
                                          lambda w: stream(w, b"y" * 65536)),
                                   status=200, excerpt=b"y" * 16384, once=True),
    "bytes into an idle kept-alive connection": Attack(idle_stream, status=200, excerpt=b"ok", once=True,
                                                       sequential=True),
    "close mid-body": Attack(close_mid_body, status=200, excerpt=b"partial", once=True),
    "garbage instead of a status line": Attack(answer(b"SSH-2.0-OpenSSH_9.6 letta\r\n\r\n"),
                                               error="invalid response from the receiver: Expected HTTP/"),
    "1xx storm": Attack(answer(b"HTTP/1.1 100 Continue\r\n\r\n" * 5000 + OK_HEAD + b"Content-Length: 0\r\n\r\n"),
                        error="more than 16 informational (1xx) responses"),
    "obs-fold": Attack(answer(OK_HEAD + b"Content-Length: 2\r\n Content-Length: 5\r\n\r\nokabc"),
                       error="invalid response from the receiver: Unexpected whitespace after header value"),
    "duplicate Content-Length": Attack(answer(OK_HEAD + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok"),
                                       error="invalid response from the receiver: Duplicate Content-Length"),
    "302 to the metadata service": Attack(
        answer(b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest/meta-data/\r\n"
               b"Content-Length: 0\r\n\r\n"),
        status=302, error="HTTP 302: not retried", once=True),
    "1 MB of NULs instead of a response": Attack(answer(b"\0" * (1024 * 1024)),
                                                 error="invalid response from the receiver: Expected HTTP/"),
    "1 MB of NULs as the body": Attack(answer(OK_HEAD + b"Content-Length: 1048576\r\n\r\n" + b"\0" * (1024 * 1024)),
                                       status=200, once=True),  # how NULs are stored: the history's business
}


# --- HTTP attacks ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ATTACKS))
async def test_a_hostile_receiver_costs_bounded_memory_and_nothing_to_the_healthy_endpoints(
        name, settings, nc, store, receiver, dispatcher):
    attack = ATTACKS[name]
    attacker = await Attacker(attack.script).start()
    try:
        await store.set_agent_webhook("agent-attack", url=attacker.url())
        for i in range(HEALTHY):
            await store.set_agent_webhook(f"agent-healthy-{i}", url=receiver.url(f"/healthy-{i}"))
        await dispatcher.endpoints.refresh()
        publisher = EventPublisher(settings, nc)
        watch = RssWatch()
        watch.start()

        async def publish_attack() -> None:
            for n in range(EVENTS):
                await publisher.publish_event("agent-attack", "agent.run.completed", RUN, strict=True)
                if attack.sequential:  # the next POST only once the client closed the connection of this one
                    await wait_until(lambda: attacker.closed_by_client > n, timeout_s=15,
                                     what=f"the client closed attack connection {n + 1}")

        await asyncio.gather(publish_attack(), *(
            publisher.publish_event(f"agent-healthy-{i}", "agent.run.completed", RUN, strict=True)
            for i in range(HEALTHY) for _ in range(EVENTS)))

        rows = await wait_until(lambda: _first_attempts(store), timeout_s=30, what="an attempt row per attack event")
        await receiver.wait_for(HEALTHY * EVENTS, timeout_s=30)
        growth = await watch.stop()
    finally:
        await attacker.stop()

    log.info("%s: RSS grew by %.1f MB", name, growth / 2**20)
    assert growth < RSS_BUDGET, f"{name}: the dispatcher grew by {growth / 2**20:.0f} MB"
    per_path = Counter(r.path for r in receiver.received)
    assert per_path == {f"/healthy-{i}": EVENTS for i in range(HEALTHY)}, "every healthy endpoint, every event, once"
    ids = [r.headers["webhook-id"] for r in receiver.received]
    assert len(set(ids)) == len(ids) == HEALTHY * EVENTS, "no duplicate POST to a healthy endpoint"
    for row in rows:
        assert len(row.response_excerpt or "") <= settings.response_excerpt_bytes
        if attack.error is not None:
            assert row.error is not None and attack.error in row.error, f"{name}: attempt row says {row.error!r}"
        if attack.status is not None:
            assert row.status_code == attack.status, f"{name}: {row.status_code} {row.error!r}"
        if attack.excerpt is not None:
            assert row.response_excerpt == attack.excerpt.decode(), f"{name}: {row.response_excerpt[:80]!r}"
    if attack.once:
        assert sorted(Counter(attacker.ids).values()) == [1] * EVENTS, f"{name}: {Counter(attacker.ids)}"


async def _first_attempts(store) -> list | None:
    """The first attempt row of each of the attack agent's deliveries, once all EVENTS have one."""
    rows = []
    for delivery in await deliveries(store, agent_id="agent-attack"):
        tried = await attempts(store, delivery.id)
        if not tried:
            return None
        rows.append(tried[0])
    return rows if len(rows) == EVENTS else None
