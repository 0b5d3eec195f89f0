"""Endpoint health: when a failing endpoint gets disabled, and the operational event that says so.

Rules: a 410 Gone disables at once. Otherwise an endpoint is disabled once it has failed for ``disable_after_s``
seconds without a success (Svix's rule, default 5 days) and at least ``disable_after_failures`` consecutive
attempts failed. ``failing_since`` lives in the database, so the clock survives restarts and is shared by every
dispatcher process; it is written only when it changes (first failure, first success after failures).
Disabling publishes ``letta_webhooks.endpoint.disabled`` (JSON) to ``LETTA_WEBHOOKS``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from nats.js import JetStreamContext

from config.settings import Settings
from dispatcher.delivery.endpoints import EndpointCache, EndpointView
from dispatcher.store.database import Store

log = logging.getLogger(__name__)


class EndpointHealth:
    """Tracks consecutive failures per endpoint and disables endpoints by the rules above."""

    def __init__(self, store: Store, js: JetStreamContext, settings: Settings, endpoints: EndpointCache) -> None:
        self.store = store
        self.js = js
        self.settings = settings
        self.endpoints = endpoints
        self._consecutive: dict[str, int] = {}
        self._since: dict[str, datetime] = {}

    async def succeeded(self, endpoint: EndpointView) -> None:
        """A 2xx: the endpoint is healthy again."""
        failing = self._consecutive.pop(endpoint.id, 0) or endpoint.failing_since is not None
        self._since.pop(endpoint.id, None)
        if failing:
            await self.store.set_failing_since(endpoint.id, None)

    async def failed(self, endpoint: EndpointView) -> None:
        """A retryable failure (5xx, timeout, connection error, 408, 429); may disable the endpoint."""
        count = self._consecutive.get(endpoint.id, 0) + 1
        self._consecutive[endpoint.id] = count
        since = self._since.get(endpoint.id) or endpoint.failing_since
        if since is None:
            since = datetime.now(timezone.utc)
            await self.store.set_failing_since(endpoint.id, since)
        self._since[endpoint.id] = since
        failing_for = (datetime.now(timezone.utc) - since).total_seconds()
        if failing_for >= self.settings.disable_after_s and count >= self.settings.disable_after_failures:
            await self.disable(endpoint, f"failing for {failing_for / 3600:.1f} h ({count} consecutive failed "
                                         f"attempts) without a success")

    async def disable(self, endpoint: EndpointView, reason: str) -> None:
        """Disable in the database and the cache, and publish the operational event."""
        await self.store.disable_endpoint(endpoint.id, reason)
        self.endpoints.mark_disabled(endpoint.id)
        self._consecutive.pop(endpoint.id, None)
        self._since.pop(endpoint.id, None)
        notice = {
            "event_type": "webhook.endpoint.disabled", "endpoint_id": endpoint.id, "scope": endpoint.scope,
            "agent_id": endpoint.agent_id, "organization_id": endpoint.organization_id, "url": endpoint.url,
            "reason": reason, "disabled_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        log.warning("endpoint %s (%s) disabled: %s", endpoint.id, endpoint.url, reason)
        try:
            await self.js.publish(f"{self.settings.webhooks_subject_prefix}.endpoint.disabled",
                                  json.dumps(notice).encode(), headers={"Content-Type": "application/json"},
                                  timeout=self.settings.publish_timeout_s)
        except Exception as exc:  # noqa: BLE001 - the endpoint is disabled either way
            log.error("could not publish the endpoint.disabled event for %s: %r", endpoint.id, exc)
