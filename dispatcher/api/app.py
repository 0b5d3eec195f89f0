"""Builds the FastAPI application. Every route but ``/healthz`` needs a bearer key (:mod:`.auth`), the API docs
(``/docs``, ``/redoc``, ``/openapi.json``) included."""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from dispatcher.api import (
    routes_access,
    routes_agents,
    routes_health,
    routes_history,
    routes_replay,
    routes_webhooks,
)
from dispatcher.api.auth import get_principal, require_docs_key
from dispatcher.api.context import ApiContext
from dispatcher.api.console import routes as console

DESCRIPTION = """Manage letta-bus webhooks: an agent's webhook (`/v1/agents/{agent_id}/webhook`), organization and
global endpoints (`/v1/webhooks`), delivery history, manual retry and replay from the event stream.
Authenticate with `Authorization: Bearer <key>`: the operator's keys (LETTA_BUS_API_KEYS; in development
./var/api.key), a scoped key from `POST /v1/api-keys`, or a portal session token from `POST /v1/portal-sessions`.

**Scopes.** A credential is scoped to the operator (everything), one organization (its organization endpoints and
the agent endpoints whose `organization_id` is that organization, with their deliveries, attempts, retries and
replays) or one agent (that agent's webhook), with the role `admin` (change, retry, replay, rotate) or `read`.
A resource outside the scope answers 404 as if it did not exist; a change with a `read` credential answers 403;
global endpoints, `/v1/status` and operator keys are the operator's alone. The console is at `/console`."""


def create_app(ctx: ApiContext) -> FastAPI:
    """The API over ``ctx`` (settings, store, NATS connection, keys, optional in-process dispatcher)."""
    # FastAPI's own docs routes take no dependencies: switched off and served below, behind the key
    app = FastAPI(title="letta-bus", version="0.1.0", description=DESCRIPTION, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.ctx = ctx
    secured = [Depends(get_principal)]
    app.include_router(routes_health.router)
    for module in (routes_agents, routes_history, routes_replay, routes_webhooks, routes_access):
        app.include_router(module.router, dependencies=secured)
    app.include_router(console.router)
    app.include_router(docs_router(app))
    return app


def docs_router(app: FastAPI) -> APIRouter:
    """``/openapi.json``, ``/docs`` (Swagger UI) and ``/redoc`` of ``app``, each behind
    :func:`dispatcher.api.auth.require_docs_key` (401 without a key)."""
    router = APIRouter(include_in_schema=False, dependencies=[Depends(require_docs_key)])

    def spec_url(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/") + "/openapi.json"

    @router.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=spec_url(request), title=f"{app.title} - Swagger UI")

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=spec_url(request), title=f"{app.title} - ReDoc")

    return router
