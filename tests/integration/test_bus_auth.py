"""Security of the bus on a real nats-server started from nats.conf plus the generated letta-bus account: every
role's happy path works, and each denial is a real ``Permissions Violation`` (the server drops the request and says
so; the client's JetStream call then times out) or a refused connection."""

from __future__ import annotations

import asyncio
import json
import logging

import nats.errors
import pytest
from nats.js.api import ConsumerConfig

from bus.connection import NatsAuthError, connect
from bus.publisher import EventPublisher
from dispatcher.cli.runtime import provision_streams
from dispatcher.delivery.service import Dispatcher
from dispatcher.ops.dead_letters import list_dead_letters, resend
from subscribers import Subscriber
from tests.helpers import wait_until

RUN = {"run_id": "run-1", "status": "completed", "completed_at": "2026-01-01T00:00:00Z"}
STEP = {"step_id": "step-1", "status": "success", "run_id": "run-1"}


async def violation(caplog, subject: str, what: str = "Publish") -> None:
    """Wait until the server reported ``Permissions Violation for <what> to "<subject>"`` (nats-py logs it through
    bus.connection's error callback; nats-server 2.15 sends it in lower case)."""
    expected = f'Permissions Violation for {what} to "{subject}"'.lower()
    await wait_until(lambda: any(expected in r.getMessage().lower() for r in caplog.records), timeout_s=3,
                     what=expected)


async def denied(caplog, call, subject: str) -> None:
    """``call`` (a JetStream request) gets no answer, and the server reported a permissions violation for
    publishing to ``subject``."""
    with pytest.raises(nats.errors.TimeoutError):
        await call
    await violation(caplog, subject)


async def stream_names(nc) -> list[str]:
    return sorted(s.config.name for s in await nc.jetstream().streams_info())


# --- connections ----------------------------------------------------------------------------------------------

async def test_anonymous_and_wrong_password_are_refused_at_once(settings):
    with pytest.raises(NatsAuthError, match="Authorization Violation.*LETTA_BUS_NATS_USER"):
        await asyncio.wait_for(connect(settings.nats_url, name="anonymous", timeout_s=5), 3)
    wrong = settings.model_copy(update={"nats_user": "letta-bus-admin", "nats_password": "not-the-password"})
    from pydantic import SecretStr

    wrong = wrong.model_copy(update={"nats_password": SecretStr("not-the-password")})
    with pytest.raises(NatsAuthError, match="letta-bus-admin"):
        await asyncio.wait_for(connect(settings.nats_url, name="wrong", settings=wrong, role="admin", timeout_s=5), 3)


async def test_explicit_user_and_password_settings_are_used(settings, nats_auth, provisioned):
    from bus.auth import load_credentials
    from pydantic import SecretStr

    creds = load_credentials(nats_auth.roles["publisher"])
    explicit = settings.model_copy(update={"nats_auth_dir": nats_auth.directory / "nowhere",
                                           "nats_user": creds.user, "nats_password": SecretStr(creds.password)})
    publisher = await EventPublisher(explicit).start(wait_s=5)
    try:
        assert publisher.connected
        assert await publisher.publish_event("agent-1", "agent.step.completed", STEP, strict=True)
    finally:
        await publisher.close()


# --- admin ----------------------------------------------------------------------------------------------------

async def test_admin_provisions_and_other_roles_may_not(settings, nc, caplog):
    caplog.set_level(logging.WARNING, logger="bus.connection")
    await provision_streams(settings)  # the admin role's generated credentials
    assert await stream_names(nc) == ["LETTA_ADVISORIES", "LETTA_EVENTS", "LETTA_PARKED", "LETTA_WEBHOOKS"]
    info = await nc.jetstream().consumer_info("LETTA_WEBHOOKS", "webhook-sender")
    assert info.config.max_deliver == settings.max_attempts

    from bus.auth import load_credentials
    from pydantic import SecretStr

    creds = load_credentials(settings.nats_auth_dir / "dispatcher.env")
    as_dispatcher = settings.model_copy(update={"nats_user": creds.user, "nats_password": SecretStr(creds.password)})
    with pytest.raises(PermissionError, match="LETTA_BUS_PROVISION=false"):
        await provision_streams(as_dispatcher)
    await violation(caplog, "$JS.API.STREAM.CREATE.LETTA_EVENTS")


# --- publisher ------------------------------------------------------------------------------------------------

async def test_publisher_publishes_and_gets_pubacks(settings, nc, provisioned):
    publisher = await EventPublisher(settings).start(wait_s=5)  # finds publisher.env in nats_auth_dir
    try:
        assert publisher._nc.options["user"] == "letta-bus-publisher"
        envelope = publisher.build("agent-1", "agent.step.completed", STEP)
        first = await publisher.publish_envelope(envelope)
        again = await publisher.publish_envelope(envelope)
        assert first.stream == "LETTA_EVENTS" and not first.duplicate
        assert again.duplicate and again.seq == first.seq
    finally:
        await publisher.close()
    stored = await nc.jetstream().get_msg("LETTA_EVENTS", first.seq)
    assert json.loads(stored.data)["event_id"] == envelope.event_id


async def test_publisher_cannot_delete_streams_create_consumers_or_read_deliveries(settings, nc, provisioned, as_role,
                                                                                  caplog):
    caplog.set_level(logging.WARNING, logger="bus.connection")
    pub = await as_role("publisher")
    js = pub.jetstream(timeout=0.5)
    await denied(caplog, js.delete_stream("LETTA_EVENTS"), "$JS.API.STREAM.DELETE.LETTA_EVENTS")
    await denied(caplog, js.add_consumer("LETTA_EVENTS", ConsumerConfig(durable_name="spy", name="spy")),
                 "$JS.API.CONSUMER.CREATE.LETTA_EVENTS.spy")
    await denied(caplog, js.stream_info("LETTA_WEBHOOKS"), "$JS.API.STREAM.INFO.LETTA_WEBHOOKS")

    seen = []

    async def collect(msg) -> None:  # noqa: ANN001
        seen.append(msg)

    await pub.subscribe("letta_webhooks.>", cb=collect)
    await pub.subscribe("_INBOX.>", cb=collect)  # the other roles' replies
    await pub.flush()
    for subject in ("letta_webhooks.>", "_INBOX.>"):
        await violation(caplog, subject, "Subscription")
    await nc.jetstream().publish("letta_webhooks.endpoint.disabled", b"{}")
    await asyncio.sleep(0.2)
    assert seen == [] and await stream_names(nc) == ["LETTA_ADVISORIES", "LETTA_EVENTS", "LETTA_PARKED", "LETTA_WEBHOOKS"]
    assert [c.name for c in await nc.jetstream().consumers_info("LETTA_EVENTS")] == ["webhook-fanout"]


# --- subscriber -----------------------------------------------------------------------------------------------

async def test_subscriber_runs_its_own_durable_and_acks(settings, nc, provisioned):
    received = []

    async def handle(event) -> None:  # noqa: ANN001
        received.append(event.event_id)

    sub = Subscriber("audit-log", ["letta.agent.>"], settings=settings, handler=handle, fetch_timeout_s=0.3)
    await sub.start()  # connects itself with subscriber.env
    try:
        assert sub._nc.options["user"] == "letta-bus-subscriber"
        event_id = await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN,
                                                                   strict=True)
        await wait_until(lambda: event_id in received, timeout_s=5, what="the event reaches the handler")
        js = nc.jetstream()

        async def acked():
            info = await js.consumer_info("LETTA_EVENTS", "audit-log")
            return info.ack_floor.stream_seq >= 1 and info.num_ack_pending == 0
        await wait_until(acked, timeout_s=5, what="the event acked")
    finally:
        await sub.stop()


async def test_subscriber_cannot_publish_events_delete_streams_or_take_the_fanout(settings, nc, provisioned,
                                                                                  as_role, caplog):
    caplog.set_level(logging.WARNING, logger="bus.connection")
    sub = await as_role("subscriber")
    js = sub.jetstream(timeout=0.5)
    await denied(caplog, js.publish("letta.agent.step.completed", b"{}", timeout=0.5), "letta.agent.step.completed")
    await denied(caplog, js.delete_stream("LETTA_EVENTS"), "$JS.API.STREAM.DELETE.LETTA_EVENTS")
    await denied(caplog, js.delete_consumer("LETTA_EVENTS", "webhook-fanout"),
                 "$JS.API.CONSUMER.DELETE.LETTA_EVENTS.webhook-fanout")
    steal = await js.pull_subscribe_bind("webhook-fanout", "LETTA_EVENTS")
    with pytest.raises(nats.errors.TimeoutError):
        await steal.fetch(1, timeout=0.5)
    await violation(caplog, "$JS.API.CONSUMER.MSG.NEXT.LETTA_EVENTS.webhook-fanout")
    await denied(caplog, js.stream_info("LETTA_WEBHOOKS"), "$JS.API.STREAM.INFO.LETTA_WEBHOOKS")
    assert (await nc.jetstream().stream_info("LETTA_EVENTS")).state.messages == 0
    assert await stream_names(nc) == ["LETTA_ADVISORIES", "LETTA_EVENTS", "LETTA_PARKED", "LETTA_WEBHOOKS"]


# --- bridge ---------------------------------------------------------------------------------------------------

async def test_bridge_cannot_touch_other_streams_or_durables(settings, nc, provisioned, as_role, caplog):
    """The bridge's own work (its stream, its durable, publishing events) is what tests/integration/test_bridge.py
    runs on this role; here, what it may not do."""
    caplog.set_level(logging.WARNING, logger="bus.connection")
    bridge = await as_role("bridge")
    js = bridge.jetstream(timeout=0.5)
    await denied(caplog, js.delete_stream("LETTA_EVENTS"), "$JS.API.STREAM.DELETE.LETTA_EVENTS")
    await denied(caplog, js.stream_info("LETTA_WEBHOOKS"), "$JS.API.STREAM.INFO.LETTA_WEBHOOKS")
    await denied(caplog, js.publish("letta_webhooks.deliveries.ep_1", b"{}", timeout=0.5),
                 "letta_webhooks.deliveries.ep_1")
    await denied(caplog, js.add_consumer("LETTA_EVENTS", ConsumerConfig(durable_name="sneak")),
                 "$JS.API.CONSUMER.DURABLE.CREATE.LETTA_EVENTS.sneak")
    steal = await js.pull_subscribe_bind("webhook-fanout", "LETTA_EVENTS")
    with pytest.raises(nats.errors.TimeoutError):
        await steal.fetch(1, timeout=0.5)
    await violation(caplog, "$JS.API.CONSUMER.MSG.NEXT.LETTA_EVENTS.webhook-fanout")


# --- dispatcher -----------------------------------------------------------------------------------------------

async def test_dispatcher_cannot_delete_streams_or_its_durables_or_publish_events(settings, nc, provisioned,
                                                                                  dispatcher_nc, caplog):
    caplog.set_level(logging.WARNING, logger="bus.connection")
    js = dispatcher_nc.jetstream(timeout=0.5)
    await denied(caplog, js.delete_stream("LETTA_WEBHOOKS"), "$JS.API.STREAM.DELETE.LETTA_WEBHOOKS")
    await denied(caplog, js.purge_stream("LETTA_EVENTS"), "$JS.API.STREAM.PURGE.LETTA_EVENTS")
    await denied(caplog, js.delete_consumer("LETTA_EVENTS", "webhook-fanout"),
                 "$JS.API.CONSUMER.DELETE.LETTA_EVENTS.webhook-fanout")
    await denied(caplog, js.publish("letta.agent.step.completed", b"{}", timeout=0.5), "letta.agent.step.completed")
    assert await stream_names(nc) == ["LETTA_ADVISORIES", "LETTA_EVENTS", "LETTA_PARKED", "LETTA_WEBHOOKS"]
    assert (await nc.jetstream().consumer_info("LETTA_EVENTS", "webhook-fanout")).name == "webhook-fanout"


async def test_dispatcher_cannot_read_delete_or_create_other_consumers_on_the_events_stream(
        settings, nc, provisioned, dispatcher_nc, caplog):
    """An internal service's durable on LETTA_EVENTS is out of the dispatcher's reach: no pulling its messages, no
    deleting it, no consumers of its own beside webhook-fanout (replay reads by direct get instead)."""
    caplog.set_level(logging.WARNING, logger="bus.connection")
    await nc.jetstream().add_consumer("LETTA_EVENTS", ConsumerConfig(durable_name="billing", name="billing"))
    await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    js = dispatcher_nc.jetstream(timeout=0.5)
    pull = await js.pull_subscribe_bind("billing", "LETTA_EVENTS")
    with pytest.raises(nats.errors.TimeoutError):
        await pull.fetch(1, timeout=0.5)
    await violation(caplog, "$JS.API.CONSUMER.MSG.NEXT.LETTA_EVENTS.billing")
    await denied(caplog, js.delete_consumer("LETTA_EVENTS", "billing"), "$JS.API.CONSUMER.DELETE.LETTA_EVENTS.billing")
    await denied(caplog, js.add_consumer("LETTA_EVENTS", ConsumerConfig(name="snoop", filter_subject="letta.>")),
                 "$JS.API.CONSUMER.CREATE.LETTA_EVENTS.snoop.letta.>")
    info = await nc.jetstream().consumer_info("LETTA_EVENTS", "billing")
    assert info.num_pending == 1 and info.delivered.stream_seq == 0  # nothing was taken from it
    names = [c.name for c in await nc.jetstream().consumers_info("LETTA_EVENTS")]
    assert sorted(names) == ["billing", "webhook-fanout"]


async def test_dispatcher_role_delivers_retries_by_schedule_and_dead_letters(settings, nc, dispatcher_nc, store,
                                                                            receiver, provisioned):
    """End to end on the dispatcher role alone: fan-out, a POST, a retry that goes out as a JetStream message
    schedule (past nak_max_delay_s), a dead letter after the last attempt, then listing and resending it."""
    settings = settings.model_copy(update={"retry_schedule_s": [1.0], "nak_max_delay_s": 0.5})
    ok, _ = await store.set_agent_webhook("agent-ok", url=receiver.url("/ok"), secret="s" * 32)
    dead, _ = await store.set_agent_webhook("agent-dead", url=receiver.url("/dead"), secret="d" * 32)
    receiver.respond("/ok", 503)  # first attempt fails, the scheduled retry succeeds
    receiver.respond("/dead", 500, 500)  # both attempts fail: a dead letter
    d = Dispatcher(settings, dispatcher_nc, store)
    await d.start()
    try:
        publisher = await EventPublisher(settings).start(wait_s=5)  # Letta's side: the publisher role
        try:
            ok_event = await publisher.publish_event("agent-ok", "agent.run.completed", RUN, strict=True)
            await publisher.publish_event("agent-dead", "agent.run.completed", RUN, strict=True)
        finally:
            await publisher.close()
        await receiver.wait_for(2, timeout_s=8, path="/ok")
        await receiver.wait_for(2, timeout_s=8, path="/dead")
        assert [r.status for r in receiver.received if r.path == "/ok"] == [503, 200]
        assert {r.headers["webhook-id"] for r in receiver.received if r.path == "/ok"} == {ok_event}
        assert d.sender.rescheduler.rescheduled >= 2  # both retries went out as message schedules
        js = dispatcher_nc.jetstream()
        letters = await wait_until(lambda: list_dead_letters(js, settings, dead.id), timeout_s=5,
                                   what="a dead letter")
        assert [letter.task.endpoint_id for letter in letters] == [dead.id]
        receiver.respond("/dead", 200)
        assert await resend(js, settings, letters) == 1  # publishes the task, deletes the dead letter
        await receiver.wait_for(3, timeout_s=5, path="/dead")
        assert await list_dead_letters(js, settings, dead.id) == []
    finally:
        await d.stop()
    assert ok.id != dead.id
