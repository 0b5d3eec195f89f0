"""The API refuses what can never be delivered and stores URLs as they are sent (issue 10, finding 8).

Before: webhooks for agent ids with %0A, %00, a tab, U+202E or 5,000 characters were stored (201) although no
event for them can ever be published; a URL with CR/LF or spaces was stored as written and sent as something
else (yarl drops CR/LF and re-encodes spaces); ``/docs``, ``/redoc`` and ``/openapi.json`` answered without a key.
Now: 422 naming the field, URLs stored in normal form, the docs behind the key. SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import quote

from tests.helpers import wait_until
from tests.integration.api.conftest import API_KEY

BAD_AGENT_IDS = ["agent\nnewline", "agent\x00nul", "agent\tx", "agent-\u202eevil", "a" * 5000, "agént-1", "agent 1",
                 "-agent"]


def _detail(r) -> dict:
    assert r.status_code == 422, r.text
    return {tuple(e["loc"]): e["msg"] for e in r.json()["detail"]}


async def _nothing_stored(api) -> None:
    assert (await api.client.get("/v1/webhooks")).json()["data"] == []


async def test_agent_ids_that_could_never_fire_are_refused_in_paths(api):
    url = api.receiver.url("/x")
    for agent_id in BAD_AGENT_IDS:
        path = f"/v1/agents/{quote(agent_id, safe='')}/webhook"
        detail = _detail(await api.client.put(path, json={"url": url}))
        assert "agent_id must be 1-128 ASCII characters" in detail[("path", "agent_id")], agent_id[:20]
        for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/test"), ("GET", "/deliveries")):
            r = await api.client.request(method, path + suffix)
            assert ("path", "agent_id") in _detail(r), (method, suffix)
    await _nothing_stored(api)


async def test_owner_ids_in_bodies_are_refused_naming_the_field(api):
    url = api.receiver.url("/x")
    for bad in BAD_AGENT_IDS:
        detail = _detail(await api.client.post("/v1/webhooks", json={"url": url, "scope": "agent", "agent_id": bad}))
        assert "agent_id must be 1-128" in detail[("body", "agent_id")]
        detail = _detail(await api.client.post("/v1/webhooks", json={
            "url": url, "scope": "organization", "organization_id": bad.replace("agent", "org")}))
        assert "organization_id must be 1-128" in detail[("body", "organization_id")]
    await _nothing_stored(api)
    # "" is "absent", as a client leaving the other owner empty means it
    r = await api.client.post("/v1/webhooks", json={"url": url, "scope": "organization", "organization_id": "org-1",
                                                    "agent_id": ""})
    assert r.status_code == 201 and r.json()["agent_id"] is None, r.text


async def test_urls_that_cannot_be_sent_as_written_are_refused(api):
    base = api.receiver.url("")
    for url, says in ((f"{base}/a\r\nX-Injected: 1", "U+000D (CR)"), (f"{base}/a b", "U+0020 (space)"),
                      (f"{base}/a\tb", "U+0009 (tab)"), (f"{base}/\u202e", "U+202E"),
                      (base.replace("://", "://user:pass@") + "/", "credentials in the URL are not allowed"),
                      (f"{base}/#top", "fragment"), (f"{base}/%zz", "two hex digits")):
        detail = _detail(await api.client.put("/v1/agents/agent-1/webhook", json={"url": url}))
        assert says in detail[("body", "url")], (url, detail)
        detail = _detail(await api.client.post("/v1/webhooks", json={"url": url, "scope": "global"}))
        assert says in detail[("body", "url")]
    await _nothing_stored(api)


async def test_urls_are_stored_normalised_and_delivered_there(api):
    port = api.receiver.port
    stored = await api.put_webhook("agent-1", "/Hooks~", url=f"HTTP://127.0.0.1:{port}/Hooks%7e?v=%31")
    assert stored["url"] == f"http://127.0.0.1:{port}/Hooks~?v=1"
    assert (await api.client.get("/v1/agents/agent-1/webhook")).json()["url"] == stored["url"]
    api.receiver.secrets["/Hooks~"] = stored["secret"]
    event_id = await api.publish("agent-1")
    [got] = await api.receiver.wait_for(1, 20, "/Hooks~")
    assert got.headers["webhook-id"] == event_id and got.letta_verified
    r = await api.client.patch(f"/v1/webhooks/{stored['id']}", json={"url": f"http://127.0.0.1:{port}/a/./b%2f"})
    assert r.status_code == 200 and r.json()["url"] == f"http://127.0.0.1:{port}/a/b%2F", r.text
    glob = await api.client.post("/v1/webhooks", json={"url": "HTTP://Example.COM:80", "scope": "global"})
    assert glob.status_code == 201 and glob.json()["url"] == "http://example.com/", glob.text


async def test_ids_at_the_grammar_limits_are_stored_and_delivered(api):
    """128-character agent and organization ids and a 64-character event id: within every column (PostgreSQL
    refuses longer ones), so the history writer is never handed a row it cannot store."""
    agent = ("agent-" + "Az09_.:-" * 20)[:128]
    org = ("org-" + "0" * 200)[:128]
    event_id = "evt_" + "ab" * 30
    # one more character is refused (before: 201 on SQLite, a 500 from PostgreSQL's String(128))
    assert ("path", "agent_id") in _detail(await api.client.put(f"/v1/agents/{agent}x/webhook",
                                                                  json={"url": api.receiver.url("/agent")}))
    await api.put_webhook(agent, "/agent")
    r = await api.client.post("/v1/webhooks", json={"url": api.receiver.url("/org"), "scope": "organization",
                                                    "organization_id": org})
    assert r.status_code == 201, r.text
    api.receiver.secrets["/org"] = r.json()["secret"]
    assert await api.publisher.publish_event(agent, "agent.step.completed", {"step_id": "s", "status": "success"},
                                             organization_id=org, event_id=event_id, strict=True) == event_id
    await api.receiver.wait_for(1, 20, "/agent")
    await api.receiver.wait_for(1, 20, "/org")

    async def recorded() -> list:
        page = (await api.client.get(f"/v1/agents/{agent}/webhook/deliveries")).json()["data"]
        return [(d["event_id"], d["agent_id"], d["status"]) for d in page if d["status"] == "succeeded"]

    assert await wait_until(recorded, 20, what="the succeeded delivery row") == [(event_id, agent, "succeeded")]


async def test_api_docs_need_the_key(api):
    basic = "Basic " + base64.b64encode(f"api:{API_KEY}".encode()).decode()
    wrong = "Basic " + base64.b64encode(b"api:lbk_wrong").decode()
    for path in ("/docs", "/redoc", "/openapi.json"):
        anon = await api.anon.get(path)
        assert anon.status_code == 401, (path, anon.text)
        assert anon.headers["WWW-Authenticate"].startswith('Basic realm="letta-bus API docs"')  # a browser asks
        assert (await api.anon.get(path, headers={"Authorization": wrong})).status_code == 401
        assert (await api.anon.get(path, headers={"Authorization": "Bearer lbk_wrong"})).status_code == 401
        assert (await api.client.get(path)).status_code == 200, path  # Bearer
        assert (await api.anon.get(path, headers={"Authorization": basic})).status_code == 200, path
    assert "/openapi.json" in (await api.client.get("/docs")).text
    spec = (await api.client.get("/openapi.json")).json()
    assert "/healthz" in spec["paths"] and "/docs" not in spec["paths"]
    [param] = [p for p in spec["paths"]["/v1/agents/{agent_id}/webhook"]["put"]["parameters"]
               if p["name"] == "agent_id"]
    assert param["schema"]["maxLength"] == 128 and param["schema"]["pattern"].startswith("^[A-Za-z0-9]")
    assert json.dumps(spec).count("bearer") >= 1  # the routes still declare the bearer scheme
    assert (await api.anon.get("/healthz")).status_code in (200, 503)  # still open
    assert (await api.anon.get("/docs/oauth2-redirect")).status_code in (401, 404)
