"""API fixtures on real parts: the test's nats-server, a migrated database (SQLite, and PostgreSQL when
LETTA_BUS_TEST_POSTGRES_URL is set: every API test runs on both), the running dispatcher, a real receiver, and
the FastAPI app reached through httpx's ASGITransport in the same event loop."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
import pytest

from bus.publisher import EventPublisher
from config.settings import Settings
from dispatcher.api.app import create_app
from dispatcher.api.context import ApiContext
from dispatcher.cli.receiver import Receiver
from dispatcher.delivery.service import Dispatcher
from dispatcher.store.database import Store

API_KEY = "lbk_test-key-0123456789abcdef"
STEP = {"step_id": "step-1", "status": "success", "run_id": "run-1"}


@dataclass
class Api:
    """Everything an API test touches."""

    client: httpx.AsyncClient  # authenticated
    anon: httpx.AsyncClient  # no Authorization header
    settings: Settings
    store: Store
    dispatcher: Dispatcher
    receiver: Receiver
    publisher: EventPublisher
    nc: object

    async def put_webhook(self, agent_id: str, path: str, **body) -> dict:
        """PUT an agent webhook to ``receiver.url(path)``; registers its secret with the receiver."""
        r = await self.client.put(f"/v1/agents/{agent_id}/webhook", json={"url": self.receiver.url(path), **body})
        assert r.status_code in (200, 201), r.text
        data = r.json()
        if data.get("secret") or body.get("secret"):
            self.receiver.secrets[path] = data.get("secret") or body["secret"]
        return data

    async def publish(self, agent_id: str, event_type: str = "agent.step.completed", data: dict | None = None,
                      organization_id: str | None = None) -> str:
        return await self.publisher.publish_event(agent_id, event_type, data or STEP,
                                                  organization_id=organization_id, strict=True)


@pytest.fixture
async def api(settings: Settings, db_url: str, nc, dispatcher_nc, provisioned, receiver) -> Api:
    """The app over a migrated database with a running dispatcher. The periodic endpoint refresh is 30 s, so
    endpoint changes reach the dispatcher only through change notices (or the API's own reload)."""
    settings = settings.model_copy(update={"database_url": db_url, "api_keys": [API_KEY], "endpoint_refresh_s": 30.0})
    store = Store.from_settings(settings)
    await store.upgrade_schema()
    dispatcher = Dispatcher(settings, dispatcher_nc, store)  # the dispatcher role, as in `letta-bus up`
    await dispatcher.start()
    ctx = ApiContext(settings, store, dispatcher_nc, api_keys=[API_KEY], dispatcher=dispatcher)
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://api",
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as client, \
            httpx.AsyncClient(transport=transport, base_url="http://api") as anon:
        try:
            yield Api(client, anon, settings, store, dispatcher, receiver, EventPublisher(settings, nc), nc)
        finally:
            await dispatcher.stop()
            await store.close()
