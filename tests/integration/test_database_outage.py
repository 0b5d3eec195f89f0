"""A PostgreSQL outage loses no delivery history and POSTs nothing twice (issue 10, "no silent loss").

The store talks to PostgreSQL through a small TCP forwarder on 127.0.0.1 that the test stops (every connection
cut, the port refusing) and starts again on the same port: a real outage, under the test's control. Before the fix
the writer gave up after ``ack_wait_s / 2`` and acked without rows (``letta_bus_history_records_lost_total``);
now it keeps the records, keeps their JetStream messages alive with ``in_progress()`` and writes everything when
the database is back.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from dispatcher.store.database import Store
from dispatcher.store.history import DeliveryRecord, HistoryWriter
from dispatcher.store.models import Attempt, Delivery, DeliveryStatus
from tests.helpers import wait_until

pytestmark = [pytest.mark.timeout(90), pytest.mark.postgres]


class TcpForwarder:
    """Forwards 127.0.0.1:<port> to ``target``; ``stop()`` cuts every connection and closes the port (connects are
    refused), ``start()`` opens the same port again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self.connections = 0

    async def start(self) -> TcpForwarder:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        for t in list(self._pipes):
            t.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.transport.abort()


@pytest.fixture
async def forwarder(postgres_url):  # noqa: ANN001
    url = make_url(postgres_url)
    proxy = await TcpForwarder(url.host or "127.0.0.1", url.port or 5432).start()
    yield proxy
    await proxy.stop()


def record(i: int, **fields) -> DeliveryRecord:  # noqa: ANN003
    values = {"delivery_id": f"dlv_{i:032d}", "event_id": f"evt_{i}", "endpoint_id": "ep-1", "agent_id": "agent-1",
              "event_type": "agent.step.completed", "status": DeliveryStatus.SUCCEEDED, "attempt": 1,
              "status_code": 200, "duration_ms": 3.0, "response_excerpt": "ok", "event_seq": i}
    return DeliveryRecord(**(values | fields))


async def test_a_database_outage_longer_than_ack_wait_loses_no_record_and_redelivers_nothing(
        settings, nc, postgres_url, forwarder):
    """60 attempts' records (acks and retry callbacks, each with its real JetStream message) wait through a 10 s
    outage of PostgreSQL, more than three times the consumer's 3 s ack_wait: nothing is settled, nothing is
    redelivered (in_progress() kept every message alive); when the database is back every row is written, then every
    message is acked, and nothing is counted lost."""
    ack_wait = 3.0
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="HISTORY_OUTAGE", subjects=["history_outage.>"]))
    await js.add_consumer("HISTORY_OUTAGE", ConsumerConfig(durable_name="writer", ack_policy=AckPolicy.EXPLICIT,
                                                           ack_wait=ack_wait, max_ack_pending=1000))
    for i in range(60):
        await js.publish(f"history_outage.{i}", b"task")
    pull = await js.pull_subscribe_bind("writer", "HISTORY_OUTAGE")
    msgs = []
    while len(msgs) < 60:
        msgs += await pull.fetch(60 - len(msgs), timeout=5)

    via_proxy = make_url(postgres_url).set(host="127.0.0.1", port=forwarder.port).render_as_string(
        hide_password=False)
    store = Store.from_settings(settings, via_proxy)
    direct = Store.from_settings(settings, postgres_url)  # the test's own view, not through the forwarder
    await store.create_schema()
    writer = HistoryWriter(store, flush_s=0.02, pending_hold_s=0.0, keepalive_s=ack_wait / 3)
    loop = asyncio.get_running_loop()
    rows_at_callback: list[int] = []

    async def count(table) -> int:  # noqa: ANN001
        async with direct.session() as s:
            return (await s.execute(select(func.count()).select_from(table))).scalar_one()

    def retry_callback(msg):  # noqa: ANN001, ANN202 - as the sender's retry: settles the message itself
        async def settle() -> None:
            rows_at_callback.append(await count(Attempt))
            await msg.ack()
        return settle

    writer.start()
    try:
        await forwarder.stop()
        down_at = loop.time()
        for i, msg in enumerate(msgs):
            if i % 3:
                writer.add(record(i, ack=msg))
            else:
                writer.add(record(i, status=DeliveryStatus.RETRYING, status_code=503, error="HTTP 503",
                                  then=retry_callback(msg), msg=msg))
        await wait_until(lambda: writer.database_down_s > 0, 10, what="the writer noticing the outage")
        while loop.time() - down_at < 10.0:  # the outage itself: 10 s, more than three ack_waits
            await asyncio.sleep(0.5)
            info = await js.consumer_info("HISTORY_OUTAGE", "writer")
            assert info.num_redelivered == 0, "a message was redelivered during the outage (ack_wait ran out)"
            assert info.num_ack_pending == 60 and not rows_at_callback, "settled while the database was down"
        assert writer.kept_alive >= 60 * 5 and writer.backlog == 60
        await forwarder.start()
        back_at = loop.time()
        await wait_until(lambda: writer.backlog == 0 and len(rows_at_callback) == 20, 30,
                         what="every record written and settled after the outage")
        info = await wait_until(_all_acked(js), 10, what="every message acked")
        assert info.num_redelivered == 0 and info.num_pending == 0
    finally:
        with contextlib.suppress(Exception):
            await forwarder.start()
        await writer.stop()
        await store.close()
    try:
        assert writer.lost == 0 and writer.refused == 0 and writer.unsettled == 0
        assert await count(Delivery) == 60 and await count(Attempt) == 60
        assert all(n == 60 for n in rows_at_callback), "a callback ran before its row was committed"
        assert loop.time() - back_at < 30
    finally:
        await direct.close()
        await pull.unsubscribe()


def _all_acked(js):  # noqa: ANN001, ANN202
    async def check():  # noqa: ANN202
        info = await js.consumer_info("HISTORY_OUTAGE", "writer")
        return info if info.num_ack_pending == 0 else None
    return check


@pytest.mark.slow  # about 25 s: the slow tier (make test-slow)
async def test_a_20_s_database_outage_during_deliveries_loses_no_attempt_and_posts_nothing_twice(
        settings, nc, dispatcher_nc, receiver, postgres_url, forwarder):
    """The whole dispatcher on PostgreSQL behind the forwarder, ack_wait 5 s. Events go out before, during and
    after a 20 s outage to three endpoints that answer 200 and one that answers 400 (a final failure: dead letter).
    Every event reaches every endpoint exactly once, every attempt is in the history afterwards (succeeded or
    failed, one attempt each), nothing is counted lost, and the sender durable redelivered nothing."""
    from bus.publisher import EventPublisher
    from bus.streams import provision
    from dispatcher.delivery.service import Dispatcher
    from tests.integration.test_end_to_end import STEP

    via_proxy = make_url(postgres_url).set(host="127.0.0.1", port=forwarder.port).render_as_string(
        hide_password=False)
    settings = settings.model_copy(update={"database_url": via_proxy, "ack_wait_s": 5.0, "endpoint_refresh_s": 1.0})
    js = nc.jetstream()
    await provision(js, settings)
    store = Store.from_settings(settings, via_proxy)
    direct = Store.from_settings(settings, postgres_url)
    await store.create_schema()
    paths = {f"agent-db-{i}": f"/db-{i}" for i in range(4)}
    for agent, path in paths.items():
        _, secret = await store.set_agent_webhook(agent, url=receiver.url(path))
        receiver.secrets[path] = secret
    receiver.respond("/db-3", *[400] * 1000)  # every POST to agent-db-3's endpoint fails for good
    dispatcher = Dispatcher(settings, dispatcher_nc, store)
    publisher = EventPublisher(settings, nc)
    loop = asyncio.get_running_loop()
    event_ids: list[str] = []

    async def publish(n: int) -> None:
        for _ in range(n):
            for agent in paths:
                event_ids.append(await publisher.publish_event(agent, "agent.step.completed", STEP, strict=True))
            await asyncio.sleep(0.25)

    await dispatcher.start()
    try:
        await publish(4)  # database up
        await receiver.wait_for(16, timeout_s=20)
        await forwarder.stop()
        down_at = loop.time()
        await publish(40)  # 10 s of events while the database is down
        await wait_until(lambda: len(receiver.received) >= len(event_ids), 30, what="every POST during the outage")
        while loop.time() - down_at < 20.0:
            await asyncio.sleep(0.5)
        await forwarder.start()
        await publish(4)  # database back

        async def all_recorded() -> bool:
            async with direct.session() as s:
                statuses = (await s.execute(select(Delivery.status, func.count()).group_by(Delivery.status))).all()
            return dict(statuses) == {"succeeded": 3 * 48, "failed": 48}

        await wait_until(all_recorded, 40, interval_s=0.2, what="every delivery's row after the outage")
        await wait_until(lambda: dispatcher.history.backlog == 0, 20, what="the writer's backlog written")
    finally:
        with contextlib.suppress(Exception):
            await forwarder.start()
        await dispatcher.stop()
        await store.close()
    try:
        per_event: dict[tuple[str, str], int] = {}
        for r in receiver.received:
            key = (r.path, r.headers["webhook-id"])
            per_event[key] = per_event.get(key, 0) + 1
        assert len(event_ids) == 4 * 48
        ok_posts = {k: n for k, n in per_event.items() if k[0] != "/db-3"}
        assert len(ok_posts) == 3 * 48 and set(ok_posts.values()) == {1}, "a 200 endpoint got an event twice"
        async with direct.session() as s:
            attempts = (await s.execute(select(Delivery.attempts))).scalars().all()
            attempt_rows = (await s.execute(select(func.count()).select_from(Attempt))).scalar_one()
        assert dispatcher.history.lost == 0 and dispatcher.history.refused == 0
        assert all(n == 1 for k, n in per_event.items() if k[0] == "/db-3"), "the 400 endpoint got an event twice"
        assert set(attempts) == {1} and attempt_rows == 4 * 48
        info = await js.consumer_info(settings.webhooks_stream, settings.sender_durable)
        assert info.num_redelivered == 0 and info.num_ack_pending == 0
    finally:
        await direct.close()
