"""The scope matrix of issue 13: every route of /openapi.json x {operator, org A admin, org A read, agent key of
org A, org B admin, expired portal token, no credential} against resources of org A, org B and the operator, on
real parts (the test's nats-server, a migrated SQLite database, the app through ASGI).

Each request's status is asserted against the scope rules (:mod:`dispatcher.api.scoping`); every refused request
(401, 403, 404) must leave the database and the delivery stream exactly as they were. An allowed change is undone
(the database reseeded) before the next request, so every credential meets the same resources. A route added
without a row here fails :func:`test_the_matrix_covers_every_route`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import delete, insert, select

from bus.publisher import EventPublisher
from dispatcher.api.app import create_app
from dispatcher.api.context import ApiContext
from dispatcher.api.portal import make_token
from dispatcher.store.access import Grant, create_key, create_session
from dispatcher.store.database import Store
from dispatcher.store.models import Base, Delivery, utcnow

BOOTSTRAP = "lbk_bootstrap-operator-key-0123456789"
URL = "http://127.0.0.1:9/hook"
SINCE = "2020-01-01T00:00:00Z"

#: what each credential sees: operator everything; an organization its organization and agent endpoints; the
#: agent key its agent's webhook
SEES = {
    "operator": {"a_org", "a_agent", "b_org", "b_agent", "global"},
    "org_a_admin": {"a_org", "a_agent"}, "org_a_read": {"a_org", "a_agent"}, "agent_a1": {"a_agent"},
    "org_b_admin": {"b_org", "b_agent"},
}
ADMIN = {"operator", "org_a_admin", "agent_a1", "org_b_admin"}
ORG = {"org_a_admin": "a", "org_a_read": "a", "agent_a1": "a", "org_b_admin": "b"}
CREDENTIALS = ("operator", "org_a_admin", "org_a_read", "agent_a1", "org_b_admin", "expired_portal", "none")
ENDPOINT_TARGETS = ("a_org", "a_agent", "b_org", "b_agent", "global")
AGENTS = {"a_agent": "agent-a1", "b_agent": "agent-b1"}


@dataclass(frozen=True)
class Route:
    """One row of the matrix: ``kind`` says which rule applies and what ``targets`` are (see :func:`expected`)."""

    method: str
    path: str
    kind: str  # open, operator, agent, endpoint, delivery, create, list, keys, key, portal, session
    targets: tuple[str, ...] = ("-",)
    body: object = None
    ok: frozenset[int] = frozenset({200, 201, 202, 204})


def _routes() -> list[Route]:
    ep = ENDPOINT_TARGETS
    agents = tuple(AGENTS)
    dl = ("a_org", "a_agent", "b_agent", "global")
    webhook = {"url": URL, "events": []}
    return [
        Route("GET", "/healthz", "open", ok=frozenset({200, 503})),
        Route("GET", "/v1/status", "operator"),
        Route("GET", "/v1/agents/{agent_id}/webhook", "agent", agents),
        Route("PUT", "/v1/agents/{agent_id}/webhook", "agent", agents, webhook),
        Route("DELETE", "/v1/agents/{agent_id}/webhook", "agent", agents),
        Route("POST", "/v1/agents/{agent_id}/webhook/test", "agent", agents, ok=frozenset({200, 504})),
        Route("POST", "/v1/agents/{agent_id}/webhook/rotate-secret", "agent", agents),
        Route("GET", "/v1/agents/{agent_id}/webhook/deliveries", "agent", agents),
        Route("POST", "/v1/agents/{agent_id}/webhook/retry-failed", "agent", agents, {"since": SINCE}),
        Route("POST", "/v1/agents/{agent_id}/webhook/replay", "agent", agents, {"since": SINCE}),
        Route("GET", "/v1/webhook-deliveries/{delivery_id}", "delivery", dl),
        Route("POST", "/v1/webhook-deliveries/{delivery_id}/retry", "delivery", dl),
        Route("GET", "/v1/webhooks", "list"),
        Route("POST", "/v1/webhooks", "create", ("a_org", "b_org", "global")),
        Route("GET", "/v1/webhooks/{endpoint_id}", "endpoint", ep),
        Route("PATCH", "/v1/webhooks/{endpoint_id}", "endpoint", ep, {"url": "http://127.0.0.1:9/other"}),
        Route("DELETE", "/v1/webhooks/{endpoint_id}", "endpoint", ep),
        Route("POST", "/v1/webhooks/{endpoint_id}/test", "endpoint", ep, ok=frozenset({200, 504})),
        Route("POST", "/v1/webhooks/{endpoint_id}/rotate-secret", "endpoint", ep),
        Route("GET", "/v1/webhooks/{endpoint_id}/deliveries", "endpoint", ep),
        Route("POST", "/v1/webhooks/{endpoint_id}/retry-failed", "endpoint", ep, {"since": SINCE}),
        Route("POST", "/v1/webhooks/{endpoint_id}/replay", "endpoint", ep, {"since": SINCE}),
        Route("GET", "/v1/webhooks/{endpoint_id}/dead-letters", "endpoint", ep),
        Route("POST", "/v1/webhooks/{endpoint_id}/dead-letters/resend", "endpoint", ep, {}),
        Route("GET", "/v1/api-keys", "keys"),
        Route("POST", "/v1/api-keys", "keys", ("a", "b")),
        Route("DELETE", "/v1/api-keys/{key_id}", "key", ("a", "b")),
        Route("POST", "/v1/portal-sessions", "portal", ("a", "b")),
        Route("DELETE", "/v1/portal-sessions/{session_id}", "session", ("a", "b")),
    ]


def expected(cred: str, route: Route, target: str) -> int | str:
    """``"ok"`` or the refusal status: 401 without a live credential; for a resource, 404 outside the scope, then
    403 for a change by a ``read`` credential; operator-only and credential routes 403."""
    if route.kind == "open":
        return "ok"
    if cred in ("none", "expired_portal"):
        return 401
    if cred == "operator":
        return "ok"
    admin, org = cred in ADMIN, ORG[cred]
    write = route.method != "GET"
    if route.kind == "operator":
        return 403
    if route.kind in ("agent", "endpoint", "delivery"):
        if target not in SEES[cred]:
            return 404
        return 403 if write and not admin else "ok"
    if route.kind == "list":
        return "ok"
    if route.kind == "create":  # organization admins create in their own organization only
        return "ok" if admin and cred != "agent_a1" and target == f"{org}_org" else 403
    if not admin:  # credentials are handed out and revoked by admins only
        return 403
    if route.kind == "keys":
        return "ok" if route.method == "GET" or (cred != "agent_a1" and target == org) else 403
    if route.kind == "portal":
        return "ok" if cred != "agent_a1" and target == org else 403
    return "ok" if cred != "agent_a1" and target == org else 404  # key / session: reach it or 404


@dataclass
class World:
    client: httpx.AsyncClient
    store: Store
    js: object
    stream: str
    app: object
    tokens: dict[str, str | None]
    ids: dict[str, str]
    seed: dict[str, list[dict]]

    async def snapshot(self) -> tuple:
        """Every row of every table, and the delivery stream's message count."""
        tables = []
        async with self.store.session() as s:
            for t in Base.metadata.sorted_tables:
                tables.append(sorted(map(repr, (await s.execute(select(t))).all())))
        return tuple(map(tuple, tables)), (await self.js.stream_info(self.stream)).state.messages

    async def reseed(self) -> None:
        async with self.store.session.begin() as s:
            for table in reversed(Base.metadata.sorted_tables):
                await s.execute(delete(table))
            for table in Base.metadata.sorted_tables:
                if self.seed[table.name]:
                    await s.execute(insert(table), self.seed[table.name])


@pytest.fixture
async def world(settings, nc, dispatcher_nc, provisioned) -> World:
    settings = settings.model_copy(update={"api_keys": [BOOTSTRAP], "webhook_test_wait_s": 0.05})
    store = Store.from_settings(settings)
    await store.upgrade_schema()
    ids: dict[str, str] = {}
    for target, scope, agent, org in (
            ("a_org", "organization", None, "org-a"), ("a_agent", "agent", "agent-a1", "org-a"),
            ("b_org", "organization", None, "org-b"), ("b_agent", "agent", "agent-b1", "org-b"),
            ("global", "global", None, None)):
        endpoint, _ = await store.create_endpoint(scope=scope, agent_id=agent, organization_id=org, url=URL)
        ids[target] = endpoint.id
    publisher = EventPublisher(settings, nc)
    now = utcnow()
    async with store.session.begin() as s:
        for target in ("a_org", "a_agent", "b_agent", "global"):
            agent, org = ("agent-b1", "org-b") if target.startswith("b") else ("agent-a1", "org-a")
            event_id = await publisher.publish_event(agent, "agent.step.completed",
                                                     {"step_id": "step-1", "status": "success", "run_id": "run-1"},
                                                     organization_id=org, strict=True)
            seq = (await nc.jetstream().stream_info(settings.events_stream)).state.last_seq
            ids[f"dlv_{target}"] = f"dlv_{target}"
            s.add(Delivery(id=f"dlv_{target}", event_id=event_id, endpoint_id=ids[target], agent_id=agent,
                           event_type="agent.step.completed", status="failed", attempts=1, last_status_code=503,
                           event_seq=seq, created_at=now - timedelta(minutes=5), updated_at=now))
    tokens: dict[str, str | None] = {"operator": BOOTSTRAP, "none": None}
    for cred, grant in (("org_a_admin", Grant("organization", "admin", "org-a")),
                        ("org_a_read", Grant("organization", "read", "org-a")),
                        ("agent_a1", Grant("agent", "admin", "org-a", "agent-a1")),
                        ("org_b_admin", Grant("organization", "admin", "org-b")),
                        ("key_a", Grant("organization", "read", "org-a")),
                        ("key_b", Grant("organization", "read", "org-b"))):
        row, key = await create_key(store, grant, name=cred)
        tokens[cred], ids[cred] = key, row.id
    ctx = ApiContext(settings, store, dispatcher_nc, api_keys=[BOOTSTRAP])
    for name, org, ttl in (("session_a", "org-a", 3600), ("session_b", "org-b", 3600),
                           ("expired_portal", "org-a", -60)):
        row = await create_session(store, Grant("organization", "admin", org), ttl_s=ttl)
        ids[name] = row.id
        tokens[name] = make_token(ctx.portal_key, row.id, int(row.expires_at.timestamp()))
    async with store.session() as s:
        seed = {t.name: [dict(r._mapping) for r in (await s.execute(select(t))).all()]
                for t in Base.metadata.sorted_tables}
    app = create_app(ctx)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        try:
            yield World(client, store, dispatcher_nc.jetstream(), settings.webhooks_stream, app, tokens, ids, seed)
        finally:
            await store.close()


def _path(world: World, route: Route, target: str) -> str:
    path = route.path
    if "{agent_id}" in path:
        path = path.replace("{agent_id}", AGENTS[target])
    path = path.replace("{endpoint_id}", world.ids.get(target, ""))
    path = path.replace("{delivery_id}", world.ids.get(f"dlv_{target}", ""))
    path = path.replace("{key_id}", world.ids.get(f"key_{target}", ""))
    return path.replace("{session_id}", world.ids.get(f"session_{target}", ""))


def _body(route: Route, target: str) -> object:
    org = {"a": "org-a", "b": "org-b", "a_org": "org-a", "b_org": "org-b"}.get(target)
    if route.kind == "create":
        scope = {"scope": "global"} if target == "global" else {"scope": "organization", "organization_id": org}
        return {**scope, "url": URL, "events": []}
    if route.kind == "keys" and route.method == "POST":
        return {"scope": "organization", "organization_id": org, "role": "read", "name": "new"}
    if route.kind == "portal":
        return {"scope": "organization", "organization_id": org, "role": "read", "ttl": 60}
    return route.body


def test_the_matrix_covers_every_route():
    """Every operation of /openapi.json has a row, and every row an operation (no route escapes the matrix)."""
    from unittest.mock import MagicMock

    spec = create_app(MagicMock()).openapi()["paths"]
    documented = {(m.upper(), p) for p, ops in spec.items() for m in ops}
    assert documented == {(r.method, r.path) for r in _routes()}


async def test_scope_matrix(world: World):
    """Every route x credential x target: the status the scope rules give, and nothing changed by a refusal."""
    failures, checked = [], 0
    state = await world.snapshot()  # only an allowed change moves it (and is undone): refusals compare with it
    for route in _routes():
        for target in route.targets:
            for cred in CREDENTIALS:
                token = world.tokens[cred]
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                r = await world.client.request(route.method, _path(world, route, target), headers=headers,
                                               json=_body(route, target))
                want = expected(cred, route, target)
                checked += 1
                cell = f"{cred} {route.method} {route.path} [{target}]"
                if want == "ok":
                    if r.status_code not in route.ok:
                        failures.append(f"{cell}: {r.status_code} {r.text[:160]}")
                    elif route.kind == "list":
                        seen = {e["id"] for e in r.json()["data"]}
                        if seen != {world.ids[t] for t in SEES[cred]}:
                            failures.append(f"{cred} lists {sorted(seen)}")
                    if route.method != "GET":
                        await world.reseed()
                        state = await world.snapshot()
                    continue
                if r.status_code != want:
                    failures.append(f"{cell}: {r.status_code}, want {want}: {r.text[:160]}")
                if await world.snapshot() != state:
                    failures.append(f"{cell}: refused ({r.status_code}) but something changed")
                    await world.reseed()
                    state = await world.snapshot()
    assert not failures, f"{len(failures)} of {checked} cells wrong:\n" + "\n".join(failures)
    assert checked == sum(len(r.targets) for r in _routes()) * len(CREDENTIALS)
