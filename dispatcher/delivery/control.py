"""Endpoint change notices: every write to the endpoint table is announced on a core NATS subject, and every
running dispatcher reloads its endpoint cache at once (instead of at its next periodic refresh).

Subject: ``settings.control_subject`` (default ``letta_bus.control.endpoints``), outside the subjects of every
stream (``letta.>``, ``letta_webhooks.>``), so notices are never stored and cost nothing when nobody listens.
Body (JSON): ``{"endpoint_id": "ep_...", "change": "created" | "updated" | "deleted" | "secret-rotated"}``.
Core NATS is at-most-once: a notice lost in a reconnect is covered by the periodic refresh
(``endpoint_refresh_s``), which stays on as the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client

log = logging.getLogger(__name__)


async def announce_change(nc: Client, subject: str, endpoint_id: str, change: str) -> None:
    """Publish one notice and flush it (at most 1 s), so it has left this process when the caller answers.
    Never raises: a lost notice only delays the change until the next periodic refresh."""
    body = json.dumps({"endpoint_id": endpoint_id, "change": change}).encode()
    try:
        await nc.publish(subject, body)
        await nc.flush(timeout=1)
    except Exception as exc:  # noqa: BLE001 - the periodic refresh covers a lost notice
        log.warning("could not announce the %s of endpoint %s: %r", change, endpoint_id, exc)


class ChangeListener:
    """Subscribes to the notices and runs ``reload()`` after each; notices arriving during a reload are folded
    into one more reload, so a burst of writes costs two reloads, not one per write. ``reloads`` counts them."""

    def __init__(self, nc: Client, subject: str, reload: Callable[[], Awaitable[None]]) -> None:
        self.nc = nc
        self.subject = subject
        self.reload = reload
        self.reloads = 0
        self._pending = asyncio.Event()
        self._sub = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe and start the reload loop."""

        async def on_notice(_msg) -> None:  # noqa: ANN001 - nats-py Msg
            self._pending.set()

        self._sub = await self.nc.subscribe(self.subject, cb=on_notice)
        self._task = asyncio.create_task(self._run(), name="endpoint-change-listener")

    async def _run(self) -> None:
        while True:
            await self._pending.wait()
            self._pending.clear()
            try:
                await self.reload()
                self.reloads += 1
            except Exception:  # noqa: BLE001 - the periodic refresh tries again
                log.exception("endpoint reload after a change notice failed")

    async def stop(self) -> None:
        """Unsubscribe and end the loop (a reload in progress is cancelled)."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
