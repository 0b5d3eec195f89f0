"""Rendering console pages: Jinja2 templates (autoescaped: everything a receiver sent is hostile input), the
security headers of every console response, and the error pages (401 sign-in, 403, 404, 422) that replace
FastAPI's JSON errors on console routes (:class:`ConsoleRoute`)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.exceptions import HTTPException

from dispatcher.api.auth import PORTAL_COOKIE
from dispatcher.store.queries import aware

HERE = Path(__file__).parent
#: Sent with every console response: only this origin's scripts, styles and connections; no framing.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def when(value: datetime | None) -> str:
    """``2026-01-02 03:04:05Z`` (UTC, seconds), or an en dash for None."""
    value = aware(value)
    return "–" if value is None else value.strftime("%Y-%m-%d %H:%M:%SZ")


def ms(value: float | None) -> str:
    """A duration in milliseconds for a table cell: ``84 ms``, ``1.2 s``; an en dash for None."""
    if value is None:
        return "–"
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.1f} s"


def rate(value: float | None) -> str:
    """A 0..1 ratio as a percentage (``99.5 %``), or an en dash."""
    return "–" if value is None else f"{value * 100:.1f} %"


templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined,
                        trim_blocks=True, lstrip_blocks=True)
templates.filters.update(when=when, ms=ms, rate=rate)


def fragment(name: str, **context: Any) -> str:
    """A template rendered to a string (a table row or timeline item for the live stream)."""
    return templates.get_template(name).render(**context)


def page(name: str, *, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A whole page with the security headers."""
    return HTMLResponse(fragment(name, **context), status_code=status_code, headers=SECURITY_HEADERS)


#: ``<h1>`` of the sign-in page by why it is shown.
SIGN_IN_TITLES = {"expired": "This link has expired", "invalid": "This link is not valid",
                  "missing": "Sign in with a portal link", "signed-out": "You are signed out"}


def sign_in_page(reason: str, detail: str = "") -> HTMLResponse:
    """The page shown without a usable session (401; 200 after signing out), clearing a stale cookie."""
    response = page("signin.html", status_code=200 if reason == "signed-out" else 401,
                    title=SIGN_IN_TITLES.get(reason, SIGN_IN_TITLES["invalid"]), reason=reason, detail=detail)
    response.delete_cookie(PORTAL_COOKIE, path="/", httponly=True, samesite="strict")
    return response


def reason_of(exc: HTTPException, request: Request) -> str:
    """Why a 401 happened: ``expired`` (expired or revoked session), ``invalid`` (a credential nobody knows) or
    ``missing`` (none sent)."""
    if "expired" in str(exc.detail) or "revoked" in str(exc.detail):
        return "expired"
    sent = request.cookies.get(PORTAL_COOKIE) or request.headers.get("authorization")
    return "invalid" if sent else "missing"


def error_page(request: Request, exc: HTTPException) -> Response:
    """The HTML form of an error raised by a console route or its dependencies."""
    if exc.status_code == 401:
        return sign_in_page(reason_of(exc, request), str(exc.detail))
    titles = {403: "Not allowed", 404: "Not found", 422: "That did not work", 503: "Busy"}
    response = page("error.html", status_code=exc.status_code, title=titles.get(exc.status_code, "Error"),
                    detail=str(exc.detail))
    for name, value in (exc.headers or {}).items():
        response.headers.setdefault(name, value)
    return response


class ConsoleRoute(APIRoute):
    """A route whose errors (from its dependencies too: an expired cookie in
    :func:`dispatcher.api.auth.get_principal`) are pages rather than JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPException as exc:
                return error_page(request, exc)
            except RequestValidationError as exc:
                problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
                return error_page(request, HTTPException(422, problems))

        return route
