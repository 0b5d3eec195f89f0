"""Letta 0.16 objects -> the catalog ``data`` of each event (bus/catalog.py). Pure: attribute reads only, no I/O.

Letta objects are read by attribute with ``getattr`` (pydantic models: ``Step``, ``Run``, ``Job``, ``Message``,
``LettaUsageStatistics``, ``ToolExecutionResult``), so a missing field gives ``None`` rather than an error. Shapes:

* usage: ``{"message_type": "usage_statistics", "completion_tokens", "prompt_tokens", "total_tokens",
  "step_count", "run_ids"?}`` (ints, tokens) - the same mapping the stock-Letta bridge publishes;
* tool calls: ``[{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}]``;
* times: RFC 3339 UTC with microseconds (``2026-01-01T12:00:00.000000Z``); Letta stores naive UTC datetimes;
* ``stop_reason``: the ``StopReasonType`` value string (``"end_turn"``...).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Iterable

from bus.envelope import utc_timestamp

#: ``agent_id`` of job events tied to no agent (batch jobs), as the stock-Letta bridge uses.
NO_AGENT_ID = "agent-none"
#: ``error`` texts are cut to this many characters (they reach webhook receivers).
MAX_ERROR_CHARS = 1000


def value(v: Any) -> Any:
    """An Enum's ``value`` (``StopReasonType.end_turn`` -> ``"end_turn"``), anything else unchanged."""
    return v.value if isinstance(v, Enum) else v


def stop_reason(v: Any) -> str | None:
    """A stop reason as its string: ``StopReasonType``, ``LettaStopReason`` (``.stop_reason``) or ``None``."""
    if v is None:
        return None
    inner = getattr(v, "stop_reason", v)
    return value(inner)


def rfc3339(when: datetime | None) -> str | None:
    """``when`` (naive = UTC, as Letta stores it) as RFC 3339 UTC; ``None`` stays ``None``."""
    if when is None:
        return None
    return utc_timestamp(when if when.tzinfo else when.replace(tzinfo=timezone.utc))


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def usage_of_step(step: Any) -> dict[str, Any]:
    """The usage of one Letta ``Step`` (its token counts, ``step_count`` 1, ``run_ids`` [its run])."""
    usage = {"message_type": "usage_statistics", "completion_tokens": _int(getattr(step, "completion_tokens", 0)),
             "prompt_tokens": _int(getattr(step, "prompt_tokens", 0)),
             "total_tokens": _int(getattr(step, "total_tokens", 0)), "step_count": 1}
    if getattr(step, "run_id", None):
        usage["run_ids"] = [step.run_id]
    return usage


def usage_of_stats(stats: Any, run_id: str | None = None) -> dict[str, Any] | None:
    """A ``LettaUsageStatistics`` as the catalog usage mapping (``None`` for ``None``); ``run_ids`` [``run_id``]
    when Letta's own list is empty."""
    if stats is None:
        return None
    usage = {"message_type": "usage_statistics", "completion_tokens": _int(getattr(stats, "completion_tokens", 0)),
             "prompt_tokens": _int(getattr(stats, "prompt_tokens", 0)),
             "total_tokens": _int(getattr(stats, "total_tokens", 0)),
             "step_count": _int(getattr(stats, "step_count", 0))}
    run_ids = getattr(stats, "run_ids", None) or ([run_id] if run_id else None)
    if run_ids:
        usage["run_ids"] = list(run_ids)
    return usage


def tool_calls_of(messages: Iterable[Any]) -> list[dict[str, Any]]:
    """The OpenAI-shaped tool calls of Letta ``Message`` objects (each message's ``tool_calls``, in order).
    Entries without an id or a function name are skipped."""
    calls: list[dict[str, Any]] = []
    for message in messages or ():
        for call in getattr(message, "tool_calls", None) or ():
            function = getattr(call, "function", None)
            name = getattr(function, "name", None)
            if not getattr(call, "id", None) or not name:
                continue
            arguments = getattr(function, "arguments", "")
            calls.append({"id": call.id, "type": "function", "function": {
                "name": name, "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    return calls


def _extras(step: Any, data: dict[str, Any]) -> dict[str, Any]:
    reason = stop_reason(getattr(step, "stop_reason", None))
    if reason is not None:
        data["stop_reason"] = reason
    for key in ("model", "provider_name", "project_id", "trace_id"):
        if getattr(step, key, None) is not None:
            data[key] = getattr(step, key)
    return data


def step_completed(step: Any, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    """``agent.step.completed`` data of a Letta ``Step`` marked success, with its ``tool_calls``."""
    return _extras(step, {"step_id": step.id, "status": value(getattr(step, "status", None)) or "success",
                          "usage": usage_of_step(step), "tool_calls": tool_calls, "run_id": step.run_id})


def step_failed(step: Any, error_type: str | None, error_message: str | None,
                error_details: dict[str, Any] | None) -> dict[str, Any]:
    """``agent.step.failed`` data: ``error`` is Letta's ``error_message`` (cut to :data:`MAX_ERROR_CHARS`);
    ``error_data`` is what Letta stored minus the traceback."""
    error = (error_message or error_type or "step failed")[:MAX_ERROR_CHARS]
    data = {"step_id": step.id, "error": error, "error_type": error_type, "run_id": step.run_id,
            "usage": usage_of_step(step), "error_data": {"message": error_message, "details": error_details}}
    return _extras(step, data)


def step_cancelled(step_id: str, run_id: str | None, reason: Any = "cancelled") -> dict[str, Any]:
    """``agent.step.cancelled`` data."""
    return {"step_id": step_id, "run_id": run_id, "stop_reason": stop_reason(reason)}


def run_completed(run: Any, usage: dict[str, Any] | None) -> dict[str, Any]:
    """``agent.run.completed`` data of a Letta ``Run`` in a terminal status."""
    data = {"run_id": run.id, "status": value(run.status), "completed_at": rfc3339(getattr(run, "completed_at", None)),
            "usage": usage}
    if getattr(run, "stop_reason", None) is not None:
        data["stop_reason"] = stop_reason(run.stop_reason)
    if usage is None:
        data.pop("usage")
    return data


def job_agent_id(job: Any) -> str:
    """The agent of a Letta ``Job``: ``agent_id``, else ``metadata["agent_id"]``, else :data:`NO_AGENT_ID`."""
    metadata = getattr(job, "metadata", None) or {}
    return getattr(job, "agent_id", None) or (metadata.get("agent_id") if isinstance(metadata, dict) else None) \
        or NO_AGENT_ID


def job_completed(job: Any) -> dict[str, Any]:
    """``agent.job.completed`` data of a Letta ``Job`` in a terminal status."""
    data = {"job_id": job.id, "status": value(job.status), "completed_at": rfc3339(getattr(job, "completed_at", None))}
    if getattr(job, "job_type", None) is not None:
        data["job_type"] = value(job.job_type)
    return data


def tool_execution(function_name: str, tool: Any, result: Any, function_args: Any, elapsed_ms: float | None,
                   step_id: str | None) -> dict[str, Any]:
    """``tool.execution.completed`` data: ``status`` is the ``ToolExecutionResult``'s (``success``/``error``),
    ``execution_time_ms`` the wall time of ``execute_tool_async`` in milliseconds."""
    data = {"tool_name": function_name or getattr(tool, "name", None), "status": value(getattr(result, "status", None)),
            "tool_args": function_args if isinstance(function_args, dict) else None,
            "execution_time_ms": elapsed_ms, "step_id": step_id}
    if getattr(tool, "id", None):
        data["tool_id"] = tool.id
    return data


def message_sent(message_count: int, run_id: str | None, usage: dict[str, Any] | None) -> dict[str, Any]:
    """``agent.message.sent`` data."""
    data = {"message_count": message_count, "run_id": run_id}
    if usage is not None:
        data["usage"] = usage
    return data
