"""Endpoints of every scope: ``/v1/webhooks`` (list, create) and ``/v1/webhooks/{endpoint_id}`` (get, patch,
delete, ``/test``, ``/rotate-secret``, ``/deliveries``). Organization endpoints receive the events of every agent
of their organization, global ones every event; agent endpoints are the same rows as ``/v1/agents/{id}/webhook``."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Response, status

from dispatcher.api.context import ApiContext, get_ctx
from dispatcher.api.routes_agents import rotate, run_test
from dispatcher.api.routes_history import page_of
from dispatcher.api.schemas import (
    DeliveryPage, EndpointIn, EndpointList, EndpointOut, EndpointPatch, RotateIn, Scope, SecretOut, TestResult,
)
from dispatcher.api.validation import check_endpoint_input
from dispatcher.store.database import EndpointConflict
from dispatcher.store.models import Endpoint

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


async def endpoint_or_404(endpoint_id: str, ctx: ApiContext) -> Endpoint:
    endpoint = await ctx.store.get_endpoint(endpoint_id)
    if endpoint is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no endpoint {endpoint_id}")
    return endpoint


@router.get("", response_model=EndpointList)
async def list_webhooks(scope: Scope | None = None, agent_id: str | None = None, organization_id: str | None = None,
                        ctx: ApiContext = Depends(get_ctx)) -> EndpointList:
    """Every endpoint, or those of a scope / agent / organization; oldest first; never with secrets."""
    rows = await ctx.store.list_endpoints(scope=scope, agent_id=agent_id, organization_id=organization_id)
    return EndpointList(data=[EndpointOut.of(e) for e in rows])


@router.post("", response_model=EndpointOut, status_code=status.HTTP_201_CREATED, responses={409: {}, 422: {}})
async def create_webhook(body: EndpointIn, ctx: ApiContext = Depends(get_ctx)) -> EndpointOut:
    """Create an endpoint; the generated secret (when none was given) is in ``secret``, once. 409 when an
    agent-scoped endpoint exists for the agent already."""
    url = check_endpoint_input(ctx.store, url=body.url, events=body.events, secret=body.secret,
                               allow_unknown_events=body.allow_unknown_events, scope=body.scope,
                               agent_id=body.agent_id, organization_id=body.organization_id)
    try:
        endpoint, generated = await ctx.store.create_endpoint(
            scope=body.scope, agent_id=body.agent_id, organization_id=body.organization_id, url=url,
            events=body.events, secret=body.secret, enabled=body.enabled)
    except EndpointConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    await ctx.changed(endpoint.id, "created")
    return EndpointOut.of(endpoint, generated)


@router.get("/{endpoint_id}", response_model=EndpointOut)
async def get_webhook(endpoint_id: str, ctx: ApiContext = Depends(get_ctx)) -> EndpointOut:
    return EndpointOut.of(await endpoint_or_404(endpoint_id, ctx))


@router.patch("/{endpoint_id}", response_model=EndpointOut, responses={404: {}, 422: {}})
async def patch_webhook(endpoint_id: str, body: EndpointPatch, ctx: ApiContext = Depends(get_ctx)) -> EndpointOut:
    """Change url, events, secret or enabled; scope and owner are fixed (delete and create instead)."""
    url = check_endpoint_input(ctx.store, url=body.url, events=body.events, secret=body.secret,
                               allow_unknown_events=body.allow_unknown_events)
    try:
        endpoint = await ctx.store.update_endpoint(endpoint_id, url=url, events=body.events,
                                                   secret=body.secret, enabled=body.enabled)
    except LookupError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    await ctx.changed(endpoint.id, "updated")
    return EndpointOut.of(endpoint)


@router.delete("/{endpoint_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_webhook(endpoint_id: str, ctx: ApiContext = Depends(get_ctx)) -> Response:
    if not await ctx.store.delete_endpoint(endpoint_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no endpoint {endpoint_id}")
    await ctx.changed(endpoint_id, "deleted")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{endpoint_id}/test", response_model=TestResult, responses={409: {}, 504: {"model": TestResult}})
async def test_webhook(endpoint_id: str, response: Response, ctx: ApiContext = Depends(get_ctx)) -> TestResult:
    """Like ``POST /v1/agents/{agent_id}/webhook/test``, for any endpoint."""
    return await run_test(await endpoint_or_404(endpoint_id, ctx), response, ctx)


@router.post("/{endpoint_id}/rotate-secret", response_model=SecretOut)
async def rotate_secret(endpoint_id: str, body: RotateIn | None = Body(None),
                        ctx: ApiContext = Depends(get_ctx)) -> SecretOut:
    return await rotate(await endpoint_or_404(endpoint_id, ctx), body, ctx)


@router.get("/{endpoint_id}/deliveries", response_model=DeliveryPage)
async def endpoint_deliveries(
    endpoint_id: str, status_: str | None = Query(None, alias="status"), event_type: str | None = None,
    since: datetime | None = None, until: datetime | None = None, cursor: str | None = None,
    limit: int = Query(50, ge=1, le=500), ctx: ApiContext = Depends(get_ctx),
) -> DeliveryPage:
    """Deliveries to one endpoint, newest first (same filters as the agent's list)."""
    return await page_of(ctx, endpoint_id=endpoint_id, status=status_, event_type=event_type, since=since,
                         until=until, cursor=cursor, limit=limit)
