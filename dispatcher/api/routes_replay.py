"""``POST /v1/agents/{agent_id}/webhook/replay``: deliver the agent's past events again from ``LETTA_EVENTS``
(:mod:`dispatcher.ops.replay`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, status

from dispatcher.api.context import ApiContext, get_ctx
from dispatcher.api.routes_agents import agent_endpoint
from dispatcher.api.schemas import AgentIdPath, ReplayIn, ReplayOut
from dispatcher.api.validation import check_endpoint_input, field_error
from dispatcher.ops.replay import replay

router = APIRouter(tags=["replay"])


@router.post("/v1/agents/{agent_id}/webhook/replay", response_model=ReplayOut, status_code=202,
             responses={404: {}, 409: {}, 422: {}})
async def replay_events(agent_id: AgentIdPath, body: ReplayIn, ctx: ApiContext = Depends(get_ctx)) -> ReplayOut:
    """Queue a delivery for each of the agent's events published in [since, until) that matches ``events``
    (default: the webhook's patterns), as far back as the stream keeps events, including events from before the
    webhook existed or while it was disabled. Replayed deliveries are rows of their own (``replayed``: true).
    With ``limit`` it stops after that many events scanned; continue with the returned ``replay_id``,
    ``next_seq`` (as ``start_seq``) and ``end_seq`` until ``done``."""
    endpoint = await agent_endpoint(agent_id, ctx)
    if body.since is None and body.start_seq is None:
        raise field_error("since", "since is required: the time to replay from, e.g. 2026-01-01T00:00:00Z")
    if body.since is not None and body.until is not None and body.until <= body.since:
        raise field_error("until", "until must be after since")
    if body.events is not None:
        check_endpoint_input(ctx.store, events=body.events, allow_unknown_events=body.allow_unknown_events)
    if not endpoint.enabled:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"webhook of agent {agent_id} is disabled ({endpoint.disabled_reason}): enable it first")
    page = await replay(ctx.nc, ctx.settings, ctx.store, endpoint, since=body.since, until=body.until,
                        events=body.events, replay_id=body.replay_id, start_seq=body.start_seq,
                        end_seq=body.end_seq, limit=body.limit)
    return ReplayOut(**page.__dict__)
