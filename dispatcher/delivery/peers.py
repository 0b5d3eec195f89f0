"""Which dispatcher processes are alive, so fleet-wide limits can be split between them.

Each dispatcher publishes a heartbeat on the core NATS subject ``settings.peers_subject`` (default
``letta_bus.control.dispatchers``, outside every stream, never stored) every ``peer_heartbeat_s`` seconds, and a
goodbye when it stops; it counts the peers heard within the last three heartbeats. Body (JSON):
``{"id": "<process id>", "state": "alive" | "gone"}``.

The per-agent rate limit (``agent_rate_limit_per_s``) is fleet-wide: with N live dispatchers each takes 1/N of the
rate and of the burst (:class:`dispatcher.delivery.gates.RateLimiter` reads :meth:`Peers.count` per reservation).
This holds because the dispatchers pull the same ``webhook-sender`` durable, which spreads an agent's tasks evenly
between them; no per-delivery coordination (a KV counter would cost a round trip per delivery). While a peer starts
or dies the sum is off for at most three heartbeats (6 s by default): below the limit when one has just started and
not been heard yet by the others, above it (at most N/(N-1) x) when one died and has not timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid

from nats.aio.client import Client

log = logging.getLogger(__name__)

#: A peer silent for this many heartbeats is taken as gone.
MISSED_HEARTBEATS = 3


class Peers:
    """Live dispatcher processes sharing the durables. ``await start()``, ``count()``, ``await stop()``.

    ``interval_s``: seconds between heartbeats. ``now`` is ``time.monotonic``, replaceable in tests."""

    def __init__(self, nc: Client, subject: str, interval_s: float, *, now=time.monotonic) -> None:  # noqa: ANN001
        self.nc = nc
        self.subject = subject
        self.interval_s = interval_s
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._now = now
        self._seen: dict[str, float] = {}  # peer id -> monotonic time heard last
        self._sub = None
        self._task: asyncio.Task[None] | None = None
        self._count = 1
        self._counted_at = 0.0

    async def start(self) -> None:
        """Subscribe, announce this process, and keep announcing it every ``interval_s`` seconds."""
        self._sub = await self.nc.subscribe(self.subject, cb=self._on_heartbeat)
        await self._announce("alive")
        self._task = asyncio.create_task(self._run(), name="dispatcher-peers")

    def count(self) -> int:
        """Live dispatchers, this one included (at least 1). Recomputed at most once per ``interval_s / 4``."""
        now = self._now()
        if now - self._counted_at >= self.interval_s / 4:
            horizon = now - MISSED_HEARTBEATS * self.interval_s
            for peer, at in list(self._seen.items()):
                if at < horizon:
                    del self._seen[peer]
                    log.info("dispatcher %s is silent: counted as gone", peer)
            self._count = 1 + len(self._seen)
            self._counted_at = now
        return self._count

    async def _on_heartbeat(self, msg) -> None:  # noqa: ANN001 - nats-py Msg
        try:
            beat = json.loads(msg.data)
            peer, state = str(beat["id"]), beat.get("state", "alive")
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed dispatcher heartbeat on %s", msg.subject)
            return
        if peer == self.id:
            return
        if state == "gone":
            self._seen.pop(peer, None)
        else:
            if peer not in self._seen:
                log.info("dispatcher %s joined", peer)
            self._seen[peer] = self._now()
        self._counted_at = 0.0  # recount at the next count()

    async def _announce(self, state: str) -> None:
        try:
            await self.nc.publish(self.subject, json.dumps({"id": self.id, "state": state}).encode())
        except Exception as exc:  # noqa: BLE001 - reconnecting: the next heartbeat goes out later
            log.debug("dispatcher heartbeat not sent: %r", exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._announce("alive")

    async def stop(self) -> None:
        """Say goodbye (so the others take their full share at once) and unsubscribe."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._announce("gone")
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=1)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
