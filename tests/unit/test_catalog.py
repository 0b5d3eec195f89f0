"""The event catalog (bus.catalog): samples validate, missing fields are named, unknown fields pass through,
event types outside the catalog follow the regex."""

from __future__ import annotations

import copy

import msgspec
import pytest

from bus.catalog import CATALOG, EVENT_TYPE_RE, EventValidationError, check_event_type, decode_data, validate_data
from bus.publisher import EventPublisher
from config.settings import Settings
from tests.helpers import CATALOG_SAMPLES

DESIGN_TYPES = {
    "agent.step.completed", "agent.step.failed", "agent.step.cancelled", "agent.message.sent",
    "agent.tool.attached", "agent.tool.detached", "agent.run.completed", "agent.job.completed",
    "tool.execution.completed",
}


def required_fields(event_type: str) -> list[str]:
    return [f.encode_name for f in msgspec.structs.fields(CATALOG[event_type]) if f.required]


def test_catalog_is_the_designed_one():
    assert set(CATALOG) == DESIGN_TYPES == set(CATALOG_SAMPLES)
    assert all(EVENT_TYPE_RE.match(t) for t in CATALOG)


@pytest.mark.parametrize("event_type", sorted(DESIGN_TYPES))
def test_every_catalog_type_validates_a_realistic_sample(event_type):
    data = CATALOG_SAMPLES[event_type]
    validate_data(event_type, data)
    typed = decode_data(event_type, data)
    assert isinstance(typed, CATALOG[event_type])
    for name in required_fields(event_type):
        assert getattr(typed, name) == data[name]


@pytest.mark.parametrize("event_type", sorted(DESIGN_TYPES))
def test_missing_required_field_is_named(event_type):
    required = required_fields(event_type)
    assert required, f"{event_type} has no required field"
    for name in required:
        data = {k: v for k, v in CATALOG_SAMPLES[event_type].items() if k != name}
        with pytest.raises(EventValidationError) as exc:
            validate_data(event_type, data)
        assert event_type in str(exc.value) and f"`{name}`" in str(exc.value)


def test_required_fields_of_the_step_events():
    assert {"step_id", "status"} <= set(required_fields("agent.step.completed"))
    assert {"step_id", "error"} <= set(required_fields("agent.step.failed"))
    assert "step_id" in required_fields("agent.step.cancelled")
    assert {"run_id", "status"} <= set(required_fields("agent.run.completed"))
    assert {"tool_name", "status"} <= set(required_fields("tool.execution.completed"))


@pytest.mark.parametrize(
    ("event_type", "field", "value", "path"),
    [
        ("agent.step.completed", "step_id", 123, "$.step_id"),
        ("agent.message.sent", "message_count", "three", "$.message_count"),
        ("agent.step.completed", "usage", {"completion_tokens": "many"}, "$.usage.completion_tokens"),
        ("agent.step.completed", "tool_calls", [{"id": "call_1"}], "function"),
    ],
)
def test_wrong_type_is_named(event_type, field, value, path):
    data = {**CATALOG_SAMPLES[event_type], field: value}
    with pytest.raises(EventValidationError) as exc:
        validate_data(event_type, data)
    assert path in str(exc.value)


def test_unknown_fields_pass_through_unchanged():
    data = copy.deepcopy(CATALOG_SAMPLES["agent.step.completed"])
    data["usage"]["cached_tokens"] = 800  # unknown nested field
    data["future_field"] = {"nested": [1, 2, 3]}
    before = copy.deepcopy(data)
    validate_data("agent.step.completed", data)
    assert data == before, "validation must not alter the caller's data"
    envelope = EventPublisher(Settings(_env_file=None)).build("agent-1", "agent.step.completed", data)
    assert envelope.data == before
    assert envelope.data["future_field"] == {"nested": [1, 2, 3]} and envelope.data["usage"]["cached_tokens"] == 800


@pytest.mark.parametrize("event_type", ["agent.memory.updated", "agent.block.edited", "source.file.added",
                                        "letta.v2_event.x1", "a.b"])
def test_event_types_outside_the_catalog_matching_the_regex_are_allowed(event_type):
    check_event_type(event_type)
    validate_data(event_type, {"anything": 1, "nested": {"x": None}})
    assert decode_data(event_type, {"anything": 1}) == {"anything": 1}


@pytest.mark.parametrize("event_type", ["", "agent", "Agent.step.completed", "agent..step", "agent.step.",
                                        ".agent.step", "agent.step-completed", "1agent.step", "agent.*",
                                        "agent.>", "agent step", "agent.step.completed\n"])
def test_event_types_outside_the_regex_are_refused(event_type):
    with pytest.raises(EventValidationError) as exc:
        check_event_type(event_type)
    assert repr(event_type) in str(exc.value)
    with pytest.raises(EventValidationError):
        validate_data(event_type, {})


@pytest.mark.parametrize("data", [None, [], "step", 3])
def test_data_must_be_an_object(data):
    with pytest.raises(EventValidationError) as exc:
        validate_data("agent.step.cancelled", data)
    assert "agent.step.cancelled" in str(exc.value)
