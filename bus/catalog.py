"""The event catalog: every Letta lifecycle event type and the typed schema of its ``data``.

Source: DESIGN.md, "Events". ``usage`` follows Letta's ``LettaUsageStatistics``; ``tool_calls`` follow the OpenAI
tool-call shape. Validation checks required fields and types but never drops fields: the published ``data`` is the
caller's mapping unchanged, so fields unknown to this catalog pass through to subscribers and webhooks.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

#: Event types outside the catalog are accepted when they match this (forward compatibility).
EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


class EventValidationError(ValueError):
    """An event was refused before publishing: bad event type, bad ``data`` or too large. The message names the
    field and the fix."""


class LettaUsageStatistics(msgspec.Struct, kw_only=True):
    """Token usage of a step or run, as Letta's ``LettaUsageStatistics`` (counts are tokens)."""

    message_type: str = "usage_statistics"
    completion_tokens: int = 0
    prompt_tokens: int = 0
    total_tokens: int = 0
    step_count: int = 0
    run_ids: list[str] | None = None


class ToolCallFunction(msgspec.Struct):
    """The ``function`` part of an OpenAI tool call; ``arguments`` is a JSON string."""

    name: str
    arguments: str = ""


class ToolCall(msgspec.Struct):
    """An OpenAI-shaped tool call: ``{"id", "type": "function", "function": {"name", "arguments"}}``."""

    id: str
    function: ToolCallFunction
    type: str = "function"


class StepCompleted(msgspec.Struct, kw_only=True):
    """agent.step.completed: a step checkpoint finished."""

    step_id: str
    status: str
    usage: LettaUsageStatistics | None = None
    tool_calls: list[ToolCall] = []
    run_id: str | None = None


class StepFailed(msgspec.Struct, kw_only=True):
    """agent.step.failed: a step raised an error."""

    step_id: str
    error: str
    error_type: str | None = None
    run_id: str | None = None


class StepCancelled(msgspec.Struct, kw_only=True):
    """agent.step.cancelled: a step was cancelled."""

    step_id: str
    run_id: str | None = None


class MessageSent(msgspec.Struct, kw_only=True):
    """agent.message.sent: the messages endpoint returned."""

    message_count: int
    run_id: str | None = None
    usage: LettaUsageStatistics | None = None


class ToolAttached(msgspec.Struct, kw_only=True):
    """agent.tool.attached: attach_tool_async committed."""

    tool_id: str
    tool_name: str


class ToolDetached(msgspec.Struct, kw_only=True):
    """agent.tool.detached: detach_tool_async committed."""

    tool_id: str
    tool_name: str


class RunCompleted(msgspec.Struct, kw_only=True):
    """agent.run.completed: a run reached a terminal status (completed, failed, cancelled, ...)."""

    run_id: str
    status: str
    completed_at: str | None = None
    usage: LettaUsageStatistics | None = None


class JobCompleted(msgspec.Struct, kw_only=True):
    """agent.job.completed: a job reached a terminal status."""

    job_id: str
    status: str
    completed_at: str | None = None


class ToolExecutionCompleted(msgspec.Struct, kw_only=True):
    """tool.execution.completed: the tool executor returned; ``execution_time_ms`` is milliseconds."""

    tool_name: str
    status: str
    tool_args: dict[str, Any] | None = None
    execution_time_ms: float | None = None


#: event_type -> schema of its ``data``.
CATALOG: dict[str, type[msgspec.Struct]] = {
    "agent.step.completed": StepCompleted,
    "agent.step.failed": StepFailed,
    "agent.step.cancelled": StepCancelled,
    "agent.message.sent": MessageSent,
    "agent.tool.attached": ToolAttached,
    "agent.tool.detached": ToolDetached,
    "agent.run.completed": RunCompleted,
    "agent.job.completed": JobCompleted,
    "tool.execution.completed": ToolExecutionCompleted,
}


def check_event_type(event_type: str) -> None:
    """Raise :class:`EventValidationError` unless ``event_type`` is in the catalog or matches
    :data:`EVENT_TYPE_RE` (dot-separated lowercase tokens such as ``agent.memory.updated``)."""
    if event_type not in CATALOG and not EVENT_TYPE_RE.fullmatch(event_type):
        raise EventValidationError(
            f"event_type {event_type!r} is not valid: use a catalog type ({', '.join(CATALOG)}) or dot-separated "
            "lowercase tokens such as 'agent.memory.updated'"
        )


def validate_data(event_type: str, data: Any) -> None:
    """Check ``data`` against the catalog schema of ``event_type`` (a mapping for types outside the catalog).

    Raises :class:`EventValidationError` naming the event type and the field, e.g.
    ``agent.step.completed data: Object missing required field `step_id```.
    """
    check_event_type(event_type)
    if not isinstance(data, dict):
        raise EventValidationError(f"{event_type} data must be a JSON object (a dict), not {type(data).__name__}")
    schema = CATALOG.get(event_type)
    if schema is None:
        return
    try:
        msgspec.convert(data, schema, strict=False)
    except msgspec.ValidationError as exc:
        raise EventValidationError(f"{event_type} data: {exc}") from None


def decode_data(event_type: str, data: dict[str, Any]) -> msgspec.Struct | dict[str, Any]:
    """Typed view of an event's ``data``: the catalog Struct, or the mapping itself for other event types.

    Raises ``msgspec.ValidationError`` when ``data`` does not fit the schema.
    """
    schema = CATALOG.get(event_type)
    return data if schema is None else msgspec.convert(data, schema, strict=False)
