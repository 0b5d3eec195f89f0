"""Stream and consumer provisioning (bus.streams.provision) against a real nats-server: idempotent, updates in place."""

from __future__ import annotations

from nats.js.api import AckPolicy, RetentionPolicy, StorageType

from bus.publisher import EventPublisher
from bus.streams import provision
from tests.helpers import CATALOG_SAMPLES


async def snapshot(js, settings):
    events = await js.stream_info(settings.events_stream)
    hooks = await js.stream_info(settings.webhooks_stream)
    fanout = await js.consumer_info(settings.events_stream, settings.fanout_durable)
    sender = await js.consumer_info(settings.webhooks_stream, settings.sender_durable)
    return events, hooks, fanout, sender


async def test_provision_creates_the_designed_streams_and_consumers(settings, nc):
    js = nc.jetstream()
    await provision(js, settings)
    events, hooks, fanout, sender = await snapshot(js, settings)

    assert events.config.subjects == ["letta.>"]
    assert events.config.retention == RetentionPolicy.LIMITS and events.config.storage == StorageType.FILE
    assert events.config.max_age == settings.events_max_age_s == 7 * 86400
    assert events.config.duplicate_window == 120
    assert events.config.num_replicas == 1
    assert hooks.config.subjects == ["letta_webhooks.>"]
    assert hooks.config.retention == RetentionPolicy.LIMITS, "not WorkQueue (nats-server #7817)"

    assert fanout.config.durable_name == settings.fanout_durable
    assert fanout.config.ack_policy == AckPolicy.EXPLICIT and fanout.config.max_deliver and fanout.config.max_deliver > 0
    assert sender.config.durable_name == settings.sender_durable
    assert sender.config.ack_policy == AckPolicy.EXPLICIT
    assert sender.config.max_deliver == settings.max_attempts == 4
    assert sender.config.ack_wait == settings.ack_wait_s > settings.http_timeout_s
    assert sender.config.filter_subject == "letta_webhooks.deliveries.>"


async def test_stream_info_explains_itself(settings, nc):
    js = nc.jetstream()
    await provision(js, settings)
    events, hooks, _, _ = await snapshot(js, settings)
    for info in (events, hooks):
        assert info.config.description and len(info.config.description) > 20
        ours = {k: v for k, v in (info.config.metadata or {}).items() if not k.startswith("_nats")}
        assert ours, f"{info.config.name} has no metadata of its own: {info.config.metadata}"
        assert all(v for v in ours.values())


async def test_provision_twice_is_idempotent(settings, nc):
    js = nc.jetstream()
    await provision(js, settings)
    # state that must survive a second provision: a stored event and a consumer position
    await EventPublisher(settings, nc).publish_event("agent-1", "agent.step.cancelled",
                                                     CATALOG_SAMPLES["agent.step.cancelled"], strict=True)
    before = await snapshot(js, settings)
    await provision(js, settings)
    await provision(js, settings)
    after = await snapshot(js, settings)

    for b, a in zip(before[:2], after[:2]):
        assert a.config == b.config
        assert a.created == b.created, "the stream was recreated, not left in place"
        assert a.state.messages == b.state.messages
    assert after[0].state.messages == 1
    for b, a in zip(before[2:], after[2:]):
        assert a.config == b.config
        assert a.created == b.created, "the durable was recreated, not left in place"
        assert a.num_pending == b.num_pending
    names = {s.config.name for s in await js.streams_info()}
    assert names == {settings.events_stream, settings.webhooks_stream, settings.parked_stream,
                     settings.advisories_stream}
    assert {c.name for c in await js.consumers_info(settings.events_stream)} == {settings.fanout_durable}
    assert {c.name for c in await js.consumers_info(settings.webhooks_stream)} == {settings.sender_durable}
    assert {c.name for c in await js.consumers_info(settings.advisories_stream)} == {settings.exhausted_durable}


async def test_changed_max_age_updates_the_stream_in_place(settings, nc):
    js = nc.jetstream()
    await provision(js, settings)
    event_id = await EventPublisher(settings, nc).publish_event(
        "agent-1", "agent.run.completed", CATALOG_SAMPLES["agent.run.completed"], strict=True)
    created = (await js.stream_info(settings.events_stream)).created

    changed = settings.model_copy(update={"events_max_age_s": 3600.0})
    await provision(js, changed)
    info = await js.stream_info(settings.events_stream)
    assert info.config.max_age == 3600
    assert info.state.messages == 1, "updated in place: the stored event is still there"
    assert info.created == created
    msg = await js.get_last_msg(settings.events_stream, "letta.agent.run.completed")
    assert msg.headers["Nats-Msg-Id"] == event_id
    assert (await js.stream_info(settings.webhooks_stream)).config.max_age == 7200
    # and back
    await provision(js, settings)
    assert (await js.stream_info(settings.events_stream)).config.max_age == settings.events_max_age_s


async def test_changed_retry_schedule_updates_sender_max_deliver(settings, nc):
    js = nc.jetstream()
    await provision(js, settings)
    created = (await js.consumer_info(settings.webhooks_stream, settings.sender_durable)).created

    longer = settings.model_copy(update={"retry_schedule_s": [0.2] * 6})
    await provision(js, longer)
    info = await js.consumer_info(settings.webhooks_stream, settings.sender_durable)
    assert info.config.max_deliver == longer.max_attempts == 7
    assert info.created == created, "updated in place, not recreated"

    none = settings.model_copy(update={"retry_schedule_s": []})
    await provision(js, none)
    info = await js.consumer_info(settings.webhooks_stream, settings.sender_durable)
    assert info.config.max_deliver == 1
