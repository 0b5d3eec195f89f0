"""Dead letters can be listed and sent again, with a full set of attempts on the same delivery."""

from __future__ import annotations

import json

from sqlalchemy import select

from bus.publisher import EventPublisher
from dispatcher.delivery.service import Dispatcher
from dispatcher.ops.dead_letters import list_dead_letters, resend
from dispatcher.store.models import Attempt, Delivery
from tests.helpers import wait_until

RUN = {"run_id": "run-1", "status": "completed"}


async def _delivery(store, status):
    async with store.session() as s:
        rows = (await s.execute(select(Delivery).where(Delivery.status == status))).scalars().all()
    return rows[0] if rows else None


async def test_list_and_resend_dead_letters(settings, nc, dispatcher_nc, store, receiver, provisioned):
    settings = settings.model_copy(update={"retry_schedule_s": [0.1]})
    endpoint, _ = await store.set_agent_webhook("agent-1", url=receiver.url("/h"))
    receiver.respond("/h", 500, 500, 500)  # two attempts fail, then the resend: one more 500, then a 200
    d = Dispatcher(settings, dispatcher_nc, store)
    await d.start()
    try:
        js = nc.jetstream()
        event_id = await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN,
                                                                    strict=True)
        await wait_until(lambda: _delivery(store, "failed"))
        letters = await wait_until(lambda: list_dead_letters(js, settings))
        (letter,) = letters
        assert letter.task.endpoint_id == endpoint.id and letter.task.event_id == event_id
        assert letter.attempts == 2 and "500" in letter.last_error
        assert json.loads(letter.body)["event_id"] == event_id
        assert await list_dead_letters(js, settings, "ep_other") == []

        assert await resend(js, settings, letters) == 1
        assert await list_dead_letters(js, settings) == [], "a resent dead letter leaves the dead-letter subject"
        row = await wait_until(lambda: _delivery(store, "succeeded"))
        assert row.attempts == 4 and row.event_id == event_id
        async with store.session() as s:
            numbers = [(a.number, a.status_code) for a in
                       (await s.execute(select(Attempt).order_by(Attempt.number))).scalars()]
        assert numbers == [(1, 500), (2, 500), (3, 500), (4, 200)]
        assert {r.headers["webhook-id"] for r in receiver.received} == {event_id}
    finally:
        await d.stop()
