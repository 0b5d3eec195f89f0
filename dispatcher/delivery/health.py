"""Endpoint health: when a failing endpoint gets disabled, and the operational event that says so.

Rules: a 410 Gone disables at once. Otherwise an endpoint is disabled once it has failed for ``disable_after_s``
seconds without a success (Svix's rule, default 5 days) and at least ``disable_after_failures`` consecutive
attempts failed. ``failing_since`` lives in the database, so the clock survives restarts and is shared by every
dispatcher process; it is written only when it changes (first failure, first success after failures).
Disabling publishes ``letta_webhooks.endpoint.disabled`` (JSON) to ``LETTA_WEBHOOKS``.

Off the critical path (issue 10, finding 3): the sender's calls decide in memory and return at once; the database
writes they imply go to a background writer (:meth:`EndpointHealth.run`) that keeps only the latest wanted state
of each endpoint and retries it (0.5 s doubling to 2 s) while the database is down. So a database outage delays
these writes but never decides whether an attempt is recorded and settled.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from nats.js import JetStreamContext

from config.settings import Settings
from dispatcher.delivery.endpoints import EndpointCache, EndpointView
from dispatcher.store.database import Store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Write:
    """The database state one endpoint should reach: ``failing_since`` (None: healthy), or disabled for ``reason``."""

    endpoint: EndpointView
    failing_since: datetime | None = None
    disable_reason: str | None = None
    disabled_at: datetime | None = None


class EndpointHealth:
    """Tracks consecutive failures per endpoint and disables endpoints by the rules above. ``run()`` writes the
    outcome to the database and must run beside the sender (the dispatcher starts it)."""

    def __init__(self, store: Store, js: JetStreamContext, settings: Settings, endpoints: EndpointCache) -> None:
        self.store = store
        self.js = js
        self.settings = settings
        self.endpoints = endpoints
        self._consecutive: dict[str, int] = {}
        self._since: dict[str, datetime] = {}
        self._writes: dict[str, _Write] = {}  # endpoint id -> latest state to write
        self._wake = asyncio.Event()
        self.write_failures = 0  # database writes that failed and were retried
        #: called with the endpoint id when this process disables an endpoint (the parked backlog's drainer)
        self.on_disable: list[Callable[[str], None]] = []

    def succeeded(self, endpoint: EndpointView) -> None:
        """A 2xx: the endpoint is healthy again."""
        failing = self._consecutive.pop(endpoint.id, 0) or endpoint.failing_since is not None
        self._since.pop(endpoint.id, None)
        if failing:
            self._queue(_Write(endpoint))

    def failed(self, endpoint: EndpointView) -> None:
        """A retryable failure (5xx, timeout, connection error, 408, 429); may disable the endpoint."""
        count = self._consecutive.get(endpoint.id, 0) + 1
        self._consecutive[endpoint.id] = count
        since = self._since.get(endpoint.id) or endpoint.failing_since
        now = datetime.now(timezone.utc)
        if since is None:
            since = now
            self._queue(_Write(endpoint, failing_since=since))
        self._since[endpoint.id] = since
        failing_for = (now - since).total_seconds()
        if failing_for >= self.settings.disable_after_s and count >= self.settings.disable_after_failures:
            self.disable(endpoint, f"failing for {failing_for / 3600:.1f} h ({count} consecutive failed "
                                   f"attempts) without a success")

    def disable(self, endpoint: EndpointView, reason: str) -> None:
        """Stop routing to the endpoint in this process now; disable it in the database and publish the
        operational event in the background."""
        self.endpoints.mark_disabled(endpoint.id)
        self._consecutive.pop(endpoint.id, None)
        self._since.pop(endpoint.id, None)
        log.warning("endpoint %s (%s) disabled: %s", endpoint.id, endpoint.url, reason)
        self._queue(_Write(endpoint, disable_reason=reason, disabled_at=datetime.now(timezone.utc)))
        for listener in self.on_disable:
            listener(endpoint.id)

    def pending(self) -> int:
        """Endpoint writes not yet in the database."""
        return len(self._writes)

    def _queue(self, write: _Write) -> None:
        queued = self._writes.get(write.endpoint.id)
        if queued is not None and queued.disable_reason is not None and write.disable_reason is None:
            return  # a disable waiting to be written wins over a later health change
        self._writes[write.endpoint.id] = write
        self._wake.set()

    async def run(self) -> None:
        """Write queued endpoint states until cancelled; the dispatcher's stop then calls :meth:`flush` once."""
        pause = 0.5
        while True:
            if not self._writes:
                self._wake.clear()
                await self._wake.wait()
            elif await self.flush():
                pause = 0.5
            else:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def flush(self) -> bool:
        """Write every queued state once; True when all were written (the failed ones stay queued)."""
        ok = True
        for endpoint_id, write in list(self._writes.items()):
            try:
                await self._apply(write)
            except Exception as exc:  # noqa: BLE001 - the database may be down: keep it and try again
                ok = False
                self.write_failures += 1
                log.warning("endpoint %s health write failed, will retry: %r", endpoint_id, exc)
                continue
            if self._writes.get(endpoint_id) is write:  # not replaced by a newer state meanwhile
                del self._writes[endpoint_id]
        return ok

    async def _apply(self, write: _Write) -> None:
        endpoint = write.endpoint
        if write.disable_reason is None:
            await self.store.set_failing_since(endpoint.id, write.failing_since)
            return
        await self.store.disable_endpoint(endpoint.id, write.disable_reason)
        notice = {
            "event_type": "webhook.endpoint.disabled", "endpoint_id": endpoint.id, "scope": endpoint.scope,
            "agent_id": endpoint.agent_id, "organization_id": endpoint.organization_id, "url": endpoint.url,
            "reason": write.disable_reason,
            "disabled_at": (write.disabled_at or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        try:
            await self.js.publish(f"{self.settings.webhooks_subject_prefix}.endpoint.disabled",
                                  json.dumps(notice).encode(), headers={"Content-Type": "application/json"},
                                  timeout=self.settings.publish_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the endpoint is disabled either way
            log.error("could not publish the endpoint.disabled event for %s: %r", endpoint.id, exc)
