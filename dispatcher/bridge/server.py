"""``letta-bus bridge``: events for an unmodified Letta server, from the two notifications it already sends.

Point Letta at it (see README, "Plugging into Letta"):

* ``STEP_COMPLETE_WEBHOOK=http://<bridge>:8290/letta/step-complete`` and ``STEP_COMPLETE_KEY=<LETTA_BUS_BRIDGE_KEY>``:
  Letta POSTs ``{"step_id": ...}`` with ``Authorization: Bearer <key>``; the bridge reads the step
  (``GET /v1/steps/{step_id}``) and publishes ``agent.step.completed`` / ``failed`` / ``cancelled``.
* ``callback_url=http://<bridge>:8290/letta/callback?key=<LETTA_BUS_BRIDGE_KEY>`` on runs (async messages) and jobs
  (batches): Letta POSTs ``{"run_id" | "job_id", "status", "completed_at", "metadata"}``; the bridge publishes
  ``agent.run.completed`` / ``agent.job.completed``. Older servers send ``job_id`` for runs too (``run-...`` ids);
  those count as runs.

Answers: 200 ``{"event_id", "event_type", "duplicate"}`` only after JetStream's PubAck; 401 without the key; 422
naming the field for bad input (or an id Letta does not know, or an agent / organization id outside the id
grammar of :mod:`bus.names`, which the bus cannot carry); 502 when the Letta REST read fails and 503 when
NATS does not store the event, so a sender that retries (Letta itself tries each notification once) gets the event
in. Event ids derive from the Letta ids (:func:`dispatcher.bridge.events.bridge_event_id`): a repeated
notification within the stream's duplicate window (2 min) is acknowledged as ``duplicate`` and stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from nats.aio.client import Client

from bus.catalog import EventValidationError
from bus.connection import close_client, connect
from bus.names import id_problem
from bus.publisher import EventPublisher, PublishError
from config.settings import Settings
from dispatcher.bridge import events as be
from dispatcher.bridge.events import nonempty_str as text
from dispatcher.bridge.letta_client import LETTA_ID_RE, LettaClient, LettaError, LettaNotFound

log = logging.getLogger(__name__)

#: Largest request body accepted (run callbacks carry the run's metadata, sometimes with its whole result).
MAX_BODY_BYTES = 4 * 1024 * 1024


class BridgeError(Exception):
    """A request the bridge answers with ``status`` (4xx/5xx) and ``{"detail": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True, slots=True)
class Published:
    """What was stored: the event id and type, and whether JetStream already had it (a repeated notification)."""

    event_id: str
    event_type: str
    duplicate: bool


def _letta_id(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not LETTA_ID_RE.fullmatch(value):
        raise BridgeError(422, f"{field}: expected a Letta id such as '{field.split('_')[0]}-<uuid>', got {value!r}")
    return value


class Bridge:
    """Turns Letta's notifications into published events. HTTP-free: :func:`create_app` serves it.

    ``settings``: ``bridge_key``, ``letta_*``; ``publisher``: stores the events; ``letta``: reads Letta's REST API.
    Each handler returns :class:`Published` or raises :class:`BridgeError`.
    """

    def __init__(self, settings: Settings, publisher: EventPublisher, letta: LettaClient) -> None:
        self.settings = settings
        self.publisher = publisher
        self.letta = letta

    def check_key(self, authorization: str | None, query_key: str | None = None) -> None:
        """Accept ``Authorization: Bearer <bridge_key>`` (or ``?key=<bridge_key>`` when given); raise
        :class:`BridgeError` 401 otherwise. No ``bridge_key`` configured: everything passes (development)."""
        if self.settings.bridge_key is None:
            return
        expected = self.settings.bridge_key.get_secret_value().encode()
        offered = []
        if authorization and authorization[:7].lower() == "bearer ":
            offered.append(authorization[7:].strip().encode())
        if query_key is not None:
            offered.append(query_key.encode())
        if not any(hmac.compare_digest(o, expected) for o in offered):
            raise BridgeError(401, "missing or wrong key: send Authorization: Bearer <STEP_COMPLETE_KEY> (callbacks: "
                                   "?key=...), the value of LETTA_BUS_BRIDGE_KEY", {"WWW-Authenticate": "Bearer"})

    async def step_complete(self, body: dict[str, Any]) -> Published:
        """``{"step_id"}`` from Letta's step-complete webhook: read the step, publish its terminal event."""
        step_id = _letta_id(body, "step_id")
        step = await self._read("step_id", self.letta.get_step(step_id))
        if step.get("id") != step_id:
            raise BridgeError(502, f"Letta answered GET /v1/steps/{step_id} with step {step.get('id')!r}")
        try:
            event = be.step_event(step)
        except be.StepNotTerminal as exc:
            raise BridgeError(503, f"{exc}; try again shortly", {"Retry-After": "1"}) from None
        except be.BadLettaData as exc:
            raise BridgeError(422, str(exc)) from None
        return await self._publish(event)

    async def callback(self, body: dict[str, Any]) -> Published:
        """A run or job ``callback_url`` POST: ``{"run_id" | "job_id", "status", "completed_at", "metadata"}``."""
        status = body.get("status")
        if not isinstance(status, str) or not status:
            raise BridgeError(422, f"status: expected Letta's run/job status such as 'completed', got {status!r}")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise BridgeError(422, f"metadata: expected a JSON object or null, got {type(metadata).__name__}")
        try:
            completed_at = be.rfc3339(body.get("completed_at"), "completed_at")
        except be.BadLettaData as exc:
            raise BridgeError(422, str(exc)) from None
        if "run_id" in body:
            return await self._run(_letta_id(body, "run_id"), status, completed_at, metadata)
        if "job_id" in body:
            job_id = _letta_id(body, "job_id")
            if job_id.startswith("run-"):  # servers where runs were jobs post job_id for runs
                return await self._run(job_id, status, completed_at, metadata)
            return await self._job(job_id, status, completed_at, metadata)
        raise BridgeError(422, "run_id or job_id: the body names neither; expected Letta's callback "
                               '{"run_id" | "job_id", "status", "completed_at", "metadata"}')

    async def _run(self, run_id: str, status: str, completed_at: str | None, metadata: dict | None) -> Published:
        agent_id = text((metadata or {}).get("agent_id"))
        stop_reason = be.stop_reason_of(metadata)
        if agent_id is None:
            run = await self._read("run_id", self.letta.get_run(run_id))
            run_meta = run.get("metadata") if isinstance(run.get("metadata"), dict) else {}
            agent_id = text(run.get("agent_id")) or text(run_meta.get("agent_id"))
            stop_reason = stop_reason or text(run.get("stop_reason"))
            if agent_id is None:
                raise BridgeError(422, f"agent_id: Letta run {run_id} names no agent (neither agent_id nor "
                                       "metadata.agent_id)")
        usage = be.usage_of_result(metadata, run_id)
        if usage is None:
            usage = await self._run_usage(run_id)
        event = be.run_event(run_id, status, completed_at, metadata, agent_id=agent_id, usage=usage,
                             stop_reason=stop_reason)
        return await self._publish(event)

    async def _run_usage(self, run_id: str) -> dict[str, Any] | None:
        """Best effort: usage is optional in agent.run.completed, so a failed read leaves it out."""
        try:
            counts = await self.letta.get_run_usage(run_id)
        except LettaError as exc:
            log.warning("run %s: usage not read (%s); publishing without it", run_id, exc)
            return None
        return be.usage_from(counts, run_id=run_id, step_count=None)

    async def _job(self, job_id: str, status: str, completed_at: str | None, metadata: dict | None) -> Published:
        job = await self._read("job_id", self.letta.get_job(job_id))
        job_meta = job.get("metadata") if isinstance(job.get("metadata"), dict) else {}
        agent_id = (text((metadata or {}).get("agent_id")) or text(job.get("agent_id"))
                    or text(job_meta.get("agent_id")))
        event = be.job_event(job_id, status, completed_at, metadata, agent_id=agent_id,
                             organization_id=text(job.get("organization_id")), job_type=text(job.get("job_type")))
        return await self._publish(event)

    async def _read(self, field: str, request: Any) -> dict[str, Any]:
        try:
            return await request
        except LettaNotFound as exc:
            raise BridgeError(422, f"{field}: {exc}") from None
        except LettaError as exc:
            raise BridgeError(502, f"reading Letta failed, try again: {exc}") from None

    async def _publish(self, event: be.BridgeEvent) -> Published:
        for field, value in (("agent_id", event.agent_id), ("organization_id", event.organization_id)):
            # from Letta (or the callback's metadata): refused here, with a 422, if the bus could not carry it
            if value is not None and (problem := id_problem(field, value)) is not None:
                raise BridgeError(422, f"{field}: {event.event_type} not published: {problem}")
        try:
            envelope = self.publisher.build(event.agent_id, event.event_type, event.data,
                                            organization_id=event.organization_id, event_id=event.event_id)
            ack = await self.publisher.publish_envelope(envelope)
        except EventValidationError as exc:
            raise BridgeError(422, str(exc)) from None
        except PublishError as exc:
            raise BridgeError(503, f"event not stored, try again: {exc}") from None
        duplicate = bool(ack.duplicate)
        log.info("bridge: %s %s for agent %s%s", event.event_type, event.event_id, event.agent_id,
                 " (duplicate)" if duplicate else "")
        return Published(event.event_id, event.event_type, duplicate)


async def _json_body(request: Request) -> dict[str, Any]:
    size = 0
    chunks = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BridgeError(413, f"body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except ValueError:
        raise BridgeError(422, "body: not JSON; expected a JSON object") from None
    if not isinstance(body, dict):
        raise BridgeError(422, f"body: expected a JSON object, got {type(body).__name__}")
    return body


def create_app(bridge: Bridge) -> FastAPI:
    """The bridge's HTTP API: ``POST /letta/step-complete``, ``POST /letta/callback``, ``GET /healthz``."""
    app = FastAPI(title="letta-bus bridge", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BridgeError)
    async def _bridge_error(request: Request, exc: BridgeError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("bridge %s: %d %s", request.url.path, exc.status, exc)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=exc.headers)

    @app.post("/letta/step-complete")
    async def step_complete(request: Request) -> dict[str, Any]:
        bridge.check_key(request.headers.get("authorization"))
        published = await bridge.step_complete(await _json_body(request))
        return {"event_id": published.event_id, "event_type": published.event_type, "duplicate": published.duplicate}

    @app.post("/letta/callback")
    async def callback(request: Request) -> dict[str, Any]:
        bridge.check_key(request.headers.get("authorization"), request.query_params.get("key"))
        published = await bridge.callback(await _json_body(request))
        return {"event_id": published.event_id, "event_type": published.event_type, "duplicate": published.duplicate}

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        up = bridge.publisher.connected
        return JSONResponse({"status": "ok" if up else "degraded", "nats": "connected" if up else "disconnected"},
                            status_code=200 if up else 503)

    return app


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the owner (CLI or test) decides when to stop."""

    def capture_signals(self):  # noqa: ANN201
        return contextlib.nullcontext()


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"bridge address {host}:{port}: {exc} (LETTA_BUS_BRIDGE_HOST)") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}): set LETTA_BUS_BRIDGE_PORT or stop what "
                      "uses it") from None
    return sock


class BridgeServer:
    """The bridge as a running service: its NATS connection (its own unless ``nc`` is given), a Letta REST client
    and uvicorn on ``settings.bridge_host:bridge_port`` (port 0: a free one; see :attr:`url`).

    Raises ``ValueError`` at :meth:`start` in production without ``LETTA_BUS_BRIDGE_KEY``, ``ConnectionError``
    when NATS does not answer within ``connect_timeout_s`` seconds and ``OSError`` when the port is taken.
    """

    def __init__(self, settings: Settings, *, nc: Client | None = None) -> None:
        self.settings = settings
        self._nc = nc
        self._owns_nc = nc is None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._letta: LettaClient | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` the bridge listens on (after :meth:`start`)."""
        host = self.settings.bridge_host
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"

    async def start(self) -> "BridgeServer":
        """Connect, bind and serve; returns once requests are accepted (at most 10 s)."""
        s = self.settings
        if s.bridge_key is None:
            if s.env == "production":
                raise ValueError("LETTA_BUS_BRIDGE_KEY is required in production: set it, and give Letta the same "
                                 "value as STEP_COMPLETE_KEY")
            log.warning("bridge: LETTA_BUS_BRIDGE_KEY unset, requests are not authenticated (development only)")
        sock = _bind(s.bridge_host, s.bridge_port)
        try:
            if self._nc is None:
                self._nc = await connect(s.client_url, name="letta-bus-bridge", timeout_s=s.connect_timeout_s,
                                         settings=s, role="publisher")
            publisher = EventPublisher(s.model_copy(update={"nats_url": s.client_url}), self._nc)
            self._letta = LettaClient(s)
            app = create_app(Bridge(s, publisher, self._letta))
            config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                    timeout_graceful_shutdown=5)
            self._server = _Server(config)
            self.port = sock.getsockname()[1]
            self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="letta-bus-bridge")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while not self._server.started:
                if self._task.done():
                    self._task.result()  # raises what stopped it
                    raise RuntimeError("the bridge's HTTP server stopped during start-up")
                if loop.time() > deadline:
                    raise TimeoutError("the bridge's HTTP server did not start within 10 s")
                await asyncio.sleep(0.01)
        except BaseException:
            await self.stop()
            sock.close()
            raise
        log.info("bridge listening on %s, reading Letta at %s", self.url, s.letta_base_url)
        return self

    async def stop(self) -> None:
        """Finish in-flight requests (5 s at most), close the Letta client and, if it owns it, drain NATS."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 10)
            except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - stopping must not fail
                log.warning("bridge HTTP server stop: %r", exc)
                self._server.force_exit = True
        if self._letta is not None:
            await self._letta.close()
            self._letta = None
        if self._owns_nc:
            await close_client(self._nc, what="the bridge's NATS connection")
        self._server = self._task = None

    async def __aenter__(self) -> "BridgeServer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
