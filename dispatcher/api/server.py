"""Serving the API with uvicorn inside the dispatcher's asyncio loop (``letta-bus up``).

The socket is bound here, before uvicorn starts, so a taken port is an ``OSError`` naming
``LETTA_BUS_API_PORT`` rather than uvicorn's ``sys.exit``; uvicorn's own signal handling is switched off, since
``letta-bus up`` handles SIGINT/SIGTERM and stops the server with :meth:`ApiServer.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # noqa: ANN201 - the caller owns the signals
        yield


class ApiServer:
    """``await start()`` listens on ``host:port`` (port -1 or 0: a free one; ``port`` tells which afterwards);
    ``await stop()`` stops accepting, lets requests in flight finish (at most 5 s) and closes."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> "ApiServer":
        """Bind and serve. Raises ``OSError`` naming the address and ``LETTA_BUS_API_PORT`` when it is taken."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, max(self.port, 0)))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"API port {self.host}:{self.port} is not available ({exc.strerror}): set "
                                     "LETTA_BUS_API_PORT to a free port (or 0 to turn the API off)") from None
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="api-server")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the API server stopped during start-up")
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        """Graceful stop; safe to call twice."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(self._task, 10)
            except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - stopping anyway
                log.warning("API server stop: %r", exc)
            self._server = self._task = None
