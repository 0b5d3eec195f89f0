"""Endpoint changes applied incrementally (issue 11): a dispatcher loads its endpoint view once, then applies each
change by id from the change notice, reconciles by ``updated_at`` and tombstones when a notice is lost, survives a
secret no key decrypts, and builds a large view in slices that leave the event loop to other tasks."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import pytest
from sqlalchemy import insert, select, update

from bus.envelope import EnvelopeHead
from bus.publisher import EventPublisher
from dispatcher.delivery import metrics
from dispatcher.delivery.control import announce_change
from dispatcher.delivery.endpoints import EndpointCache
from dispatcher.delivery.service import Dispatcher
from dispatcher.store.database import Store
from dispatcher.store.models import Endpoint, EndpointTombstone, utcnow
from dispatcher.store.secrets import SecretBox, generate_key, generate_secret
from tests.helpers import deliveries, endpoint_row, wait_until

STEP = {"step_id": "step-1", "status": "success", "run_id": "run-1"}


@pytest.fixture(params=["sqlite", "postgres"])
def pg_url(request) -> str | None:
    """None for SQLite, or a fresh PostgreSQL database (skipped unless LETTA_BUS_TEST_POSTGRES_URL is set)."""
    return request.getfixturevalue("postgres_url") if request.param == "postgres" else None


@pytest.fixture
async def any_store(pg_url, store):
    """The test's SQLite store, or a PostgreSQL one."""
    if pg_url is None:
        yield store
        return
    pg = Store(pg_url, secret_box=store.secret_box, ssrf_allow_cidrs=store.ssrf_allow_cidrs)
    await pg.create_schema()
    yield pg
    await pg.close()


async def _publish(settings, nc, agent_id: str) -> str:
    return await EventPublisher(settings, nc).publish_event(agent_id, "agent.step.completed", STEP, strict=True)


async def test_a_second_dispatcher_applies_each_change_by_id_without_reloading(settings, nc, dispatcher_nc, store,
                                                                               receiver, provisioned):
    # Reconciliation once an hour: only the change notice can bring these changes in time.
    settings = settings.model_copy(update={"endpoint_refresh_s": 3600.0})
    subject = settings.control_subject
    d = Dispatcher(settings, dispatcher_nc, store)
    await d.start()
    try:
        endpoint, _ = await store.set_agent_webhook("agent-a", url=receiver.url("/v1"))
        await announce_change(nc, subject, endpoint.id, "created")
        await wait_until(lambda: d.endpoints.get(endpoint.id) is not None, 5, what="created endpoint applied")
        await _publish(settings, nc, "agent-a")
        await receiver.wait_for(1, timeout_s=10, path="/v1")

        await store.update_endpoint(endpoint.id, url=receiver.url("/v2"))
        await announce_change(nc, subject, endpoint.id, "updated")
        await wait_until(lambda: d.endpoints.get(endpoint.id).url.endswith("/v2"), 5, what="new URL applied")
        assert [v.url for v in d.endpoints.match(_head("agent-a"))] == [receiver.url("/v2")], "re-routed"
        await _publish(settings, nc, "agent-a")
        await receiver.wait_for(1, timeout_s=10, path="/v2")

        await store.delete_endpoint(endpoint.id)
        await announce_change(nc, subject, endpoint.id, "deleted")
        await wait_until(lambda: d.endpoints.get(endpoint.id) is None, 5, what="deleted endpoint removed")
        assert d.endpoints.match(_head("agent-a")) == []
        assert d.endpoints.full_loads == 1, "one full load, at start; every change applied by id"
        assert d.changes.applied >= 3
    finally:
        await d.stop()


async def test_reconciliation_finds_changes_whose_notice_was_lost(any_store):
    store = any_store
    cache = EndpointCache(store, refresh_s=0.1)
    await cache.refresh()
    runner = asyncio.create_task(cache.run())
    try:
        endpoint, _ = await store.set_agent_webhook("agent-b", url="http://127.0.0.1:9/b1")  # no notice anywhere
        await wait_until(lambda: cache.get(endpoint.id) is not None, 5, what="created endpoint reconciled")
        await store.update_endpoint(endpoint.id, url="http://127.0.0.1:9/b2", events=["agent.run.*"])
        await wait_until(lambda: cache.get(endpoint.id).url.endswith("/b2"), 5, what="update reconciled")
        assert cache.get(endpoint.id).events == ("agent.run.*",)
        assert await store.delete_agent_webhook("agent-b") is not None
        await wait_until(lambda: cache.get(endpoint.id) is None, 5, what="deletion reconciled (tombstone)")
        async with store.session() as s:
            assert (await s.get(EndpointTombstone, endpoint.id)) is not None, "written with the deletion"
        assert cache.full_loads == 1 and cache.reconciles >= 3
    finally:
        runner.cancel()


async def test_reconciliation_overlap_covers_a_write_stamped_before_the_last_pass(any_store):
    """A writer stamps ``updated_at`` before it commits; a reconciliation that ran in between must not move past it."""
    store = any_store
    cache = EndpointCache(store, refresh_s=3600, overlap_s=10.0)
    await cache.refresh()
    endpoint, _ = await store.set_agent_webhook("agent-c", url="http://127.0.0.1:9/c1")
    await cache.refresh()
    assert cache.get(endpoint.id) is not None
    late = utcnow() - timedelta(seconds=5)  # stamped 5 s ago, committed only now (slow commit, skewed clock)
    async with store.session.begin() as s:
        await s.execute(update(Endpoint).where(Endpoint.id == endpoint.id)
                        .values(url="http://127.0.0.1:9/c2", updated_at=late))
    await cache.refresh()
    assert cache.get(endpoint.id).url.endswith("/c2")
    assert cache.full_loads == 1


async def test_an_undecryptable_secret_disables_that_endpoint_alone(settings, nc, dispatcher_nc, store, receiver,
                                                                    provisioned, caplog):
    good, _ = await store.set_agent_webhook("agent-good", url=receiver.url("/good"))
    bad, _ = await store.set_agent_webhook("agent-bad", url=receiver.url("/bad"))
    foreign = SecretBox([generate_key()]).encrypt(generate_secret())  # a key this installation does not have
    async with store.session.begin() as s:
        await s.execute(update(Endpoint).where(Endpoint.id == bad.id).values(secret=foreign))
    before = metrics.ENDPOINT_SECRETS_UNDECRYPTABLE._value.get()  # noqa: SLF001 - prometheus_client has no getter

    d = Dispatcher(settings, dispatcher_nc, store)
    await d.start()  # the old cache raised SecretKeyError here: no view, no dispatcher
    try:
        assert d.endpoints.get(bad.id) is not None and d.endpoints.get(good.id) is not None
        with caplog.at_level(logging.ERROR, logger="dispatcher.delivery.endpoints"):
            await _publish(settings, nc, "agent-bad")
            await _publish(settings, nc, "agent-good")
            await receiver.wait_for(1, timeout_s=10, path="/good")
            row = await wait_until(lambda: _disabled(store, bad.id), 10, what="undecryptable endpoint disabled")
        assert "LETTA_BUS_SECRET_KEYS" in row.disabled_reason and "new secret" in row.disabled_reason
        assert not d.endpoints.get(bad.id).enabled and d.endpoints.signer(d.endpoints.get(bad.id)) is None
        assert d.endpoints.match(_head("agent-bad")) == [], "no more tasks routed to it"
        assert metrics.ENDPOINT_SECRETS_UNDECRYPTABLE._value.get() == before + 1  # noqa: SLF001 - once, not per send
        assert any(bad.id in r.getMessage() and "LETTA_BUS_SECRET_KEYS" in r.getMessage() for r in caplog.records
                   if r.levelno == logging.ERROR)
        assert [r for r in receiver.received if r.path == "/bad"] == []
        assert (await endpoint_row(store, good.id)).enabled
        # its delivery is not lost: failed, with a dead letter, for retry-failed once the key is back
        (row,) = await wait_until(lambda: _failed(store, bad.id), 10, what="the delivery failed, recoverably")
        assert "cannot be decrypted" in row.last_error
        subject = settings.dead_letter_subject(bad.id)
        dead = await nc.jetstream().stream_info(settings.webhooks_stream, subjects_filter=subject)
        assert dead.state.subjects == {subject: 1}
    finally:
        await d.stop()


async def test_the_start_up_load_builds_views_in_slices_between_other_tasks(store):
    token = store.secret_box.encrypt(generate_secret())  # one token for all: the load must not decrypt any
    now = utcnow()
    rows = [{"id": f"ep_{i:06d}", "scope": "agent", "agent_id": f"agent-{i:06d}", "url": f"http://127.0.0.1:9/{i}",
             "secret": token, "events": ["agent.step.*"], "enabled": True, "created_at": now, "updated_at": now}
            for i in range(20_000)]
    async with store.session.begin() as s:
        await s.execute(insert(Endpoint), rows)
    cache = EndpointCache(store, page_rows=20_000, slice_ms=1.0)  # one page: only slicing can let others run
    seen: set[int] = set()

    async def ticker() -> None:
        while True:
            seen.add(cache.load_progress)
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        await cache.load()
    finally:
        task.cancel()
    assert len(cache) == 20_000 and cache.full_loads == 1
    partial = {p for p in seen if 0 < p < 20_000}
    assert len(partial) >= 3 and cache.load_slices >= 3, "another task ran between slices of one page"
    a, b = cache.get("ep_000001"), cache.get("ep_000002")
    assert a.events is b.events and a.scope is b.scope, "patterns and scope shared, not one tuple per endpoint"
    assert cache._signers == {}, "no secret decrypted before a send"  # noqa: SLF001
    assert cache.signer(a) is cache.signer(a), "decrypted once, then cached"


async def _disabled(store, endpoint_id: str):
    async with store.session() as s:
        row = (await s.execute(select(Endpoint).where(Endpoint.id == endpoint_id))).scalar_one()
    return row if not row.enabled and row.disabled_reason else None


def _head(agent_id: str) -> EnvelopeHead:
    return EnvelopeHead(event_id="evt_x", event_type="agent.step.completed", timestamp="2026-01-01T00:00:00Z",
                        agent_id=agent_id)


async def _failed(store, endpoint_id: str):
    rows = await deliveries(store, endpoint_id=endpoint_id)
    return rows if rows and all(r.status == "failed" for r in rows) else None
