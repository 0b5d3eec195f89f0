"""Step events: ``agent.step.completed`` / ``agent.step.failed`` / ``agent.step.cancelled``.

What Letta 0.16.8 does (agents/letta_agent_v3.py ``_step``, services/step_manager.py):

* ``_step_checkpoint_finish`` calls ``StepManager.update_step_success_async(actor, step_id, usage, stop_reason)``
  and only **then** ``_checkpoint_messages(...)``, which persists the step's messages with
  ``MessageManager.create_many_messages_async(pydantic_msgs, actor, ...)`` ("ONLY place where messages are
  persisted"); the assistant message carrying the step's tool calls is among them, ``step_id`` set on each.
  So at success time the tool calls are not in the database yet (the stock webhook's problem).
* Choice: publish ``agent.step.completed`` when the step's messages are persisted. The success wrapper keeps the
  step's data pending; the ``create_many_messages_async`` wrapper finds the pending step by the messages'
  ``step_id`` and publishes it with their tool calls (no extra query). Loops that persist messages before marking
  the step (letta_agent.py, V1) are covered the other way round: persisted tool calls are remembered per step
  (bounded) and used when the success comes. A step whose messages are never persisted (the checkpoint raised) is
  published after :data:`JOIN_TIMEOUT_S` seconds with ``tool_calls`` [].
* ``update_step_error_async(actor, step_id, error_type, error_message, error_traceback, error_details,
  stop_reason)`` -> ``agent.step.failed`` at once.
* Nothing in 0.16.8 calls ``update_step_cancelled_async`` (wrapped anyway, for later versions). Cancelling a run
  marks the run cancelled; the loop notices at the start of its next step (``_check_run_cancellation(run_id)``
  returns True, LettaAgentV2, inherited by V3) and stops. That observation publishes ``agent.step.cancelled``
  for the run's last step (the one running when the cancel arrived, recorded from the step wrappers), with
  ``stop_reason`` ``"cancelled"``; a run cancelled before its first step has no step, so no event.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from bus.instrument import runtime, shapes
from bus.instrument.wrap import Call, wrap_method

#: seconds a marked-success step waits for its messages before it is published without tool calls
JOIN_TIMEOUT_S = 10.0
#: at most this many entries in each bookkeeping map (oldest forgotten first)
MAX_TRACKED = 10_000

_pending: OrderedDict[str, tuple[str, str | None, dict[str, Any]]] = OrderedDict()  # step_id -> agent, org, data
_persisted_calls: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()  # step_id -> tool calls seen
_last_step: OrderedDict[str, str] = OrderedDict()  # run_id -> its latest step_id
_cancel_announced: OrderedDict[str, None] = OrderedDict()  # run_ids whose step.cancelled went out


def _put(store: OrderedDict, key: Any, val: Any) -> None:
    store[key] = val
    store.move_to_end(key)
    while len(store) > MAX_TRACKED:
        store.popitem(last=False)


def _org(step: Any, actor: Any) -> str | None:
    return getattr(step, "organization_id", None) or getattr(actor, "organization_id", None)


def _remember_step(step: Any) -> None:
    if getattr(step, "run_id", None):
        _put(_last_step, step.run_id, step.id)


def _publish_completed(step_id: str, tool_calls: list[dict[str, Any]]) -> None:
    entry = _pending.pop(step_id, None)
    if entry is None:
        return
    agent_id, org, data = entry
    data["tool_calls"] = tool_calls
    runtime.emit(agent_id, "agent.step.completed", data, org)


def _timeout(step_id: str) -> None:
    try:
        _publish_completed(step_id, [])
    except Exception:  # noqa: BLE001 - a timer callback must not raise into the loop
        pass


def after_success(call: Call, step: Any, _ctx: Any) -> None:
    """``update_step_success_async`` returned the updated ``Step``: publish now if its messages were already
    persisted, else wait for them (:func:`after_messages`)."""
    if step is None or not getattr(step, "id", None):
        return
    _remember_step(step)
    _pending[step.id] = (step.agent_id, _org(step, call.get("actor")), shapes.step_completed(step, []))
    while len(_pending) > MAX_TRACKED:
        _publish_completed(next(iter(_pending)), [])
    if step.id in _persisted_calls:
        _publish_completed(step.id, _persisted_calls.pop(step.id))
    else:
        runtime.later(JOIN_TIMEOUT_S, _timeout, step.id)


def after_messages(call: Call, result: Any, _ctx: Any) -> None:
    """``create_many_messages_async`` persisted messages: publish each pending step they belong to, with their
    tool calls; remember the calls of steps not marked yet."""
    messages = result if isinstance(result, list) else call.get("pydantic_msgs") or []
    by_step: dict[str, list[Any]] = {}
    for message in messages:
        step_id = getattr(message, "step_id", None)
        if step_id:
            by_step.setdefault(step_id, []).append(message)
    for step_id, step_messages in by_step.items():
        calls = shapes.tool_calls_of(step_messages)
        if step_id in _pending:
            _publish_completed(step_id, calls)
        else:
            _put(_persisted_calls, step_id, _persisted_calls.get(step_id, []) + calls)


def after_error(call: Call, step: Any, _ctx: Any) -> None:
    """``update_step_error_async`` returned the failed ``Step``: publish ``agent.step.failed``."""
    if step is None or not getattr(step, "id", None):
        return
    _remember_step(step)
    _pending.pop(step.id, None)
    data = shapes.step_failed(step, call.get("error_type"), call.get("error_message"), call.get("error_details"))
    runtime.emit(step.agent_id, "agent.step.failed", data, _org(step, call.get("actor")))


def after_cancelled(call: Call, step: Any, _ctx: Any) -> None:
    """``update_step_cancelled_async`` returned the cancelled ``Step``: publish ``agent.step.cancelled``."""
    if step is None or not getattr(step, "id", None):
        return
    _pending.pop(step.id, None)
    if step.run_id:
        _put(_cancel_announced, step.run_id, None)
    data = shapes.step_cancelled(step.id, step.run_id, getattr(step, "stop_reason", None) or "cancelled")
    runtime.emit(step.agent_id, "agent.step.cancelled", data, _org(step, call.get("actor")))


def after_cancellation_check(call: Call, cancelled: Any, _ctx: Any) -> None:
    """``_check_run_cancellation(run_id)`` returned True: the loop stops; publish ``agent.step.cancelled`` for
    the run's last step (once per run) and let a cancelled run's pending ``agent.run.completed`` go out."""
    if cancelled is not True:
        return
    run_id = call.get("run_id")
    loop = call.get("self")
    from bus.instrument import points  # the run side of the same observation

    points.flush_cancelled_run(run_id)
    step_id = _last_step.get(run_id) if run_id else None
    if step_id is None or run_id in _cancel_announced:
        return
    _put(_cancel_announced, run_id, None)
    agent_state = getattr(loop, "agent_state", None)
    actor = getattr(loop, "actor", None)
    runtime.emit(getattr(agent_state, "id", None), "agent.step.cancelled",
                 shapes.step_cancelled(step_id, run_id), getattr(actor, "organization_id", None))


def install_step_manager(module: Any) -> None:
    """Wrap the three ``StepManager`` status updates (letta.services.step_manager)."""
    owner = getattr(module, "StepManager", None)
    wrap_method(owner, "update_step_success_async", ("actor", "step_id"), after=after_success,
                point="StepManager.update_step_success_async")
    wrap_method(owner, "update_step_error_async", ("actor", "step_id", "error_type", "error_message",
                                                   "error_details"),
                after=after_error, point="StepManager.update_step_error_async")
    wrap_method(owner, "update_step_cancelled_async", ("actor", "step_id"), after=after_cancelled,
                point="StepManager.update_step_cancelled_async")


def install_message_manager(module: Any) -> None:
    """Wrap ``MessageManager.create_many_messages_async`` (letta.services.message_manager)."""
    wrap_method(getattr(module, "MessageManager", None), "create_many_messages_async", ("pydantic_msgs",),
                after=after_messages, point="MessageManager.create_many_messages_async")


def install_agent_loop(module: Any) -> None:
    """Wrap ``LettaAgentV2._check_run_cancellation`` (letta.agents.letta_agent_v2; V3 inherits it)."""
    wrap_method(getattr(module, "LettaAgentV2", None), "_check_run_cancellation", ("run_id",),
                after=after_cancellation_check, point="LettaAgentV2._check_run_cancellation")
