"""POST /v1/agents/{agent_id}/webhook/replay: events read back from LETTA_EVENTS, including ones from before
the webhook existed or while it was disabled; replayed deliveries are rows of their own."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from tests.helpers import wait_until

RUN = {"run_id": "run-1", "status": "completed"}


async def test_replay_delivers_events_from_before_the_webhook_existed(api):
    t0 = datetime.now(timezone.utc) - timedelta(seconds=1)
    before = [await api.publish("agent-1"), await api.publish("agent-1", "agent.run.completed", RUN),
              await api.publish("agent-1", "agent.tool.attached", {"tool_id": "t", "tool_name": "x"})]
    await api.publish("agent-2")  # another agent's: never replayed here
    await api.put_webhook("agent-1", "/p", events=["agent.step.*", "agent.run.completed"])
    await asyncio.sleep(0.3)
    assert api.receiver.received == []  # the fan-out routed them to nobody

    r = await api.client.post("/v1/agents/agent-1/webhook/replay", json={"since": t0.isoformat()})
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["replay_id"].startswith("rpl_") and out["done"] and out["queued"] == 2
    assert out["scanned"] == 4  # two patterns: every event since t0 is read (letta.>) and matched here
    hits = await api.receiver.wait_for(2, 5, "/p")
    assert sorted(h.headers["webhook-id"] for h in hits) == sorted(before[:2])  # the webhook's own patterns
    assert all(h.letta_verified and h.standard_verified for h in hits)

    async def replayed():
        rows = (await api.client.get("/v1/agents/agent-1/webhook/deliveries")).json()["data"]
        return rows if len(rows) == 2 and all(d["status"] == "succeeded" for d in rows) else None

    rows = await wait_until(replayed, 10, what="replayed deliveries succeeded")
    assert all(d["replayed"] and d["replay_id"] == out["replay_id"] for d in rows)

    # Again, with an explicit event filter: a new replay id, new delivery rows, the events delivered again.
    again = (await api.client.post("/v1/agents/agent-1/webhook/replay",
                                   json={"since": t0.isoformat(), "events": ["agent.tool.*"]})).json()
    assert again["queued"] == 1 and again["replay_id"] != out["replay_id"]
    assert again["scanned"] == 1  # one pattern: the server reads only letta.agent.tool.*
    [tool] = [h for h in await api.receiver.wait_for(3, 5, "/p") if h.headers["X-Letta-Event"] == "agent.tool.attached"]
    assert tool.headers["webhook-id"] == before[2]


async def test_replay_covers_a_disabled_period_and_pages(api):
    await api.put_webhook("agent-1", "/d", enabled=False)
    t0 = datetime.now(timezone.utc) - timedelta(seconds=1)
    missed = [await api.publish("agent-1", data={"step_id": f"s{i}", "status": "success"}) for i in range(5)]
    await asyncio.sleep(0.3)
    r = await api.client.post("/v1/agents/agent-1/webhook/replay", json={"since": t0.isoformat()})
    assert r.status_code == 409 and "disabled" in r.json()["detail"]
    await api.put_webhook("agent-1", "/d", enabled=True)
    t1 = datetime.now(timezone.utc)
    await asyncio.sleep(0.05)
    live = await api.publish("agent-1", data={"step_id": "live", "status": "success"})
    await api.receiver.wait_for(1, 5, "/d")

    body = {"since": t0.isoformat(), "until": t1.isoformat(), "limit": 2}
    pages = []
    while True:
        page = (await api.client.post("/v1/agents/agent-1/webhook/replay", json=body)).json()
        pages.append(page)
        if page["done"]:
            break
        body.update(replay_id=page["replay_id"], start_seq=page["next_seq"], end_seq=page["end_seq"])
    assert [p["queued"] for p in pages] == [2, 2, 1] and len({p["replay_id"] for p in pages}) == 1
    hits = await api.receiver.wait_for(6, 5, "/d")
    await asyncio.sleep(0.3)
    ids = [h.headers["webhook-id"] for h in api.receiver.received]
    assert sorted(ids) == sorted(missed + [live])  # each missed event once; `until` kept the live one out
    assert len(hits) == 6


async def test_replay_bad_input(api):
    url = "/v1/agents/agent-1/webhook/replay"
    assert (await api.client.post(url, json={"since": "2026-01-01T00:00:00Z"})).status_code == 404
    await api.put_webhook("agent-1", "/v")
    cases = (({}, "since"), ({"since": "soon"}, "since"),
             ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "until"),
             ({"since": "2026-01-01T00:00:00Z", "events": ["agent.**"]}, "events"),
             ({"since": "2026-01-01T00:00:00Z", "limit": 0}, "limit"),
             ({"since": "2026-01-01T00:00:00Z", "replay_id": "x"}, "replay_id"))
    for body, field in cases:
        r = await api.client.post(url, json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["detail"][0]["loc"][:2] == ["body", field], (body, r.text)
    empty = (await api.client.post(url, json={"since": "2020-01-01T00:00:00Z"})).json()
    assert empty["done"] and empty["queued"] == 0
