"""Replay and dead letters: ``POST /v1/agents/{agent_id}/webhook/replay`` delivers the agent's past events again
from ``LETTA_EVENTS`` (:mod:`dispatcher.ops.replay`); the shared helpers here also serve
``/v1/webhooks/{id}/replay`` and ``/v1/webhooks/{id}/dead-letters`` (:mod:`dispatcher.ops.dead_letters`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, status

from dispatcher.api.auth import Principal, get_principal
from dispatcher.api.context import ApiContext, get_ctx
from dispatcher.api.routes_agents import agent_endpoint
from dispatcher.api.schemas import AgentIdPath, DeadLetterList, DeadLetterOut, ReplayIn, ReplayOut, ResendIn, ResendOut
from dispatcher.api.scoping import visible_endpoint
from dispatcher.api.validation import check_endpoint_input, field_error
from dispatcher.ops.dead_letters import list_dead_letters, resend
from dispatcher.ops.replay import replay
from dispatcher.store.models import Endpoint

router = APIRouter(tags=["replay"])


async def queue_replay(ctx: ApiContext, endpoint: Endpoint, body: ReplayIn) -> ReplayOut:
    """Check ``body`` (422 naming ``since``, ``until`` or ``events``; 409 for a disabled endpoint) and queue one
    page of the replay."""
    if body.since is None and body.start_seq is None:
        raise field_error("since", "since is required: the time to replay from, e.g. 2026-01-01T00:00:00Z")
    if body.since is not None and body.until is not None and body.until <= body.since:
        raise field_error("until", "until must be after since")
    if body.events is not None:
        check_endpoint_input(ctx.store, events=body.events, allow_unknown_events=body.allow_unknown_events)
    if not endpoint.enabled:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"endpoint {endpoint.id} is disabled ({endpoint.disabled_reason}): enable it first")
    page = await replay(ctx.nc, ctx.settings, ctx.store, endpoint, since=body.since, until=body.until,
                        events=body.events, replay_id=body.replay_id, start_seq=body.start_seq,
                        end_seq=body.end_seq, limit=body.limit)
    return ReplayOut(**page.__dict__)


@router.post("/v1/agents/{agent_id}/webhook/replay", response_model=ReplayOut, status_code=202,
             responses={403: {}, 404: {}, 409: {}, 422: {}})
async def replay_events(agent_id: AgentIdPath, body: ReplayIn, ctx: ApiContext = Depends(get_ctx),
                        principal: Principal = Depends(get_principal)) -> ReplayOut:
    """Queue a delivery for each of the agent's events published in [since, until) that matches ``events``
    (default: the webhook's patterns), as far back as the stream keeps events, including events from before the
    webhook existed or while it was disabled. Replayed deliveries are rows of their own (``replayed``: true).
    With ``limit`` it stops after that many events scanned; continue with the returned ``replay_id``,
    ``next_seq`` (as ``start_seq``) and ``end_seq`` until ``done``."""
    endpoint = await agent_endpoint(agent_id, ctx, principal)
    principal.need_admin()
    return await queue_replay(ctx, endpoint, body)


async def resend_dead(ctx: ApiContext, endpoint: Endpoint, body: ResendIn) -> ResendOut:
    """Resend at most ``body.limit`` of ``endpoint``'s dead letters, oldest first."""
    letters = await list_dead_letters(ctx.js, ctx.settings, endpoint.id, limit=body.limit)
    return ResendOut(sent=await resend(ctx.js, ctx.settings, letters))


@router.get("/v1/webhooks/{endpoint_id}/dead-letters", response_model=DeadLetterList, tags=["webhooks"])
async def dead_letters(endpoint_id: str, limit: int = 100, ctx: ApiContext = Depends(get_ctx),
                       principal: Principal = Depends(get_principal)) -> DeadLetterList:
    """The endpoint's dead letters, oldest first (at most ``limit``, ≤ 1000): delivery, event, attempts, last
    error, failure time."""
    endpoint = await visible_endpoint(ctx, principal, endpoint_id)
    letters = await list_dead_letters(ctx.js, ctx.settings, endpoint.id, limit=max(1, min(limit, 1000)))
    return DeadLetterList(data=[DeadLetterOut.of(letter) for letter in letters])
