"""``max_deliver`` exhaustion on either durable ends in a dead letter and a ``failed`` row (issue 10, finding 4).

When a message's last delivery is not settled (nak, deferral, crash, no ack), JetStream stops delivering it and
publishes ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>``. Before the fix nothing consumed that
advisory: the task or event was gone and no row said so.

* sender durable: ``letta-bus up`` is SIGKILLed while each delivery of a task is in flight (a receiver that never
  answers, as one that takes the process down would), until max_deliver;
* fan-out durable: ``LETTA_WEBHOOKS`` is unavailable, so every fan-out of an event fails and is nak'ed;
* durable capture and idempotence: a dispatcher fetched a task and died before acking, twice, while no dispatcher
  runs to see the advisory; ``LETTA_ADVISORIES`` keeps it for the next one, and the same advisory processed again
  writes no second dead letter.

Each test watches the server's advisory on a core subscription of its own, so it knows exhaustion happened.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from bus.envelope import decode_head
from bus.publisher import EventPublisher
from bus.streams import fanout_consumer_config, provision
from dispatcher.delivery.service import Dispatcher
from dispatcher.delivery.tasks import delivery_id, task_headers
from dispatcher.ops.dead_letters import list_dead_letters, resend
from dispatcher.ops.manual_retry import retry_failed
from dispatcher.store.database import Store
from dispatcher.store.models import Delivery, DeliveryStatus
from tests.faults import STEP, DispatcherProcess, settings_env
from tests.helpers import deliveries, wait_drained, wait_until

pytestmark = pytest.mark.timeout(90)

RUN = {"run_id": "run-1", "status": "completed"}
ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, settings) -> str:
    return request.getfixturevalue("postgres_url") if request.param == "postgres" else settings.database_url


@pytest.fixture
async def any_store(settings, db_url):
    """The test's store on SQLite, then on PostgreSQL (the dispatcher's history is written to it)."""
    s = Store.from_settings(settings, db_url)
    await s.create_schema()
    yield s
    await s.close()


async def _advisories(nc, stream: str, consumer: str) -> list[dict]:
    """A list that fills with the MAX_DELIVERIES advisories of one durable as the server publishes them."""
    seen: list[dict] = []

    async def on_advisory(msg):
        seen.append(json.loads(msg.data))

    await nc.subscribe(f"{ADVISORY}.{stream}.{consumer}", cb=on_advisory)
    return seen


async def _row(store, delivery: str):
    rows = await deliveries(store, id=delivery)
    return rows[0] if rows else None


class HangingReceiver:
    """A TCP server on 127.0.0.1 that reads each request's head, counts it, and never answers (a receiver whose
    response never comes while the dispatcher handling it dies)."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> "HangingReceiver":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            await reader.read()  # until the peer goes away
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_sender_exhausted_by_a_dispatcher_dying_mid_delivery_leaves_a_dead_letter_and_a_failed_row(
        settings, nc, store, tmp_path):
    """``letta-bus up`` is SIGKILLed while each delivery of a task is in flight (the receiver never answers: a
    poison receiver that takes the process down), twice: max_deliver (2) is used up without an ack. The next
    dispatcher dead-letters the task and fails its row."""
    # each kill follows its POST within milliseconds; the 4 s HTTP timeout keeps the POST from ending first
    overrides = {"ack_wait_s": 5.0, "http_timeout_s": 4.0, "retry_schedule_s": [0.2], "api_port": 0,
                 "metrics_port": 0}
    s = settings.model_copy(update=overrides)
    js = nc.jetstream()
    await provision(js, s)
    await store.upgrade_schema()
    hanging = await HangingReceiver().start()
    endpoint, _ = await store.set_agent_webhook("agent-a", url=hanging.url("/a"))
    seen = await _advisories(nc, s.webhooks_stream, s.sender_durable)
    workdir = tmp_path / "dispatcher"
    workdir.mkdir()
    child = DispatcherProcess(settings_env(settings, **overrides), workdir)
    try:
        child.start()
        await child.wait_ready()
        event_id = await EventPublisher(s, nc).publish_event("agent-a", "agent.step.completed", STEP, strict=True)
        dlv = delivery_id(event_id, endpoint.id)
        for n in (1, 2):
            await wait_until(lambda: len(hanging.requests) >= n, 20, what=f"POST {n} of the task")
            child.sigkill()
            child.start()
            await child.wait_ready()
        await wait_until(lambda: seen, 20, what="MAX_DELIVERIES advisory of the sender")
        assert seen[0]["deliveries"] == s.max_attempts == 2

        (letter,) = await wait_until(lambda: list_dead_letters(js, s), 20, what="a dead letter of the task")
        assert letter.task.delivery_id == dlv and letter.task.event_id == event_id
        assert letter.task.endpoint_id == endpoint.id
        assert "max_deliver (2) exhausted" in letter.last_error
        assert json.loads(letter.body)["event_id"] == event_id
        row = await wait_until(lambda: _failed(store, dlv), 10, what="a failed row")
        assert "max_deliver (2) exhausted" in row.last_error and row.event_seq
        assert len(hanging.requests) == 2
    finally:
        child.stop()
        await hanging.stop()


async def test_fanout_exhausted_leaves_a_dead_letter_and_a_failed_row_per_endpoint(
        settings, nc, dispatcher_nc, any_store, receiver):
    """The fan-out cannot store an event's tasks (``LETTA_WEBHOOKS`` is unavailable: no stream answers its
    subjects, as while it is re-created or has no leader) and naks it until max_deliver. Once the stream is back,
    each delivery the fan-out would have created is dead-lettered and failed, and the resends arrive."""
    store = any_store
    s = settings.model_copy(update={"ack_wait_s": 2.0})
    js = nc.jetstream()
    await provision(js, s)
    fanout = fanout_consumer_config(s)
    fanout.max_deliver = 2  # as `nats consumer edit`: the default 100 naks take over an hour to run out
    await js.add_consumer(s.events_stream, fanout)
    agent_ep, _ = await store.set_agent_webhook("agent-b", url=receiver.url("/b"), events=["agent.step.*"])
    global_ep, _ = await store.create_endpoint(scope="global", url=receiver.url("/global"))
    other, _ = await store.set_agent_webhook("agent-c", url=receiver.url("/c"))  # not this event's agent
    seen = await _advisories(nc, s.events_stream, s.fanout_durable)
    d = Dispatcher(s, dispatcher_nc, store)
    await d.start()
    try:
        await js.delete_stream(s.webhooks_stream)
        event_id = await EventPublisher(s, nc).publish_event("agent-b", "agent.step.completed", STEP, strict=True)
        await wait_until(lambda: seen, 30, what="MAX_DELIVERIES advisory of the fan-out")
        info = await js.consumer_info(s.events_stream, s.fanout_durable)
        assert info.num_ack_pending == 0 and info.num_pending == 0, "JetStream gave up on the event"
        assert await deliveries(store) == [], "and no delivery row says so"
        await provision(js, s)  # the webhooks stream is back (and the fan-out's max_deliver reset)
        wanted = {delivery_id(event_id, agent_ep.id), delivery_id(event_id, global_ep.id)}

        async def both_dead():
            letters = await list_dead_letters(js, s)
            return letters if len(letters) == 2 else None

        letters = await wait_until(both_dead, 20, what="a dead letter per endpoint of the event")
        assert {x.task.delivery_id for x in letters} == wanted
        assert all(x.task.event_id == event_id and x.attempts == 0 for x in letters)
        assert all("max_deliver (2) exhausted" in x.last_error for x in letters)

        async def both_failed():
            rows = [await _row(store, dlv) for dlv in wanted]
            return rows if all(r is not None and r.status == DeliveryStatus.FAILED for r in rows) else None

        rows = await wait_until(both_failed, 10, what="a failed row per delivery")
        assert all(r.event_seq and "fan-out" in r.last_error for r in rows)
        assert await deliveries(store, endpoint_id=other.id) == []

        assert await resend(js, s, letters) == 2
        await receiver.wait_for(2, 15)
        assert sorted(r.path for r in receiver.received) == ["/b", "/global"]
        await wait_until(lambda: _all_status(store, wanted, DeliveryStatus.SUCCEEDED), 10, what="resends succeeded")
    finally:
        await d.stop()


async def _all_status(store, ids, status) -> bool:
    rows = [await _row(store, dlv) for dlv in ids]
    return all(r is not None and r.status == status for r in rows)


async def test_advisory_published_while_the_dispatcher_is_down_is_processed_after_restart_once(
        settings, nc, dispatcher_nc, any_store, receiver):
    """A dispatcher fetched the task and died before acking it, twice (max_deliver 2), and none runs when the
    server publishes the advisory: ``LETTA_ADVISORIES`` keeps it, the next dispatcher dead-letters the task and
    fails its row; the same advisory again (redelivered, or published twice) writes no second dead letter; and
    retry-failed sends the failed delivery."""
    store = any_store
    s = settings.model_copy(update={"ack_wait_s": 1.0, "retry_schedule_s": [0.2]})
    js = nc.jetstream()
    await provision(js, s)
    endpoint, _ = await store.set_agent_webhook("agent-d", url=receiver.url("/d"))
    since = datetime.now(timezone.utc) - timedelta(minutes=1)
    event_id = await EventPublisher(s, nc).publish_event("agent-d", "agent.run.completed", RUN, strict=True)
    stored = await js.get_last_msg(s.events_stream, s.event_subject("agent.run.completed"))
    headers = task_headers(decode_head(stored.data), endpoint.id, stored.seq)  # what the fan-out stores
    await js.publish(s.delivery_subject(endpoint.id), stored.data, headers=headers)
    dlv = delivery_id(event_id, endpoint.id)

    sub = await js.pull_subscribe_bind(s.sender_durable, s.webhooks_stream)
    for n in (1, 2):  # fetched, never acked: a process killed mid-delivery
        (msg,) = await sub.fetch(1, timeout=10)
        assert msg.metadata.num_delivered == n
    with pytest.raises(asyncio.TimeoutError):
        await sub.fetch(1, timeout=3)  # past max_deliver: the server publishes the advisory instead
    await sub.unsubscribe()
    captured = await wait_until(
        lambda: _stored_count(js, s.advisories_stream), 10, what="the advisory stored in LETTA_ADVISORIES")
    assert captured == 1

    d = Dispatcher(s, dispatcher_nc, store)
    await d.start()
    try:
        (letter,) = await wait_until(lambda: list_dead_letters(js, s), 20, what="a dead letter after the restart")
        assert letter.task.delivery_id == dlv and "max_deliver (2) exhausted" in letter.last_error
        row = await wait_until(lambda: _failed(store, dlv), 10, what="a failed row")
        assert row.event_seq == stored.seq

        advisory = await js.get_msg(s.advisories_stream, 1)
        for _ in range(2):
            await nc.publish(advisory.subject, advisory.data)
        await wait_until(lambda: _stored_count(js, s.advisories_stream, 3), 10, what="the copies stored")
        await wait_drained(js, s.advisories_stream, s.exhausted_durable, 20)
        assert len(await list_dead_letters(js, s)) == 1, "the same advisory again wrote a second dead letter"
        again = await _row(store, dlv)
        assert again.status == DeliveryStatus.FAILED and again.updated_at == row.updated_at

        # a handler that died after its dead letter, before the row: the repeat's dead letter is dropped by its id
        async with store.session.begin() as session:
            await session.execute(update(Delivery).where(Delivery.id == dlv).values(status=DeliveryStatus.PENDING))
        await nc.publish(advisory.subject, advisory.data)
        await wait_until(lambda: _failed(store, dlv), 10, what="the row failed again")
        await wait_drained(js, s.advisories_stream, s.exhausted_durable, 20)
        assert len(await list_dead_letters(js, s)) == 1, "the repeated dead letter was stored"

        result = await retry_failed(js, s, store, agent_id="agent-d", since=since)
        assert result.queued == 1, result.refused
        (post,) = await receiver.wait_for(1, 15)
        assert post.headers["webhook-id"] == event_id
        await wait_until(lambda: _all_status(store, [dlv], DeliveryStatus.SUCCEEDED), 10, what="retry succeeded")
    finally:
        await d.stop()


async def _stored_count(js, stream: str, at_least: int = 1) -> int | None:
    try:
        n = (await js.stream_info(stream)).state.messages
    except Exception:  # noqa: BLE001 - not created (yet)
        return None
    return n if n >= at_least else None


async def _failed(store, dlv: str):
    row = await _row(store, dlv)
    return row if row is not None and row.status == DeliveryStatus.FAILED else None
