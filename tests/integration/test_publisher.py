"""EventPublisher against a real nats-server: what is stored, and that failures never raise unless strict."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from nats.js.errors import NotFoundError

from bus.catalog import EventValidationError
from bus.publisher import EventPublisher, PublishError
from bus.streams import provision
from config.settings import Settings
from tests.helpers import CATALOG_SAMPLES, closed_port

STEP = CATALOG_SAMPLES["agent.step.completed"]


async def stored_count(js, settings) -> int:
    return (await js.stream_info(settings.events_stream)).state.messages


async def test_unreachable_server_returns_none_and_strict_raises():
    settings = Settings(_env_file=None, nats_url=f"nats://127.0.0.1:{closed_port()}")
    publisher = EventPublisher(settings)
    t0 = time.monotonic()
    await publisher.start(wait_s=0.3)
    try:
        assert time.monotonic() - t0 < 1.5, "start() must not block the caller past wait_s"
        assert not publisher.connected
        t0 = time.monotonic()
        assert await publisher.publish_event("agent-1", "agent.step.completed", STEP) is None
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(PublishError) as exc:
            await publisher.publish_event("agent-1", "agent.step.completed", STEP, event_id="evt_fixed", strict=True)
        assert exc.value.event_id == "evt_fixed"
        assert settings.nats_url in str(exc.value)
    finally:
        await asyncio.wait_for(publisher.close(), 5)


async def test_start_needs_a_url():
    with pytest.raises(ValueError, match="LETTA_BUS_NATS_URL"):
        await EventPublisher(Settings(_env_file=None, nats_url=None)).start()


async def test_invalid_data_is_refused_naming_the_field(settings, nc, provisioned):
    publisher = EventPublisher(settings, nc)
    data = {k: v for k, v in STEP.items() if k != "step_id"}
    assert await publisher.publish_event("agent-1", "agent.step.completed", data) is None
    with pytest.raises(EventValidationError) as exc:
        await publisher.publish_event("agent-1", "agent.step.completed", data, strict=True)
    assert "step_id" in str(exc.value) and "agent.step.completed" in str(exc.value)
    # bad event type and missing agent id
    assert await publisher.publish_event("agent-1", "Agent Step", STEP) is None
    with pytest.raises(EventValidationError, match="event_type"):
        await publisher.publish_event("agent-1", "Agent Step", STEP, strict=True)
    assert await publisher.publish_event("", "agent.step.completed", STEP) is None
    with pytest.raises(EventValidationError, match="agent_id"):
        await publisher.publish_event("", "agent.step.completed", STEP, strict=True)
    # data JSON cannot carry (an unknown field holding an object): reported, not raised
    assert await publisher.publish_event("agent-1", "agent.step.completed", {**STEP, "extra": object()}) is None
    assert await stored_count(provisioned, settings) == 0


async def test_oversized_event_is_refused_naming_the_setting(settings, nc, provisioned):
    publisher = EventPublisher(settings, nc)
    data = {**STEP, "blob": "x" * (settings.max_event_bytes + 1)}
    assert await publisher.publish_event("agent-1", "agent.step.completed", data) is None
    with pytest.raises(EventValidationError) as exc:
        await publisher.publish_event("agent-1", "agent.step.completed", data, strict=True)
    assert "LETTA_BUS_MAX_EVENT_BYTES" in str(exc.value)
    assert str(settings.max_event_bytes) in str(exc.value)
    # just under the limit is fine
    small = Settings(**{**settings.model_dump(), "max_event_bytes": 2048})
    p2 = EventPublisher(small, nc)
    assert await p2.publish_event("agent-1", "agent.step.cancelled", {"step_id": "s", "pad": "x" * 1500}) is not None
    assert await p2.publish_event("agent-1", "agent.step.cancelled", {"step_id": "s", "pad": "x" * 2100}) is None
    assert await stored_count(provisioned, settings) == 1


async def close_quietly(nc) -> None:
    """Close a client whose server was killed (nats-py's close() may raise while the socket is gone)."""
    if nc is not None and not nc.is_closed:
        try:
            await asyncio.wait_for(nc.close(), 5)
        except Exception:  # noqa: BLE001 - cleanup only
            pass


async def test_publish_after_server_killed_returns_none_in_bounded_time(settings, nc, nats_server):
    fast = settings.model_copy(update={"publish_timeout_s": 0.3, "publish_attempts": 3})
    publisher = await EventPublisher(fast).start(wait_s=5)
    try:
        assert publisher.connected
        await provision(nc.jetstream(), fast)  # as admin: the publisher role may not administer streams
        assert await publisher.publish_event("agent-1", "agent.step.completed", STEP) is not None
        nats_server.kill()
        bound = fast.publish_attempts * fast.publish_timeout_s + 1
        t0 = time.monotonic()
        result = await asyncio.wait_for(
            publisher.publish_event("agent-1", "agent.step.completed", STEP), bound + 5)
        elapsed = time.monotonic() - t0
        assert result is None
        assert elapsed < bound, f"publish took {elapsed:.2f} s with the broker down (bound {bound:.2f} s)"
        t0 = time.monotonic()
        with pytest.raises(PublishError):
            await asyncio.wait_for(
                publisher.publish_event("agent-1", "agent.step.completed", STEP, strict=True), bound + 5)
        assert time.monotonic() - t0 < bound
    finally:
        await close_quietly(publisher._nc)


async def test_close_during_an_outage_does_not_raise(settings, nats_server):
    """Shutting down a service while the broker is down must not fail: close() is called from shutdown paths."""
    publisher = await EventPublisher(settings).start(wait_s=5)
    nc = publisher._nc
    try:
        assert publisher.connected
        nats_server.kill()
        await asyncio.sleep(0.2)  # the client notices and starts reconnecting
        await asyncio.wait_for(publisher.close(), 5)
    finally:
        await close_quietly(nc)


async def test_stored_message_subject_headers_and_body(settings, nc, provisioned):
    js = provisioned
    publisher = EventPublisher(settings, nc)
    event_id = await publisher.publish_event("agent-42", "agent.step.completed", STEP, organization_id="org-7",
                                             strict=True)
    msg = await js.get_last_msg(settings.events_stream, "letta.agent.step.completed")
    assert msg.subject == "letta.agent.step.completed"
    h = msg.headers
    body = json.loads(msg.data)
    assert h["Nats-Msg-Id"] == event_id
    assert h["Letta-Agent-Id"] == "agent-42"
    assert h["Letta-Organization-Id"] == "org-7"
    assert h["Content-Type"] == "application/json"
    assert h["ce-specversion"] == "1.0"
    assert h["ce-id"] == event_id
    assert h["ce-type"] == "agent.step.completed"
    assert h["ce-source"] == "/letta/agents/agent-42"
    assert h["ce-time"] == body["timestamp"]
    assert list(body) == ["event_id", "event_type", "timestamp", "agent_id", "organization_id", "data"]
    assert body["event_id"] == event_id and re.fullmatch(r"evt_[0-9a-f]{32}", event_id)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", body["timestamp"])
    assert (body["agent_id"], body["organization_id"], body["data"]) == ("agent-42", "org-7", STEP)


async def test_without_organization_and_outside_the_catalog(settings, nc, provisioned):
    js = provisioned
    publisher = EventPublisher(settings, nc)
    event_id = await publisher.publish_event("agent-1", "agent.memory.updated", {"block": "human"}, strict=True)
    msg = await js.get_last_msg(settings.events_stream, "letta.agent.memory.updated")
    assert msg.headers["Nats-Msg-Id"] == event_id
    assert "Letta-Organization-Id" not in msg.headers
    assert json.loads(msg.data)["organization_id"] is None
    with pytest.raises(NotFoundError):
        await js.get_last_msg(settings.events_stream, "letta.agent.step.completed")


async def test_every_catalog_event_is_stored_on_its_subject(settings, nc, provisioned):
    js = provisioned
    publisher = EventPublisher(settings, nc)
    ids = {t: await publisher.publish_event("agent-1", t, data, strict=True) for t, data in CATALOG_SAMPLES.items()}
    for event_type, event_id in ids.items():
        msg = await js.get_last_msg(settings.events_stream, f"letta.{event_type}")
        assert msg.headers["Nats-Msg-Id"] == event_id
        assert json.loads(msg.data)["data"] == CATALOG_SAMPLES[event_type]
