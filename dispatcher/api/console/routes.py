"""The console's pages: ``/console/endpoints``, ``/console/deliveries``, ``/console/deliveries/{id}`` and the
vendored static files, plus the sign-in (:mod:`.session`) and live (:mod:`.live`) routes; :data:`router` is what
the app mounts. Every page depends on :func:`dispatcher.api.auth.get_principal` and reads only through the scoped
queries (:mod:`dispatcher.api.scoping`), so it shows what the JSON API would show the same principal; the
changes it offers are JSON API calls made by the browser."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import HTMLResponse, Response

from dispatcher.api.auth import Principal, describe, get_principal
from dispatcher.api.context import ApiContext, get_ctx
from dispatcher.api.routes_history import page_of, visible_delivery
from dispatcher.api.scoping import delivery_clause, endpoint_clause, visible_endpoint
from dispatcher.api.console import live, session
from dispatcher.api.console.charts import latency_chart, outcome_chart
from dispatcher.api.console.reading import attempt_headers, circuits, event_payload
from dispatcher.api.console.rendering import HERE, ConsoleRoute, page
from dispatcher.store.queries import STATUSES
from dispatcher.store.stats import MAX_ENDPOINTS, WINDOWS_S, endpoint_stats, latency_series, outcome_series

router = APIRouter(prefix="/console", include_in_schema=False, route_class=ConsoleRoute)
router.include_router(session.router)
router.include_router(live.router)
Caller = Depends(get_principal)
#: Deliveries per page of ``/console/deliveries``.
PAGE_SIZE = 50
STATIC = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}


def base_context(principal: Principal, section: str) -> dict[str, Any]:
    """What every page's header needs: who is signed in, may they change things, which section is open."""
    return {"principal": principal, "who": describe(principal.grant), "can_edit": principal.grant.role == "admin",
            "section": section}


def create_scopes(principal: Principal) -> list[str]:
    """The endpoint scopes the principal may create with ``POST /v1/webhooks`` (an agent's admin creates its one
    webhook with ``PUT /v1/agents/{agent_id}/webhook`` instead)."""
    if principal.grant.role != "admin":
        return []
    return {"operator": ["agent", "organization", "global"], "organization": ["organization", "agent"]}.get(
        principal.grant.scope, [])


async def charts(ctx: ApiContext, principal: Principal, endpoint_id: str | None, label: str) -> list:
    """The two 24 h charts of one endpoint, or of everything the principal sees."""
    scope = dict(endpoint_ids=[endpoint_id]) if endpoint_id else dict(where=delivery_clause(principal.grant))
    return [outcome_chart(await outcome_series(ctx.store, **scope), label),
            latency_chart(await latency_series(ctx.store, **scope), label)]


@router.get("/endpoints", response_class=HTMLResponse)
async def endpoints_page(page_no: int = Query(0, alias="page", ge=0), ctx: ApiContext = Depends(get_ctx),
                         principal: Principal = Caller) -> HTMLResponse:
    """The endpoints the principal sees, :data:`~dispatcher.store.stats.MAX_ENDPOINTS` a page, each with its
    state and its numbers over 1 h and 24 h, and the forms that change them."""
    rows = await ctx.store.list_endpoints(where=endpoint_clause(principal.grant), offset=page_no * MAX_ENDPOINTS,
                                          limit=MAX_ENDPOINTS + 1)
    shown = rows[:MAX_ENDPOINTS]
    own_webhook = None
    if principal.grant.scope == "agent":
        own_webhook = await ctx.store.get_agent_webhook(principal.grant.agent_id or "")
    return page("endpoints.html", **base_context(principal, "endpoints"), endpoints=shown, page_no=page_no,
                more=len(rows) > MAX_ENDPOINTS,
                stats=await endpoint_stats(ctx.store, [e.id for e in shown]), windows=WINDOWS_S,
                circuits=circuits(ctx), scopes=create_scopes(principal), own_webhook=own_webhook,
                charts=await charts(ctx, principal, None, "every endpoint shown"))


def _blank(value: str | None) -> str | None:
    return value.strip() or None if value is not None else None


def _time(name: str, value: str | None) -> datetime | None:
    """A form's time (``2026-01-02T03:04``, taken as UTC when it names no zone); 422 naming the field."""
    value = _blank(value)
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(422, f"{name}: not a time (use 2026-01-02T03:04, UTC)") from None


@router.get("/deliveries", response_class=HTMLResponse)
async def deliveries_page(status: str | None = None, event_type: str | None = None, agent_id: str | None = None,
                          endpoint_id: str | None = None, since: str | None = None, until: str | None = None,
                          cursor: str | None = None, ctx: ApiContext = Depends(get_ctx),
                          principal: Principal = Caller) -> HTMLResponse:
    """Deliveries, newest first, filtered (a GET form) and paged by cursor; the bulk actions of an endpoint when
    the filter names one; its charts (or everything's)."""
    filters = {"status": _blank(status), "event_type": _blank(event_type), "agent_id": _blank(agent_id),
               "endpoint_id": _blank(endpoint_id)}
    endpoint = await visible_endpoint(ctx, principal, filters["endpoint_id"]) if filters["endpoint_id"] else None
    times = {"since": _time("since", since), "until": _time("until", until)}
    result = await page_of(ctx, status=filters.pop("status"), **times, cursor=_blank(cursor), limit=PAGE_SIZE,
                           where=delivery_clause(principal.grant), **filters)
    form = {"status": _blank(status) or "", "event_type": filters["event_type"] or "",
            "agent_id": filters["agent_id"] or "", "endpoint_id": filters["endpoint_id"] or "",
            "since": _blank(since) or "", "until": _blank(until) or ""}
    query = {k: v for k, v in form.items() if v}
    live_query = {k: v for k, v in query.items() if k not in ("since", "until")}
    return page("deliveries.html", **base_context(principal, "deliveries"), rows=result.data,
                next_cursor=result.next_cursor, first_page=not _blank(cursor), form=form, statuses=STATUSES,
                endpoint=endpoint, query=query, live_query=live_query,
                charts=await charts(ctx, principal, endpoint.id if endpoint else None,
                                    f"endpoint {endpoint.id}" if endpoint else "every endpoint visible"))


@router.get("/deliveries/{delivery_id}", response_class=HTMLResponse)
async def delivery_page(delivery_id: str, ctx: ApiContext = Depends(get_ctx),
                        principal: Principal = Caller) -> HTMLResponse:
    """One delivery: status, the event's payload, every attempt as a timeline; 404 outside the scope."""
    delivery, attempts = await visible_delivery(ctx, principal, delivery_id)
    return page("delivery.html", **base_context(principal, "deliveries"), d=delivery,
                attempts=[(a, attempt_headers(delivery, a)) for a in attempts],
                payload=await event_payload(ctx, delivery), endpoint=await ctx.store.get_endpoint(delivery.endpoint_id))


@router.get("/static/{name}")
async def static(name: str) -> Response:
    """The vendored files (:data:`STATIC`); anything else is 404."""
    if name not in STATIC:
        raise HTTPException(404, f"no file {name}")
    return Response((HERE / "static" / name).read_bytes(), media_type=STATIC[name],
                    headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})
