"""Delivery history and manual retry: ``GET /v1/agents/{agent_id}/webhook/deliveries`` (filters, cursor
pagination, newest first), ``GET /v1/webhook-deliveries/{id}`` (with every attempt),
``POST /v1/webhook-deliveries/{id}/retry`` and ``POST /v1/agents/{agent_id}/webhook/retry-failed``.

An agent's deliveries are those of its events to its own webhook; ``endpoint_id`` widens or narrows the list
(``GET /v1/webhooks/{id}/deliveries`` lists an organization or global endpoint's). A delivery is visible to whoever
sees its endpoint (:mod:`dispatcher.api.scoping`); another scope's answers 404."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, HTTPException, Query, status

from dispatcher.api.auth import Principal, get_principal
from dispatcher.api.context import ApiContext, get_ctx
from dispatcher.api.routes_agents import agent_endpoint
from dispatcher.api.schemas import (
    AgentIdPath,
    AttemptOut,
    DeliveryDetail,
    DeliveryOut,
    DeliveryPage,
    RetryFailedIn,
    RetryFailedOut,
    RetryOut,
)
from dispatcher.api.scoping import delivery_clause, not_found, sees, visible_agent_webhook
from dispatcher.api.validation import field_error
from dispatcher.ops.manual_retry import RetryRefused, retry_delivery, retry_failed
from dispatcher.store.models import Endpoint
from dispatcher.store.queries import STATUSES, get_delivery, list_deliveries

router = APIRouter(tags=["deliveries"])
Caller = Depends(get_principal)

_REFUSAL_STATUS = {"not_found": status.HTTP_404_NOT_FOUND, "conflict": status.HTTP_409_CONFLICT,
                   "gone": status.HTTP_410_GONE}


async def page_of(ctx: ApiContext, *, status: str | None, since: datetime | None, until: datetime | None,
                  cursor: str | None, limit: int, where=None, **equal: str | None) -> DeliveryPage:  # noqa: ANN001
    """One page of deliveries (``where``: a scope condition); 422 naming ``status``, ``until`` or ``cursor`` when
    they are bad."""
    if status is not None and status not in STATUSES:
        raise field_error("status", f"status must be one of {', '.join(STATUSES)}", "query")
    if since is not None and until is not None and until <= since:
        raise field_error("until", "until must be after since", "query")
    try:
        rows, next_cursor = await list_deliveries(ctx.store, status=status, since=since, until=until, cursor=cursor,
                                                  limit=limit, where=where, **equal)
    except ValueError as exc:
        raise field_error("cursor", str(exc), "query") from None
    return DeliveryPage(data=[DeliveryOut.of(r) for r in rows], next_cursor=next_cursor)


@router.get("/v1/agents/{agent_id}/webhook/deliveries", response_model=DeliveryPage)
async def agent_deliveries(
    agent_id: AgentIdPath,
    status_: str | None = Query(None, alias="status", description="pending, retrying, succeeded, failed or skipped"),
    event_type: str | None = None, since: datetime | None = Query(None, description="created at or after"),
    until: datetime | None = Query(None, description="created before"), cursor: str | None = None,
    limit: int = Query(50, ge=1, le=500),
    endpoint_id: str | None = Query(None, description="default: the agent's webhook; 'all' for every endpoint "
                                    "(of the caller's scope)"),
    ctx: ApiContext = Depends(get_ctx), principal: Principal = Caller,
) -> DeliveryPage:
    """Deliveries of the agent's events to its webhook (or ``endpoint_id``), newest first."""
    if endpoint_id is None:
        endpoint = await visible_agent_webhook(ctx, principal, agent_id)
        if endpoint is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"agent {agent_id} has no webhook (pass "
                                "endpoint_id=all for its deliveries to organization and global endpoints)")
        endpoint_id = endpoint.id
    return await page_of(ctx, agent_id=agent_id, endpoint_id=None if endpoint_id == "all" else endpoint_id,
                         status=status_, event_type=event_type, since=since, until=until, cursor=cursor, limit=limit,
                         where=delivery_clause(principal.grant))


async def visible_delivery(ctx: ApiContext, principal: Principal, delivery_id: str):  # noqa: ANN201
    """``(delivery, attempts)`` when ``principal`` sees the delivery's endpoint; 404 otherwise. A delivery whose
    endpoint was deleted is the operator's alone."""
    delivery, attempts = await get_delivery(ctx.store, delivery_id)
    if delivery is None or not (principal.is_operator
                                or sees(principal.grant, await ctx.store.get_endpoint(delivery.endpoint_id))):
        raise not_found(f"no delivery {delivery_id}")
    return delivery, attempts


@router.get("/v1/webhook-deliveries/{delivery_id}", response_model=DeliveryDetail)
async def show_delivery(delivery_id: str, ctx: ApiContext = Depends(get_ctx),
                        principal: Principal = Caller) -> DeliveryDetail:
    """One delivery with every attempt (status code, duration, response excerpt, error, time)."""
    delivery, attempts = await visible_delivery(ctx, principal, delivery_id)
    return DeliveryDetail(**DeliveryOut.of(delivery).model_dump(), attempt_log=[AttemptOut.of(a) for a in attempts])


@router.post("/v1/webhook-deliveries/{delivery_id}/retry", response_model=RetryOut, status_code=202,
             responses={403: {}, 404: {}, 409: {}, 410: {}})
async def retry(delivery_id: str, ctx: ApiContext = Depends(get_ctx), principal: Principal = Caller) -> RetryOut:
    """Send a finished delivery again with a full set of attempts (numbering continues). 409 while an attempt is
    coming or when the endpoint is gone or disabled; 410 when the event left the stream (older than the replay
    window)."""
    await visible_delivery(ctx, principal, delivery_id)
    principal.need_admin()
    try:
        before = await retry_delivery(ctx.js, ctx.settings, ctx.store, delivery_id)
    except RetryRefused as exc:
        raise HTTPException(_REFUSAL_STATUS[exc.kind], str(exc)) from None
    return RetryOut(delivery_id=delivery_id, previous_status=before.status, attempts_so_far=before.attempts)


async def queue_failed(ctx: ApiContext, endpoint: Endpoint, body: RetryFailedIn) -> RetryFailedOut:
    """Retry ``endpoint``'s failed deliveries created since ``body.since`` (shared by the agent and endpoint
    routes)."""
    result = await retry_failed(ctx.js, ctx.settings, ctx.store, agent_id=endpoint.agent_id, since=body.since,
                                endpoint_ids=[endpoint.id], limit=body.limit)
    return RetryFailedOut(queued=result.queued, remaining=result.remaining, refused=result.refused)


@router.post("/v1/agents/{agent_id}/webhook/retry-failed", response_model=RetryFailedOut, status_code=202,
             responses={403: {}, 404: {}})
async def retry_all_failed(agent_id: AgentIdPath, body: RetryFailedIn, ctx: ApiContext = Depends(get_ctx),
                           principal: Principal = Caller) -> RetryFailedOut:
    """Retry the agent webhook's failed deliveries created since ``since`` (at most ``limit``, oldest first).
    Returns how many were queued and how many failed ones remain past the limit."""
    endpoint = await agent_endpoint(agent_id, ctx, principal)
    principal.need_admin()
    return await queue_failed(ctx, endpoint, body)
