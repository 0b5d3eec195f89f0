"""Builds the FastAPI application. Every route but ``/healthz`` needs a bearer key (:mod:`.auth`)."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from dispatcher.api import routes_agents, routes_health, routes_history, routes_replay, routes_webhooks
from dispatcher.api.auth import require_api_key
from dispatcher.api.context import ApiContext

DESCRIPTION = """Manage letta-bus webhooks: an agent's webhook (`/v1/agents/{agent_id}/webhook`), organization and
global endpoints (`/v1/webhooks`), delivery history, manual retry and replay from the event stream.
Authenticate with `Authorization: Bearer <key>` (LETTA_BUS_API_KEYS; in development ./var/api.key)."""


def create_app(ctx: ApiContext) -> FastAPI:
    """The API over ``ctx`` (settings, store, NATS connection, keys, optional in-process dispatcher)."""
    app = FastAPI(title="letta-bus", version="0.1.0", description=DESCRIPTION)
    app.state.ctx = ctx
    secured = [Depends(require_api_key)]
    app.include_router(routes_health.router)
    for module in (routes_agents, routes_history, routes_replay, routes_webhooks):
        app.include_router(module.router, dependencies=secured)
    return app
