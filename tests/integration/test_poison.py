"""Fault test: poison messages on ``letta.>`` published raw (no EventPublisher checks) between good events.

Each one is handled and recorded, and the dispatcher keeps delivering everything else:

* undecodable bodies (garbage bytes, JSON that is not an envelope, an envelope missing a field or with a wrong
  type, ``data`` that is not an object or nested 1,500 deep, invalid UTF-8, an ill-formed event type, an empty
  agent id, a control character in the event id, a garbage body just under the stream's ``max_msg_size``) are terminated by the fan-out: the server's
  MSG_TERMINATED advisory names each one's sequence, ``letta_bus_poison_events_total`` counts them and the fan-out
  logs each with its subject and sequence;
* a body over ``max_msg_size`` is refused by the server (JetStream error 10054) and a 10 MB body by the client
  (``MaxPayloadError``, over the server's 1 MB ``max_payload``): neither is stored;
* a valid envelope just under ``max_msg_size`` and an unknown but well-formed event type are delivered to the
  endpoints that want them (forward compatibility) and skipped (acked without a task) for the others;
* a valid event with a malformed ``traceparent`` header (control characters, 9 KB) is delivered without it.
"""

from __future__ import annotations

import asyncio
import json
import logging

import msgspec
import nats.errors
import pytest
from nats.js.errors import APIError
from prometheus_client import REGISTRY

from bus import envelope as env
from bus.ids import new_event_id
from bus.publisher import EventPublisher
from bus.streams import HEADER_ROOM
from tests.faults import STEP
from tests.helpers import deliveries, wait_drained, wait_until

pytestmark = pytest.mark.timeout(60)

ERR_MSG_TOO_BIG = 10054  # JetStream: "message size exceeds maximum allowed"
SECRET = "whsec_poison-test-secret-0123456"


def _envelope(event_type: str, agent_id: str, data: dict) -> tuple[bytes, dict[str, str], str]:
    e = env.Envelope(event_id=new_event_id(), event_type=event_type, timestamp=env.utc_timestamp(),
                     agent_id=agent_id, data=data)
    return env.encode(e), env.headers_for(e), e.event_id


def _poison_count() -> float:
    return REGISTRY.get_sample_value("letta_bus_poison_events_total") or 0.0


async def test_poison_messages_are_termed_or_skipped_and_the_rest_flows(settings, nc, store, receiver, dispatcher,
                                                                        provisioned, caplog):
    js = provisioned
    receiver.secrets.update({"/all": SECRET, "/steps": SECRET})
    ep_all, _ = await store.set_agent_webhook("agent-p", url=receiver.url("/all"), secret=SECRET)
    ep_steps, _ = await store.set_agent_webhook("agent-q", url=receiver.url("/steps"), secret=SECRET,
                                                events=["agent.step.*"])
    await dispatcher.endpoints.refresh()
    terminated: list[int] = []

    async def on_terminated(msg):
        terminated.append(json.loads(msg.data)["stream_seq"])

    advisories = await nc.subscribe(
        f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{settings.events_stream}.{settings.fanout_durable}",
        cb=on_terminated)
    publisher = EventPublisher(settings, nc)
    poison_before = _poison_count()
    max_msg = settings.max_event_bytes + HEADER_ROOM
    subject = settings.event_subject("agent.step.completed")
    good: dict[str, list[str]] = {"agent-p": [], "agent-q": []}

    async def publish_good(n: int) -> None:
        for i in range(n):
            for agent in good:
                good[agent].append(await publisher.publish_event(agent, "agent.step.completed",
                                                                 {**STEP, "step_id": f"ok-{len(good[agent])}"},
                                                                 strict=True))

    not_an_envelope = [
        b"\x00\xff\xfe\x80 garbage \x1b[31m",
        b'{"hello": "world"}',
        b"[1, 2, 3]",
        b"null",
        b'{"event_id": "evt_1", "event_type": "agent.step.completed", "timestamp": "x"}',  # agent_id missing
        b'{"event_id": 1, "event_type": "agent.step.completed", "timestamp": "x", "agent_id": "agent-p"}',
        b'{"event_id": "evt_2", "event_type": "agent.step.completed", "timestamp": "x", "agent_id": "agent-p", '
        b'"data": [1]}',  # data is not an object
        b'{"event_id": "evt_3", "event_type": "Agent Step!", "timestamp": "x", "agent_id": "agent-p"}',
        b'{"event_id": "evt_4", "event_type": "agent.step.completed\\r\\nX-Evil: 1", "timestamp": "x", '
        b'"agent_id": "agent-p"}',  # a type that would smuggle a header line
        b'{"event_id": "evt_5", "event_type": "agent.step.completed", "timestamp": "x", "agent_id": ""}',
        b'{"event_id": "evt_\\u0001", "event_type": "agent.step.completed", "timestamp": "x", "agent_id": "a"}',
        b"[" * 10_000,  # deep nesting, at the top
        b'{"event_id": "evt_6", "event_type": "agent.step.completed", "timestamp": "x", "agent_id": "agent-p", '
        b'"data": {"x": ' + b"[" * 1500 + b"]" * 1500 + b"}}",  # ... and inside data (msgspec: RecursionError)
        b'{"event_id": "\x80", "event_type": "agent.step.completed", "timestamp": "x", "agent_id": "agent-p"}',
        b'{"event_id": "evt_7", "event_type": "agent.step.completed", "timestamp": "x", "agent_id": "agent-p", '
        b'"data": {"k": "\xff\xfe"}}',  # invalid UTF-8: in a field, and inside data
        b"\xff" * (max_msg - 1024),  # garbage just under max_msg_size
    ]
    big_body, big_headers, big_id = _envelope("agent.step.completed", "agent-p", {
        **STEP, "blob": "x" * (max_msg - 1024 - 400)})
    assert max_msg - 1024 < len(big_body) + sum(len(k) + len(v) + 4 for k, v in big_headers.items()) < max_msg
    unknown_body, unknown_headers, unknown_id = _envelope("agent.memory.updated", "agent-p", {"block": "human"})
    # a valid event whose traceparent would put control characters (or 9,000 bytes) into the webhook request:
    # delivered without it
    traced_body, traced_headers, traced_id = _envelope("agent.step.completed", "agent-p", STEP)
    traced_headers["traceparent"] = "00-\x01\x02-" + "x" * 9000
    unknown_q_body, unknown_q_headers, unknown_q_id = _envelope("agent.memory.updated", "agent-q", {"block": "x"})

    with caplog.at_level(logging.ERROR, logger="dispatcher.delivery.fanout"):
        await publish_good(10)
        poison_seqs = []
        for body in not_an_envelope:
            ack = await js.publish(subject, body, headers={env.H_MSG_ID: new_event_id()})
            poison_seqs.append(ack.seq)
            await publish_good(1)  # interleaved: each poison message sits between good ones
        with pytest.raises(APIError) as too_big:
            await js.publish(subject, b"x" * (max_msg + 1024))
        assert too_big.value.err_code == ERR_MSG_TOO_BIG
        with pytest.raises(nats.errors.MaxPayloadError):
            await js.publish(subject, b"x" * (10 * 1024 * 1024))
        await js.publish(subject, big_body, headers=big_headers)
        await js.publish(settings.event_subject("agent.memory.updated"), unknown_body, headers=unknown_headers)
        await js.publish(settings.event_subject("agent.memory.updated"), unknown_q_body, headers=unknown_q_headers)
        await js.publish(subject, traced_body, headers=traced_headers)
        await publish_good(10)

        expected_all = set(good["agent-p"]) | {big_id, unknown_id, traced_id}
        expected_steps = set(good["agent-q"])
        await receiver.wait_for(len(expected_all), 20, path="/all")
        await receiver.wait_for(len(expected_steps), 20, path="/steps")
        await wait_drained(js, settings.events_stream, settings.fanout_durable)
        await wait_drained(js, settings.webhooks_stream, settings.sender_durable)
        await wait_until(lambda: sorted(terminated) == sorted(poison_seqs), 10, what="a termination per poison")
    await advisories.unsubscribe()

    # everything else was delivered, exactly once, verified, and nothing for the poison
    by_path: dict[str, list[str]] = {"/all": [], "/steps": []}
    for r in receiver.received:
        by_path[r.path].append(r.headers["webhook-id"])
        assert r.letta_verified and r.standard_verified
    assert sorted(by_path["/all"]) == sorted(expected_all)
    assert sorted(by_path["/steps"]) == sorted(expected_steps)  # agent-q's unknown type: skipped by its filter
    big = next(r for r in receiver.received if r.headers["webhook-id"] == big_id)
    assert big.body == big_body and big.headers["X-Letta-Event"] == "agent.step.completed"
    traced = next(r for r in receiver.received if r.headers["webhook-id"] == traced_id)
    assert "traceparent" not in traced.headers and traced.body == traced_body
    unknown = next(r for r in receiver.received if r.headers["webhook-id"] == unknown_id)
    assert unknown.body == unknown_body and unknown.headers["X-Letta-Event"] == "agent.memory.updated"

    # recorded: metric, fan-out counter, one log line per poison message naming its sequence
    assert _poison_count() - poison_before == len(not_an_envelope)
    assert dispatcher.fanout.poison == len(not_an_envelope)
    logged = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(logged) == len(not_an_envelope)
    assert all(f"(seq {seq})" in line for seq, line in zip(poison_seqs, logged))
    # neither refused body was stored
    info = await js.stream_info(settings.events_stream)
    assert info.state.messages == len(good["agent-p"]) * 2 + len(not_an_envelope) + 4
    rows = await deliveries(store)
    assert {r.event_id for r in rows} == expected_all | expected_steps
    assert all(r.status == "succeeded" for r in rows)


async def test_fanout_counts_and_skips_an_unknown_type_no_endpoint_wants(settings, nc, store, receiver, dispatcher,
                                                                         provisioned):
    """An unknown well-formed type for an agent whose endpoint filters it out: acked without a task, counted as a
    fanned-out event, never delivered, and the next event still is."""
    js = provisioned
    await store.set_agent_webhook("agent-r", url=receiver.url("/r"), events=["agent.run.completed"])
    await dispatcher.endpoints.refresh()
    body, headers, _ = _envelope("agent.memory.updated", "agent-r", {"block": "persona"})
    events_before = REGISTRY.get_sample_value("letta_bus_events_fanned_out_total") or 0.0
    await js.publish(settings.event_subject("agent.memory.updated"), body, headers=headers)
    run = await EventPublisher(settings, nc).publish_event(
        "agent-r", "agent.run.completed", {"run_id": "run-1", "status": "completed"}, strict=True)
    await receiver.wait_for(1, 10, path="/r")
    await wait_drained(js, settings.events_stream, settings.fanout_durable)
    await asyncio.sleep(0.2)
    assert [r.headers["webhook-id"] for r in receiver.received] == [run]
    assert (REGISTRY.get_sample_value("letta_bus_events_fanned_out_total") or 0.0) - events_before == 2
    hooks = await js.stream_info(settings.webhooks_stream)
    assert hooks.state.messages == 1
    assert dispatcher.fanout.poison == 0
    with pytest.raises(msgspec.ValidationError):
        env.decode(b'{"event_id": 1}')  # sanity: the decoder the fan-out relies on refuses wrong types
