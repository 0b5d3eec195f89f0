"""PUT/GET/DELETE /v1/agents/{agent_id}/webhook against the real pipeline; bad input, auth, health, and change
notices reaching a dispatcher within a second."""

from __future__ import annotations

import asyncio
import time

from bus.connection import connect
from dispatcher.delivery.control import ChangeListener
from dispatcher.delivery.endpoints import EndpointCache
from dispatcher.store.migrate import head_revision
from tests.helpers import wait_until


async def test_put_get_delete_and_deliver(api):
    created = await api.put_webhook("agent-1", "/a1", events=["agent.step.*"])
    assert created["secret"].startswith("whsec_") and created["scope"] == "agent" and created["has_secret"]
    got = (await api.client.get("/v1/agents/agent-1/webhook")).json()
    assert "secret" not in got or got["secret"] is None
    assert got["has_secret"] and got["events"] == ["agent.step.*"] and got["id"] == created["id"]

    event_id = await api.publish("agent-1")
    await api.publish("agent-1", "agent.run.completed", {"run_id": "run-1", "status": "completed"})  # filtered out
    [hit] = await api.receiver.wait_for(1, 5, "/a1")
    assert hit.headers["webhook-id"] == event_id and hit.letta_verified and hit.standard_verified

    r = await api.client.put("/v1/agents/agent-1/webhook", json={"url": api.receiver.url("/a1"), "events": []})
    assert r.status_code == 200 and r.json()["secret"] is None and r.json()["events"] == []
    await api.publish("agent-1", "agent.run.completed", {"run_id": "run-2", "status": "completed"})
    await api.receiver.wait_for(2, 5, "/a1")  # the update reached the dispatcher: every event now

    assert (await api.client.delete("/v1/agents/agent-1/webhook")).status_code == 204
    assert (await api.client.get("/v1/agents/agent-1/webhook")).status_code == 404
    assert (await api.client.delete("/v1/agents/agent-1/webhook")).status_code == 404


def _locs(response) -> dict[tuple, str]:
    assert response.status_code == 422, response.text
    return {tuple(e["loc"]): e["msg"] for e in response.json()["detail"]}


async def test_bad_input_is_422_naming_the_field(api):
    put = lambda body: api.client.put("/v1/agents/agent-2/webhook", json=body)  # noqa: E731
    url = api.receiver.url("/x")
    locs = _locs(await put({"url": "ftp://example.com/hook"}))
    assert "scheme must be http or https" in locs[("body", "url")]
    locs = _locs(await put({"url": "http://10.1.2.3/hook"}))
    assert "private network" in locs[("body", "url")]
    locs = _locs(await put({"url": "http://169.254.169.254/latest/meta-data"}))
    assert "metadata" in locs[("body", "url")]
    locs = _locs(await put({"url": url, "events": ["agent.step.completed", "agent.**"]}))
    assert "'agent.**' is not valid" in locs[("body", "events", 1)]
    locs = _locs(await put({"url": url, "events": ["agent.stpe.completed"]}))
    assert "matches no known event type" in locs[("body", "events", 0)]
    locs = _locs(await put({"url": url, "secret": "short"}))
    assert "at least 16 characters" in locs[("body", "secret")]
    locs = _locs(await put({"url": url, "evnts": ["agent.>"]}))
    assert ("body", "evnts") in locs
    locs = _locs(await put({"events": ["agent.>"]}))
    assert ("body", "url") in locs
    locs = _locs(await put({"url": "ftp://x", "secret": "short", "events": ["a..b"]}))
    assert {("body", "url"), ("body", "secret"), ("body", "events", 0)} <= set(locs)  # every bad field at once
    assert (await api.client.get("/v1/agents/agent-2/webhook")).status_code == 404  # nothing written
    ok = await put({"url": url, "events": ["agent.memory.updated"], "allow_unknown_events": True})
    assert ok.status_code == 201


async def test_missing_or_wrong_key_is_401_and_health_is_open(api):
    assert (await api.anon.get("/openapi.json")).status_code == 401  # the docs need the key too (issue 10)
    spec = (await api.client.get("/openapi.json")).json()
    routes = [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops if path != "/healthz"]
    assert len(routes) >= 19  # the spec lists them all (self-check of this loop)
    for method, path in routes:  # every route of the API, with and without a body
        concrete = path.replace("{agent_id}", "agent-1").replace("{endpoint_id}", "ep_1").replace("{delivery_id}", "dlv_1")
        r = await api.anon.request(method, concrete, json={})
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    wrong = await api.anon.get("/v1/webhooks", headers={"Authorization": "Bearer lbk_wrong"})
    assert wrong.status_code == 401
    basic = await api.anon.get("/v1/webhooks", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status_code == 401
    health = await api.anon.get("/healthz")
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["status"] == "ok" and body["nats"]["connected"] and body["database"]["revision"] == head_revision()
    assert body["consumers"]["webhook-fanout"]["pending"] == 0 and "ack_pending" in body["consumers"]["webhook-sender"]
    assert "/v1/agents/{agent_id}/webhook" in spec["paths"] and "/v1/webhook-deliveries/{delivery_id}/retry" in spec["paths"]


async def test_health_is_503_when_a_consumer_is_missing(api):
    await api.nc.jetstream().delete_consumer(api.settings.webhooks_stream, api.settings.sender_durable)
    r = await api.anon.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "degraded"
    assert r.json()["consumers"]["webhook-sender"]["missing"]


async def test_a_change_reaches_another_dispatcher_within_a_second(api):
    """Another process's endpoint cache (its own connection, 30 s periodic refresh) sees each write through the
    change notice: created, updated (disabled) and deleted, each well within a second."""
    other_nc = await connect(api.settings.nats_url, name="other-dispatcher", settings=api.settings, role="dispatcher")
    cache = EndpointCache(api.store, refresh_s=30)
    await cache.refresh()
    listener = ChangeListener(other_nc, api.settings.control_subject, cache.refresh)
    await listener.start()
    try:
        t0 = time.perf_counter()
        created = await api.put_webhook("agent-3", "/a3")
        await wait_until(lambda: cache.get(created["id"]) is not None, 1.0, what="created endpoint in the cache")
        created_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        r = await api.client.put("/v1/agents/agent-3/webhook", json={"url": api.receiver.url("/a3"), "enabled": False})
        assert r.status_code == 200
        await wait_until(lambda: not cache.get(created["id"]).enabled, 1.0, what="disabled endpoint in the cache")
        updated_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        assert (await api.client.delete("/v1/agents/agent-3/webhook")).status_code == 204
        await wait_until(lambda: cache.get(created["id"]) is None, 1.0, what="deleted endpoint gone from the cache")
        deleted_s = time.perf_counter() - t0
        print(f"change notice -> other cache: created {created_s * 1000:.1f} ms, updated {updated_s * 1000:.1f} ms, "
              f"deleted {deleted_s * 1000:.1f} ms")
        assert listener.applied >= 3
    finally:
        await listener.stop()
        await other_nc.close()


async def test_first_event_after_put_is_delivered_without_waiting_for_a_refresh(api):
    await api.put_webhook("agent-4", "/a4")
    await api.publish("agent-4")
    await asyncio.wait_for(api.receiver.wait_for(1, 5, "/a4"), 6)  # periodic refresh is 30 s: the notice did it
