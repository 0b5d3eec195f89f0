"""In-memory view of the endpoint table, reloaded every ``endpoint_refresh_s`` seconds.

Fan-out routes every event through it and the sender reads url, secret and enabled from it at send time, so an
endpoint change applies to retries already queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from bus.envelope import EnvelopeHead
from dispatcher.delivery.signing import Signer
from dispatcher.rules.matching import wants
from dispatcher.store.database import Store
from dispatcher.store.models import Endpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EndpointView:
    """What delivery needs of one endpoint."""

    id: str
    scope: str
    agent_id: str | None
    organization_id: str | None
    url: str
    events: tuple[str, ...]
    enabled: bool
    signer: Signer
    failing_since: datetime | None = None


class EndpointCache:
    """Endpoints by id and by routing key. ``refresh()`` reloads; ``run()`` keeps reloading until cancelled."""

    def __init__(self, store: Store, refresh_s: float = 1.0) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self._by_id: dict[str, EndpointView] = {}
        self._by_agent: dict[str, list[EndpointView]] = {}
        self._by_org: dict[str, list[EndpointView]] = {}
        self._global: list[EndpointView] = []
        self._signers: dict[tuple[str, str | None], Signer] = {}
        self._lock = asyncio.Lock()
        self._absent: dict[str, float] = {}  # endpoint id -> monotonic time until which a lookup found none

    async def refresh(self) -> None:
        """Reload every endpoint from the database. Secrets are decrypted once per change, not per reload.
        Reloads run one at a time (periodic and change-notice reloads), so an older read never replaces a newer
        one. Raises :class:`dispatcher.store.secrets.SecretKeyError` when a stored secret fits no configured key."""
        async with self._lock:
            await self._reload()

    async def _reload(self) -> None:
        rows = await self.store.endpoints()
        by_id, by_agent, by_org, glob = {}, {}, {}, []
        signers: dict[tuple[str, str | None], Signer] = {}
        now = datetime.now(timezone.utc)
        for row in rows:
            view = self._view(row, now, signers)
            by_id[row.id] = view
            _route(view, by_agent, by_org, glob)
        self._by_id, self._by_agent, self._by_org, self._global = by_id, by_agent, by_org, glob
        self._signers = signers
        self._absent.clear()

    def _view(self, row: Endpoint, now: datetime, signers: dict[tuple[str, str | None], Signer]) -> EndpointView:
        expires = _aware(row.previous_secret_expires_at)
        previous = row.previous_secret if row.previous_secret and expires and expires > now else None
        key = (row.secret, previous)
        signer = signers[key] = self._signers.get(key) or self._signer(row.secret, previous)
        return EndpointView(
            id=row.id, scope=row.scope, agent_id=row.agent_id, organization_id=row.organization_id, url=row.url,
            events=tuple(row.events or ()), enabled=row.enabled, signer=signer, failing_since=_aware(row.failing_since),
        )

    async def lookup(self, endpoint_id: str) -> EndpointView | None:
        """An endpoint that is not in the view, read from the database (issue 10, finding 6: another process's
        fan-out may route to an endpoint created a moment ago, before this process's reload) and added to the
        view; None when it does not exist. A miss is remembered for ``refresh_s`` seconds (at least 1 s), so the
        backlog of a deleted endpoint costs one query per that time. Raises what the database raises."""
        now = time.monotonic()
        if self._absent.get(endpoint_id, 0.0) > now:
            return None
        row = await self.store.get_endpoint(endpoint_id)
        if row is None:
            if len(self._absent) > 10_000:
                self._absent.clear()
            self._absent[endpoint_id] = now + max(self.refresh_s, 1.0)
            return None
        view = self._by_id.get(endpoint_id)
        if view is None:  # not loaded by a reload meanwhile
            view = self._by_id[endpoint_id] = self._view(row, datetime.now(timezone.utc), self._signers)
            _route(view, self._by_agent, self._by_org, self._global)
        return view

    def _signer(self, token: str, previous_token: str | None) -> Signer:
        box = self.store.secret_box
        extra = (box.decrypt(previous_token),) if previous_token else ()
        return Signer(box.decrypt(token), extra)

    async def run(self) -> None:
        """Reload every ``refresh_s`` seconds; a failed reload keeps the last good view."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the database may be briefly unavailable
                log.exception("endpoint refresh failed; keeping the previous endpoints")

    def mark_disabled(self, endpoint_id: str) -> None:
        """Stop routing to an endpoint now, before the next reload shows it disabled."""
        view = self._by_id.get(endpoint_id)
        if view is not None:
            disabled = replace(view, enabled=False)
            self._by_id[endpoint_id] = disabled
            for group in (self._by_agent.get(view.agent_id or ""), self._by_org.get(view.organization_id or ""),
                          self._global):
                if group is not None and view in group:
                    group[group.index(view)] = disabled

    def get(self, endpoint_id: str) -> EndpointView | None:
        """The endpoint, or None when it was deleted."""
        return self._by_id.get(endpoint_id)

    def match(self, head: EnvelopeHead) -> list[EndpointView]:
        """Enabled endpoints that want this event: its agent's, its organization's and the global ones."""
        candidates = list(self._by_agent.get(head.agent_id, ()))
        if head.organization_id:
            candidates += self._by_org.get(head.organization_id, ())
        candidates += self._global
        return [e for e in candidates if e.enabled and wants(e.events, head.event_type)]


def _route(view: EndpointView, by_agent: dict[str, list[EndpointView]], by_org: dict[str, list[EndpointView]],
           glob: list[EndpointView]) -> None:
    """File ``view`` under the routing key of its scope."""
    if view.scope == "agent" and view.agent_id:
        by_agent.setdefault(view.agent_id, []).append(view)
    elif view.scope == "organization" and view.organization_id:
        by_org.setdefault(view.organization_id, []).append(view)
    elif view.scope == "global":
        glob.append(view)


def _aware(when: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; they are UTC."""
    return when.replace(tzinfo=timezone.utc) if when is not None and when.tzinfo is None else when
