"""``agent.message.sent`` from Letta's messages routes (letta/server/rest_api/routers/v1/agents.py).

Letta 0.16.8: ``router = APIRouter(prefix="/agents")`` holds ``send_message(request_obj, agent_id, server,
request, headers)`` (``POST /v1/agents/{agent_id}/messages``; returns a ``LettaResponse``, or a
``StreamingResponse`` with ``streaming=true``) and ``send_message_async(agent_id, server, request, headers)``
(``POST .../messages/async``; returns the ``Run``). ``create_application`` (letta/server/rest_api/app.py)
includes the router later, copying each route from ``route.endpoint``; the running app calls
``route.dependant.call``. The hook runs right after the router module executed, so it replaces both on the
router's route before any app includes it; the wrapper keeps the endpoint's signature (``__wrapped__``), which
FastAPI reads for the parameters.

Data: ``message_count`` = ``len(request.messages)``; ``run_id`` = the run of the response's messages (the
``Run``'s id for the async route); ``usage`` = the response's ``LettaUsageStatistics``. The organization is the
request's actor (``server.user_manager.get_actor_or_default_async(actor_id=headers.actor_id)``), looked up in
the background after the response and cached per actor id. A streaming response is not announced (its result is
known only when the stream ends).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from bus.instrument import runtime, shapes
from bus.instrument.compat import signature_problem
from bus.instrument.logs import disable_point
from bus.instrument.wrap import ORIGINAL, Call, wrap_coroutine_function

MAX_ACTORS = 1024
_org_of_actor: OrderedDict[str | None, str | None] = OrderedDict()


async def _emit_with_org(server: Any, actor_id: str | None, agent_id: str, data: dict[str, Any]) -> None:
    if actor_id not in _org_of_actor:
        actor = await server.user_manager.get_actor_or_default_async(actor_id=actor_id)
        _org_of_actor[actor_id] = getattr(actor, "organization_id", None)
        while len(_org_of_actor) > MAX_ACTORS:
            _org_of_actor.popitem(last=False)
    runtime.emit(agent_id, "agent.message.sent", data, _org_of_actor[actor_id])


def _publish(call: Call, data: dict[str, Any]) -> None:
    actor_id = getattr(call.get("headers"), "actor_id", None)
    if actor_id in _org_of_actor:
        runtime.emit(call["agent_id"], "agent.message.sent", data, _org_of_actor[actor_id])
    else:
        runtime.spawn(_emit_with_org(call["server"], actor_id, call["agent_id"], data), "agent.message.sent")


def _message_count(call: Call) -> int:
    return len(getattr(call.get("request"), "messages", None) or [])


def after_send_message(call: Call, result: Any, _ctx: Any) -> None:
    """``send_message`` returned: publish for a ``LettaResponse`` (not for a stream)."""
    messages = getattr(result, "messages", None)
    if messages is None:  # StreamingResponse
        return
    run_id = next((m.run_id for m in messages if getattr(m, "run_id", None)), None)
    _publish(call, shapes.message_sent(_message_count(call), run_id,
                                       shapes.usage_of_stats(getattr(result, "usage", None), run_id)))


def after_send_message_async(call: Call, run: Any, _ctx: Any) -> None:
    """``send_message_async`` returned the run it started."""
    _publish(call, shapes.message_sent(_message_count(call), getattr(run, "id", None), None))


#: endpoint name -> (parameters read, after)
ENDPOINTS = {
    "send_message": (("agent_id", "server", "request", "headers"), after_send_message),
    "send_message_async": (("agent_id", "server", "request", "headers"), after_send_message_async),
}


def install_agents_router(module: Any) -> None:
    """Wrap the messages endpoints on ``module.router`` (letta.server.rest_api.routers.v1.agents)."""
    router = getattr(module, "router", None)
    for name, (params, after) in ENDPOINTS.items():
        point = f"routers.v1.agents.{name}"
        problem = signature_problem(module, name, params)
        if problem is None and router is None:
            problem = "letta.server.rest_api.routers.v1.agents has no router"
        if problem is not None:
            disable_point(point, problem)
            continue
        endpoint = getattr(module, name)
        routes = [r for r in getattr(router, "routes", []) if getattr(r, "endpoint", None) is endpoint
                  and hasattr(r, "dependant")]
        if not routes:
            if not any(getattr(getattr(r, "endpoint", None), ORIGINAL, None) is endpoint for r in router.routes):
                disable_point(point, f"no route of the agents router has {name} as its endpoint")
            continue
        wrapper = wrap_coroutine_function(endpoint, point, after=after)
        for route in routes:
            route.endpoint = wrapper
            route.dependant.call = wrapper
