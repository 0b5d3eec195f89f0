"""The Letta stand-in (tests/letta_standin.py) against what the real letta==0.16.8 answered
(tests/fixtures/letta-0.16.8/): every key of every captured object, with the same JSON types."""

from __future__ import annotations

import pytest

from tests.letta_standin import make_failed_step, make_messages, make_run, make_step, make_usage, sample


def _shape(value):
    """A JSON value's type tree: dicts by key, lists by their first element, scalars by type (null: None)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return None if value is None else type(value).__name__


@pytest.mark.parametrize(("made", "captured"), [
    (make_step, "step_get"), (make_failed_step, "step_get_failed"), (make_run, "run_get"),
    (make_usage, "run_usage_get"),
])
def test_stand_in_objects_have_the_real_server_s_fields(made, captured):
    assert _shape(made()) == _shape(sample(captured))


def test_stand_in_objects_match_what_the_real_server_showed_at_webhook_time():
    at_webhook = sample("step_state_at_webhook_time")
    assert _shape(make_step()) == _shape(at_webhook["step"])
    assert at_webhook["messages"] == []  # why the enricher waits for a step's messages
    assert sample("step_webhook_delivery")["json"].keys() == {"step_id"}
    assert sample("run_callback_delivery")["json"].keys() == {"run_id", "status", "completed_at", "metadata"}


def test_stand_in_messages_are_the_real_server_s_with_the_step_s_ids():
    step = make_step()
    messages = make_messages(step)
    assert [_shape(m) for m in messages] == [_shape(m) for m in sample("step_messages_get")]
    assert {m["step_id"] for m in messages} == {step["id"]}
    assert [m["message_type"] for m in messages] == ["user_message", "tool_call_message", "tool_return_message"]
