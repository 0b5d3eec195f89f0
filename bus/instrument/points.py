"""Manager points: ``agent.tool.attached`` / ``agent.tool.detached``, ``tool.execution.completed``,
``agent.run.completed``, ``agent.job.completed``.

What Letta 0.16.8 does, and what we read:

* ``AgentManager.attach_tool_async(agent_id, tool_id, actor)`` / ``detach_tool_async`` return ``None`` after
  their session committed (the session context manager commits). The tool's name is read afterwards, in the
  background (``ToolManager().get_tool_by_id_async``: one query, off the request path; detaching keeps the tool).
* ``ToolExecutionManager.execute_tool_async(function_name, function_args, tool, step_id)`` returns a
  ``ToolExecutionResult`` (``status`` ``success``/``error``) and never raises for tool errors; the agent is
  ``self.agent_state``, the organization ``self.actor.organization_id``. ``execution_time_ms``: our wall clock
  around the call.
* ``RunManager.update_run_by_id_async(run_id, update, actor, ...)``: a run first reaches a terminal status
  (``completed``, ``failed``, ``cancelled``) when it had no ``completed_at`` (Letta's ``needs_callback`` test
  without the callback URL). When the caller gives no ``completed_at``, Letta sets ``update.completed_at`` exactly
  in that case, so that is read without a query; otherwise the run is read before the call. The usage is
  ``RunManager.get_run_usage`` (the sum of the run's steps, as ``GET /v1/runs/{id}/usage``), read in the
  background. A **cancelled** run is published once its loop stopped (``_check_run_cancellation`` saw it, or a
  later update of the same run, or after :data:`CANCEL_SETTLE_S` s), so the usage includes the step that was
  running when the cancel arrived.
* ``JobManager.update_job_by_id_async(job_id, job_update, actor, ...)``: first terminal status (``completed``,
  ``failed``; ``cancelled`` too) of a job without ``completed_at``, read before the call (jobs are rare: batches).
  Batch jobs have no agent: ``agent_id`` is :data:`bus.instrument.shapes.NO_AGENT_ID`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from bus.instrument import runtime, shapes
from bus.instrument.wrap import Call, wrap_method

TERMINAL = frozenset({"completed", "failed", "cancelled"})
#: seconds a cancelled run waits for its loop to stop before ``agent.run.completed`` is published anyway
CANCEL_SETTLE_S = 10.0
MAX_TRACKED = 10_000

_cancelled_runs: OrderedDict[str, tuple[Any, Any, Any]] = OrderedDict()  # run_id -> (manager, run, actor)


# --- tools ----------------------------------------------------------------------------------------------------

async def _tool_event(event_type: str, agent_id: str, tool_id: str, actor: Any) -> None:
    from letta.services.tool_manager import ToolManager

    tool = await ToolManager().get_tool_by_id_async(tool_id=tool_id, actor=actor)
    runtime.emit(agent_id, event_type, {"tool_id": tool_id, "tool_name": tool.name},
                 getattr(actor, "organization_id", None))


def _after_tool_link(event_type: str):
    def after(call: Call, _result: Any, _ctx: Any) -> None:
        runtime.spawn(_tool_event(event_type, call["agent_id"], call["tool_id"], call["actor"]), event_type)
    return after


def _before_execute(_call: Call) -> float:
    return time.perf_counter()


def after_execute(call: Call, result: Any, started: Any) -> None:
    """``execute_tool_async`` returned: publish ``tool.execution.completed``."""
    manager = call["self"]
    agent_state = getattr(manager, "agent_state", None)
    elapsed_ms = (time.perf_counter() - started) * 1000 if isinstance(started, float) else None
    data = shapes.tool_execution(call.get("function_name"), call.get("tool"), result, call.get("function_args"),
                                 elapsed_ms, call.get("step_id"))
    runtime.emit(getattr(agent_state, "id", None), "tool.execution.completed", data,
                 getattr(getattr(manager, "actor", None), "organization_id", None))


# --- runs -----------------------------------------------------------------------------------------------------

async def _before_run_update(call: Call) -> dict[str, Any] | None:
    update = call.get("update")
    if shapes.value(getattr(update, "status", None)) not in TERMINAL:
        return None
    if getattr(update, "completed_at", None) is None:
        return {"completed_at_given": False}
    manager = call["self"]
    before = await manager.get_run_by_id(run_id=call["run_id"], actor=call["actor"])
    return {"completed_at_given": True, "first": getattr(before, "completed_at", None) is None}


async def _publish_run(manager: Any, run: Any, actor: Any) -> None:
    stats = await manager.get_run_usage(run_id=run.id, actor=actor)
    runtime.emit(run.agent_id, "agent.run.completed", shapes.run_completed(run, shapes.usage_of_stats(stats, run.id)),
                 getattr(actor, "organization_id", None))


def flush_cancelled_run(run_id: str | None, run: Any = None) -> None:
    """Publish the pending ``agent.run.completed`` of cancelled run ``run_id`` (with ``run``, a newer copy of
    it, when given). No-op when none is pending."""
    entry = _cancelled_runs.pop(run_id, None) if run_id else None
    if entry is not None:
        manager, old, actor = entry
        runtime.spawn(_publish_run(manager, run if run is not None else old, actor), "agent.run.completed")


def _settle(run_id: str) -> None:
    try:
        flush_cancelled_run(run_id)
    except Exception:  # noqa: BLE001 - a timer callback must not raise into the loop
        pass


def after_run_update(call: Call, run: Any, ctx: Any) -> None:
    """``update_run_by_id_async`` returned the run: publish ``agent.run.completed`` on its first terminal
    status (a cancelled one once its loop stopped)."""
    run_id = call.get("run_id")
    if run_id in _cancelled_runs and run is not None:
        flush_cancelled_run(run_id, run)
        return
    if not ctx or run is None:
        return
    first = ctx["first"] if ctx["completed_at_given"] else getattr(call.get("update"), "completed_at", None) is not None
    if not first:
        return
    manager, actor = call["self"], call["actor"]
    if shapes.value(run.status) == "cancelled":
        _cancelled_runs[run.id] = (manager, run, actor)
        while len(_cancelled_runs) > MAX_TRACKED:
            flush_cancelled_run(next(iter(_cancelled_runs)))
        runtime.later(CANCEL_SETTLE_S, _settle, run.id)
        return
    runtime.spawn(_publish_run(manager, run, actor), "agent.run.completed")


# --- jobs -----------------------------------------------------------------------------------------------------

async def _before_job_update(call: Call) -> bool:
    update = call.get("job_update")
    if shapes.value(getattr(update, "status", None)) not in TERMINAL:
        return False
    before = await call["self"].get_job_by_id_async(job_id=call["job_id"], actor=call["actor"])
    return getattr(before, "completed_at", None) is None and shapes.value(before.status) not in TERMINAL


def after_job_update(call: Call, job: Any, first: Any) -> None:
    """``update_job_by_id_async`` returned the job: publish ``agent.job.completed`` on its first terminal
    status."""
    if first is True and job is not None:
        runtime.emit(shapes.job_agent_id(job), "agent.job.completed", shapes.job_completed(job),
                     getattr(call.get("actor"), "organization_id", None))


# --- installers -----------------------------------------------------------------------------------------------

def install_agent_manager(module: Any) -> None:
    """letta.services.agent_manager: attach/detach."""
    owner = getattr(module, "AgentManager", None)
    wrap_method(owner, "attach_tool_async", ("agent_id", "tool_id", "actor"),
                after=_after_tool_link("agent.tool.attached"), point="AgentManager.attach_tool_async")
    wrap_method(owner, "detach_tool_async", ("agent_id", "tool_id", "actor"),
                after=_after_tool_link("agent.tool.detached"), point="AgentManager.detach_tool_async")


def install_tool_execution(module: Any) -> None:
    """letta.services.tool_executor.tool_execution_manager."""
    wrap_method(getattr(module, "ToolExecutionManager", None), "execute_tool_async",
                ("function_name", "function_args", "tool", "step_id"), before=_before_execute, after=after_execute,
                point="ToolExecutionManager.execute_tool_async")


def install_run_manager(module: Any) -> None:
    """letta.services.run_manager."""
    wrap_method(getattr(module, "RunManager", None), "update_run_by_id_async", ("run_id", "update", "actor"),
                before=_before_run_update, after=after_run_update, point="RunManager.update_run_by_id_async")


def install_job_manager(module: Any) -> None:
    """letta.services.job_manager."""
    wrap_method(getattr(module, "JobManager", None), "update_job_by_id_async", ("job_id", "job_update", "actor"),
                before=_before_job_update, after=after_job_update, point="JobManager.update_job_by_id_async")
