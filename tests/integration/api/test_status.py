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
