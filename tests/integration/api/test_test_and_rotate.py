"""POST .../webhook/test (a webhook.test event through the real sender) and POST .../webhook/rotate-secret."""

from __future__ import annotations

import json

from dispatcher.cli.receiver import verify_letta, verify_standard
from tests.helpers import closed_port


async def test_test_event_reports_the_attempt(api):
    created = await api.put_webhook("agent-1", "/t", events=["agent.run.completed"])  # webhook.test not wanted
    r = await api.client.post("/v1/agents/agent-1/webhook/test")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == "succeeded" and out["status_code"] == 200 and out["error"] is None
    assert 0 < out["duration_ms"] < 2000 and out["delivery_id"].startswith("dlv_")
    [hit] = api.receiver.received
    assert hit.headers["X-Letta-Event"] == "webhook.test" and hit.letta_verified and hit.standard_verified
    body = json.loads(hit.body)
    assert body["event_type"] == "webhook.test" and body["agent_id"] == "agent-1"
    assert body["data"]["endpoint_id"] == created["id"]
    detail = (await api.client.get(f"/v1/webhook-deliveries/{out['delivery_id']}")).json()
    assert detail["event_seq"] is None and [a["status_code"] for a in detail["attempt_log"]] == [200]
    again = await api.client.post(f"/v1/webhook-deliveries/{out['delivery_id']}/retry")
    assert again.status_code == 409 and "no stream sequence" in again.json()["detail"]


async def test_test_event_reports_failures(api):
    await api.put_webhook("agent-1", "/t")
    api.receiver.respond("/t", 500)
    out = (await api.client.post("/v1/agents/agent-1/webhook/test")).json()
    assert out["status"] == "retrying" and out["status_code"] == 500 and out["response_excerpt"] == "status 500"

    r = await api.client.put("/v1/agents/agent-2/webhook", json={"url": f"http://127.0.0.1:{closed_port()}/x"})
    assert r.status_code == 201
    out = (await api.client.post("/v1/agents/agent-2/webhook/test")).json()
    assert out["status_code"] is None and "Connect" in out["error"]

    await api.client.put("/v1/agents/agent-1/webhook", json={"url": api.receiver.url("/t"), "enabled": False})
    r = await api.client.post("/v1/agents/agent-1/webhook/test")
    assert r.status_code == 409 and "disabled" in r.json()["detail"]
    assert (await api.client.post("/v1/agents/nobody/webhook/test")).status_code == 404


async def test_rotate_secret_returns_it_once_and_both_sign_during_the_window(api):
    created = await api.put_webhook("agent-1", "/r")
    old = created["secret"]
    r = await api.client.post("/v1/agents/agent-1/webhook/rotate-secret")
    assert r.status_code == 200, r.text
    new = r.json()["secret"]
    assert new.startswith("whsec_") and new != old and r.json()["previous_secret_valid_until"]
    got = (await api.client.get("/v1/agents/agent-1/webhook")).json()
    assert got["previous_secret_valid_until"] and "whsec_" not in json.dumps(got)

    api.receiver.secrets["/r"] = new
    await api.publish("agent-1")
    [hit] = await api.receiver.wait_for(1, 5, "/r")
    h = hit.headers
    assert verify_letta(new, hit.body, h["X-Letta-Signature"]) and not verify_letta(old, hit.body, h["X-Letta-Signature"])
    assert len(h["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert verify_standard(secret, hit.body, h["webhook-id"], h["webhook-timestamp"], h["webhook-signature"])

    chosen = await api.client.post("/v1/agents/agent-1/webhook/rotate-secret", json={"secret": "my-own-secret-0123456"})
    assert chosen.json()["secret"] == "my-own-secret-0123456"
    short = await api.client.post("/v1/agents/agent-1/webhook/rotate-secret", json={"secret": "short"})
    assert short.status_code == 422 and short.json()["detail"][0]["loc"] == ["body", "secret"]
    assert (await api.client.post("/v1/agents/nobody/webhook/rotate-secret")).status_code == 404
