"""``webhook_events`` filtering end to end: real nats-server, real dispatcher, real HTTP receiver, real SQLite.

"Nothing arrived" is proved, not assumed: after the expected deliveries arrived, both durables are waited on until
nothing is pending or unacknowledged (every event routed, every task POSTed and acked), and then the webhooks
stream, the receiver and the delivery history are checked for the unwanted ones.
"""

from __future__ import annotations

import asyncio
import json

from bus.catalog import CATALOG
from bus.publisher import EventPublisher
from tests.helpers import CATALOG_SAMPLES, deliveries, wait_drained

AGENT_STEPS = {"agent.step.completed", "agent.step.failed", "agent.step.cancelled"}


async def publish_all(publisher: EventPublisher, agent_id: str) -> dict[str, str]:
    """Every catalog event type once for ``agent_id``; returns event_type -> event_id."""
    return {t: await publisher.publish_event(agent_id, t, CATALOG_SAMPLES[t], strict=True) for t in CATALOG}


async def test_webhook_events_filtering(settings, nc, store, receiver, dispatcher, provisioned):
    js = provisioned
    ep_a, _ = await store.set_agent_webhook("agent-a", url=receiver.url("/a"), events=[])
    ep_b, _ = await store.set_agent_webhook("agent-b", url=receiver.url("/b"),
                                            events=["agent.step.*", "agent.run.completed"])
    ep_c, _ = await store.set_agent_webhook("agent-c", url=receiver.url("/c"), events=["agent.>"])
    ep_d, _ = await store.set_agent_webhook("agent-d", url=receiver.url("/d"), events=[], enabled=False)
    await dispatcher.endpoints.refresh()

    publisher = EventPublisher(settings, nc)
    published = {agent: await publish_all(publisher, agent)
                 for agent in ("agent-e", "agent-d", "agent-c", "agent-b", "agent-a")}  # expected ones last
    expected = {
        "/a": set(CATALOG),
        "/b": AGENT_STEPS | {"agent.run.completed"},
        "/c": set(CATALOG) - {"tool.execution.completed"},
    }
    # a final marker each expected endpoint wants
    markers = {agent: await publisher.publish_event(agent, "agent.run.completed",
                                                    {"run_id": f"marker-{agent}", "status": "completed"}, strict=True)
               for agent in ("agent-a", "agent-b", "agent-c")}
    total = sum(len(v) for v in expected.values()) + len(markers)

    await receiver.wait_for(total, timeout_s=15)
    fanout = await wait_drained(js, settings.events_stream, settings.fanout_durable)
    sender = await wait_drained(js, settings.webhooks_stream, settings.sender_durable)
    await asyncio.sleep(0.3)  # grace: anything unwanted still in flight would show up now

    by_path: dict[str, list[str]] = {}
    for r in receiver.received:
        by_path.setdefault(r.path, []).append(json.loads(r.body)["event_type"])
    assert set(by_path) == {"/a", "/b", "/c"}, f"deliveries to {sorted(by_path)}"
    for path, wanted in expected.items():
        got = by_path[path]
        assert sorted(got) == sorted([*wanted, "agent.run.completed"]), path  # each once, plus the marker
    for r in receiver.received:
        assert r.path == {"agent-a": "/a", "agent-b": "/b", "agent-c": "/c"}[json.loads(r.body)["agent_id"]]

    # every event, including agent-e's (no endpoint) and agent-d's (disabled), was acked by the fan-out
    events = await js.stream_info(settings.events_stream)
    assert events.state.messages == 5 * len(CATALOG) + len(markers)
    assert fanout.num_pending == 0 and fanout.num_ack_pending == 0
    assert fanout.ack_floor.stream_seq == events.state.last_seq
    assert fanout.num_redelivered == 0
    # exactly one task per wanted (event, endpoint) pair, none for the disabled endpoint
    hooks = await js.stream_info(settings.webhooks_stream, subjects_filter=">")
    assert hooks.state.messages == total
    subjects = hooks.state.subjects or {}
    assert subjects.get(settings.delivery_subject(ep_a.id)) == len(CATALOG) + 1
    assert subjects.get(settings.delivery_subject(ep_b.id)) == 5
    assert subjects.get(settings.delivery_subject(ep_c.id)) == len(CATALOG)
    assert settings.delivery_subject(ep_d.id) not in subjects
    assert sender.num_pending == 0 and sender.num_ack_pending == 0
    assert sender.ack_floor.stream_seq == hooks.state.last_seq

    # delivery history: succeeded rows for the wanted pairs only
    rows = await deliveries(store)
    assert len(rows) == total and all(r.status == "succeeded" and r.attempts == 1 for r in rows)
    assert {r.agent_id for r in rows} == {"agent-a", "agent-b", "agent-c"}
    assert {r.event_id for r in rows if r.endpoint_id == ep_b.id} == {
        published["agent-b"][t] for t in expected["/b"]} | {markers["agent-b"]}
    assert not [r for r in rows if r.endpoint_id == ep_d.id]
    assert dispatcher.fanout.poison == 0


async def test_disabling_an_endpoint_stops_deliveries_and_enabling_resumes(settings, nc, store, receiver, dispatcher,
                                                                            provisioned):
    js = provisioned
    publisher = EventPublisher(settings, nc)
    await store.set_agent_webhook("agent-a", url=receiver.url("/a"), events=["agent.run.completed"])
    await dispatcher.endpoints.refresh()
    run = CATALOG_SAMPLES["agent.run.completed"]
    first = await publisher.publish_event("agent-a", "agent.run.completed", run, strict=True)
    await receiver.wait_for(1, timeout_s=10, path="/a")

    await store.set_agent_webhook("agent-a", url=receiver.url("/a"), events=["agent.run.completed"], enabled=False)
    await dispatcher.endpoints.refresh()
    await publisher.publish_event("agent-a", "agent.run.completed", run, strict=True)
    await wait_drained(js, settings.events_stream, settings.fanout_durable)
    await wait_drained(js, settings.webhooks_stream, settings.sender_durable)

    await store.set_agent_webhook("agent-a", url=receiver.url("/a"), events=["agent.run.completed"], enabled=True)
    await dispatcher.endpoints.refresh()
    last = await publisher.publish_event("agent-a", "agent.run.completed", run, strict=True)
    await receiver.wait_for(2, timeout_s=10, path="/a")
    await wait_drained(js, settings.webhooks_stream, settings.sender_durable)
    await asyncio.sleep(0.3)
    assert [json.loads(r.body)["event_id"] for r in receiver.received] == [first, last]
