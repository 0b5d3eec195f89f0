"""/v1/webhooks: organization-wide and global endpoints next to agent ones, on the real pipeline."""

from __future__ import annotations

import asyncio


async def _create(api, path: str, **body) -> dict:
    r = await api.client.post("/v1/webhooks", json={"url": api.receiver.url(path), **body})
    assert r.status_code == 201, r.text
    data = r.json()
    api.receiver.secrets[path] = data["secret"]
    return data


async def test_organization_and_global_endpoints_receive_matching_events(api):
    org = await _create(api, "/org", scope="organization", organization_id="org-1", events=["agent.step.*"])
    glob = await _create(api, "/global", scope="global")
    agent = await api.put_webhook("agent-1", "/agent")
    assert org["secret"].startswith("whsec_") and org["organization_id"] == "org-1" and glob["agent_id"] is None

    e1 = await api.publish("agent-1", organization_id="org-1")  # agent + org + global
    e2 = await api.publish("agent-9", organization_id="org-2")  # global only
    e3 = await api.publish("agent-8", "agent.run.completed", {"run_id": "r", "status": "completed"},
                           organization_id="org-1")  # global only: the org endpoint wants agent.step.*
    await api.receiver.wait_for(3, 5, "/global")
    await api.receiver.wait_for(1, 5, "/org")
    await api.receiver.wait_for(1, 5, "/agent")
    await asyncio.sleep(0.3)
    got = {p: sorted(r.headers["webhook-id"] for r in api.receiver.received if r.path == p)
           for p in ("/org", "/global", "/agent")}
    assert got == {"/org": [e1], "/global": sorted([e1, e2, e3]), "/agent": [e1]}
    assert all(r.letta_verified and r.standard_verified for r in api.receiver.received)

    listed = (await api.client.get("/v1/webhooks")).json()["data"]
    assert [e["id"] for e in listed] == [org["id"], glob["id"], agent["id"]]
    assert [e["id"] for e in (await api.client.get("/v1/webhooks", params={"scope": "global"})).json()["data"]] == [glob["id"]]
    assert (await api.client.get(f"/v1/webhooks/{org['id']}")).json()["has_secret"]

    r = await api.client.patch(f"/v1/webhooks/{glob['id']}", json={"enabled": False})
    assert r.status_code == 200 and r.json()["enabled"] is False and r.json()["disabled_reason"]
    r = await api.client.patch(f"/v1/webhooks/{org['id']}", json={"events": []})
    assert r.json()["events"] == []
    e4 = await api.publish("agent-8", "agent.run.completed", {"run_id": "r2", "status": "completed"},
                           organization_id="org-1")
    await api.receiver.wait_for(2, 5, "/org")
    await asyncio.sleep(0.3)
    assert [r.headers["webhook-id"] for r in api.receiver.received if r.path == "/global"].count(e4) == 0

    page = (await api.client.get(f"/v1/webhooks/{glob['id']}/deliveries")).json()
    assert sorted(d["event_id"] for d in page["data"]) == sorted([e1, e2, e3])
    bad = await api.client.get(f"/v1/webhooks/{glob['id']}/deliveries", params={"status": "lost"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "status"]

    tested = (await api.client.post(f"/v1/webhooks/{org['id']}/test")).json()
    assert tested["status"] == "succeeded" and tested["status_code"] == 200
    [probe] = [r for r in api.receiver.received if r.headers["X-Letta-Event"] == "webhook.test"]
    assert probe.path == "/org" and probe.letta_verified
    assert (await api.client.post(f"/v1/webhooks/{glob['id']}/test")).status_code == 409  # disabled
    rotated = (await api.client.post(f"/v1/webhooks/{org['id']}/rotate-secret")).json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != org["secret"]
    assert (await api.client.post("/v1/webhooks/ep_missing/rotate-secret")).status_code == 404
    assert (await api.client.post("/v1/webhooks/ep_missing/test")).status_code == 404
    assert (await api.client.delete(f"/v1/webhooks/{org['id']}")).status_code == 204
    assert (await api.client.get(f"/v1/webhooks/{org['id']}")).status_code == 404


async def test_scope_and_owner_must_fit(api):
    url = api.receiver.url("/x")

    async def locs(**body) -> dict:
        r = await api.client.post("/v1/webhooks", json={"url": url, **body})
        assert r.status_code == 422, r.text
        return {tuple(e["loc"]): e["msg"] for e in r.json()["detail"]}

    assert "agent_id is required" in (await locs(scope="agent"))[("body", "agent_id")]
    assert "organization_id is required" in (await locs(scope="organization"))[("body", "organization_id")]
    assert "must be empty" in (await locs(scope="global", organization_id="org-1"))[("body", "organization_id")]
    assert "must be empty" in (await locs(scope="organization", organization_id="o", agent_id="a"))[("body", "agent_id")]
    assert ("body", "scope") in await locs(scope="team")
    listed = await api.client.get("/v1/webhooks", params={"scope": "team"})
    assert listed.status_code == 422 and listed.json()["detail"][0]["loc"] == ["query", "scope"]
    assert ("body", "url") in await locs(scope="global", url="http://192.168.1.1/")
    await api.put_webhook("agent-1", "/a")
    dup = await api.client.post("/v1/webhooks", json={"url": url, "scope": "agent", "agent_id": "agent-1"})
    assert dup.status_code == 409 and "already has a webhook" in dup.json()["detail"]
    for method in ("GET", "PATCH", "DELETE"):
        r = await api.client.request(method, "/v1/webhooks/ep_missing", json={} if method == "PATCH" else None)
        assert r.status_code == 404, (method, r.text)
    assert (await api.client.patch("/v1/webhooks/ep_missing", json={"url": "ftp://x"})).status_code == 404
    agent_webhook = (await api.client.get("/v1/agents/agent-1/webhook")).json()["id"]
    bad = await api.client.patch(f"/v1/webhooks/{agent_webhook}", json={"url": "ftp://x"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "url"]
