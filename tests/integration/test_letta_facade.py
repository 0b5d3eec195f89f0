"""LettaEventBus (the WebhookManager-compatible facade) against a real nats-server: awaited and fire-and-forget
publishing, never raising into the caller, buffering through a broker outage with a bound and a drop count,
flushing at close, and retries that keep the Nats-Msg-Id so JetStream stores each event once."""

from __future__ import annotations

import asyncio
import enum
import logging
import time

import pytest

from bus import envelope as env
from bus.connection import connect
from bus.embedded import EmbeddedServer
from bus.letta import LettaEventBus
from bus.pipeline import prepare, publish_batch
from bus.publisher import EventPublisher
from bus.streams import ensure_stream, events_stream_config
from tests.helpers import CATALOG_SAMPLES, closed_port, wait_until

STEP = CATALOG_SAMPLES["agent.step.completed"]
pytestmark = pytest.mark.timeout(30)


class WebhookEventType(str, enum.Enum):
    """The shape of Letta's WebhookEventType: a str Enum whose values are the event types."""

    AGENT_RUN_COMPLETED = "agent.run.completed"


async def stored(js, settings) -> list[tuple[str, dict, env.Envelope]]:
    """Every message of the events stream: (subject, headers, envelope), in stream order."""
    state = (await js.stream_info(settings.events_stream)).state
    out = []
    for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
        msg = await js.get_msg(settings.events_stream, seq)
        out.append((msg.subject, msg.headers, env.decode(msg.data)))
    return out


def restart(server: EmbeddedServer, port: int) -> EmbeddedServer:
    """A new nats-server on the killed one's port and store (the stream survives)."""
    return EmbeddedServer(workdir=server.workdir, conf=server.conf, port=port, monitor_port=-1).start()


async def test_awaited_publish_stores_every_catalog_event(settings, provisioned):
    bus = await LettaEventBus(settings, mode="awaited").start()
    try:
        ids = {}
        for event_type, data in CATALOG_SAMPLES.items():
            ids[event_type] = await bus.publish_event(agent_id="agent-f1", event_type=event_type, payload=data,
                                                      organization_id="org-f1")
        # the WebhookManager call shape: an Enum event type
        run = await bus.publish_event(agent_id="agent-f1", event_type=WebhookEventType.AGENT_RUN_COMPLETED,
                                      payload=CATALOG_SAMPLES["agent.run.completed"])
    finally:
        await bus.close()
    assert all(ids.values()) and run
    # returned only after the PubAck: everything is in the stream right now
    messages = await stored(provisioned, settings)
    assert len(messages) == len(CATALOG_SAMPLES) + 1
    for (subject, headers, envelope), (event_type, data) in zip(messages, CATALOG_SAMPLES.items()):
        assert subject == f"letta.{event_type}" and envelope.event_type == event_type
        assert headers[env.H_MSG_ID] == envelope.event_id == ids[event_type]
        assert headers[env.H_ORG_ID] == "org-f1" and headers[env.H_AGENT_ID] == "agent-f1"
        assert envelope.data == data  # unknown fields pass through
    assert messages[-1][2].event_id == run and messages[-1][2].organization_id is None
    assert bus.stats.published == len(CATALOG_SAMPLES) + 1 and bus.stats.dropped == 0


@pytest.mark.parametrize("mode", ["awaited", "fire_and_forget"])
async def test_bad_input_never_raises(settings, nc, provisioned, mode, caplog):
    bus = await LettaEventBus(settings, nc, mode=mode).start()
    try:
        bad = [
            dict(agent_id="agent-f2", event_type="agent.step.completed", payload={"status": "ok"}),  # no step_id
            dict(agent_id="agent-f2", event_type="Agent Step", payload=STEP),
            dict(agent_id="", event_type="agent.step.completed", payload=STEP),
            dict(agent_id="agent-f2", event_type="agent.step.completed", payload=["not", "a", "dict"]),
            dict(agent_id="agent-f2", event_type="agent.step.completed", payload={**STEP, "x": object()}),
            dict(agent_id="agent-f2", event_type="agent.step.completed",
                 payload={**STEP, "blob": "x" * settings.max_event_bytes}),
        ]
        with caplog.at_level(logging.ERROR, logger="bus.letta"):
            for kwargs in bad:
                assert await bus.publish_event(**kwargs) is None
                assert bus.enqueue(**kwargs) is None
        assert "step_id" in caplog.text and "LETTA_BUS_MAX_EVENT_BYTES" in caplog.text
        assert await bus.flush(2)
    finally:
        await bus.close()
    assert bus.stats.invalid == 2 * len(bad) and bus.stats.accepted == 0
    assert await stored(provisioned, settings) == []


async def test_fire_and_forget_returns_before_the_ack_and_close_flushes(settings, provisioned):
    bus = await LettaEventBus(settings, mode="fire_and_forget", batch_size=64).start()
    ids = []
    for i in range(1000):
        ids.append(await bus.publish_event(agent_id=f"agent-{i % 7}", event_type="agent.step.completed",
                                           payload={**STEP, "step_id": f"step-{i}"}))
    assert all(ids) and len(set(ids)) == 1000
    assert bus.pending == 1000  # no call waited for the broker (nor even yielded to the event loop)
    await bus.close(timeout_s=8)
    messages = await stored(provisioned, settings)
    assert [e.event_id for _, _, e in messages] == ids  # each once, in call order
    assert [e.data["step_id"] for _, _, e in messages] == [f"step-{i}" for i in range(1000)]
    assert bus.stats.published == 1000 and bus.stats.dropped == 0 and bus.pending == 0
    assert await bus.publish_event(agent_id="agent-1", event_type="agent.step.completed", payload=STEP) is None
    assert bus.stats.dropped_on_close == 1 and bus.stats.accepted == bus.stats.published + bus.stats.dropped


async def test_outage_buffers_up_to_the_bound_refuses_the_rest_and_publishes_after_restart(
        settings, nc, provisioned, nats_server, caplog):
    bus = await LettaEventBus(settings, mode="fire_and_forget", buffer_max=50, batch_size=16).start()
    port = nats_server.client_port
    restarted = None
    try:
        before = await bus.publish_event(agent_id="agent-f3", event_type="agent.step.completed", payload=STEP)
        assert await bus.flush(5)
        nats_server.kill()
        await wait_until(lambda: not bus.connected, 5, what="bus noticed the outage")
        with caplog.at_level(logging.WARNING, logger="bus.letta"):
            results = [bus.enqueue(agent_id="agent-f3", event_type="agent.step.completed",
                                   payload={**STEP, "step_id": f"step-{i}"}) for i in range(80)]
            await asyncio.sleep(0.2)  # the background publisher tries, fails and backs off
        accepted = [r for r in results if r]
        assert len(accepted) == 50 and results[50:] == [None] * 30  # refuse-new: the first 50 are kept
        assert bus.stats.dropped_full == 30 and bus.stats.dropped == 30 and bus.pending == 50
        assert "buffer full" in caplog.text and "total dropped 1)" in caplog.text  # the first refusal, at once
        assert not await bus.flush(0.3)

        restarted = restart(nats_server, port)
        await wait_until(lambda: bus.connected, 8, what="bus reconnected")
        with caplog.at_level(logging.WARNING, logger="bus.letta"):
            assert await bus.flush(8)
        assert "refused 29 new events since the last report (total dropped 30)" in caplog.text  # on recovery
        messages = await stored(nc.jetstream(), settings)
        assert [e.event_id for _, _, e in messages] == [before] + accepted
        assert bus.stats.published == 51 and bus.stats.retries >= 1
        assert bus.stats.accepted == bus.stats.published + bus.stats.dropped + bus.pending == 81
    finally:
        await bus.close()
        if restarted is not None:
            restarted.stop()


async def test_awaited_publish_does_not_wait_on_a_dead_broker_and_defers_with_the_same_id(
        settings, nc, provisioned, nats_server):
    bus = await LettaEventBus(settings, mode="awaited").start()
    port = nats_server.client_port
    restarted = None
    try:
        nats_server.kill()
        await wait_until(lambda: not bus.connected, 5, what="bus noticed the outage")
        t0 = time.monotonic()
        assert await bus.publish_event(agent_id="agent-f4", event_type="agent.tool.detached",
                                       payload=CATALOG_SAMPLES["agent.tool.detached"]) is None
        assert time.monotonic() - t0 < 0.1  # no broker round trip was awaited
        assert bus.stats.deferred == 1 and bus.pending == 1
        restarted = restart(nats_server, port)
        assert await bus.flush(8)
        messages = await stored(nc.jetstream(), settings)
        assert len(messages) == 1 and messages[0][0] == "letta.agent.tool.detached"
        # and once the buffer is empty, awaited publishing returns ids again
        assert await bus.publish_event(agent_id="agent-f4", event_type="agent.step.cancelled",
                                       payload={"step_id": "s"})
    finally:
        await bus.close()
        if restarted is not None:
            restarted.stop()


async def test_close_gives_up_after_its_timeout_and_counts_what_it_dropped(settings, provisioned, nats_server, caplog):
    bus = await LettaEventBus(settings, mode="fire_and_forget").start()
    nats_server.kill()
    await wait_until(lambda: not bus.connected, 5, what="bus noticed the outage")
    for i in range(10):
        assert bus.enqueue(agent_id="agent-f5", event_type="agent.step.cancelled", payload={"step_id": f"s{i}"})
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bus.letta"):
        await bus.close(timeout_s=0.5)
    assert time.monotonic() - t0 < 2.0
    assert bus.stats.dropped_on_close == 10 and bus.stats.dropped == 10 and bus.pending == 0
    assert "10 events not confirmed" in caplog.text
    await bus.close()  # idempotent


async def test_started_before_the_broker_exists_then_delivers(settings, tmp_path):
    """Initial connect retried in the background; events wait in the buffer (and a missing stream is retried)."""
    port = closed_port()
    cfg = settings.model_copy(update={"nats_url": f"nats://127.0.0.1:{port}"})
    bus = await LettaEventBus(cfg, mode="fire_and_forget").start(wait_s=0.2)
    server = None
    try:
        assert not bus.connected
        ids = [bus.enqueue(agent_id="agent-f6", event_type="agent.step.cancelled", payload={"step_id": f"s{i}"})
               for i in range(5)]
        assert all(ids)
        server = EmbeddedServer(workdir=tmp_path / "late", port=port).start()
        await wait_until(lambda: bus.connected, 8, what="bus connected")
        await asyncio.sleep(0.2)  # no stream yet: the publisher retries
        admin = await connect(cfg.nats_url, name="test-admin")
        try:
            js = admin.jetstream()
            await ensure_stream(js, events_stream_config(cfg))
            assert await bus.flush(8)
            assert [e.event_id for _, _, e in await stored(js, cfg)] == ids
        finally:
            await admin.close()
    finally:
        await bus.close()
        if server is not None:
            server.stop()


async def test_an_unacknowledged_publish_retried_with_its_id_is_stored_once(settings, nc, provisioned):
    """A publish whose ack did not come in time may still be stored: the retry (same Nats-Msg-Id) is reported
    as a duplicate and the stream keeps one copy."""
    publisher = EventPublisher(settings, nc)
    items = [prepare(settings, publisher.build("agent-f7", "agent.step.cancelled", {"step_id": f"s{i}"}))
             for i in range(20)]
    js = nc.jetstream()
    first = await publish_batch(js, items, timeout_s=0)  # give up on the acks at once
    assert all(isinstance(r, asyncio.TimeoutError) for r in first)
    await wait_until(lambda: stream_count(js, settings, 20), 5, what="first copies stored")
    again = await publish_batch(js, items, timeout_s=5)
    assert all(ack.duplicate for ack in again)
    assert [e.event_id for _, _, e in await stored(js, settings)] == [i.event_id for i in items]


async def stream_count(js, settings, expected: int) -> bool:
    return (await js.stream_info(settings.events_stream)).state.messages == expected
