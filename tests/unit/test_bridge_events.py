"""The bridge's pure mapping from Letta objects to catalog events (dispatcher.bridge.events); the HTTP path is
tested against a real server in tests/integration/test_bridge.py."""

from __future__ import annotations

import pytest

from bus.catalog import validate_data
from dispatcher.bridge.events import (BadLettaData, StepNotTerminal, bridge_event_id, cancelled_step_event,
                                      job_event, rfc3339, run_event, step_event, tool_calls_from)
from tests.letta_standin import make_failed_step, make_messages, make_step


def test_event_ids_are_deterministic_and_distinct():
    a = bridge_event_id("step", "step-1", "success")
    assert a == bridge_event_id("step", "step-1", "success") and a.startswith("evt_") and len(a) == 36
    assert len({a, bridge_event_id("step", "step-1", "failed"), bridge_event_id("run", "step-1", "success"),
                bridge_event_id("step", "step-2", "success")}) == 4


@pytest.mark.parametrize("step", [make_step(), make_failed_step(), make_step(status="cancelled")])
def test_step_events_fit_the_catalog(step):
    event = step_event(step)
    validate_data(event.event_type, event.data)  # raises on a missing required field
    assert event.data["step_id"] == step["id"] and event.agent_id == step["agent_id"]


def test_pending_unknown_and_agentless_steps():
    with pytest.raises(StepNotTerminal):
        step_event(make_step(status="pending"))
    with pytest.raises(BadLettaData, match="^status: "):
        step_event(make_step(status="exploded"))
    with pytest.raises(BadLettaData, match="^agent_id: "):
        step_event(make_step(agent_id=None))


def test_tool_calls_come_from_letta_s_tool_call_messages():
    step = make_step()
    event = step_event(step, make_messages(step, tool="roll_dice"))
    assert event.data["tool_calls"] == [{"id": "call_000001", "type": "function",
                                         "function": {"name": "roll_dice", "arguments": '{"query": "hello"}'}}]
    assert step_event(step).data["tool_calls"] == []


def test_tool_calls_skip_malformed_entries():
    messages = [
        {"message_type": "tool_call_message", "tool_calls": [
            {"tool_call_id": "c1", "name": "f", "arguments": {"a": 1}}, {"tool_call_id": "c2"}, "junk"]},
        {"message_type": "tool_call_message", "tool_calls": None, "tool_call": {"tool_call_id": "c3", "name": "g"}},
        {"message_type": "assistant_message", "tool_calls": [{"tool_call_id": "c4", "name": "h"}]}, "junk",
    ]
    assert tool_calls_from(messages) == [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "c3", "type": "function", "function": {"name": "g", "arguments": ""}},
    ]


def test_a_cancelled_run_s_last_step_event_fits_the_catalog():
    step = make_step()
    event = cancelled_step_event(step, step["run_id"])
    validate_data(event.event_type, event.data)
    assert event.event_type == "agent.step.cancelled" and event.agent_id == step["agent_id"]
    assert event.event_id != bridge_event_id("step", step["id"], "success")
    with pytest.raises(BadLettaData):
        cancelled_step_event(make_step(agent_id=None), "run-1")


def test_completed_at_normalized_to_rfc3339_utc():
    assert rfc3339("2026-01-01T12:00:03.120000", "completed_at") == "2026-01-01T12:00:03.120000Z"
    assert rfc3339("2026-01-01T14:00:00+02:00", "completed_at") == "2026-01-01T12:00:00.000000Z"
    assert rfc3339(None, "completed_at") is None
    with pytest.raises(BadLettaData, match="^completed_at: "):
        rfc3339(1767268800, "completed_at")


def test_run_and_job_events_fit_the_catalog_and_drop_bulky_metadata():
    run = run_event("run-1", "completed", None, {"result": {"messages": []}, "k": "v"}, agent_id="agent-1")
    validate_data(run.event_type, run.data)
    assert run.data["metadata"] == {"k": "v"}
    job = job_event("job-1", "failed", None, {"blob": "x" * 20000}, agent_id=None)
    validate_data(job.event_type, job.data)
    assert "metadata" not in job.data and job.agent_id == "agent-none"
