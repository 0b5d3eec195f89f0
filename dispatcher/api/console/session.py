"""Signing in to the console with a portal link, and out.

A portal link is ``<api>/console/#token=lbp_...`` (``POST /v1/portal-sessions``): the token after ``#`` is never
sent to a server, so it is in no access log. ``GET /console/`` serves a page whose script
(``static/console.js``) reads it, POSTs ``{"token": ...}`` to ``POST /console/session`` and drops it from the
address bar (``history.replaceState``). That route checks the token (:func:`dispatcher.api.auth.principal_of`:
signature, expiry, the session row's revocation) and answers with the ``HttpOnly``, ``SameSite=Strict`` cookie
:data:`~dispatcher.api.auth.PORTAL_COOKIE` (``Secure`` over https) living as long as the session has left; from
then on :func:`dispatcher.api.auth.get_principal` authenticates the console's pages and the JSON API by it.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field

from dispatcher.api.auth import PORTAL_COOKIE, principal_of
from dispatcher.api.context import ApiContext, get_ctx
from dispatcher.api.console.rendering import SECURITY_HEADERS, ConsoleRoute, page, sign_in_page
from dispatcher.store.access import get_session
from dispatcher.store.models import utcnow
from dispatcher.store.queries import aware

router = APIRouter(route_class=ConsoleRoute)
LANDING = "/console/endpoints"


class TokenIn(BaseModel):
    token: str = Field(..., max_length=200)


def refused(reason: str, detail: str) -> JSONResponse:
    """401 of a token that opened no session; ``reason`` (``expired`` or ``invalid``) names the page to show."""
    response = JSONResponse({"detail": detail, "reason": reason, "next": f"/console/signed-out?reason={reason}"},
                            status_code=401, headers=SECURITY_HEADERS)
    response.delete_cookie(PORTAL_COOKIE, path="/", httponly=True, samesite="strict")
    return response


def is_https(request: Request, ctx: ApiContext) -> bool:
    """True when the browser talks https to us: the request's scheme (behind a proxy: what uvicorn's proxy
    headers make of it) or a ``console_url`` setting that says so."""
    return request.url.scheme == "https" or (ctx.settings.console_url or "").startswith("https://")


@router.get("/", response_class=HTMLResponse)
async def login_page() -> HTMLResponse:
    """The page a portal link opens: its script hands the token over and goes on to the endpoints."""
    return page("login.html", title="Signing in")


@router.post("/session")
async def open_session(body: TokenIn, request: Request, ctx: ApiContext = Depends(get_ctx)) -> JSONResponse:
    """Exchange a portal token for the session cookie. 200 ``{"next": "/console/endpoints", "expires_in_s"}``;
    401 ``{"reason": "expired" | "invalid", "next": <the page saying so>}``; 403 without ``X-Requested-With`` or
    ``HX-Request`` (a cross-site form cannot send it, so nobody can sign a victim into a session of theirs)."""
    if not (request.headers.get("x-requested-with") or request.headers.get("hx-request")):
        raise HTTPException(403, "send the token from the console's page (X-Requested-With header)")
    if not body.token.startswith("lbp_"):
        return refused("invalid", "not a portal link token")
    try:
        principal = await principal_of(body.token, ctx)
    except HTTPException as exc:  # expired, or revoked
        return refused("expired", str(exc.detail))
    if principal is None:
        return refused("invalid", "this link is not valid")
    row = await get_session(ctx.store, principal.credential_id)
    remaining_s = int((aware(row.expires_at) - utcnow()).total_seconds()) if row is not None else 0
    if remaining_s <= 0:
        return refused("expired", "portal session expired")
    response = JSONResponse({"next": LANDING, "expires_in_s": remaining_s}, headers=SECURITY_HEADERS)
    response.set_cookie(PORTAL_COOKIE, body.token, max_age=remaining_s, path="/", httponly=True,
                        samesite="strict", secure=is_https(request, ctx))
    return response


@router.post("/logout")
async def logout() -> RedirectResponse:
    """Clear the cookie (a plain form POST; the session itself stays valid until it expires or is revoked)."""
    response = RedirectResponse("/console/signed-out?reason=signed-out", status_code=303, headers=SECURITY_HEADERS)
    response.delete_cookie(PORTAL_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/signed-out", response_class=HTMLResponse)
async def signed_out(reason: str = "missing") -> HTMLResponse:
    """Where the login script goes when its token was refused, and where signing out ends."""
    return sign_in_page(reason if reason in ("expired", "invalid", "signed-out") else "missing")
