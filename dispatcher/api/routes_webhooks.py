"""Endpoints of every scope: ``/v1/webhooks`` (list, create) and ``/v1/webhooks/{endpoint_id}`` (get, patch,
delete, ``/test``, ``/rotate-secret``, ``/deliveries``, ``/retry-failed``, ``/replay``, ``/dead-letters/resend``).
Organization endpoints receive the events of every agent of their organization, global ones every event; agent
endpoints are the same rows as ``/v1/agents/{id}/webhook``. Each route sees only the caller's scope
(:mod:`dispatcher.api.scoping`): another scope's endpoint answers 404."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Response, status

from dispatcher.api.auth import Principal, get_principal
from dispatcher.api.context import ApiContext, get_ctx
from dispatcher.api.routes_agents import rotate, run_test
from dispatcher.api.routes_history import page_of, queue_failed
from dispatcher.api.routes_replay import queue_replay, resend_dead
from dispatcher.api.schemas import (
    DeliveryPage,
    EndpointIn,
    EndpointList,
    EndpointOut,
    EndpointPatch,
    ReplayIn,
    ReplayOut,
    ResendIn,
    ResendOut,
    RetryFailedIn,
    RetryFailedOut,
    RotateIn,
    Scope,
    SecretOut,
    TestResult,
)
from dispatcher.api.scoping import endpoint_clause, owner_organization, visible_endpoint
from dispatcher.api.validation import check_endpoint_input
from dispatcher.store.database import EndpointConflict

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
Caller = Depends(get_principal)


@router.get("", response_model=EndpointList)
async def list_webhooks(scope: Scope | None = None, agent_id: str | None = None, organization_id: str | None = None,
                        ctx: ApiContext = Depends(get_ctx), principal: Principal = Caller) -> EndpointList:
    """The endpoints the caller sees, or those of a scope / agent / organization; oldest first; never with
    secrets."""
    rows = await ctx.store.list_endpoints(scope=scope, agent_id=agent_id, organization_id=organization_id,
                                          where=endpoint_clause(principal.grant))
    return EndpointList(data=[EndpointOut.of(e) for e in rows])


@router.post("", response_model=EndpointOut, status_code=status.HTTP_201_CREATED,
             responses={403: {}, 409: {}, 422: {}})
async def create_webhook(body: EndpointIn, ctx: ApiContext = Depends(get_ctx),
                         principal: Principal = Caller) -> EndpointOut:
    """Create an endpoint; the generated secret (when none was given) is in ``secret``, once. 409 when an
    agent-scoped endpoint exists for the agent already. An organization's admin creates organization and agent
    endpoints of its own organization (``organization_id`` is filled in); an agent's admin only its agent's;
    global endpoints are the operator's (403 otherwise)."""
    principal.need_admin()
    grant = principal.grant
    if body.scope == "global" and not principal.is_operator:
        principal.need_operator()
    if grant.scope == "agent" and (body.scope != "agent" or body.agent_id != grant.agent_id):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"this credential may create only the webhook of agent "
                            f"{grant.agent_id} (scope 'agent', agent_id {grant.agent_id})")
    organization_id = body.organization_id if body.scope == "global" else \
        owner_organization(principal, body.organization_id)
    url = check_endpoint_input(ctx.store, url=body.url, events=body.events, secret=body.secret,
                               allow_unknown_events=body.allow_unknown_events, scope=body.scope,
                               agent_id=body.agent_id, organization_id=organization_id)
    try:
        endpoint, generated = await ctx.store.create_endpoint(
            scope=body.scope, agent_id=body.agent_id, organization_id=organization_id, url=url,
            events=body.events, secret=body.secret, enabled=body.enabled)
    except EndpointConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    await ctx.changed(endpoint.id, "created")
    return EndpointOut.of(endpoint, generated)


@router.get("/{endpoint_id}", response_model=EndpointOut)
async def get_webhook(endpoint_id: str, ctx: ApiContext = Depends(get_ctx),
                      principal: Principal = Caller) -> EndpointOut:
    return EndpointOut.of(await visible_endpoint(ctx, principal, endpoint_id))


@router.patch("/{endpoint_id}", response_model=EndpointOut, responses={403: {}, 404: {}, 422: {}})
async def patch_webhook(endpoint_id: str, body: EndpointPatch, ctx: ApiContext = Depends(get_ctx),
                        principal: Principal = Caller) -> EndpointOut:
    """Change url, events, secret or enabled; scope and owner are fixed (delete and create instead)."""
    await visible_endpoint(ctx, principal, endpoint_id)
    principal.need_admin()
    url = check_endpoint_input(ctx.store, url=body.url, events=body.events, secret=body.secret,
                               allow_unknown_events=body.allow_unknown_events)
    try:
        endpoint = await ctx.store.update_endpoint(endpoint_id, url=url, events=body.events,
                                                   secret=body.secret, enabled=body.enabled)
    except LookupError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    await ctx.changed(endpoint.id, "updated")
    return EndpointOut.of(endpoint)


@router.delete("/{endpoint_id}", status_code=status.HTTP_204_NO_CONTENT, responses={403: {}, 404: {}})
async def delete_webhook(endpoint_id: str, ctx: ApiContext = Depends(get_ctx),
                         principal: Principal = Caller) -> Response:
    await visible_endpoint(ctx, principal, endpoint_id)
    principal.need_admin()
    if not await ctx.store.delete_endpoint(endpoint_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no endpoint {endpoint_id}")
    await ctx.changed(endpoint_id, "deleted")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{endpoint_id}/test", response_model=TestResult,
             responses={403: {}, 404: {}, 409: {}, 504: {"model": TestResult}})
async def test_webhook(endpoint_id: str, response: Response, ctx: ApiContext = Depends(get_ctx),
                       principal: Principal = Caller) -> TestResult:
    """Like ``POST /v1/agents/{agent_id}/webhook/test``, for any endpoint."""
    endpoint = await visible_endpoint(ctx, principal, endpoint_id)
    principal.need_admin()
    return await run_test(endpoint, response, ctx)


@router.post("/{endpoint_id}/rotate-secret", response_model=SecretOut, responses={403: {}, 404: {}})
async def rotate_secret(endpoint_id: str, body: RotateIn | None = Body(None),
                        ctx: ApiContext = Depends(get_ctx), principal: Principal = Caller) -> SecretOut:
    endpoint = await visible_endpoint(ctx, principal, endpoint_id)
    principal.need_admin()
    return await rotate(endpoint, body, ctx)


@router.get("/{endpoint_id}/deliveries", response_model=DeliveryPage)
async def endpoint_deliveries(
    endpoint_id: str, status_: str | None = Query(None, alias="status"), event_type: str | None = None,
    agent_id: str | None = None, since: datetime | None = None, until: datetime | None = None,
    cursor: str | None = None, limit: int = Query(50, ge=1, le=500), ctx: ApiContext = Depends(get_ctx),
    principal: Principal = Caller,
) -> DeliveryPage:
    """Deliveries to one endpoint, newest first (same filters as the agent's list)."""
    await visible_endpoint(ctx, principal, endpoint_id)
    return await page_of(ctx, endpoint_id=endpoint_id, agent_id=agent_id, status=status_, event_type=event_type,
                         since=since, until=until, cursor=cursor, limit=limit)


@router.post("/{endpoint_id}/retry-failed", response_model=RetryFailedOut, status_code=202,
             responses={403: {}, 404: {}})
async def retry_failed(endpoint_id: str, body: RetryFailedIn, ctx: ApiContext = Depends(get_ctx),
                       principal: Principal = Caller) -> RetryFailedOut:
    """Retry the endpoint's failed deliveries created since ``since`` (at most ``limit``, oldest first)."""
    endpoint = await visible_endpoint(ctx, principal, endpoint_id)
    principal.need_admin()
    return await queue_failed(ctx, endpoint, body)


@router.post("/{endpoint_id}/replay", response_model=ReplayOut, status_code=202,
             responses={403: {}, 404: {}, 409: {}, 422: {}})
async def replay(endpoint_id: str, body: ReplayIn, ctx: ApiContext = Depends(get_ctx),
                 principal: Principal = Caller) -> ReplayOut:
    """Like ``POST /v1/agents/{agent_id}/webhook/replay``, for any endpoint: its agent's events, its
    organization's, or (global) every event published in [since, until)."""
    endpoint = await visible_endpoint(ctx, principal, endpoint_id)
    principal.need_admin()
    return await queue_replay(ctx, endpoint, body)


@router.post("/{endpoint_id}/dead-letters/resend", response_model=ResendOut, status_code=202,
             responses={403: {}, 404: {}})
async def resend_dead_letters(endpoint_id: str, body: ResendIn | None = Body(None),
                              ctx: ApiContext = Depends(get_ctx), principal: Principal = Caller) -> ResendOut:
    """Send the endpoint's dead letters (``letta_webhooks.dead.<endpoint_id>``) again, each with a full set of
    attempts; at most ``limit``."""
    endpoint = await visible_endpoint(ctx, principal, endpoint_id)
    principal.need_admin()
    return await resend_dead(ctx, endpoint, body or ResendIn())
