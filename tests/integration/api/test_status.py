"""GET /v1/status: streams and consumers as the nats CLI reports them, and per-endpoint backlog, failures and
circuit state."""

from __future__ import annotations

from tests.helpers import wait_until


async def test_status_reports_streams_consumers_and_endpoints(api):
    ok = await api.put_webhook("agent-1", "/ok")
    bad = await api.put_webhook("agent-2", "/bad")
    api.receiver.respond("/bad", 400)
    await api.publish("agent-1")
    await api.publish("agent-2")
    await api.receiver.wait_for(1, 5, "/bad")

    async def settled():
        body = (await api.client.get("/v1/status")).json()
        eps = {e["id"]: e for e in body["endpoints"]}
        return body if eps[bad["id"]]["failed_24h"] == 1 and eps[ok["id"]]["backlog"] == 0 else None

    body = await wait_until(settled, 10, what="status with one failure")
    streams = {s["name"]: s for s in body["streams"]}
    events = streams[api.settings.events_stream]
    assert events["messages"] == 2 and events["bytes"] > 0 and events["last_seq"] == 2
    assert events["first_time"].startswith("20") and events["last_time"] >= events["first_time"]
    consumers = {c["name"]: c for c in body["consumers"]}
    assert consumers["webhook-fanout"]["pending"] == 0 and consumers["webhook-fanout"]["last_delivered_seq"] == 2
    assert {"pending", "ack_pending", "redelivered"} <= set(consumers["webhook-sender"])
    eps = {e["id"]: e for e in body["endpoints"]}
    assert eps[ok["id"]]["circuit"] == "closed" and eps[ok["id"]]["owner"] == "agent-1"
    assert eps[bad["id"]]["failed_24h"] == 1


async def test_status_lists_at_most_limit_endpoints_those_needing_attention_first(api):
    """A fleet's status is bounded: totals for every endpoint, and ``limit`` endpoints, the troubled ones first
    (before: every endpoint was listed, in creation order, and there were no totals)."""
    for i in range(3):
        await api.put_webhook(f"agent-{i}", "/ok")
    bad = await api.put_webhook("agent-bad", "/bad")  # created last: listed first only for its failure
    api.receiver.respond("/bad", 400)
    await api.publish("agent-bad")
    await api.receiver.wait_for(1, 5, "/bad")

    async def settled():
        body = (await api.client.get("/v1/status", params={"limit": 1})).json()
        seen = body["endpoint_totals"]["failed_24h"] == 1 and body["endpoints"][0]["failed_24h"] == 1
        return body if seen else None  # (totals and endpoints are separate reads: the row may land between)

    body = await wait_until(settled, 10, what="status with one failure")
    assert [e["id"] for e in body["endpoints"]] == [bad["id"]]
    assert "failures" in body["endpoints"][0]["attention"] and body["endpoints_truncated"] is True
    totals = body["endpoint_totals"]
    assert totals["endpoints"] == 4 and totals["enabled"] == 4 and totals["disabled"] == 0
    assert totals["backlog"] == 0 and totals["attention"] == 1
    everything = (await api.client.get("/v1/status")).json()  # the default limit (100) holds this small fleet
    assert len(everything["endpoints"]) == 4 and everything["endpoints_truncated"] is False
    assert everything["endpoints"][0]["id"] == bad["id"]
    assert (await api.client.get("/v1/status", params={"limit": 0})).status_code == 422
