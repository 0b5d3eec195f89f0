"""A crashed consumer loop is restarted: the dispatcher never stays alive while delivering nothing."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import REGISTRY

from bus.publisher import EventPublisher

RUN = {"run_id": "run-1", "status": "completed"}


async def test_a_crashed_sender_loop_restarts_and_delivers(settings, nc, store, receiver, dispatcher):
    await store.set_agent_webhook("agent-1", url=receiver.url("/h"))
    await dispatcher.endpoints.refresh()
    before = REGISTRY.get_sample_value("letta_bus_loop_restarts_total", {"loop": "sender"}) or 0.0
    sender = dispatcher.sender
    real_run = sender.run
    crashed = []

    async def crash_once(stop):  # the next start of the loop raises once, as a bug would
        if not crashed:
            crashed.append(True)
            raise RuntimeError("simulated bug in the sender loop")
        await real_run(stop)

    # Stop the running loop, then let the supervisor start the crashing one.
    sender.run = crash_once
    dispatcher._tasks[1].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await dispatcher._tasks[1]
    dispatcher._tasks[1] = asyncio.create_task(dispatcher._supervise("sender", sender.run))

    await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    (got,) = await receiver.wait_for(1, timeout_s=15)
    assert got.status == 200 and crashed
    assert REGISTRY.get_sample_value("letta_bus_loop_restarts_total", {"loop": "sender"}) == before + 1
