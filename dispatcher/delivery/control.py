"""Endpoint change notices: every write to the endpoint table is announced on a core NATS subject, and every
running dispatcher applies that one endpoint at once (instead of at its next periodic reconciliation).

Subject: ``settings.control_subject`` (default ``letta_bus.control.endpoints``), outside the subjects of every
stream (``letta.>``, ``letta_webhooks.>``), so notices are never stored and cost nothing when nobody listens.
Body (JSON): ``{"endpoint_id": "ep_...", "change": "created" | "updated" | "deleted" | "secret-rotated"}``.
Core NATS is at-most-once: a notice lost in a reconnect is covered by the periodic reconciliation
(``endpoint_refresh_s``: rows by ``updated_at`` and deletion tombstones), which stays on as the fallback.
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
    """Subscribes to the notices and calls ``apply(endpoint_id)`` for each endpoint named (the endpoint cache reads
    that one row again: :meth:`dispatcher.delivery.endpoints.EndpointCache.apply`). Notices are coalesced per id:
    a burst of writes to one endpoint while it is being applied costs one more apply, not one per write; different
    endpoints are applied one after another in arrival order. A notice without an endpoint id calls
    ``reconcile()`` when given (else it is left to the periodic reconciliation). ``applied`` counts applies."""

    def __init__(self, nc: Client, subject: str, apply: Callable[[str], Awaitable[None]],
                 reconcile: Callable[[], Awaitable[None]] | None = None) -> None:
        self.nc = nc
        self.subject = subject
        self.apply = apply
        self.reconcile = reconcile
        self.applied = 0
        self._pending: dict[str, None] = {}  # endpoint ids in arrival order (an ordered set)
        self._reconcile_pending = False
        self._wake = asyncio.Event()
        self._sub = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe and start the apply loop."""

        async def on_notice(msg) -> None:  # noqa: ANN001 - nats-py Msg
            endpoint_id = _endpoint_id(msg.data)
            if endpoint_id is None:
                self._reconcile_pending = True
            else:
                self._pending[endpoint_id] = None
            self._wake.set()

        self._sub = await self.nc.subscribe(self.subject, cb=on_notice)
        self._task = asyncio.create_task(self._run(), name="endpoint-change-listener")

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._reconcile_pending:
                self._reconcile_pending = False
                if self.reconcile is not None:
                    try:
                        await self.reconcile()
                    except Exception:  # noqa: BLE001 - the periodic reconciliation tries again
                        log.exception("endpoint reconciliation after a change notice failed")
            while self._pending:
                endpoint_id = next(iter(self._pending))
                del self._pending[endpoint_id]  # a notice arriving during the apply queues it again
                try:
                    await self.apply(endpoint_id)
                    self.applied += 1
                except Exception:  # noqa: BLE001 - the periodic reconciliation covers it
                    log.exception("applying the change of endpoint %s failed", endpoint_id)

    async def stop(self) -> None:
        """Unsubscribe and end the loop (an apply in progress is cancelled)."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _endpoint_id(data: bytes) -> str | None:
    """The ``endpoint_id`` of a notice body, or None when the body is not such a notice."""
    try:
        body = json.loads(data)
    except ValueError:
        return None
    endpoint_id = body.get("endpoint_id") if isinstance(body, dict) else None
    return endpoint_id if isinstance(endpoint_id, str) and endpoint_id else None
