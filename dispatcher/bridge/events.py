"""What the stock-Letta bridge publishes: Letta steps, runs and jobs turned into catalog events, with event ids
derived from the Letta ids so that a repeated notification is the same event (JetStream drops it by Nats-Msg-Id).

Pure functions, no I/O. Field names follow Letta's published schemas (see :mod:`dispatcher.bridge.letta_client`):

=================================  ======================  ======================================================
What Letta shows                   event_type              data
=================================  ======================  ======================================================
step, status ``success``           agent.step.completed    step_id, status, usage, tool_calls, run_id, + extras
step, status ``failed``            agent.step.failed       step_id, error, error_type, run_id, error_data, usage
step, status ``cancelled``         agent.step.cancelled    step_id, run_id, + extras
run, terminal status               agent.run.completed     run_id, status, completed_at, usage, stop_reason,
                                                           metadata
run, status ``cancelled``          agent.step.cancelled    step_id (the run's last step), run_id,
                                                           stop_reason ``cancelled``, step_status
job, terminal status               agent.job.completed     job_id, status, completed_at, job_type, metadata
=================================  ======================  ======================================================

Every field comes from Letta's REST reads (the step, its messages, the run, its steps and usage, the job), never
from a notification's body. Extras (only when Letta gave them): ``stop_reason``, ``model``, ``provider_name``,
``project_id``, ``trace_id``. Servers older than the step ``status`` field: a step with ``error_type`` counts as
failed, otherwise as success. ``error_data.traceback`` is left out (server internals; large). ``metadata`` is left
out when its JSON exceeds :data:`MAX_METADATA_BYTES`, and its ``result`` (the whole LettaResponse) always is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from bus.envelope import utc_timestamp

#: Agent id of job events Letta ties to no single agent (batch jobs): organization-wide and global endpoints
#: still receive them.
NO_AGENT_ID = "agent-none"

#: Larger run/job ``metadata`` is not copied into the event (send ids, fetch the rest).
MAX_METADATA_BYTES = 16 * 1024

STEP_EVENT_TYPES = {
    "success": "agent.step.completed",
    "failed": "agent.step.failed",
    "cancelled": "agent.step.cancelled",
}

_STEP_EXTRAS = ("stop_reason", "model", "provider_name", "project_id", "trace_id")


class BadLettaData(ValueError):
    """A Letta object or notification lacks what an event needs; the message names the field."""


class StepNotTerminal(Exception):
    """The step is still ``pending``: nothing to publish yet (the caller should try again shortly)."""


@dataclass(frozen=True, slots=True)
class BridgeEvent:
    """One event to publish: ``event_type``, ``agent_id``, ``organization_id`` (or ``None``), ``data`` and the
    deterministic ``event_id`` (:func:`bridge_event_id`)."""

    event_type: str
    agent_id: str
    organization_id: str | None
    data: dict[str, Any]
    event_id: str


def bridge_event_id(kind: str, letta_id: str, status: str) -> str:
    """``evt_`` + the first 32 hex digits of SHA-256 over ``letta-bridge``, ``kind`` (``step``, ``run``, ``job``),
    the Letta id and the status: the same notification always gives the same id, a new status a new one."""
    digest = hashlib.sha256("\x1f".join(("letta-bridge", kind, letta_id, status)).encode()).hexdigest()
    return "evt_" + digest[:32]


def nonempty_str(value: Any) -> str | None:
    """``value`` when it is a non-empty string, else ``None``."""
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_from(counts: dict[str, Any] | None, *, run_id: str | None, step_count: int | None) -> dict[str, Any] | None:
    """A ``LettaUsageStatistics`` mapping from Letta token counts (``completion_tokens``, ``prompt_tokens``,
    ``total_tokens``, ``step_count``); ``None`` when ``counts`` has none of them."""
    if not isinstance(counts, dict) or not any(k in counts for k in ("completion_tokens", "prompt_tokens",
                                                                      "total_tokens")):
        return None
    usage: dict[str, Any] = {
        "message_type": "usage_statistics",
        "completion_tokens": _int(counts.get("completion_tokens")),
        "prompt_tokens": _int(counts.get("prompt_tokens")),
        "total_tokens": _int(counts.get("total_tokens")),
        "step_count": step_count if step_count is not None else _int(counts.get("step_count")),
    }
    if run_id:
        usage["run_ids"] = [run_id]
    return usage


def tool_calls_from(messages: Any) -> list[dict[str, Any]]:
    """OpenAI-shaped tool calls (``id``, ``type``, ``function{name, arguments}``) of a step's messages as
    ``GET /v1/steps/{step_id}/messages`` gives them (Letta 0.16: ``tool_call_message`` entries, each with
    ``tool_calls[]`` of ``{name, arguments, tool_call_id}``, or the single ``tool_call`` of older servers), in
    order. Malformed entries are skipped."""
    calls: list[dict[str, Any]] = []
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict) or message.get("message_type") != "tool_call_message":
            continue
        listed = message.get("tool_calls")
        for call in listed if isinstance(listed, list) else [message.get("tool_call")]:
            if not isinstance(call, dict) or not nonempty_str(call.get("tool_call_id")):
                continue
            if not nonempty_str(call.get("name")):
                continue
            arguments = call.get("arguments", "")
            calls.append({"id": call["tool_call_id"], "type": "function", "function": {
                "name": call["name"],
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
            }})
    return calls


def step_event(step: dict[str, Any], messages: list[Any] | None = None) -> BridgeEvent:
    """The event for a Letta ``Step`` read from ``GET /v1/steps/{step_id}``; ``messages``: the step's messages
    (``GET /v1/steps/{step_id}/messages``), whose tool calls ``agent.step.completed`` carries.

    Raises :class:`StepNotTerminal` for a ``pending`` step and :class:`BadLettaData` when ``id`` or ``agent_id``
    is missing or the status is unknown.
    """
    step_id = nonempty_str(step.get("id"))
    if step_id is None:
        raise BadLettaData("the Letta step has no id")
    agent_id = nonempty_str(step.get("agent_id"))
    if agent_id is None:
        raise BadLettaData(f"agent_id: Letta step {step_id} has no agent_id")
    status = step.get("status")
    if status is None:  # servers from before StepStatus
        status = "failed" if step.get("error_type") else "success"
    if status == "pending":
        raise StepNotTerminal(f"step {step_id} is still pending")
    event_type = STEP_EVENT_TYPES.get(status) if isinstance(status, str) else None
    if event_type is None:
        raise BadLettaData(f"status: Letta step {step_id} has status {status!r}, expected one of "
                           f"{', '.join(STEP_EVENT_TYPES)} (or pending)")
    run_id = nonempty_str(step.get("run_id")) or nonempty_str(step.get("job_id"))
    data: dict[str, Any] = {"step_id": step_id, "run_id": run_id}
    usage = usage_from(step, run_id=run_id, step_count=1)
    if event_type == "agent.step.completed":
        data.update(status=status, usage=usage, tool_calls=tool_calls_from(messages))
    elif event_type == "agent.step.failed":
        error_data = step.get("error_data") if isinstance(step.get("error_data"), dict) else {}
        error_type = nonempty_str(step.get("error_type"))
        data.update(error=nonempty_str(error_data.get("message")) or error_type or "step failed", error_type=error_type,
                    usage=usage)
        kept = {k: v for k, v in error_data.items() if k != "traceback"}
        if kept:
            data["error_data"] = kept
    for key in _STEP_EXTRAS:
        if step.get(key) is not None:
            data[key] = step[key]
    if data.get("usage") is None:
        data.pop("usage", None)
    return BridgeEvent(event_type, agent_id, nonempty_str(step.get("organization_id")), data,
                       bridge_event_id("step", step_id, status))


def rfc3339(value: Any, field: str) -> str | None:
    """Letta's ``completed_at`` (``datetime.isoformat()``, naive = UTC) as ``2026-01-01T12:00:00.000000Z``;
    ``None`` stays ``None``. Raises :class:`BadLettaData` naming ``field`` for anything else."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadLettaData(f"{field}: expected an ISO 8601 time or null, got {type(value).__name__}")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadLettaData(f"{field}: {value!r} is not an ISO 8601 time (e.g. 2026-01-01T12:00:00)") from None
    return utc_timestamp(when if when.tzinfo else when.replace(tzinfo=timezone.utc))


def _metadata(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    if not metadata:
        return None
    kept = {k: v for k, v in metadata.items() if k != "result"}
    if not kept or len(json.dumps(kept, default=str)) > MAX_METADATA_BYTES:
        return None
    return kept


def run_event(
    run_id: str, status: str, completed_at: str | None, metadata: dict[str, Any] | None, *, agent_id: str,
    organization_id: str | None = None, usage: dict[str, Any] | None = None, stop_reason: str | None = None,
) -> BridgeEvent:
    """``agent.run.completed`` for a run callback. ``completed_at``: already normalized (:func:`rfc3339`);
    ``usage``: a ``LettaUsageStatistics`` mapping or ``None``."""
    data: dict[str, Any] = {"run_id": run_id, "status": status, "completed_at": completed_at}
    if usage is not None:
        data["usage"] = usage
    if stop_reason:
        data["stop_reason"] = stop_reason
    if (kept := _metadata(metadata)) is not None:
        data["metadata"] = kept
    return BridgeEvent("agent.run.completed", agent_id, organization_id, data, bridge_event_id("run", run_id, status))


def cancelled_step_event(step: dict[str, Any], run_id: str) -> BridgeEvent:
    """``agent.step.cancelled`` for the last step of a cancelled run. Letta 0.16 checks for cancellation only when a
    step starts, so the step that was running when the run was cancelled ends ``success`` (or ``failed``) and no
    step is ever ``cancelled``: the event says which step the run stopped after (``step_id``), with ``run_id``,
    ``stop_reason: "cancelled"`` and that step's own ``step_status``. Raises :class:`BadLettaData` without
    ``id`` / ``agent_id``."""
    step_id = nonempty_str(step.get("id"))
    agent_id = nonempty_str(step.get("agent_id"))
    if step_id is None or agent_id is None:
        raise BadLettaData(f"steps of run {run_id}: a step without id or agent_id")
    data = {"step_id": step_id, "run_id": run_id, "stop_reason": "cancelled", "step_status": step.get("status")}
    return BridgeEvent("agent.step.cancelled", agent_id, nonempty_str(step.get("organization_id")), data,
                       bridge_event_id("run-cancelled-step", step_id, "cancelled"))


def job_event(
    job_id: str, status: str, completed_at: str | None, metadata: dict[str, Any] | None, *, agent_id: str | None,
    organization_id: str | None = None, job_type: str | None = None,
) -> BridgeEvent:
    """``agent.job.completed`` for a job callback; ``agent_id`` ``None`` becomes :data:`NO_AGENT_ID`."""
    data: dict[str, Any] = {"job_id": job_id, "status": status, "completed_at": completed_at}
    if job_type:
        data["job_type"] = job_type
    if (kept := _metadata(metadata)) is not None:
        data["metadata"] = kept
    return BridgeEvent("agent.job.completed", agent_id or NO_AGENT_ID, organization_id, data,
                       bridge_event_id("job", job_id, status))
