"""A webhook receiver that verifies both signatures: the demo's endpoint, the tests' endpoint, and a reference for
users writing their own.

Verification follows the Standard Webhooks spec (https://www.standardwebhooks.com/, "Verifying webhooks"):
recompute ``v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>``, compare in constant time
against each space-separated signature, and refuse timestamps more than 5 minutes away. ``X-Letta-Signature`` is
``sha256=<hex HMAC-SHA256(secret UTF-8, body)>``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from aiohttp import web

from dispatcher.delivery.signing import standard_key

TOLERANCE_S = 300


def verify_letta(secret: str, body: bytes, header: str | None) -> bool:
    """True when ``X-Letta-Signature`` is the HMAC-SHA256 of ``body`` keyed with ``secret``'s UTF-8 bytes."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return header is not None and hmac.compare_digest(expected, header)


def verify_standard(secret: str, body: bytes, msg_id: str | None, timestamp: str | None, header: str | None,
                    now: float | None = None) -> bool:
    """True when one of the ``webhook-signature`` values matches and the timestamp is within 5 minutes."""
    if not (msg_id and timestamp and header and timestamp.isdigit()):
        return False
    if abs((now or time.time()) - int(timestamp)) > TOLERANCE_S:
        return False
    mac = hmac.new(standard_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    expected = base64.b64encode(mac.digest()).decode()
    return any(
        hmac.compare_digest(expected, sig.partition(",")[2]) for sig in header.split(" ") if sig.startswith("v1,")
    )


@dataclass
class Received:
    """One POST as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    letta_verified: bool
    standard_verified: bool
    status: int
    at: float = 0.0  # time.monotonic() on arrival


class Receiver:
    """HTTP server on 127.0.0.1 (port 0 = free port). ``secrets`` maps a path ("/agent-a") to its secret; paths
    answer with queued statuses (``respond``), then the status of an outage in progress (``fail_for``), then 200.
    ``delay_s`` per path makes it slow (seconds)."""

    def __init__(self, secrets: dict[str, str] | None = None, port: int = 0) -> None:
        self.secrets = dict(secrets or {})
        self.port = port
        self.received: list[Received] = []
        self._statuses: dict[str, deque[int]] = defaultdict(deque)
        self.delay_s: dict[str, float] = {}
        self._outages: dict[str, tuple[float, int]] = {}  # path -> (time.monotonic() it ends, status)
        self._runner: web.AppRunner | None = None
        self._arrived = asyncio.Condition()

    def respond(self, path: str, *statuses: int) -> None:
        """Answer the next POSTs to ``path`` with these statuses, in order."""
        self._statuses[path].extend(statuses)

    def fail_for(self, path: str, seconds: float, status: int = 500) -> float:
        """Answer every POST to ``path`` with ``status`` for the next ``seconds`` seconds (an outage); returns the
        ``time.monotonic()`` at which it ends."""
        ends = time.monotonic() + seconds
        self._outages[path] = (ends, status)
        return ends

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` on this receiver."""
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        path = request.path
        if path in self.delay_s:
            await asyncio.sleep(self.delay_s[path])
        secret = self.secrets.get(path)
        h = request.headers
        queued = self._statuses.get(path)
        outage = self._outages.get(path)
        now = time.monotonic()
        status = queued.popleft() if queued else outage[1] if outage and now < outage[0] else 200
        self.received.append(Received(
            path=path, headers=dict(h), body=body, status=status, at=now,
            letta_verified=secret is not None and verify_letta(secret, body, h.get("X-Letta-Signature")),
            standard_verified=secret is not None and verify_standard(
                secret, body, h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature")),
        ))
        async with self._arrived:
            self._arrived.notify_all()
        return web.Response(status=status, text="ok" if status < 300 else f"status {status}")

    async def wait_for(self, count: int, timeout_s: float, path: str | None = None) -> list[Received]:
        """Wait until at least ``count`` POSTs (to ``path``, if given) arrived; returns them. Raises
        ``TimeoutError`` after ``timeout_s`` seconds."""

        def matching() -> list[Received]:
            return [r for r in self.received if path is None or r.path == path]

        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(matching()) >= count), timeout_s)
        return matching()
