"""Trace context travels from the publisher to the webhook POST; every attempt is counted and logged once."""

from __future__ import annotations

import json
import logging

from prometheus_client import REGISTRY

from bus.publisher import EventPublisher

RUN = {"run_id": "run-1", "status": "completed"}
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _count(outcome: str) -> float:
    return REGISTRY.get_sample_value("letta_bus_deliveries_total", {"outcome": outcome}) or 0.0


async def test_traceparent_reaches_the_webhook(settings, nc, store, receiver, dispatcher, provisioned):
    await store.set_agent_webhook("agent-1", url=receiver.url("/h"))
    await dispatcher.endpoints.refresh()
    await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN,
                                                     traceparent=TRACEPARENT, strict=True)
    (got,) = await receiver.wait_for(1, timeout_s=10)
    assert got.headers["traceparent"] == TRACEPARENT
    stored = await provisioned.get_last_msg(settings.events_stream, "letta.agent.run.completed")
    assert stored.headers["traceparent"] == TRACEPARENT


async def test_each_attempt_is_counted_and_logged(settings, nc, store, receiver, dispatcher, caplog):
    await store.set_agent_webhook("agent-1", url=receiver.url("/h"))
    receiver.respond("/h", 500)
    await dispatcher.endpoints.refresh()
    before = {o: _count(o) for o in ("retrying", "succeeded")}
    with caplog.at_level(logging.INFO, logger="letta_bus.attempts"):
        event_id = await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN,
                                                                    strict=True)
        await receiver.wait_for(2, timeout_s=10)
        await dispatcher.history.stop()  # flush: the record (and its log line) is written before the ack
    assert _count("retrying") == before["retrying"] + 1
    assert _count("succeeded") == before["succeeded"] + 1
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "letta_bus.attempts"]
    assert [(line["attempt"], line["outcome"], line["status_code"]) for line in lines] == [
        (1, "retrying", 500), (2, "succeeded", 200)]
    assert {line["event_id"] for line in lines} == {event_id}
