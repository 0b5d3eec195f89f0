"""An event published on JetStream reaches a real HTTP receiver, signed, exactly as published."""

from __future__ import annotations

import hashlib
import hmac
import json

from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

from bus.publisher import EventPublisher
from dispatcher.delivery.tasks import delivery_id
from dispatcher.store.models import Attempt, Delivery
from tests.helpers import wait_until

STEP = {
    "step_id": "step-6f1c2a4e-1b7d-4c55-9f0e-2b1f3c4d5e6f",
    "status": "success",
    "run_id": "run-0b7e4c1a-2d3f-4e5a-8b9c-0d1e2f3a4b5c",
    "usage": {"completion_tokens": 42, "prompt_tokens": 1200, "total_tokens": 1242, "step_count": 1},
    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "send_message", "arguments": "{}"}}],
    "model": "gpt-4o-mini",  # not in the catalog schema: must pass through
}


async def test_step_completed_reaches_receiver_signed(settings, nc, store, receiver, dispatcher, provisioned):
    endpoint, secret = await store.set_agent_webhook("agent-1", url=receiver.url("/hook"))
    assert secret and secret.startswith("whsec_")
    receiver.secrets["/hook"] = secret
    await dispatcher.endpoints.refresh()

    publisher = EventPublisher(settings, nc)
    event_id = await publisher.publish_event("agent-1", "agent.step.completed", STEP, organization_id="org-1")
    assert event_id and event_id.startswith("evt_")

    (got,) = await receiver.wait_for(1, timeout_s=10)
    stored = await provisioned.get_last_msg(settings.events_stream, "letta.agent.step.completed")
    assert got.body == stored.data, "the webhook body is the envelope bytes exactly as published"
    envelope = json.loads(got.body)
    assert list(envelope) == ["event_id", "event_type", "timestamp", "agent_id", "organization_id", "data"]
    assert envelope["event_id"] == event_id and envelope["data"] == STEP

    h = got.headers
    assert h["Content-Type"] == "application/json"
    assert h["User-Agent"] == "Letta-Webhook/1.0"
    assert h["X-Letta-Event"] == "agent.step.completed"
    assert h["X-Letta-Delivery"] == delivery_id(event_id, endpoint.id)
    assert h["webhook-id"] == event_id
    # X-Letta-Signature with plain hmac, keyed with the secret string's bytes
    expected = "sha256=" + hmac.new(secret.encode(), got.body, hashlib.sha256).hexdigest()
    assert h["X-Letta-Signature"] == expected
    # Standard Webhooks with the reference package, given the secret as is
    assert Webhook(secret).verify(got.body, {k.lower(): v for k, v in h.items()}) == envelope
    assert got.letta_verified and got.standard_verified

    async def delivered():
        async with store.session() as s:
            return (await s.execute(select(Delivery).where(Delivery.status == "succeeded"))).scalars().all()

    (row,) = await wait_until(delivered)
    assert (row.event_id, row.endpoint_id, row.agent_id, row.attempts) == (event_id, endpoint.id, "agent-1", 1)
    async with store.session() as s:
        (attempt,) = (await s.execute(select(Attempt))).scalars().all()
    assert attempt.delivery_id == row.id and attempt.status_code == 200 and attempt.number == 1


async def test_user_supplied_secret_signs_with_its_utf8_bytes(settings, nc, store, receiver, dispatcher):
    secret = "my-own-secret-0123456789"
    _, generated = await store.set_agent_webhook("agent-1", url=receiver.url("/hook"), secret=secret)
    assert generated is None
    await dispatcher.endpoints.refresh()
    await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed",
                                                     {"run_id": "run-1", "status": "completed"}, strict=True)
    (got,) = await receiver.wait_for(1, timeout_s=10)
    headers = {k.lower(): v for k, v in got.headers.items()}
    assert Webhook(secret.encode()).verify(got.body, headers)["event_type"] == "agent.run.completed"
    assert got.headers["X-Letta-Signature"] == "sha256=" + hmac.new(secret.encode(), got.body, "sha256").hexdigest()
