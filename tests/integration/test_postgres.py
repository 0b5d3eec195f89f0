"""The dispatcher's store and history writer on PostgreSQL (the production database)."""

from __future__ import annotations

from sqlalchemy import select

from bus.publisher import EventPublisher
from dispatcher.delivery.service import Dispatcher
from dispatcher.store.database import Store
from dispatcher.store.models import Attempt, Delivery
from tests.helpers import wait_until
from tests.integration.test_end_to_end import STEP


async def test_delivery_history_on_postgres(settings, nc, dispatcher_nc, provisioned, receiver, postgres_url):
    settings = settings.model_copy(update={"database_url": postgres_url})
    store = Store.from_settings(settings, postgres_url)
    await store.create_schema()
    dispatcher = Dispatcher(settings, dispatcher_nc, store)
    try:
        endpoint, secret = await store.set_agent_webhook("agent-pg", url=receiver.url("/pg"))
        receiver.secrets["/pg"] = secret
        receiver.respond("/pg", 503)
        await dispatcher.start()
        publisher = EventPublisher(settings, nc)
        event_ids = [await publisher.publish_event("agent-pg", "agent.step.completed", STEP, strict=True)
                     for _ in range(3)]
        await receiver.wait_for(4, timeout_s=15, path="/pg")

        async def all_succeeded():
            async with store.session() as s:
                rows = (await s.execute(select(Delivery))).scalars().all()
            return rows if len(rows) == 3 and all(r.status == "succeeded" for r in rows) else None

        rows = await wait_until(all_succeeded)
        assert sorted(r.event_id for r in rows) == sorted(event_ids)
        assert sorted(r.attempts for r in rows) == [1, 1, 2]
        async with store.session() as s:
            codes = sorted((a.number, a.status_code) for a in (await s.execute(select(Attempt))).scalars())
        assert codes == [(1, 200), (1, 200), (1, 503), (2, 200)]
        assert all(r.letta_verified and r.standard_verified for r in receiver.received)
    finally:
        await dispatcher.stop()
        await store.close()
