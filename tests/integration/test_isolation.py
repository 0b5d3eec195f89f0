"""A failing endpoint with a large retry backlog does not hold the sender's ack-pending window, so a healthy
endpoint's deliveries keep flowing. (Throughput figures are in bench/isolation.py; this checks the mechanism.)"""

from __future__ import annotations

import asyncio

import pytest

from bus.publisher import EventPublisher
from dispatcher.delivery.service import Dispatcher
from tests.helpers import wait_until

RUN = {"run_id": "run-1", "status": "completed"}

pytestmark = pytest.mark.slow  # about 40 s: the slow tier (make test-slow)


async def test_failing_endpoint_backlog_does_not_stall_a_healthy_one(settings, nc, dispatcher_nc, store, receiver,
                                                                     provisioned):
    # Retries of the failing endpoint are 60 s away: past nak_max_delay_s, so each goes out as a message schedule.
    settings = settings.model_copy(update={
        "retry_schedule_s": [60.0, 60.0], "max_ack_pending": 100, "circuit_failure_threshold": 10_000,
    })
    await store.set_agent_webhook("agent-down", url=receiver.url("/down"))
    await store.set_agent_webhook("agent-up", url=receiver.url("/up"))
    receiver.respond("/down", *[503] * 2000)
    d = Dispatcher(settings, dispatcher_nc, store)
    await d.start()
    try:
        publisher = EventPublisher(settings, nc)
        for start in range(0, 2000, 200):
            await asyncio.gather(*(publisher.publish_event("agent-down", "agent.run.completed", RUN, strict=True)
                                   for _ in range(start, start + 200)))
        await receiver.wait_for(2000, timeout_s=90, path="/down")
        js = nc.jetstream()
        await wait_until(lambda: _scheduled(js, settings, 2000), timeout_s=30)
        info = await js.consumer_info(settings.webhooks_stream, settings.sender_durable)
        assert info.num_ack_pending < settings.max_ack_pending, "retries waiting must not hold ack-pending slots"

        await asyncio.gather(*(publisher.publish_event("agent-up", "agent.run.completed", RUN, strict=True)
                               for _ in range(200)))
        up = await receiver.wait_for(200, timeout_s=30, path="/up")
        assert len({r.headers["webhook-id"] for r in up}) == 200
        assert len([r for r in receiver.received if r.path == "/down"]) == 2000, "no early retry"
    finally:
        await d.stop()


async def _scheduled(js, settings, n):
    info = await js.stream_info(settings.webhooks_stream, subjects_filter="letta_webhooks.schedules.>")
    return sum((info.state.subjects or {}).values()) >= n
