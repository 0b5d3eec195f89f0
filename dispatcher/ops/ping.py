"""Ping an endpoint: send a ``webhook.test`` event to it through the real sender and report the attempt
(``POST .../test`` in the API, ``letta-bus webhooks test`` in the CLI).

The test event is a normal envelope (``event_type`` ``webhook.test``, ``data`` naming the endpoint) published as
a delivery task straight onto ``letta_webhooks.deliveries.<endpoint_id>``: the running dispatcher signs and POSTs
it like any delivery and records the attempt. It does not go through ``LETTA_EVENTS``, so it reaches the endpoint
whatever its ``webhook_events`` filter is, and no other endpoint or internal subscriber sees it. Its delivery row
has no stream sequence (it cannot be retried; send another test).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nats.js import JetStreamContext
from sqlalchemy import select

from bus.envelope import Envelope, decode_head, encode, utc_timestamp
from bus.ids import new_event_id
from config.settings import Settings
from dispatcher.delivery.tasks import H_EVENT_SEQ, delivery_id, task_headers
from dispatcher.store.database import Store
from dispatcher.store.models import Attempt, Delivery, Endpoint

TEST_EVENT_TYPE = "webhook.test"


@dataclass
class TestOutcome:
    """What the attempt gave. ``status``: the delivery status after it (``succeeded``, ``retrying``, ``failed``,
    ``skipped``) or ``timeout`` when no attempt was recorded within the wait; ``duration_ms`` in milliseconds."""

    __test__ = False  # not a pytest test class

    delivery_id: str
    event_id: str
    status: str
    status_code: int | None = None
    duration_ms: float | None = None
    error: str | None = None
    response_excerpt: str | None = None


def test_envelope(endpoint: Endpoint) -> Envelope:
    """The ``webhook.test`` event for ``endpoint``; its ``agent_id`` is the endpoint's agent (or ``webhook-test``
    for organization and global endpoints)."""
    return Envelope(
        event_id=new_event_id(), event_type=TEST_EVENT_TYPE, timestamp=utc_timestamp(),
        agent_id=endpoint.agent_id or "webhook-test", organization_id=endpoint.organization_id or None,
        data={"endpoint_id": endpoint.id, "message": "letta-bus test event: your endpoint receives webhooks"},
    )


async def send_test(js: JetStreamContext, settings: Settings, store: Store, endpoint: Endpoint,
                    wait_s: float | None = None) -> TestOutcome:
    """Queue a test delivery to ``endpoint`` and wait up to ``wait_s`` seconds (default
    ``webhook_test_wait_s``) for its first attempt. Raises ``nats.errors.Error`` when the task cannot be queued."""
    body = encode(test_envelope(endpoint))
    head = decode_head(body)
    headers = task_headers(head, endpoint.id, 0)
    del headers[H_EVENT_SEQ]
    await js.publish(settings.delivery_subject(endpoint.id), body, headers=headers,
                     timeout=settings.publish_timeout_s)
    did = delivery_id(head.event_id, endpoint.id)
    return await wait_for_attempt(store, did, head.event_id, wait_s or settings.webhook_test_wait_s)


async def wait_for_attempt(store: Store, did: str, event_id: str, wait_s: float) -> TestOutcome:
    """Poll (every 50 ms, at most ``wait_s`` seconds) for the first attempt of delivery ``did``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        async with store.session() as s:
            attempt = (await s.execute(select(Attempt).where(Attempt.delivery_id == did)
                                       .order_by(Attempt.number).limit(1))).scalar_one_or_none()
            delivery = await s.get(Delivery, did) if attempt is not None else None
        if attempt is not None:
            return TestOutcome(delivery_id=did, event_id=event_id, status=delivery.status if delivery else "unknown",
                               status_code=attempt.status_code, duration_ms=attempt.duration_ms, error=attempt.error,
                               response_excerpt=attempt.response_excerpt)
        if loop.time() >= deadline:
            return TestOutcome(delivery_id=did, event_id=event_id, status="timeout",
                               error=f"no attempt recorded within {wait_s:g} s: is a dispatcher running? (the "
                               "endpoint's circuit may be open, or it is busy)")
        await asyncio.sleep(0.05)
