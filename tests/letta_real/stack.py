"""letta-bus as a user runs it next to Letta, for the real-Letta tier: ``letta-bus up``
(embedded nats-server with generated credentials, SQLite, the dispatcher and the API) and ``letta-bus bridge`` as
processes, and a webhook receiver that records every POST.

Each process is started with its own free ports and working directory, waited for with a bounded poll, and
stopped by its PID (SIGTERM, then SIGKILL after 15 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web
from standardwebhooks import Webhook

from tests.letta_real.harness import free_port, stop_group

API_KEY = "letta-real-tier-api-key-0123456789"
BRIDGE_KEY = "letta-real-tier-bridge-key-0123456789"
LETTA_BUS = str(Path(sys.executable).with_name("letta-bus"))


class Process:
    """One command in its own session, output to ``<workdir>/<name>.log``; :meth:`stop` by PID."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def tail(self, size: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else ""

    def wait_http(self, url: str, timeout_s: float = 60, ok: tuple[int, ...] = (200,)) -> None:
        """Poll ``url`` until it answers one of ``ok``; ``RuntimeError`` with the log if the process exits or
        ``timeout_s`` seconds pass."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(url, timeout=2).status_code in ok:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer {url} within {timeout_s} s:\n{self.tail()}")

    def stop(self) -> None:
        stop_group(self.proc)


@dataclass
class Delivery:
    """One POST the receiver got: ``path``, ``headers`` (lower-case names), raw ``body`` and its JSON."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1:0 in a thread: answers 204 to every POST and records it."""

    deliveries: list[Delivery] = field(default_factory=list)
    url: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def start(self) -> "Receiver":
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/{tail:.*}", self._post)
            runner = web.AppRunner(app, access_log=None)
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # noqa: SLF001
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="receiver", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the receiver did not start within 10 s")
        return self

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.deliveries.append(Delivery(request.path, {k.lower(): v for k, v in request.headers.items()}, body,
                                        time.time()))
        return web.Response(status=204)

    def wait_for(self, predicate, timeout_s: float = 30, what: str = "deliveries") -> list[dict[str, Any]]:
        """Poll until ``predicate()`` returns a truthy value (returned); ``AssertionError`` naming ``what`` after
        ``timeout_s`` seconds, with what did arrive."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if result := predicate():
                return result
            time.sleep(0.05)
        got = [(d.path, d.json.get("event_type"), d.json.get("agent_id")) for d in self.deliveries[-30:]]
        raise AssertionError(f"{what}: not within {timeout_s} s; the receiver's last deliveries: {got}")

    def matching(self, path: str, event_type: str, **data: Any) -> list[Delivery]:
        """Deliveries on ``path`` of ``event_type`` whose ``data`` has the given fields equal."""
        out = []
        for d in list(self.deliveries):
            if d.path == path and (body := d.json).get("event_type") == event_type \
                    and all(body.get("data", {}).get(k) == v for k, v in data.items()):
                out.append(d)
        return out

    def wait_event(self, path: str, event_type: str, secret: str, *, timeout_s: float = 30,
                   **data: Any) -> dict[str, Any]:
        """The envelope of the first delivery on ``path`` of ``event_type`` with ``data`` fields equal to
        ``data``, once it arrived (at most ``timeout_s`` seconds), after checking its Standard Webhooks signature
        with ``secret`` (``standardwebhooks`` raises if it does not verify)."""
        found = self.wait_for(lambda: self.matching(path, event_type, **data), timeout_s,
                              f"{event_type} with {data} at {path}")
        Webhook(secret).verify(found[0].body, found[0].headers)
        return found[0].json

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None


class BusStack:
    """``letta-bus up`` in a private working directory (embedded nats-server on a free port, SQLite, API with
    :data:`API_KEY`, SSRF allowing 127.0.0.0/8 for the receiver) and, with :meth:`start_bridge`, ``letta-bus
    bridge`` reading the Letta server at a given URL.

    :attr:`nats_url`, :attr:`api` (base URL), :attr:`auth_dir` (the generated credentials, for other processes
    such as an instrumented Letta), :meth:`client_env` (what a process needs to publish to this bus).
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="letta-bus-stack-"))
        self.nats_port = free_port()
        self.api_port = free_port()
        self.processes: list[Process] = []
        self.bridge_port = 0
        #: endpoints registered by the tier (name -> the API's answer, with the secret)
        self.endpoints: dict[str, dict[str, Any]] = {}

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def auth_dir(self) -> Path:
        return self.dir / "var" / "nats-auth"

    @property
    def bridge_url(self) -> str:
        return f"http://127.0.0.1:{self.bridge_port}"

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LETTA_BUS_", "STEP_COMPLETE_"))}
        env.update(LETTA_BUS_ENV="development", LETTA_BUS_LOG_LEVEL="info", **extra)
        return env

    def client_env(self) -> dict[str, str]:
        """Variables a Letta process (instrumented) needs to publish here: the NATS URL and the credentials."""
        return {"LETTA_BUS_NATS_URL": self.nats_url, "LETTA_BUS_NATS_AUTH_DIR": str(self.auth_dir)}

    def start(self) -> "BusStack":
        env = self._env(
            LETTA_BUS_EMBEDDED_PORT=str(self.nats_port), LETTA_BUS_EMBEDDED_MONITOR_PORT="-1",
            LETTA_BUS_API_PORT=str(self.api_port),
            LETTA_BUS_METRICS_PORT="0", LETTA_BUS_API_KEYS=json.dumps([API_KEY]),
            LETTA_BUS_SSRF_ALLOW_CIDRS=json.dumps(["127.0.0.0/8"]), LETTA_BUS_ENDPOINT_REFRESH_S="1",
        )
        up = Process("letta-bus-up", [LETTA_BUS, "up"], env, self.dir)
        self.processes.append(up)
        up.wait_http(f"{self.api}/healthz", timeout_s=60)
        return self

    def start_bridge(self, letta_url: str, *, port: int | None = None) -> Process:
        """``letta-bus bridge`` on ``port`` (a free one if ``None``) reading ``letta_url``; returns once its
        ``/healthz`` answers 200."""
        self.bridge_port = port or free_port()
        env = self._env(LETTA_BUS_NATS_URL=self.nats_url, LETTA_BUS_NATS_AUTH_DIR=str(self.auth_dir),
                        LETTA_BUS_BRIDGE_PORT=str(self.bridge_port), LETTA_BUS_BRIDGE_KEY=BRIDGE_KEY,
                        LETTA_BUS_LETTA_BASE_URL=letta_url)
        bridge = Process("letta-bus-bridge", [LETTA_BUS, "bridge"], env, self.dir)
        self.processes.append(bridge)
        bridge.wait_http(f"{self.bridge_url}/healthz", timeout_s=30)
        return bridge

    def http(self) -> httpx.Client:
        """A client of the management API with the operator key."""
        return httpx.Client(base_url=self.api, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=15)

    def add_endpoint(self, url: str, *, scope: str = "global", **fields: Any) -> dict[str, Any]:
        """``POST /v1/webhooks``: an endpoint of ``scope`` for ``url`` (all events unless ``events`` given);
        returns the API's answer (with the secret, shown once)."""
        with self.http() as http:
            response = http.post("/v1/webhooks", json={"scope": scope, "url": url, **fields})
        assert response.status_code in (200, 201), response.text
        return response.json()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in self.processes)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
