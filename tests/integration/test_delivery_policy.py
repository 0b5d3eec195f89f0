"""Production delivery: long retries as message schedules, dead letters, disabling, circuit breaker, rate limit."""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import select

from bus.publisher import EventPublisher
from dispatcher.delivery.service import Dispatcher
from dispatcher.store.models import Attempt, Delivery, Endpoint
from tests.helpers import wait_until

RUN = {"run_id": "run-1", "status": "completed"}


@pytest.fixture
async def make_dispatcher(dispatcher_nc, store, provisioned):
    """Start a dispatcher with settings overrides; stopped at teardown."""
    started: list[Dispatcher] = []

    async def make(settings) -> Dispatcher:
        d = Dispatcher(settings, dispatcher_nc, store)
        await d.start()
        started.append(d)
        return d

    yield make
    for d in started:
        await d.stop()


async def deliveries(store) -> list[Delivery]:
    async with store.session() as s:
        return list((await s.execute(select(Delivery))).scalars())


async def attempts(store) -> list[Attempt]:
    async with store.session() as s:
        return list((await s.execute(select(Attempt).order_by(Attempt.number))).scalars())


async def test_long_retry_is_rescheduled_not_held_and_counts_attempts(settings, nc, store, receiver, make_dispatcher):
    # 0.2 s retries are naks; the 2 s one is past nak_max_delay_s and goes out as a message schedule.
    settings = settings.model_copy(update={"retry_schedule_s": [0.2, 2.0, 0.2], "nak_max_delay_s": 1.0})
    await store.set_agent_webhook("agent-1", url=receiver.url("/h"), secret="s" * 32)
    receiver.respond("/h", 503, 503)
    d = await make_dispatcher(settings)
    await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)

    await receiver.wait_for(2, timeout_s=10, path="/h")
    await asyncio.sleep(0.3)
    info = await nc.jetstream().consumer_info(settings.webhooks_stream, settings.sender_durable)
    assert info.num_ack_pending == 0, "a task waiting for a long retry must not hold an ack-pending slot"
    sched = await nc.jetstream().stream_info(settings.webhooks_stream, subjects_filter="letta_webhooks.schedules.>")
    assert sum((sched.state.subjects or {}).values()) == 1

    await receiver.wait_for(3, timeout_s=10, path="/h")
    (row,) = await wait_until(lambda: _succeeded(store))
    assert row.attempts == 3
    assert [(a.number, a.status_code) for a in await attempts(store)] == [(1, 503), (2, 503), (3, 200)]
    ids = {r.headers["webhook-id"] for r in receiver.received}
    assert len(ids) == 1, "webhook-id is stable across retries"
    assert d.sender.rescheduler.rescheduled == 1


async def _succeeded(store):
    rows = [r for r in await deliveries(store) if r.status == "succeeded"]
    return rows or None


async def test_exhausted_delivery_is_dead_lettered_with_its_last_error(settings, nc, store, receiver,
                                                                         make_dispatcher):
    settings = settings.model_copy(update={"retry_schedule_s": [0.1, 0.1]})
    endpoint, _ = await store.set_agent_webhook("agent-1", url=receiver.url("/h"), secret="s" * 32)
    receiver.respond("/h", 500, 502, 503)
    await make_dispatcher(settings)
    event_id = await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)

    await receiver.wait_for(3, timeout_s=10, path="/h")
    js = nc.jetstream()

    async def dead():
        try:
            return await js.get_last_msg(settings.webhooks_stream, f"letta_webhooks.dead.{endpoint.id}")
        except Exception:  # noqa: BLE001 - not there yet
            return None

    msg = await wait_until(dead)
    assert json.loads(msg.data)["event_id"] == event_id
    assert msg.headers["Letta-Attempts"] == "3"
    assert "503" in msg.headers["Letta-Last-Error"]
    (row,) = await wait_until(lambda: _with_status(store, "failed"))
    assert row.attempts == 3 and row.last_status_code == 503 and "attempts exhausted" in row.last_error
    await asyncio.sleep(0.5)
    assert len(receiver.received) == 3, "no attempt after the last one"
    info = await js.consumer_info(settings.webhooks_stream, settings.sender_durable)
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def _with_status(store, status):
    rows = [r for r in await deliveries(store) if r.status == status]
    return rows or None


async def test_410_disables_the_endpoint_and_publishes_an_operational_event(settings, nc, store, receiver,
                                                                              make_dispatcher):
    endpoint, _ = await store.set_agent_webhook("agent-1", url=receiver.url("/h"), secret="s" * 32)
    receiver.respond("/h", 410)
    js = nc.jetstream()
    notices = await js.subscribe("letta_webhooks.endpoint.disabled", stream=settings.webhooks_stream)
    await make_dispatcher(settings)
    publisher = EventPublisher(settings, nc)
    await publisher.publish_event("agent-1", "agent.run.completed", RUN, strict=True)

    notice = await notices.next_msg(timeout=10)
    body = json.loads(notice.data)
    assert body["endpoint_id"] == endpoint.id and "410" in body["reason"] and body["agent_id"] == "agent-1"
    async with store.session() as s:
        row = await s.get(Endpoint, endpoint.id)
    assert row.enabled is False and "410 Gone" in row.disabled_reason
    # Later events are not delivered to the disabled endpoint.
    await publisher.publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    await asyncio.sleep(1.0)
    assert len(receiver.received) == 1


async def test_endpoint_failing_long_enough_is_disabled(settings, nc, store, receiver, make_dispatcher):
    settings = settings.model_copy(update={
        "retry_schedule_s": [0.1] * 5, "disable_after_s": 0.3, "disable_after_failures": 3,
        "circuit_failure_threshold": 100,
    })
    endpoint, _ = await store.set_agent_webhook("agent-1", url=receiver.url("/h"), secret="s" * 32)
    receiver.respond("/h", *[500] * 20)
    await make_dispatcher(settings)
    await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)

    async def disabled():
        async with store.session() as s:
            row = await s.get(Endpoint, endpoint.id)
        return row if not row.enabled else None

    row = await wait_until(disabled)
    assert "without a success" in row.disabled_reason
    assert len(receiver.received) >= 3


async def test_open_circuit_defers_without_requests_or_attempts(settings, nc, store, receiver, make_dispatcher):
    settings = settings.model_copy(update={
        "retry_schedule_s": [0.1] * 8, "circuit_failure_threshold": 2, "circuit_cooldown_s": 2.0,
    })
    await store.set_agent_webhook("agent-1", url=receiver.url("/h"), secret="s" * 32)
    receiver.respond("/h", 500, 500)  # two failures open the circuit; then the endpoint is healthy
    d = await make_dispatcher(settings)
    publisher = EventPublisher(settings, nc)
    await publisher.publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    await receiver.wait_for(2, timeout_s=10, path="/h")
    gate = d.sender.gate(next(iter(d.sender.gates)))
    assert gate.state == "open"
    for _ in range(5):
        await publisher.publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    await asyncio.sleep(0.8)
    assert len(receiver.received) == 2, "no request while the circuit is open"
    assert d.sender.parked >= 1 and d.sender.deferred == 0, "parked in LETTA_PARKED while open (issue 11)"

    rows = await wait_until(lambda: _all_succeeded(store, 6), timeout_s=20)
    by_attempts = sorted(r.attempts for r in rows)
    assert by_attempts == [1, 1, 1, 1, 1, 3], "deferral while open does not use up attempts"
    assert gate.state == "closed"


async def _all_succeeded(store, n):
    rows = await deliveries(store)
    return rows if len(rows) == n and all(r.status == "succeeded" for r in rows) else None


async def test_agent_rate_limit_delays_but_never_drops(settings, nc, store, receiver, make_dispatcher):
    settings = settings.model_copy(update={"agent_rate_limit_per_s": 10.0, "agent_rate_burst": 2})
    await store.set_agent_webhook("agent-slow", url=receiver.url("/slow"), secret="s" * 32)
    await make_dispatcher(settings)
    publisher = EventPublisher(settings, nc)
    for _ in range(30):
        await publisher.publish_event("agent-slow", "agent.run.completed", RUN, strict=True)
    await receiver.wait_for(30, timeout_s=20, path="/slow")
    slow = [r for r in receiver.received if r.path == "/slow"]
    assert len({r.headers["webhook-id"] for r in slow}) == 30, "none dropped, none duplicated"
    # 30 deliveries at 10/s with a burst of 2 span about 2.8 s: the limit applied (a lower bound only)
    span = _span(slow)
    assert span >= 2.0, f"30 deliveries at 10/s took only {span:.2f} s"


def _span(received) -> float:
    stamps = sorted(r.at for r in received)
    return stamps[-1] - stamps[0] if stamps else 0.0
