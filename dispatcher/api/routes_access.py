"""Scoped credentials (issue 13): ``/v1/api-keys`` (create, list, revoke) and ``/v1/portal-sessions`` (create,
revoke). Only an ``admin`` may hand out credentials, and never more than its own grant
(:meth:`dispatcher.store.access.Grant.covers`): an organization's admin creates keys and portal sessions of its
organization and its agents; operator keys are the operator's. Another scope's key or session answers 404."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status

from dispatcher.api.auth import Principal, describe, get_principal
from dispatcher.api.context import ApiContext, get_ctx
from dispatcher.api.portal import make_token
from dispatcher.api.schemas import ApiKeyIn, ApiKeyList, ApiKeyOut, GrantIn, PortalSessionIn, PortalSessionOut
from dispatcher.api.scoping import not_found
from dispatcher.store.access import (
    Grant,
    create_key,
    create_session,
    get_key,
    get_session,
    key_grant,
    list_keys,
    revoke_key,
    revoke_session,
)

router = APIRouter(tags=["access"])
Caller = Depends(get_principal)


def grant_of(body: GrantIn, principal: Principal) -> Grant:
    """The grant ``body`` asks for, with the caller's organization filled in; 422 naming the field when it does
    not fit its scope, 403 when it exceeds the caller's own grant."""
    organization_id = body.organization_id
    if organization_id is None and body.scope in ("organization", "agent"):
        organization_id = principal.grant.organization_id
    grant = Grant(scope=body.scope, role=body.role, organization_id=organization_id, agent_id=body.agent_id)
    try:
        grant.check()
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, [{
            "type": "value_error", "loc": ["body", str(exc).split(" ", 1)[0]], "msg": str(exc)}]) from None
    if not principal.grant.covers(grant):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"a credential scoped to {describe(principal.grant)} "
                            f"({principal.grant.role}) cannot grant {describe(grant)} ({grant.role})")
    return grant


async def revoke_within(principal: Principal, row, missing: str, revoke) -> Response:  # noqa: ANN001
    """Revoke ``row`` (a key or a portal session) with ``revoke()`` when ``principal`` is an admin whose scope
    reaches it: 403 for a ``read`` credential, 404 (``missing``) when there is none or it is outside the scope."""
    principal.need_admin()
    if row is None or not principal.grant.reaches(key_grant(row)):
        raise not_found(missing)
    await revoke()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/v1/api-keys", response_model=ApiKeyOut, status_code=status.HTTP_201_CREATED,
             responses={403: {}, 422: {}})
async def create_api_key(body: ApiKeyIn, ctx: ApiContext = Depends(get_ctx),
                         principal: Principal = Caller) -> ApiKeyOut:
    """Create a scoped key; ``key`` holds it in this response only (it is stored as a SHA-256 hash)."""
    principal.need_admin()
    row, key = await create_key(ctx.store, grant_of(body, principal), name=body.name,
                                created_by=principal.credential_id)
    return ApiKeyOut.of(row, key)


@router.get("/v1/api-keys", response_model=ApiKeyList, responses={403: {}})
async def list_api_keys(include_revoked: bool = False, ctx: ApiContext = Depends(get_ctx),
                        principal: Principal = Caller) -> ApiKeyList:
    """The keys within the caller's scope (never the keys themselves), oldest first."""
    principal.need_admin()
    g = principal.grant
    rows = await list_keys(ctx.store, organization_id=g.organization_id, agent_id=g.agent_id,
                           include_revoked=include_revoked)
    return ApiKeyList(data=[ApiKeyOut.of(r) for r in rows if g.reaches(key_grant(r))])


@router.delete("/v1/api-keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT, responses={403: {}, 404: {}})
async def revoke_api_key(key_id: str, ctx: ApiContext = Depends(get_ctx), principal: Principal = Caller) -> Response:
    """Revoke a key: refused from the next request on. Idempotent."""
    return await revoke_within(principal, await get_key(ctx.store, key_id), f"no API key {key_id}",
                               lambda: revoke_key(ctx.store, key_id))


@router.post("/v1/portal-sessions", response_model=PortalSessionOut, status_code=status.HTTP_201_CREATED,
             responses={403: {}, 422: {}})
async def create_portal_session(body: PortalSessionIn, request: Request, ctx: ApiContext = Depends(get_ctx),
                                principal: Principal = Caller) -> PortalSessionOut:
    """A console link in a scope for ``ttl`` seconds (default 1 h): ``url`` (``<api>/console/#token=...``) and
    ``token``, in this response only. Operator or organization admin."""
    principal.need_admin()
    if principal.grant.scope == "agent":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "portal sessions are handed out by the operator or an "
                            "organization's admin")
    row = await create_session(ctx.store, grant_of(body, principal), ttl_s=body.ttl,
                               created_by=principal.credential_id)
    token = make_token(ctx.portal_key, row.id, int(row.expires_at.timestamp()))
    base = ctx.settings.console_url or str(request.base_url).rstrip("/") + "/console/"
    return PortalSessionOut.of(row, url=f"{base}#token={token}", token=token)


@router.delete("/v1/portal-sessions/{session_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={403: {}, 404: {}})
async def revoke_portal_session(session_id: str, ctx: ApiContext = Depends(get_ctx),
                                principal: Principal = Caller) -> Response:
    """Revoke a portal session: its link and cookie are refused from the next request on. Idempotent."""
    return await revoke_within(principal, await get_session(ctx.store, session_id),
                               f"no portal session {session_id}", lambda: revoke_session(ctx.store, session_id))
