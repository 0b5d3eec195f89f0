"""The delivery console (/console, issue 13) on real parts: the test's nats-server, a migrated database (SQLite, and
PostgreSQL when LETTA_BUS_TEST_POSTGRES_URL is set), the running dispatcher, real receivers, and the app served by
uvicorn on a free port (server-sent events need a real server: httpx's ASGI transport waits for the whole body).
Browser tests (Chromium) use the same DOM hooks: #endpoints tr[data-endpoint-id], #deliveries tr[data-delivery-id],
button#retry, ol#attempts li[data-attempt-number], #session-error."""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from aiohttp import web
from sqlalchemy import select

from bus.publisher import EventPublisher
from config.settings import Settings
from dispatcher.api.app import create_app
from dispatcher.api.auth import principal_of
from dispatcher.api.context import ApiContext
from dispatcher.api.portal import make_token
from dispatcher.api.server import ApiServer
from dispatcher.cli.receiver import Receiver
from dispatcher.api.console.live import Filters, LiveHub
from dispatcher.delivery.service import Dispatcher
from dispatcher.store.access import Grant, create_session, revoke_session
from dispatcher.store.database import Store
from dispatcher.store.models import Attempt, Delivery
from dispatcher.store.queries import get_delivery
from dispatcher.store.stats import endpoint_stats, latency_series, outcome_series
from tests.helpers import wait_until

API_KEY = "lbk_console-test-key-0123456789"
STEP = {"step_id": "step-1", "status": "success", "run_id": "run-1"}
HOSTILE = "<script>alert(1)</script>"
AJAX = {"X-Requested-With": "test"}


@dataclass
class Console:
    url: str
    operator: httpx.AsyncClient  # bearer: the operator's key
    ctx: ApiContext
    store: Store
    receiver: Receiver
    publisher: EventPublisher
    app: object
    opened: list

    async def endpoint(self, path: str, **body) -> str:
        """Create an endpoint to ``receiver.url(path)`` as the operator; returns its id."""
        r = await self.operator.post("/v1/webhooks", json={"url": self.receiver.url(path), "events": [], **body})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    async def token(self, grant: Grant, ttl_s: float = 600) -> str:
        row = await create_session(self.store, grant, ttl_s=ttl_s)
        return make_token(self.ctx.portal_key, row.id, int(row.expires_at.timestamp()))

    async def signed_in(self, grant: Grant) -> httpx.AsyncClient:
        """A browser-like client that opened a portal link: its cookie jar holds the session."""
        client = httpx.AsyncClient(base_url=self.url, timeout=10)
        self.opened.append(client)
        r = await client.post("/console/session", json={"token": await self.token(grant)}, headers=AJAX)
        assert r.status_code == 200, r.text
        return client


@pytest.fixture
async def console(settings: Settings, db_url: str, nc, dispatcher_nc, provisioned, receiver):
    settings = settings.model_copy(update={"database_url": db_url, "api_keys": [API_KEY]})
    store = Store.from_settings(settings)
    await store.upgrade_schema()
    dispatcher = Dispatcher(settings, dispatcher_nc, store)
    await dispatcher.start()
    ctx = ApiContext(settings, store, dispatcher_nc, api_keys=[API_KEY], dispatcher=dispatcher)
    app = create_app(ctx)
    server = await ApiServer(app, "127.0.0.1", 0).start()
    opened: list[httpx.AsyncClient] = []
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=10) as operator:
        try:
            yield Console(server.url, operator, ctx, store, receiver, EventPublisher(settings, nc), app, opened)
        finally:
            for client in opened:
                await client.aclose()
            await server.stop()
            await dispatcher.stop()
            await store.close()


ORG_A = Grant(scope="organization", role="admin", organization_id="org-a")
ORG_B = Grant(scope="organization", role="admin", organization_id="org-b")


async def _settled(store: Store, delivery_id: str, attempts: int) -> Delivery:
    async def done():
        d, rows = await get_delivery(store, delivery_id)
        return d if d is not None and len(rows) >= attempts and d.status in ("succeeded", "failed") else None

    return await wait_until(done, 5, interval_s=0.05, what=f"{attempts} attempts of {delivery_id}")


async def test_portal_login_sets_cookie_and_shows_only_own_organization(console):
    a = await console.endpoint("/a", scope="organization", organization_id="org-a")
    b = await console.endpoint("/b", scope="organization", organization_id="org-b")

    anon = httpx.AsyncClient(base_url=console.url)
    console.opened.append(anon)
    login = await anon.get("/console/")
    assert login.status_code == 200 and 'src="/console/static/console.js"' in login.text
    assert login.headers["content-security-policy"].startswith("default-src 'self'")
    js = await anon.get("/console/static/console.js")
    assert js.status_code == 200 and "replaceState" in js.text
    assert js.headers["content-type"].startswith("text/javascript")

    token = await console.token(ORG_A, ttl_s=600)
    assert (await anon.post("/console/session", json={"token": token})).status_code == 403  # no X-Requested-With
    r = await anon.post("/console/session", json={"token": token}, headers=AJAX)
    assert r.status_code == 200 and r.json()["next"] == "/console/endpoints"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"letta_bus_portal={token};") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Path=/" in cookie and "Secure" not in cookie  # plain http here
    max_age = int(re.search(r"Max-Age=(\d+)", cookie).group(1))
    assert 590 <= max_age <= 600

    page = await anon.get("/console/endpoints")
    assert page.status_code == 200, page.text
    assert f'data-endpoint-id="{a}"' in page.text and f'data-endpoint-id="{b}"' not in page.text
    assert 'id="endpoints"' in page.text and "<svg" in page.text and "<title" in page.text
    assert '<option value="global">' not in page.text  # an organization creates organization or agent endpoints
    # the cookie authenticates the JSON API too, for changes only with the header
    assert (await anon.patch(f"/v1/webhooks/{a}", json={"enabled": False})).status_code == 403
    assert (await anon.patch(f"/v1/webhooks/{a}", json={"enabled": False}, headers=AJAX)).status_code == 200
    assert (await anon.patch(f"/v1/webhooks/{b}", json={"enabled": False}, headers=AJAX)).status_code == 404

    read_only = await console.signed_in(Grant(scope="organization", role="read", organization_id="org-a"))
    page = (await read_only.get("/console/endpoints")).text
    assert f'data-endpoint-id="{a}"' in page and "rotate-secret" not in page and "Read-only" in page

    out = await anon.post("/console/logout")
    assert out.status_code == 303 and 'letta_bus_portal=""' in out.headers["set-cookie"]
    assert (await anon.get("/console/endpoints")).status_code == 401


def _session_error(r: httpx.Response, title: str) -> None:
    assert r.status_code == 401, r.text
    assert re.search(r'id="session-error" role="alert"', r.text), r.text
    assert f"<h1>{title}</h1>" in r.text and "link" in r.text


async def test_expired_revoked_invalid_and_missing_sessions_show_the_sign_in_page(console):
    anon = httpx.AsyncClient(base_url=console.url)
    console.opened.append(anon)
    row = await create_session(console.store, ORG_A, ttl_s=600)
    expired = make_token(console.ctx.portal_key, row.id, int(time.time()) - 5)
    r = await anon.post("/console/session", json={"token": expired}, headers=AJAX)
    assert r.status_code == 401 and r.json()["reason"] == "expired" and "set-cookie" in r.headers
    _session_error(await anon.get(r.json()["next"]), "This link has expired")

    forged = make_token(b"another key", row.id, int(time.time()) + 600)
    r = await anon.post("/console/session", json={"token": forged}, headers=AJAX)
    assert r.status_code == 401 and r.json()["reason"] == "invalid"
    _session_error(await anon.get(r.json()["next"]), "This link is not valid")

    _session_error(await anon.get("/console/endpoints"), "Sign in with a portal link")  # no cookie
    assert "POST /v1/portal-sessions" in (await anon.get("/console/deliveries")).text

    client = await console.signed_in(ORG_A)  # a session revoked while in use: the next page says so
    assert (await client.get("/console/deliveries")).status_code == 200
    sessions = [c for c in client.cookies.jar]
    assert len(sessions) == 1
    await revoke_session(console.store, sessions[0].value[4:].split(".")[0])
    _session_error(await client.get("/console/deliveries"), "This link has expired")
    _session_error(await httpx.AsyncClient(base_url=console.url, cookies={"letta_bus_portal": expired}).get(
        "/console/endpoints"), "This link has expired")


async def _hostile_receiver():
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=500, text=HOSTILE, content_type="text/html")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def test_other_organizations_delivery_is_404_and_hostile_excerpts_are_escaped(console):
    runner, port = await _hostile_receiver()
    try:
        r = await console.operator.post("/v1/webhooks", json={
            "scope": "organization", "organization_id": "org-b", "url": f"http://127.0.0.1:{port}/evil",
            "events": []})
        b = r.json()["id"]
        test = (await console.operator.post(f"/v1/webhooks/{b}/test")).json()
        assert test["status_code"] == 500, test
        delivery_id = test["delivery_id"]
        await _settled(console.store, delivery_id, 1)
    finally:
        await runner.cleanup()

    org_a, org_b = await console.signed_in(ORG_A), await console.signed_in(ORG_B)
    denied = await org_a.get(f"/console/deliveries/{delivery_id}")
    assert denied.status_code == 404 and "Not found" in denied.text and HOSTILE not in denied.text
    assert f'data-delivery-id="{delivery_id}"' not in (await org_a.get("/console/deliveries")).text
    assert (await org_a.get(f"/console/deliveries?endpoint_id={b}")).status_code == 404

    listed = await org_b.get("/console/deliveries", params={"endpoint_id": b, "status": "", "since": ""})
    assert listed.status_code == 200 and f'data-delivery-id="{delivery_id}"' in listed.text
    shown = await org_b.get(f"/console/deliveries/{delivery_id}")
    assert shown.status_code == 200, shown.text
    assert HOSTILE not in shown.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in shown.text
    assert '<li data-attempt-number="1"' in shown.text and 'id="attempts"' in shown.text
    assert 'id="retry"' in shown.text and 'aria-label="Retry this delivery"' in shown.text
    assert "(redacted)" in shown.text and "sha256=" not in shown.text and "v1," not in shown.text
    assert shown.headers["content-security-policy"].startswith("default-src 'self'")


async def _next_attempt(lines, number: int, timeout_s: float) -> dict:
    """The first ``attempt`` event with ``number`` on an SSE line iterator."""
    async def read() -> dict:
        event = None
        async for line in lines:
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "attempt":
                data = json.loads(line[6:])
                if data["number"] == number:
                    return data
        raise AssertionError("stream ended")

    return await asyncio.wait_for(read(), timeout_s)


async def test_stream_yields_the_attempt_of_a_retry(console):
    a = await console.endpoint("/a", scope="organization", organization_id="org-a")
    await console.publisher.publish_event("agent-1", "agent.step.completed", STEP, organization_id="org-a",
                                          strict=True)
    delivery = await wait_until(lambda: _only_delivery(console.store), 5, interval_s=0.05, what="a delivery")
    await _settled(console.store, delivery.id, 1)

    org_a = await console.signed_in(ORG_A)
    hub_b = LiveHub(console.store)  # another organization's stream sees none of it
    other = await hub_b.subscribe(await principal_of(await console.token(ORG_B), console.ctx), Filters())
    try:
        async with org_a.stream("GET", "/console/stream", params={"delivery_id": delivery.id}) as stream:
            assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            assert await lines.__anext__() == "retry: 3000"
            await asyncio.sleep(0.1)  # the hub has read its cursor
            r = await org_a.post(f"/v1/webhook-deliveries/{delivery.id}/retry", headers=AJAX)  # the retry button
            assert r.status_code == 202, r.text
            data = await _next_attempt(lines, 2, 5)
        assert data["delivery_id"] == delivery.id and '<li data-attempt-number="2"' in data["item"]
        assert f'<tr data-delivery-id="{delivery.id}"' in data["row"]
        await hub_b.poll()
        assert other.queue.empty()
    finally:
        hub_b.unsubscribe(other)
    assert console.receiver.received and a

    console.app.state.console_live = LiveHub(console.store, max_streams=0)
    busy = await org_a.get("/console/stream")
    assert busy.status_code == 503 and busy.headers["retry-after"] == "30"


async def _only_delivery(store: Store) -> Delivery | None:
    async with store.session() as s:
        return (await s.execute(select(Delivery))).scalars().first()


async def test_stats_of_a_known_set_of_attempts(console):
    a = await console.endpoint("/a", scope="organization", organization_id="org-a")
    b = await console.endpoint("/b", scope="organization", organization_id="org-a")
    now = datetime.now(timezone.utc)
    rows = []
    for i in range(1, 101):  # the last hour: 100 attempts of 1..100 ms, every tenth answered 500
        at = now - timedelta(minutes=30, seconds=i)
        rows.append(Delivery(id=f"dlv_a{i:03}", event_id=f"ev{i}", endpoint_id=a, agent_id="agent-1",
                             event_type="agent.step.completed", status="failed" if i % 10 == 0 else "succeeded",
                             attempts=1, created_at=at, updated_at=at))
        rows.append(Attempt(delivery_id=f"dlv_a{i:03}", number=1, status_code=500 if i % 10 == 0 else 200,
                            duration_ms=float(i), at=at))
    for i in range(1, 11):  # earlier in the day: 10 slow successes of 1000 ms
        at = now - timedelta(hours=5, seconds=i)
        rows.append(Delivery(id=f"dlv_d{i:03}", event_id=f"ed{i}", endpoint_id=a, agent_id="agent-1",
                             event_type="agent.step.completed", status="succeeded", attempts=1, created_at=at,
                             updated_at=at))
        rows.append(Attempt(delivery_id=f"dlv_d{i:03}", number=1, status_code=200, duration_ms=1000.0, at=at))
    old = now - timedelta(days=2)  # outside both windows
    rows.append(Delivery(id="dlv_old", event_id="eo", endpoint_id=a, agent_id="agent-1", event_type="x",
                         status="succeeded", attempts=1, created_at=old, updated_at=old))
    rows.append(Attempt(delivery_id="dlv_old", number=1, status_code=200, duration_ms=5.0, at=old))
    async with console.store.session.begin() as s:
        s.add_all(rows)

    t0 = time.monotonic()
    stats = await endpoint_stats(console.store, [a, b], now=now)
    elapsed_ms = (time.monotonic() - t0) * 1000
    hour, day = stats[a].windows[3600], stats[a].windows[86400]
    assert (hour.attempts, hour.succeeded, hour.success_rate) == (100, 90, 0.9)
    assert (hour.p50_ms, hour.p99_ms) == (50.0, 99.0)
    assert (day.attempts, day.succeeded) == (110, 100)
    assert (day.p50_ms, day.p99_ms) == (55.0, 1000.0)
    assert stats[a].sampled == 110 and not stats[a].truncated
    assert abs((stats[a].last_success_at - (now - timedelta(minutes=30, seconds=1))).total_seconds()) < 0.01
    assert stats[b].windows[3600].attempts == 0 and stats[b].windows[3600].success_rate is None
    assert elapsed_ms < 1000
    sampled = await endpoint_stats(console.store, [a], now=now, sample=20)  # the newest 20 deliveries only
    assert sampled[a].truncated and sampled[a].windows[3600].attempts == 20

    outcomes = await outcome_series(console.store, endpoint_ids=[a], now=now)
    total = {k: round(sum(v) * outcomes.bucket_s / 60) for k, v in outcomes.values.items()}
    assert total == {"succeeded": 100, "retrying": 0, "failed": 10} and outcomes.buckets == 144
    latency = await latency_series(console.store, endpoint_ids=[a], now=now)
    assert max(v for v in latency.values["p99"] if v is not None) == 1000.0
    filled = [v for v in latency.values["p50"] if v is not None]
    assert filled[0] == 1000.0 and 0 < filled[-1] <= 100  # 5 h ago: the slow ones; 30 min ago: 1..100 ms

    page = await (await console.signed_in(ORG_A)).get("/console/endpoints")
    assert "90.0 % of 100" in page.text and "50 ms · 99 ms" in page.text
