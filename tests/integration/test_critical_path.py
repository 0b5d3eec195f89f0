"""What must never decide whether a delivery happens: a stale endpoint view (issue 10, finding 6) and the endpoint
health bookkeeping during a database outage (finding 3)."""

from __future__ import annotations

from bus.envelope import EnvelopeHead, decode_head
from bus.publisher import EventPublisher
from config.settings import Settings
from dispatcher.delivery.endpoints import EndpointCache
from dispatcher.delivery.health import EndpointHealth
from dispatcher.delivery.service import Dispatcher
from dispatcher.delivery.tasks import delivery_id, task_headers
from dispatcher.delivery.webhook_http import _Attempt
from dispatcher.store.database import Store
from tests.helpers import attempts, closed_port, deliveries, endpoint_row, wait_until

RUN = {"run_id": "run-1", "status": "completed"}


async def test_a_task_for_an_endpoint_this_process_has_not_loaded_is_delivered(settings, nc, dispatcher_nc, store,
                                                                                receiver, provisioned):
    # This process reloads endpoints once an hour; another process's fan-out already routed to a new endpoint.
    settings = settings.model_copy(update={"endpoint_refresh_s": 3600.0})
    d = Dispatcher(settings, dispatcher_nc, store)
    await d.start()
    try:
        endpoint, _ = await store.set_agent_webhook("agent-new", url=receiver.url("/new"))
        assert d.endpoints.get(endpoint.id) is None
        head = await _task(nc, settings, "agent-new", endpoint.id)
        (got,) = await receiver.wait_for(1, timeout_s=10, path="/new")
        assert got.headers["webhook-id"] == head.event_id
        await wait_until(lambda: _status(store, head.event_id, endpoint.id, "succeeded"), timeout_s=10)

        await store.delete_endpoint(endpoint.id)  # and one deleted for good is still skipped, with the reason
        d.endpoints._by_id.pop(endpoint.id)  # noqa: SLF001 - as a reload would
        head = await _task(nc, settings, "agent-new", endpoint.id)
        await wait_until(lambda: _status(store, head.event_id, endpoint.id, "skipped"), timeout_s=10)
        (row,) = await deliveries(store, id=delivery_id(head.event_id, endpoint.id))
        assert row.last_error == "endpoint deleted"
    finally:
        await d.stop()


async def test_health_writes_wait_out_a_database_outage_without_failing_the_attempt(settings, nc, store, tmp_path):
    endpoint, _ = await store.set_agent_webhook("agent-h", url="http://127.0.0.1:9/x")
    cache = EndpointCache(store)
    await cache.refresh()
    view = cache.get(endpoint.id)
    down = Store(f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/test", secret_box=store.secret_box)
    health = EndpointHealth(down, nc.jetstream(), settings, cache)
    try:
        health.failed(view)  # before: raised here, before the attempt was recorded or settled
        health.disable(view, "answered 410 Gone")
        assert not cache.get(endpoint.id).enabled, "routing stops at once, database or not"
        assert not await health.flush()
        assert health.pending() == 1 and health.write_failures == 1
        health.store = store  # the database is back
        assert await health.flush() and health.pending() == 0
    finally:
        await down.close()
    row = await endpoint_row(store, endpoint.id)
    assert not row.enabled and row.disabled_reason == "answered 410 Gone"


async def test_a_local_error_is_retried_without_counting_against_the_endpoint(settings, nc, dispatcher_nc, store,
                                                                              receiver, provisioned):
    # The process's one connection (http_max_connections=1) is taken, as by other POSTs in flight: the victim's
    # POST finds none within http_timeout_s. That is this process's limit, not the endpoint's failure.
    settings = settings.model_copy(update={"http_max_connections": 1, "http_timeout_s": 1.0,
                                           "circuit_failure_threshold": 1, "retry_schedule_s": [0.5, 0.5, 0.5]})
    victim, _ = await store.set_agent_webhook("agent-victim", url=receiver.url("/victim"))
    d = Dispatcher(settings, dispatcher_nc, store)
    await d.start()
    try:
        await d.http._take_slot(_Attempt())  # noqa: SLF001 - hold the only connection slot
        event_id = await EventPublisher(settings, nc).publish_event("agent-victim", "agent.run.completed", RUN)
        dlv = delivery_id(event_id, victim.id)
        await wait_until(lambda: _status(store, event_id, victim.id, "retrying"), timeout_s=10)
        (first,) = await attempts(store, dlv)
        assert first.error.startswith("local error, not the endpoint's: no connection slot"), first.error
        # a circuit that opens after one failure stayed closed, and no failure clock started
        assert d.sender.gates[victim.id].consecutive_failures == 0
        assert d.health.pending() == 0 and (await endpoint_row(store, victim.id)).failing_since is None
        d.http._give_slot()  # noqa: SLF001 - the connection is free again: the retry goes out
        await receiver.wait_for(1, timeout_s=10, path="/victim")
        await wait_until(lambda: _status(store, event_id, victim.id, "succeeded"), timeout_s=10)
    finally:
        await d.stop()


async def _task(nc, settings: Settings, agent_id: str, endpoint_id: str) -> EnvelopeHead:
    """Publish an event and, as another dispatcher's fan-out would, its delivery task for ``endpoint_id``."""
    js = nc.jetstream()
    event_id = await EventPublisher(settings, nc).publish_event(agent_id, "agent.run.completed", RUN)
    stored = await js.get_last_msg(settings.events_stream, "letta.agent.run.completed")
    head = decode_head(stored.data)
    assert head.event_id == event_id
    await js.publish(settings.delivery_subject(endpoint_id), stored.data,
                     headers=task_headers(head, endpoint_id, stored.seq))
    return head


async def _status(store: Store, event_id: str, endpoint_id: str, status: str) -> bool:
    rows = await deliveries(store, id=delivery_id(event_id, endpoint_id))
    return bool(rows) and rows[0].status == status
