"""Parked backlogs (dispatcher/delivery/parking.py): a dead endpoint's tasks wait in LETTA_PARKED behind a paused
durable, cost O(1) per cool-down, drain after one successful probe, and become recoverable ``failed`` deliveries
with dead letters when the endpoint is disabled. Real nats-server, real receiver, compressed time."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from nats.js.errors import NotFoundError

from bus.publisher import EventPublisher
from dispatcher.delivery.parking import consumer_name
from dispatcher.delivery.service import Dispatcher
from dispatcher.ops.dead_letters import list_dead_letters, resend
from dispatcher.ops.manual_retry import retry_failed
from dispatcher.store.models import DeliveryStatus
from tests.helpers import deliveries, wait_until

RUN = {"run_id": "run-1", "status": "completed"}
N = 40


def _compressed(settings, **more):
    return settings.model_copy(update={
        "circuit_failure_threshold": 2, "circuit_cooldown_s": 0.5, "circuit_max_cooldown_s": 1.0,
        "retry_schedule_s": [0.1] * 8, "max_attempts": 10, "endpoint_idle_evict_s": 0.5, **more,
    })


async def _publish(publisher, agent_id, n):
    await asyncio.gather(*(publisher.publish_event(agent_id, "agent.run.completed", RUN, strict=True)
                           for _ in range(n)))


async def _parked_count(js, settings, endpoint_id) -> int:
    subject = f"{settings.parked_subject_prefix}.{endpoint_id}"
    info = await js.stream_info(settings.parked_stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def _consumer_gone(js, settings, endpoint_id) -> bool:
    try:
        await js.consumer_info(settings.parked_stream, consumer_name(endpoint_id))
    except NotFoundError:
        return True
    return False


async def test_dead_endpoint_is_parked_paused_and_drains_once_after_recovery(settings, nc, dispatcher_nc, store,
                                                                              receiver, provisioned):
    settings = _compressed(settings)
    down, _ = await store.set_agent_webhook("agent-down", url=receiver.url("/down"))
    await store.set_agent_webhook("agent-up", url=receiver.url("/up"))
    receiver.fail_for("/down", 3600, status=503)
    d = Dispatcher(settings, dispatcher_nc, store)
    await d.start()
    js = nc.jetstream()
    try:
        publisher = EventPublisher(settings, nc)
        await _publish(publisher, "agent-down", N)
        await wait_until(lambda: _parked_count(js, settings, down.id), timeout_s=20, what="backlog parked")
        await wait_until(lambda: d.sender.parked >= N, timeout_s=20, what=f"{N} tasks parked")
        info = await js.consumer_info(settings.parked_stream, consumer_name(down.id))
        assert info.config.filter_subject == f"{settings.parked_subject_prefix}.{down.id}"

        # while it stays down: per cool-down (0.5 s doubling to 1 s) at most one probe and no re-publish
        async def paused():
            i = await js.consumer_info(settings.parked_stream, consumer_name(down.id))
            return i.paused
        await wait_until(paused, timeout_s=5, what="parked consumer paused")
        hits = len([r for r in receiver.received if r.path == "/down"])
        parked, rescheduled = d.sender.parked, d.rescheduler.rescheduled
        await _publish(publisher, "agent-up", N)  # healthy traffic meanwhile
        await receiver.wait_for(N, timeout_s=20, path="/up")
        await asyncio.sleep(4.0)  # a window of at least 4 cool-downs (1 s each at most)
        probes = len([r for r in receiver.received if r.path == "/down"]) - hits
        assert 1 <= probes <= 6, f"{probes} attempts in 4 s: must be about one per cool-down"
        assert d.rescheduler.rescheduled == rescheduled, "no schedule re-publish while parked"
        assert d.sender.parked - parked <= probes, "only a failed probe is parked again"
        assert await _parked_count(js, settings, down.id) >= N - 1

        receiver.fail_for("/down", 0)  # recovers: the next probe succeeds and the backlog drains
        await wait_until(lambda: _consumer_gone(js, settings, down.id), timeout_s=20, what="consumer deleted")
        ok = [r.headers["webhook-id"] for r in receiver.received if r.path == "/down" and r.status == 200]
        assert len(ok) == N and len(set(ok)) == N, "every parked task delivered once"
        assert await _parked_count(js, settings, down.id) == 0, "drained subject purged"
        rows = await deliveries(store, endpoint_id=down.id)
        assert len(rows) == N and {r.status for r in rows} == {DeliveryStatus.SUCCEEDED}
        up = {r.headers["webhook-id"] for r in receiver.received if r.path == "/up"}
        assert len(up) == N
    finally:
        await d.stop()


async def test_disable_makes_the_parked_backlog_recoverable_failed_deliveries(settings, nc, dispatcher_nc, store,
                                                                             receiver, provisioned):
    settings = _compressed(settings, disable_after_s=2.0, disable_after_failures=2)
    down, _ = await store.set_agent_webhook("agent-down", url=receiver.url("/down"))
    receiver.fail_for("/down", 3600, status=503)
    d = Dispatcher(settings, dispatcher_nc, store)
    await d.start()
    js = nc.jetstream()
    try:
        publisher = EventPublisher(settings, nc)
        await _publish(publisher, "agent-down", N)

        async def all_failed():
            rows = await deliveries(store, endpoint_id=down.id)
            return len(rows) == N and all(r.status == DeliveryStatus.FAILED for r in rows)
        await wait_until(all_failed, timeout_s=30, what="every delivery failed after disable")
        endpoint = await store.get_endpoint(down.id)
        assert not endpoint.enabled
        await wait_until(lambda: _consumer_gone(js, settings, down.id), timeout_s=10, what="consumer deleted")
        letters = await list_dead_letters(js, settings, down.id)
        assert len({dl.task.delivery_id for dl in letters}) == N, "one dead letter per undelivered task"
        assert await _parked_count(js, settings, down.id) == 0

        # the owner fixes the endpoint and re-enables it; retry-failed brings every one back
        receiver.fail_for("/down", 0)
        await store.update_endpoint(down.id, enabled=True)
        await d.endpoints.refresh()
        since = datetime.now(timezone.utc) - timedelta(hours=1)
        result = await retry_failed(js, settings, store, agent_id="agent-down", since=since)
        assert result.queued == N, result.refused
        await wait_until(lambda: len({r.headers["webhook-id"] for r in receiver.received
                                      if r.path == "/down" and r.status == 200}) == N, timeout_s=20,
                         what="every retried delivery received")
        rows = await deliveries(store, endpoint_id=down.id)
        await wait_until(lambda: _all(store, down.id, DeliveryStatus.SUCCEEDED), timeout_s=10, what="rows")
        assert len(rows) == N
    finally:
        await d.stop()


async def _all(store, endpoint_id, status) -> bool:
    return all(r.status == status for r in await deliveries(store, endpoint_id=endpoint_id))


async def test_tasks_of_a_disabled_endpoint_are_failed_dead_letters_resend_brings_them_back(
        settings, nc, dispatcher_nc, store, receiver, provisioned):
    # retries 1 s apart, circuit kept closed: the owner disables the endpoint while its tasks wait for a retry
    settings = _compressed(settings, retry_schedule_s=[1.0] * 8, circuit_failure_threshold=100)
    ep, _ = await store.set_agent_webhook("agent-off", url=receiver.url("/off"))
    receiver.respond("/off", *[503] * 5)
    d = Dispatcher(settings, dispatcher_nc, store)
    await d.start()
    js = nc.jetstream()
    try:
        await _publish(EventPublisher(settings, nc), "agent-off", 5)
        await receiver.wait_for(5, timeout_s=10, path="/off")
        await store.update_endpoint(ep.id, enabled=False)
        await d.endpoints.refresh()
        await wait_until(lambda: _all_n(store, ep.id, DeliveryStatus.FAILED, 5), timeout_s=10, what="failed")
        letters = await wait_until(lambda: _letters(js, settings, ep.id, 5), timeout_s=10, what="dead letters")
        assert all("disabled" in dl.last_error for dl in letters)
        assert len(receiver.received) == 5, "no request to a disabled endpoint"

        await store.update_endpoint(ep.id, enabled=True)
        await d.endpoints.refresh()
        assert await resend(js, settings, letters) == 5
        await receiver.wait_for(10, timeout_s=10, path="/off")
        await wait_until(lambda: _all_n(store, ep.id, DeliveryStatus.SUCCEEDED, 5), timeout_s=10, what="ok")
    finally:
        await d.stop()


async def _all_n(store, endpoint_id, status, n) -> bool:
    rows = await deliveries(store, endpoint_id=endpoint_id)
    return len(rows) == n and all(r.status == status for r in rows)


async def _letters(js, settings, endpoint_id, n):
    letters = await list_dead_letters(js, settings, endpoint_id)
    return letters if len(letters) >= n else None


async def test_a_backlog_parked_by_a_stopped_process_is_adopted_and_drained(settings, nc, dispatcher_nc, store,
                                                                            receiver, provisioned):
    settings = _compressed(settings)
    ep, _ = await store.set_agent_webhook("agent-orphan", url=receiver.url("/orphan"))
    receiver.fail_for("/orphan", 3600, status=503)
    js = nc.jetstream()
    first = Dispatcher(settings, dispatcher_nc, store)
    await first.start()
    try:
        await _publish(EventPublisher(settings, nc), "agent-orphan", 10)
        await wait_until(lambda: first.sender.parked >= 10, timeout_s=20, what="backlog parked")
    finally:
        await first.stop()  # its drainer ends with it; the backlog and its paused durable stay
    assert await _parked_count(js, settings, ep.id) >= 9
    receiver.fail_for("/orphan", 0)
    second = Dispatcher(settings, dispatcher_nc, store)  # no park of its own: it finds the backlog by its scan
    await second.start()
    try:
        await wait_until(lambda: _consumer_gone(js, settings, ep.id), timeout_s=20, what="consumer deleted")
        ok = {r.headers["webhook-id"] for r in receiver.received if r.path == "/orphan" and r.status == 200}
        assert len(ok) == 10
        assert second.sender.parked == 0 and second.parking.probes >= 1
        assert await _parked_count(js, settings, ep.id) == 0
    finally:
        await second.stop()


async def test_idle_gates_and_full_rate_limiters_are_evicted(settings, nc, dispatcher_nc, store, receiver,
                                                             provisioned):
    settings = _compressed(settings, agent_rate_limit_per_s=100.0)
    await store.set_agent_webhook("agent-idle", url=receiver.url("/idle"))
    d = Dispatcher(settings, dispatcher_nc, store)
    await d.start()
    try:
        await _publish(EventPublisher(settings, nc), "agent-idle", 3)
        await receiver.wait_for(3, timeout_s=10, path="/idle")
        await wait_until(lambda: d.sender.evicted >= 2, timeout_s=5, what="gate and limiter evicted")
        assert not d.sender.gates and not d.sender.limiters
    finally:
        await d.stop()
