"""Delivery history (filters, cursor pagination, attempts) and manual retry, one and bulk, on the real pipeline."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from tests.helpers import wait_until


async def _settled(api, agent_id: str, count: int) -> list[dict]:
    """Wait until the agent webhook's ``count`` deliveries are all succeeded or failed; returns them."""

    async def done():
        page = (await api.client.get(f"/v1/agents/{agent_id}/webhook/deliveries", params={"limit": 500})).json()
        rows = page["data"]
        return rows if len(rows) == count and all(d["status"] in ("succeeded", "failed") for d in rows) else None

    return await wait_until(done, 10, interval_s=0.05, what=f"{count} settled deliveries")


async def test_list_filters_and_pages_newest_first(api):
    await api.put_webhook("agent-1", "/h")
    api.receiver.respond("/h", 200, 400, 200, 400, 200, 200, 200)
    t0 = datetime.now(timezone.utc)
    for i in range(7):
        kind = "agent.step.completed" if i % 2 == 0 else "agent.run.completed"
        data = {"step_id": f"s{i}", "status": "success"} if i % 2 == 0 else {"run_id": f"r{i}", "status": "completed"}
        await api.publish("agent-1", kind, data)
        await api.receiver.wait_for(i + 1, 5, "/h")  # one at a time: creation order = publish order
    rows = await _settled(api, "agent-1", 7)
    assert [d["created_at"] for d in rows] == sorted((d["created_at"] for d in rows), reverse=True)
    assert sorted(d["status"] for d in rows).count("failed") == 2

    seen, cursor = [], None
    while True:
        page = (await api.client.get("/v1/agents/agent-1/webhook/deliveries",
                                     params={"limit": 3, **({"cursor": cursor} if cursor else {})})).json()
        seen += [d["id"] for d in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [d["id"] for d in rows]  # three pages, no gap, no repeat

    q = lambda **p: api.client.get("/v1/agents/agent-1/webhook/deliveries", params=p)  # noqa: E731
    failed = (await q(status="failed")).json()["data"]
    assert len(failed) == 2 and all(d["last_status_code"] == 400 for d in failed)
    runs = (await q(event_type="agent.run.completed")).json()["data"]
    assert len(runs) == 3 and {d["event_type"] for d in runs} == {"agent.run.completed"}
    middle = rows[3]["created_at"]
    newer = (await q(since=middle)).json()["data"]
    older = (await q(until=middle)).json()["data"]
    assert len(newer) == 4 and len(older) == 3
    assert (await q(since=t0.isoformat(), until=(t0 + timedelta(hours=1)).isoformat())).json()["data"] == rows

    for params, field in (({"status": "done"}, "status"), ({"cursor": "garbage!"}, "cursor"),
                          ({"since": "yesterday"}, "since"), ({"limit": 0}, "limit"),
                          ({"since": middle, "until": middle}, "until")):
        r = await q(**params)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", field], (params, r.text)
    assert (await api.client.get("/v1/agents/nobody/webhook/deliveries")).status_code == 404


async def test_show_has_every_attempt_and_retry_continues_numbering(api):
    await api.put_webhook("agent-1", "/r")
    api.receiver.respond("/r", 503, 200)  # retried once, then succeeds
    await api.publish("agent-1")
    [d] = await _settled(api, "agent-1", 1)
    shown = (await api.client.get(f"/v1/webhook-deliveries/{d['id']}")).json()
    assert shown["status"] == "succeeded" and shown["attempts"] == 2 and shown["event_seq"] >= 1
    assert [(a["number"], a["status_code"]) for a in shown["attempt_log"]] == [(1, 503), (2, 200)]
    assert (await api.client.get("/v1/webhook-deliveries/dlv_missing")).status_code == 404

    api.receiver.respond("/r", 400)
    await api.publish("agent-1", data={"step_id": "s2", "status": "success"})
    failed = await wait_until(lambda: _one(api, "failed"), 10, what="a failed delivery")
    original = [r.body for r in api.receiver.received if r.headers["X-Letta-Delivery"] == failed["id"]][0]

    api.receiver.delay_s["/r"] = 0.5  # the retry's attempt stays in flight while a second retry is asked for
    r = await api.client.post(f"/v1/webhook-deliveries/{failed['id']}/retry")
    assert r.status_code == 202, r.text
    assert r.json() == {"delivery_id": failed["id"], "status": "queued", "previous_status": "failed",
                        "attempts_so_far": 1}
    second = await api.client.post(f"/v1/webhook-deliveries/{failed['id']}/retry")
    assert second.status_code == 409 and "pending" in second.json()["detail"]  # claimed: not queued twice
    del api.receiver.delay_s["/r"]

    async def retried():
        shown = (await api.client.get(f"/v1/webhook-deliveries/{failed['id']}")).json()
        return shown if shown["status"] == "succeeded" else None

    shown = await wait_until(retried, 10, what="retried delivery succeeded")
    assert [(a["number"], a["status_code"]) for a in shown["attempt_log"]] == [(1, 400), (2, 200)]
    bodies = [r.body for r in api.receiver.received if r.headers["X-Letta-Delivery"] == failed["id"]]
    assert bodies == [original, original]  # byte for byte the published envelope
    assert (await api.client.post("/v1/webhook-deliveries/dlv_missing/retry")).status_code == 404


async def _one(api, status: str) -> dict | None:
    rows = (await api.client.get("/v1/agents/agent-1/webhook/deliveries", params={"status": status})).json()["data"]
    return rows[0] if rows else None


async def test_retry_of_an_event_that_left_the_stream_is_410(api):
    await api.put_webhook("agent-1", "/g")
    api.receiver.respond("/g", 400)
    await api.publish("agent-1")
    failed = await wait_until(lambda: _one(api, "failed"), 10, what="a failed delivery")
    await api.nc.jetstream().delete_msg(api.settings.events_stream, failed["event_seq"])
    r = await api.client.post(f"/v1/webhook-deliveries/{failed['id']}/retry")
    assert r.status_code == 410 and "replay window" in r.json()["detail"]
    assert (await _one(api, "failed"))["id"] == failed["id"]  # the claim was undone

    await api.client.put("/v1/agents/agent-1/webhook", json={"url": api.receiver.url("/g"), "enabled": False})
    r = await api.client.post(f"/v1/webhook-deliveries/{failed['id']}/retry")
    assert r.status_code == 409 and "disabled" in r.json()["detail"]


async def test_retry_failed_queues_every_failed_delivery_since(api):
    await api.put_webhook("agent-1", "/b")
    api.receiver.respond("/b", 400, 400, 200, 400)
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    for i in range(4):
        await api.publish("agent-1", data={"step_id": f"s{i}", "status": "success"})
    await _settled(api, "agent-1", 4)
    url = "/v1/agents/agent-1/webhook/retry-failed"
    later = await api.client.post(url, json={"since": (datetime.now(timezone.utc) + timedelta(minutes=1)).isoformat()})
    assert later.json() == {"queued": 0, "remaining": 0, "refused": {}}
    first = await api.client.post(url, json={"since": since.isoformat(), "limit": 2})
    assert first.status_code == 202 and first.json() == {"queued": 2, "remaining": 1, "refused": {}}
    rest = (await api.client.post(url, json={"since": since.isoformat()})).json()
    assert rest == {"queued": 1, "remaining": 0, "refused": {}}
    rows = await _settled(api, "agent-1", 4)
    assert all(d["status"] == "succeeded" for d in rows)
    assert sorted(d["attempts"] for d in rows) == [1, 2, 2, 2]
    r = await api.client.post(url, json={"since": "not a time"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "since"]
    assert (await api.client.post("/v1/agents/nobody/webhook/retry-failed",
                                  json={"since": since.isoformat()})).status_code == 404
