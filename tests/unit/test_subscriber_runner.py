"""Subscriber configuration, start positions, Event decoding and tail formatting, without a server."""

from __future__ import annotations

import ast
from datetime import datetime, timedelta, timezone
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, DeliverPolicy

from bus.catalog import StepCompleted
from bus.envelope import Envelope, encode
from config.settings import Settings
from subscribers import Event, Subscriber, format_event, start_config
from subscribers.tail import compact_data

SETTINGS = Settings(_env_file=None, nats_url="nats://127.0.0.1:1", ack_wait_s=12, max_ack_pending=500)
ACK_REPLY = "$JS.ACK.LETTA_EVENTS.svc.2.41.7.1767268800000000000.3"  # delivered 2, stream seq 41, consumer seq 7


def message(body: bytes, subject: str = "letta.agent.step.completed") -> Msg:
    return Msg(_client=None, subject=subject, reply=ACK_REPLY, data=body, headers={"Nats-Msg-Id": "evt_1"})


def envelope(**data) -> bytes:
    return encode(Envelope(event_id="evt_1", event_type="agent.step.completed", timestamp="2026-01-01T12:00:00.123456Z",
                           agent_id="agent-1", organization_id="org-1", data=data))


async def handler(event: Event) -> None:
    pass


def test_consumer_config_one_subject():
    config = Subscriber("billing", ["letta.agent.run.completed"], settings=SETTINGS).consumer_config()
    assert (config.name, config.durable_name) == ("billing", "billing")
    assert config.filter_subject == "letta.agent.run.completed" and config.filter_subjects is None
    assert config.ack_policy is AckPolicy.EXPLICIT and config.ack_wait == 12 and config.max_deliver == 10
    assert config.deliver_policy is DeliverPolicy.NEW and config.max_ack_pending == 500


def test_consumer_config_several_subjects_and_defaults():
    sub = Subscriber("audit", settings=SETTINGS, max_deliver=3, ack_wait_s=2, start="all")
    assert sub.subjects == ["letta.>"] and sub.stream == "LETTA_EVENTS"
    config = Subscriber("a", ["letta.agent.>", "letta.tool.>"], settings=SETTINGS).consumer_config()
    assert config.filter_subject is None and config.filter_subjects == ["letta.agent.>", "letta.tool.>"]
    config = sub.consumer_config()
    assert (config.max_deliver, config.ack_wait, config.deliver_policy) == (3, 2.0, DeliverPolicy.ALL)
    assert Subscriber("a", "letta.agent.>", settings=SETTINGS).subjects == ["letta.agent.>"]


@pytest.mark.parametrize("kwargs", [
    {"durable": "bad.name"}, {"durable": "has space"}, {"max_in_flight": 0}, {"max_deliver": 0},
    {"ack_wait_s": 0}, {"fetch_timeout_s": -1}, {"start": "yesterday"}, {"subjects": ["a b"]},
])
def test_bad_arguments(kwargs):
    kwargs = {"durable": "svc", **kwargs}
    with pytest.raises(ValueError):
        Subscriber(settings=SETTINGS, **kwargs)


def test_handler_must_be_async():
    sub = Subscriber("svc", settings=SETTINGS)
    with pytest.raises(TypeError, match="async function"):
        sub.handler(lambda event: None)
    assert sub.handler(handler) is handler
    assert Subscriber("svc", settings=SETTINGS, handler=handler)._handler is handler


async def test_start_without_handler_or_url():
    with pytest.raises(RuntimeError, match="no handler"):
        await Subscriber("svc", settings=SETTINGS).start()
    with pytest.raises(ValueError, match="LETTA_BUS_NATS_URL"):
        await Subscriber("svc", settings=Settings(_env_file=None, nats_url=None), handler=handler).start()


def test_start_config():
    assert start_config("new") == {"deliver_policy": DeliverPolicy.NEW}
    assert start_config("all") == {"deliver_policy": DeliverPolicy.ALL}
    assert start_config(42) == {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": 42}
    when = datetime(2026, 1, 1, 13, tzinfo=timezone(timedelta(hours=1)))
    assert start_config(when) == {"deliver_policy": DeliverPolicy.BY_START_TIME,
                                  "opt_start_time": datetime(2026, 1, 1, 12, tzinfo=timezone.utc)}
    ago = start_config(timedelta(minutes=5))["opt_start_time"]
    assert abs((datetime.now(timezone.utc) - ago).total_seconds() - 300) < 5
    for bad in (0, True, datetime(2026, 1, 1), "last", 1.5):
        with pytest.raises(ValueError):
            start_config(bad)


def test_event_from_msg():
    event = Event.from_msg(message(envelope(step_id="s1", status="success", model="gpt")))
    assert (event.event_id, event.event_type, event.agent_id, event.organization_id) == (
        "evt_1", "agent.step.completed", "agent-1", "org-1")
    assert event.data["model"] == "gpt" and isinstance(event.data_typed, StepCompleted)
    assert event.data_typed.step_id == "s1"
    assert (event.num_delivered, event.stream_seq, event.metadata.sequence.consumer) == (2, 41, 7)
    assert event.headers == {"Nats-Msg-Id": "evt_1"} and event.subject == "letta.agent.step.completed"


def test_event_outside_catalog_keeps_the_mapping():
    body = encode(Envelope(event_id="e", event_type="agent.memory.updated", timestamp="t", agent_id="a",
                           data={"block": "human"}))
    assert Event.from_msg(message(body, "letta.agent.memory.updated")).data_typed == {"block": "human"}


@pytest.mark.parametrize("body", [b"\xff", b"[]", b'{"event_id": "e"}', envelope(status="success")])
def test_event_from_bad_msg_raises(body):
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        Event.from_msg(message(body))


def test_format_event_line():
    line = format_event(message(envelope(step_id="s1", status="success", note="x" * 100, ids=list(range(9)))))
    assert line.startswith("2026-01-01T12:00:00.123Z  agent.step.completed  agent-1  evt_1  {")
    assert '"note":"' + "x" * 39 + "…" in line and '"ids":[0,1,2,3,4,"…+4"]' in line
    assert "\n" not in line


def test_format_event_undecodable_and_long_data():
    line = format_event(message(b"\x00garbage"))
    assert "letta.agent.step.completed  undecodable (8 bytes)" in line and line.startswith("2026-01-01T12:00:00")
    text = compact_data({f"k{i}": "v" * 30 for i in range(20)})
    assert len(text) == 200 and text.endswith("…")


def test_subscribers_never_import_dispatcher():
    for path in (Path(__file__).resolve().parents[2] / "subscribers").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert all(n.split(".")[0] != "dispatcher" for n in names), (path, names)
