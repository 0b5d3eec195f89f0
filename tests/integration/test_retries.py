"""Retries and terminal outcomes end to end (DESIGN.md, "Delivery", outcome table), with the fixtures' retry
schedule of three 0.2 s delays (settings.max_attempts == 4)."""

from __future__ import annotations

import asyncio
import json

from nats.js.errors import NotFoundError

from bus.publisher import EventPublisher
from dispatcher.delivery.tasks import delivery_id
from tests.helpers import CATALOG_SAMPLES, attempts, closed_port, deliveries, endpoint_row, wait_drained, wait_until

RUN = CATALOG_SAMPLES["agent.run.completed"]
#: longer than the whole retry schedule (3 x 0.2 s + 20 % jitter) plus a fetch round: a retry would show by then
GRACE_S = 1.2


async def setup(store, dispatcher, receiver, path: str = "/hook", agent_id: str = "agent-1", url: str | None = None):
    endpoint, secret = await store.set_agent_webhook(agent_id, url=url or receiver.url(path))
    receiver.secrets[path] = secret
    await dispatcher.endpoints.refresh()
    return endpoint


async def final_delivery(store, dlv_id: str, status: str, timeout_s: float = 10.0):
    async def done():
        rows = [r for r in await deliveries(store, id=dlv_id) if r.status == status]
        return rows[0] if rows else None

    return await wait_until(done, timeout_s, what=f"delivery {dlv_id} {status}")


async def test_500_500_200_is_three_posts_then_succeeded(settings, nc, store, receiver, dispatcher, provisioned):
    js = provisioned
    endpoint = await setup(store, dispatcher, receiver)
    receiver.respond("/hook", 500, 500)
    event_id = await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    dlv = delivery_id(event_id, endpoint.id)

    posts = await receiver.wait_for(3, timeout_s=10, path="/hook")
    row = await final_delivery(store, dlv, "succeeded")
    sender = await wait_drained(js, settings.webhooks_stream, settings.sender_durable)
    await asyncio.sleep(GRACE_S)

    assert len(receiver.received) == 3, "no POST after the 200"
    assert [p.status for p in posts] == [500, 500, 200]
    assert {p.headers["webhook-id"] for p in posts} == {event_id}, "webhook-id is stable across retries"
    assert {p.headers["X-Letta-Delivery"] for p in posts} == {dlv}
    assert all(p.letta_verified and p.standard_verified for p in posts)
    assert len({p.body for p in posts}) == 1 and json.loads(posts[0].body)["event_id"] == event_id

    assert (row.attempts, row.last_status_code, row.endpoint_id, row.event_id) == (3, 200, endpoint.id, event_id)
    rows = await attempts(store, dlv)
    assert [(a.number, a.status_code) for a in rows] == [(1, 500), (2, 500), (3, 200)]
    assert all(a.duration_ms >= 0 and a.error is None for a in rows)

    # the task was acked once, at the end: nothing pending, nothing waiting for an ack, one task in the stream
    sender = await js.consumer_info(settings.webhooks_stream, settings.sender_durable)
    assert sender.num_ack_pending == 0 and sender.num_pending == 0
    assert sender.delivered.consumer_seq == 3, "three deliveries of the task"
    assert sender.ack_floor.stream_seq == sender.delivered.stream_seq
    tasks = await js.stream_info(settings.webhooks_stream, subjects_filter=">")
    assert tasks.state.subjects == {settings.delivery_subject(endpoint.id): 1}


async def test_400_is_one_post_then_failed(settings, nc, store, receiver, dispatcher, provisioned):
    js = provisioned
    endpoint = await setup(store, dispatcher, receiver)
    receiver.respond("/hook", 400)
    event_id = await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    dlv = delivery_id(event_id, endpoint.id)

    await receiver.wait_for(1, timeout_s=10, path="/hook")
    row = await final_delivery(store, dlv, "failed")
    await wait_drained(js, settings.webhooks_stream, settings.sender_durable)
    await asyncio.sleep(GRACE_S)

    assert len(receiver.received) == 1, "a 400 is not retried"
    assert (row.attempts, row.last_status_code) == (1, 400)
    assert [(a.number, a.status_code) for a in await attempts(store, dlv)] == [(1, 400)]
    assert (await endpoint_row(store, endpoint.id)).enabled, "a 400 does not disable the endpoint"


async def test_always_503_uses_every_attempt_then_failed(settings, nc, store, receiver, dispatcher, provisioned):
    js = provisioned
    endpoint = await setup(store, dispatcher, receiver)
    receiver.respond("/hook", *[503] * (settings.max_attempts + 5))
    event_id = await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    dlv = delivery_id(event_id, endpoint.id)

    await receiver.wait_for(settings.max_attempts, timeout_s=10, path="/hook")
    row = await final_delivery(store, dlv, "failed")
    await wait_drained(js, settings.webhooks_stream, settings.sender_durable)
    await asyncio.sleep(GRACE_S)

    assert len(receiver.received) == settings.max_attempts == 4, "no POST after the last attempt"
    assert {p.headers["webhook-id"] for p in receiver.received} == {event_id}
    assert (row.attempts, row.last_status_code) == (settings.max_attempts, 503)
    assert row.last_error
    rows = await attempts(store, dlv)
    assert [(a.number, a.status_code) for a in rows] == [(n, 503) for n in range(1, settings.max_attempts + 1)]


async def test_exhausted_delivery_is_dead_lettered(settings, nc, store, receiver, dispatcher, provisioned):
    """DESIGN.md: last attempt failed -> copy to letta_webhooks.dead.<endpoint_id> with the last error, ack."""
    js = provisioned
    endpoint = await setup(store, dispatcher, receiver)
    receiver.respond("/hook", *[503] * (settings.max_attempts + 5))
    event_id = await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    await receiver.wait_for(settings.max_attempts, timeout_s=10, path="/hook")
    await final_delivery(store, delivery_id(event_id, endpoint.id), "failed")
    await wait_drained(js, settings.webhooks_stream, settings.sender_durable)

    dead = await wait_until(lambda: _last(js, settings.webhooks_stream, f"letta_webhooks.dead.{endpoint.id}"),
                            timeout_s=5, what="dead letter")
    event = await js.get_last_msg(settings.events_stream, "letta.agent.run.completed")
    assert dead.data == event.data, "the dead letter carries the event exactly as published"
    assert any("503" in v for k, v in dead.headers.items() if "error" in k.lower()), dead.headers


async def _last(js, stream, subject):
    try:
        return await js.get_last_msg(stream, subject)
    except NotFoundError:
        return None


async def test_410_fails_and_disables_the_endpoint(settings, nc, store, receiver, dispatcher, provisioned):
    js = provisioned
    endpoint = await setup(store, dispatcher, receiver)
    receiver.respond("/hook", 410)
    publisher = EventPublisher(settings, nc)
    event_id = await publisher.publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    dlv = delivery_id(event_id, endpoint.id)

    await receiver.wait_for(1, timeout_s=10, path="/hook")
    row = await final_delivery(store, dlv, "failed")
    assert (row.attempts, row.last_status_code) == (1, 410)
    assert [(a.number, a.status_code) for a in await attempts(store, dlv)] == [(1, 410)]

    disabled = await wait_until(
        lambda: _disabled(store, endpoint.id), timeout_s=5, what="endpoint disabled")
    assert disabled.disabled_reason and "410" in disabled.disabled_reason

    # the disabled endpoint gets nothing more: neither a retry nor later events
    await asyncio.sleep(0.3)  # past endpoint_refresh_s
    await publisher.publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    await wait_drained(js, settings.events_stream, settings.fanout_durable)
    await wait_drained(js, settings.webhooks_stream, settings.sender_durable)
    await asyncio.sleep(GRACE_S)
    assert len(receiver.received) == 1


async def _disabled(store, endpoint_id):
    row = await endpoint_row(store, endpoint_id)
    return row if row is not None and not row.enabled else None


async def test_connection_error_is_retried_and_recorded(settings, nc, store, receiver, dispatcher, provisioned):
    js = provisioned
    port = closed_port()
    endpoint = await setup(store, dispatcher, receiver, url=f"http://127.0.0.1:{port}/hook")
    event_id = await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    dlv = delivery_id(event_id, endpoint.id)

    row = await final_delivery(store, dlv, "failed")
    await wait_drained(js, settings.webhooks_stream, settings.sender_durable)
    rows = await attempts(store, dlv)
    assert [a.number for a in rows] == list(range(1, settings.max_attempts + 1)), "connection errors are retried"
    for a in rows:
        assert a.status_code is None
        assert a.error and "connect" in a.error.lower() and str(port) in a.error, a.error
    assert row.attempts == settings.max_attempts and row.last_status_code is None and row.last_error
    assert not receiver.received
