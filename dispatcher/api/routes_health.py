"""``GET /healthz`` (open: no key) and ``GET /v1/status`` (streams, consumers, endpoints;
:mod:`dispatcher.ops.status`)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from dispatcher.api.auth import Principal, get_principal
from dispatcher.api.context import ApiContext, get_ctx
from dispatcher.api.schemas import HealthOut, StatusOut
from dispatcher.ops.status import ENDPOINT_LIMIT, MAX_ENDPOINT_LIMIT, endpoint_report, stream_report
from dispatcher.store.migrate import current_revision

router = APIRouter(tags=["health"])
CHECK_TIMEOUT_S = 2.0


@router.get("/healthz", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def healthz(ctx: ApiContext = Depends(get_ctx)) -> JSONResponse:
    """NATS connection, database (and its migration revision), the dispatcher's two consumers. 200 when all
    answer within 2 s each, else 503 with ``status: degraded`` and what failed."""
    nc = ctx.nc
    nats = {"connected": nc.is_connected, "server": nc.connected_url.netloc if nc.connected_url else None,
            "version": _version(nc) if nc.is_connected else None}
    database: dict = {"ok": False}
    try:
        database = {"ok": True, "revision": await asyncio.wait_for(current_revision(ctx.store.engine),
                                                                   CHECK_TIMEOUT_S)}
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        database["error"] = f"{type(exc).__name__}: {exc}"
    consumers: dict = {}
    try:
        report = await stream_report(nc, ctx.settings, timeout_s=CHECK_TIMEOUT_S)
        consumers = {c["name"]: {k: v for k, v in c.items() if k != "name"} for c in report["consumers"]}
    except Exception as exc:  # noqa: BLE001
        consumers = {"error": f"{type(exc).__name__}: {exc}"}
    d = ctx.dispatcher
    dispatcher = {"running": d is not None and bool(getattr(d, "_tasks", None))}
    ok = (nats["connected"] and database["ok"] and "error" not in consumers
          and not any(c.get("missing") for c in consumers.values()))
    body = HealthOut(status="ok" if ok else "degraded", nats=nats, database=database, consumers=consumers,
                     dispatcher=dispatcher)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)


@router.get("/v1/status", response_model=StatusOut, responses={403: {}})
async def status(
    limit: int = Query(ENDPOINT_LIMIT, ge=1, le=MAX_ENDPOINT_LIMIT, description="most endpoints listed"),
    ctx: ApiContext = Depends(get_ctx), principal: Principal = Depends(get_principal),
) -> StatusOut:
    """Streams and consumers as ``nats stream info`` / ``nats consumer info`` report them, fleet totals, and at
    most ``limit`` endpoints, those needing attention first (backlog, failures in the last 24 h, disabled,
    failing, circuit not closed), each with its backlog, failures and circuit state (as this process's dispatcher
    sees it); :func:`dispatcher.ops.status.endpoint_report`. Operator only (403 otherwise)."""
    principal.need_operator()
    report = await stream_report(ctx.nc, ctx.settings)
    circuits = None
    if ctx.dispatcher is not None and ctx.dispatcher.sender is not None:
        circuits = {endpoint_id: gate.state for endpoint_id, gate in ctx.dispatcher.sender.gates.items()}
    return StatusOut(**report, **await endpoint_report(ctx.store, circuits, limit=limit))


def _version(nc) -> str:  # noqa: ANN001 - nats-py Client
    v = nc.connected_server_version
    return f"{v.major}.{v.minor}.{v.patch}"
