"""The bridge's pure mapping from Letta objects to catalog events (dispatcher.bridge.events); the HTTP path is
tested against a real server in tests/integration/test_bridge.py."""

from __future__ import annotations

import pytest

from bus.catalog import validate_data
from dispatcher.bridge.events import (BadLettaData, StepNotTerminal, bridge_event_id, job_event, rfc3339, run_event,
                                      step_event, tool_calls_from)
from tests.letta_standin import make_failed_step, make_step


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


def test_tool_calls_skip_malformed_entries():
    messages = [{"tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": {"a": 1}}},
                                {"id": "c2", "function": {}}, "junk"]}, {"tool_calls": None}, "junk"]
    assert tool_calls_from(messages) == [{"id": "c1", "type": "function",
                                          "function": {"name": "f", "arguments": '{"a": 1}'}}]


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
