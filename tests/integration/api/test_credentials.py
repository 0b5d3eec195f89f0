"""Scoped API keys and portal sessions end to end (issue 13): created, used, listed and revoked through the API;
stored hashed; a portal token in no log line; and the fan-out's rule that an agent endpoint naming an
organization receives only that organization's events of the agent (so registering another tenant's agent id
yields nothing)."""

from __future__ import annotations

import logging

from sqlalchemy import select

from dispatcher.store.models import ApiKey
from tests.helpers import deliveries, wait_until


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_scoped_key_is_created_used_listed_and_revoked(api):
    created = await api.client.post("/v1/api-keys", json={"scope": "organization", "organization_id": "org-a",
                                                          "role": "admin", "name": "tenant a"})
    assert created.status_code == 201, created.text
    key, key_id = created.json()["key"], created.json()["id"]
    assert key.startswith("lbk_")
    async with api.store.session() as s:  # only the hash is stored
        row = (await s.execute(select(ApiKey).where(ApiKey.id == key_id))).scalar_one()
        assert key not in repr(row.__dict__) and row.key_hash != key and len(row.key_hash) == 64
    made = await api.anon.post("/v1/webhooks", headers=bearer(key),
                               json={"scope": "organization", "url": api.receiver.url("/a")})
    assert made.status_code == 201 and made.json()["organization_id"] == "org-a"  # filled in from the key
    # an org key hands out no more than it has
    wider = await api.anon.post("/v1/api-keys", headers=bearer(key), json={"scope": "operator", "role": "read"})
    assert wider.status_code == 403 and "cannot grant" in wider.json()["detail"]
    listed = (await api.client.get("/v1/api-keys")).json()["data"]
    assert [k["id"] for k in listed] == [key_id] and all(k["key"] is None for k in listed)
    assert (await api.client.delete(f"/v1/api-keys/{key_id}")).status_code == 204
    refused = await api.anon.get("/v1/webhooks", headers=bearer(key))
    assert refused.status_code == 401
    assert (await api.client.get("/v1/api-keys")).json()["data"] == []
    assert len((await api.client.get("/v1/api-keys", params={"include_revoked": True})).json()["data"]) == 1


async def test_a_portal_session_is_short_lived_revocable_and_never_logged(api, caplog):
    caplog.set_level(logging.DEBUG)
    r = await api.client.post("/v1/portal-sessions", json={"scope": "organization", "organization_id": "org-a",
                                                           "role": "read", "ttl": 60})
    assert r.status_code == 201, r.text
    body = r.json()
    token, url = body["token"], body["url"]
    assert url.endswith(f"/console/#token={token}")  # after '#': a browser never sends it to a server
    assert (await api.anon.get("/v1/webhooks", headers=bearer(token))).status_code == 200
    assert (await api.anon.post("/v1/webhooks", headers=bearer(token),
                                json={"scope": "organization", "url": api.receiver.url("/x")})).status_code == 403
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert (await api.anon.get("/v1/webhooks", headers=bearer(forged))).status_code == 401
    assert (await api.client.delete(f"/v1/portal-sessions/{body['id']}")).status_code == 204
    revoked = await api.anon.get("/v1/webhooks", headers=bearer(token))
    assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]
    short = (await api.client.post("/v1/portal-sessions", json={"scope": "organization", "organization_id": "org-a",
                                                                "ttl": 1})).json()
    await wait_until(lambda: _expired(api, short["token"]), timeout_s=5, what="the 1 s session to expire")
    assert token not in caplog.text and short["token"] not in caplog.text


async def _expired(api, token: str) -> bool:
    r = await api.anon.get("/v1/webhooks", headers=bearer(token))
    return r.status_code == 401 and "expired" in r.json()["detail"]


async def test_an_agent_endpoint_of_an_organization_gets_only_that_organizations_events(api):
    """org A registers agent-x's webhook; agent-x's events published as org B's reach nothing; org A's do."""
    key = (await api.client.post("/v1/api-keys", json={"scope": "organization", "organization_id": "org-a",
                                                       "role": "admin"})).json()["key"]
    put = await api.anon.put("/v1/agents/agent-x/webhook", headers=bearer(key), json={"url": api.receiver.url("/x")})
    assert put.status_code == 201 and put.json()["organization_id"] == "org-a"
    await api.publish("agent-x", organization_id="org-b")
    await api.publish("agent-x", "agent.run.completed", {"run_id": "run-1", "status": "completed"},
                      organization_id="org-a")
    await wait_until(lambda: len(api.receiver.received) >= 1, timeout_s=10, what="org A's event delivered")
    await api.publish("agent-x", organization_id="org-b")  # a marker after the first: still nothing of org B's
    await api.publish("agent-x", "agent.run.completed", {"run_id": "run-2", "status": "completed"},
                      organization_id="org-a")
    await wait_until(lambda: len(api.receiver.received) >= 2, timeout_s=10, what="org A's second event")

    async def recorded() -> bool:
        return len(await deliveries(api.store, agent_id="agent-x")) >= 2
    await wait_until(recorded, timeout_s=10, what="both deliveries recorded")
    types = [d.event_type for d in await deliveries(api.store, agent_id="agent-x")]
    assert types == ["agent.run.completed"] * 2 and len(api.receiver.received) == 2
    # org B's admin cannot see it either
    key_b = (await api.client.post("/v1/api-keys", json={"scope": "organization", "organization_id": "org-b",
                                                         "role": "admin"})).json()["key"]
    assert (await api.anon.get("/v1/agents/agent-x/webhook", headers=bearer(key_b))).status_code == 404
