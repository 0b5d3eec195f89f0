"""Exactly one POST per (event, endpoint): JetStream de-duplication on Nats-Msg-Id, at publish and at fan-out."""

from __future__ import annotations

import asyncio
import json

from bus.envelope import decode_head
from bus.publisher import EventPublisher
from dispatcher.delivery.service import Dispatcher
from dispatcher.delivery.tasks import delivery_id, task_headers
from tests.helpers import CATALOG_SAMPLES, attempts, deliveries, wait_drained, wait_until

STEP = CATALOG_SAMPLES["agent.step.completed"]


async def test_same_event_id_published_twice_is_delivered_once(settings, nc, store, receiver, dispatcher,
                                                               provisioned):
    js = provisioned
    endpoint, _ = await store.set_agent_webhook("agent-1", url=receiver.url("/hook"))
    await dispatcher.endpoints.refresh()
    publisher = EventPublisher(settings, nc)

    event_id = "evt_0190aaaabbbb7cccc8ddd0000eeee111"
    assert await publisher.publish_event("agent-1", "agent.step.completed", STEP, event_id=event_id,
                                         strict=True) == event_id
    # the caller's own retry: same id, a new envelope (new timestamp)
    again = publisher.build("agent-1", "agent.step.completed", STEP, event_id=event_id)
    ack = await publisher.publish_envelope(again)
    assert ack.duplicate is True and ack.stream == settings.events_stream
    assert await publisher.publish_event("agent-1", "agent.step.completed", STEP, event_id=event_id) == event_id

    (got,) = await receiver.wait_for(1, timeout_s=10)
    await wait_drained(js, settings.events_stream, settings.fanout_durable)
    await wait_drained(js, settings.webhooks_stream, settings.sender_durable)
    await asyncio.sleep(0.5)

    assert len(receiver.received) == 1
    assert json.loads(got.body)["event_id"] == event_id
    assert (await js.stream_info(settings.events_stream)).state.messages == 1
    (row,) = await deliveries(store)
    assert (row.id, row.status, row.attempts) == (delivery_id(event_id, endpoint.id), "succeeded", 1)


async def test_redelivered_event_on_the_fanout_side_posts_once(settings, nc, dispatcher_nc, store, receiver,
                                                                provisioned):
    """A fan-out that published an event's tasks and died before acking it: the event is redelivered, fanned out
    again by the running dispatcher, and the repeated task (same Nats-Msg-Id) is dropped by JetStream."""
    js = provisioned
    endpoint, _ = await store.set_agent_webhook("agent-1", url=receiver.url("/hook"))
    other, _ = await store.set_agent_webhook("agent-2", url=receiver.url("/other"))
    publisher = EventPublisher(settings, nc)
    event_id = await publisher.publish_event("agent-1", "agent.step.completed", STEP, strict=True)

    # the first fan-out instance: takes the event, publishes its task exactly as FanOut does, never acks
    sub = await js.pull_subscribe_bind(settings.fanout_durable, settings.events_stream)
    (msg,) = await sub.fetch(1, timeout=5)
    head = decode_head(msg.data)
    first = await js.publish(settings.delivery_subject(endpoint.id), msg.data, headers=task_headers(head, endpoint.id, msg.metadata.sequence.stream))
    assert not first.duplicate
    await msg.nak()  # it "crashed": the event goes back to the durable at once
    await sub.unsubscribe()

    dispatcher = Dispatcher(settings, dispatcher_nc, store)
    await dispatcher.start()
    try:
        await receiver.wait_for(1, timeout_s=10, path="/hook")
        # a later event for another agent proves the fan-out kept going after the redelivered one
        marker = await publisher.publish_event("agent-2", "agent.run.completed",
                                               CATALOG_SAMPLES["agent.run.completed"], strict=True)
        await receiver.wait_for(1, timeout_s=10, path="/other")
        fanout = await wait_drained(js, settings.events_stream, settings.fanout_durable)
        await wait_drained(js, settings.webhooks_stream, settings.sender_durable)
        await asyncio.sleep(0.5)

        assert fanout.delivered.consumer_seq == 3, "the event was delivered twice to the fan-out, the marker once"
        assert dispatcher.fanout.events == 2 and dispatcher.fanout.tasks == 2  # it did fan the event out again
        hook_posts = [r for r in receiver.received if r.path == "/hook"]
        assert len(hook_posts) == 1 and json.loads(hook_posts[0].body)["event_id"] == event_id
        tasks = await js.stream_info(settings.webhooks_stream, subjects_filter=">")
        assert tasks.state.subjects == {settings.delivery_subject(endpoint.id): 1,
                                        settings.delivery_subject(other.id): 1}
        rows = await wait_until(lambda: _succeeded(store), timeout_s=5)
        assert sorted((r.event_id, r.endpoint_id, r.attempts) for r in rows) == sorted(
            [(event_id, endpoint.id, 1), (marker, other.id, 1)])
        assert len(await attempts(store, delivery_id(event_id, endpoint.id))) == 1
    finally:
        await dispatcher.stop()


async def _succeeded(store):
    rows = await deliveries(store, status="succeeded")
    return rows if len(rows) == 2 else None
