"""``letta-bus bridge``: events for an unmodified Letta server, from the two notifications it already sends.

Point Letta at it (docs/letta-integration.md):

* ``STEP_COMPLETE_WEBHOOK=http://<bridge>:8290/letta/step-complete`` and ``STEP_COMPLETE_KEY=<LETTA_BUS_BRIDGE_KEY>``:
  Letta POSTs ``{"step_id": ...}`` with ``Authorization: Bearer <key>`` after each step, and awaits the answer
  inside its agent loop;
* ``callback_url=http://<bridge>:8290/letta/callback`` on runs (async messages) and batches: Letta POSTs
  ``{"run_id" | "job_id", "status", "completed_at", "metadata"}`` once the run or job is finished. Older servers
  send ``job_id`` for runs too (``run-...`` ids); those count as runs.

The bridge answers ``202 {"kind", "id", "duplicate"}`` as soon as the notification is stored in ``LETTA_BRIDGE``
(one PubAck, well under a millisecond here; :mod:`dispatcher.bridge.notifications`), so Letta's step is not held
up, and the enricher (:mod:`dispatcher.bridge.enricher`) reads Letta back and publishes the events. Only the id is
kept from a body: the events carry what Letta's API shows for it, so a forged callback (the callback URL is
visible to every Letta API user, with any key in it) publishes nothing that Letta does not confirm. A callback
therefore needs no key; a ``?key=`` in it is ignored, with one warning that Letta shows it to its API users.

Other answers: 401 on the step webhook without the key; 413 for a body over :data:`MAX_BODY_BYTES`; 422 naming the
field for bad input; 503 when NATS does not store the notification (Letta tries each notification once, so the
step is then missed: watch the bridge's log and ``/healthz``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from nats.aio.client import Client

from bus.connection import close_client, connect
from bus.publisher import EventPublisher, PublishError
from bus.streams import ensure_consumer, ensure_stream
from config.settings import Settings
from dispatcher.bridge import notifications as bn
from dispatcher.bridge.enricher import Enricher
from dispatcher.bridge.letta_client import LETTA_ID_RE, LettaClient

log = logging.getLogger(__name__)

#: Largest request body accepted (run callbacks carry the run's metadata, with its whole result).
MAX_BODY_BYTES = 4 * 1024 * 1024


class BridgeError(Exception):
    """A request the bridge answers with ``status`` (4xx/5xx) and ``{"detail": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def _letta_id(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not LETTA_ID_RE.fullmatch(value):
        raise BridgeError(422, f"{field}: expected a Letta id such as '{field.split('_')[0]}-<uuid>', got {value!r}")
    return value


class Bridge:
    """Stores Letta's notifications. HTTP-free: :func:`create_app` serves it. ``settings``: ``bridge_key`` and the
    ``bridge_*`` stream names; ``publisher``: its JetStream connection. Each handler returns the stored
    :class:`~dispatcher.bridge.notifications.Stored` or raises :class:`BridgeError`."""

    def __init__(self, settings: Settings, publisher: EventPublisher) -> None:
        self.settings = settings
        self.publisher = publisher
        #: the enricher's task (set by :class:`BridgeServer`); ``/healthz`` is 503 once it stopped
        self.enricher: asyncio.Task[None] | None = None
        self._warned_query_key = False

    def check_key(self, authorization: str | None) -> None:
        """Accept ``Authorization: Bearer <bridge_key>``; raise :class:`BridgeError` 401 otherwise. No
        ``bridge_key`` configured: everything passes (development)."""
        if self.settings.bridge_key is None:
            return
        expected = self.settings.bridge_key.get_secret_value().encode()
        offered = authorization[7:].strip().encode() if authorization and authorization[:7].lower() == "bearer " \
            else b""
        if not hmac.compare_digest(offered, expected):
            raise BridgeError(401, "missing or wrong key: send Authorization: Bearer <STEP_COMPLETE_KEY>, the value "
                                   "of LETTA_BUS_BRIDGE_KEY", {"WWW-Authenticate": "Bearer"})

    def note_query_key(self, present: bool) -> None:
        """Warn once when callbacks carry ``?key=``: Letta shows a run's ``callback_url`` to every API user."""
        if present and not self._warned_query_key:
            self._warned_query_key = True
            log.warning("bridge: a callback_url carries ?key=: Letta shows it to every API user (GET /v1/runs/{id}); "
                        "callbacks need no key, remove it from callback_url")

    async def step_complete(self, body: dict[str, Any]) -> bn.Stored:
        """``{"step_id"}`` from Letta's step-complete webhook."""
        return await self._store(bn.Notification("step", _letta_id(body, "step_id")))

    async def callback(self, body: dict[str, Any]) -> bn.Stored:
        """A run or job ``callback_url`` POST: only ``run_id`` / ``job_id`` is kept."""
        if "run_id" in body:
            return await self._store(bn.Notification("run", _letta_id(body, "run_id")))
        if "job_id" in body:
            job_id = _letta_id(body, "job_id")
            # servers where runs were jobs post job_id for runs
            return await self._store(bn.Notification("run" if job_id.startswith("run-") else "job", job_id))
        raise BridgeError(422, "run_id or job_id: the body names neither; expected Letta's callback "
                               '{"run_id" | "job_id", "status", "completed_at", "metadata"}')

    async def _store(self, note: bn.Notification) -> bn.Stored:
        msg_id = bn.msg_id(note)
        try:
            ack = await self.publisher.publish_raw(bn.subject(self.settings, note.kind), bn.encode(note),
                                                   {"Nats-Msg-Id": msg_id}, msg_id)
        except PublishError as exc:
            raise BridgeError(503, f"notification not stored, try again: {exc}") from None
        return bn.Stored(note, ack.seq, bool(ack.duplicate))


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
    """The bridge's HTTP API: ``POST /letta/step-complete``, ``POST /letta/callback`` (202), ``GET /healthz``."""
    app = FastAPI(title="letta-bus bridge", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BridgeError)
    async def _bridge_error(request: Request, exc: BridgeError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("bridge %s: %d %s", request.url.path, exc.status, exc)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=exc.headers)

    def accepted(stored: bn.Stored) -> JSONResponse:
        return JSONResponse({"kind": stored.note.kind, "id": stored.note.id, "duplicate": stored.duplicate},
                            status_code=202)

    @app.post("/letta/step-complete")
    async def step_complete(request: Request) -> JSONResponse:
        bridge.check_key(request.headers.get("authorization"))
        return accepted(await bridge.step_complete(await _json_body(request)))

    @app.post("/letta/callback")
    async def callback(request: Request) -> JSONResponse:
        bridge.note_query_key("key" in request.query_params)
        return accepted(await bridge.callback(await _json_body(request)))

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        up = bridge.publisher.connected
        enriching = bridge.enricher is None or not bridge.enricher.done()
        ok = up and enriching
        return JSONResponse({"status": "ok" if ok else "degraded", "nats": "connected" if up else "disconnected",
                             "enricher": "running" if enriching else "stopped"}, status_code=200 if ok else 503)

    return app


def _report_stop(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("bridge enricher stopped: %r; notifications are stored but not published until a restart",
                  task.exception())


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
    """The bridge as a running service: its NATS connection (its own unless ``nc`` is given; NATS role
    ``bridge``), the ``LETTA_BRIDGE`` stream and ``bridge-enricher`` durable (created or updated at start), uvicorn
    on ``settings.bridge_host:bridge_port`` (port 0: a free one; see :attr:`url`) and the enricher.

    Raises ``ValueError`` at :meth:`start` in production without ``LETTA_BUS_BRIDGE_KEY``, ``ConnectionError``
    when NATS does not answer within ``connect_timeout_s`` seconds, ``OSError`` when the port is taken and
    ``nats.js.errors.APIError`` when the stream or durable cannot be created.
    """

    def __init__(self, settings: Settings, *, nc: Client | None = None) -> None:
        self.settings = settings
        self._nc = nc
        self._owns_nc = nc is None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._letta: LettaClient | None = None
        self._stop_enricher = asyncio.Event()
        self._enricher: asyncio.Task[None] | None = None
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
                                         settings=s, role="bridge")
            js = self._nc.jetstream()
            await ensure_stream(js, bn.stream_config(s))
            await ensure_consumer(js, s.bridge_stream, bn.consumer_config(s))
            publisher = EventPublisher(s.model_copy(update={"nats_url": s.client_url}), self._nc)
            self._letta = LettaClient(s)
            self._stop_enricher.clear()
            self._enricher = asyncio.create_task(Enricher(s, publisher, self._letta).run(js, self._stop_enricher),
                                                 name="letta-bus-bridge-enricher")
            self._enricher.add_done_callback(_report_stop)
            bridge = Bridge(s, publisher)
            bridge.enricher = self._enricher
            app = create_app(bridge)
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
        """Finish in-flight requests (5 s at most) and the notifications in hand (10 s at most; the rest stay
        stored for the next start), close the Letta client and, if it owns it, drain NATS."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 10)
            except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - stopping must not fail
                log.warning("bridge HTTP server stop: %r", exc)
                self._server.force_exit = True
        if self._enricher is not None:
            self._stop_enricher.set()
            try:
                await asyncio.wait_for(self._enricher, 15)
            except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - stopping must not fail
                log.warning("bridge enricher stop: %r", exc)
            self._enricher = None
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
