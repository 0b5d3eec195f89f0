"""In-memory view of the endpoint table: loaded once at start, then changed one endpoint at a time.

Fan-out routes every event through it and the sender reads url, enabled and the signer from it at send time, so an
endpoint change applies to retries already queued.

How the view follows the table (issue 11, "Endpoint changes applied incrementally"):

- **Start-up load, once**: keyset pages of ``page_rows`` rows (``ORDER BY id``) read with a Core select of the
  columns delivery needs (:data:`dispatcher.store.database.VIEW_COLUMNS`); the views are built in slices of at most
  ``slice_ms`` milliseconds of CPU, yielding to the event loop between slices, so a 100,000-endpoint load never
  blocks the loop for long.
- **Each change by id**: the change notice (:mod:`dispatcher.delivery.control`) calls :meth:`EndpointCache.apply`
  with the endpoint's id; the row is read again: gone -> removed from the view and its routing group, present ->
  replaced and re-routed.
- **Reconciliation, the fallback** (a lost notice, a writer that does not announce): every ``refresh_s`` seconds,
  rows with ``updated_at >= cursor - overlap_s`` (indexed) and the ids of ``endpoint_tombstones`` deleted since then.
  ``overlap_s`` (default 10 s) covers a writer's commit delay (``updated_at`` is stamped before the commit; a SQLite
  writer may wait up to its 5 s ``busy_timeout`` for the lock) plus clock skew between hosts (NTP keeps it well
  under a second). A gap longer than ``full_reload_after_s`` (tombstones are pruned after a day) falls back to a
  full load.
- **Secrets stay encrypted in the view**: decrypted on the first send (:meth:`EndpointCache.signer`), cached per
  endpoint until its tokens change. A secret no configured key decrypts disables that endpoint alone, loudly
  (ERROR log, ``letta_bus_endpoint_secrets_undecryptable_total``, ``on_undecryptable``), and the rest keep going.

Memory: one slotted :class:`EndpointView` per endpoint plus its strings; ``events`` tuples and ``scope`` strings are
shared between endpoints; a :class:`~dispatcher.delivery.signing.Signer` exists only for endpoints that sent.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone

from bus.envelope import EnvelopeHead
from dispatcher.delivery import metrics
from dispatcher.delivery.signing import Signer
from dispatcher.rules.matching import wants
from dispatcher.store.database import Store
from dispatcher.store.secrets import KEYS_SETTING, SecretKeyError

log = logging.getLogger(__name__)

_SCOPES = {s: s for s in ("agent", "organization", "global")}  # one shared str per scope


@dataclass(frozen=True, slots=True)
class EndpointView:
    """What delivery needs of one endpoint. ``secret`` and ``previous_secret`` are the encrypted (Fernet) tokens;
    ``previous_secret_expires_at`` is Unix seconds (the rotation window's end), None without a previous secret."""

    id: str
    scope: str
    agent_id: str | None
    organization_id: str | None
    url: str
    events: tuple[str, ...]
    enabled: bool
    failing_since: datetime | None = None
    secret: str = ""
    previous_secret: str | None = None
    previous_secret_expires_at: float | None = None


UndecryptableCallback = Callable[[EndpointView, str], object]


class EndpointCache:
    """Endpoints by id and by routing key (see the module docstring).

    ``refresh_s``: reconciliation period, seconds. ``on_undecryptable(view, reason)``: called once per endpoint whose
    secret no key decrypts (the dispatcher wires it to ``EndpointHealth.disable``); ``overlap_s``: how far before
    the last reconciliation's start a reconciliation looks back, seconds; ``page_rows``: rows per database page;
    ``slice_ms``: CPU budget of one slice of view building, milliseconds (the loop gets control between slices).

    Counters for tests and metrics: ``full_loads``, ``applied`` (changes applied by id), ``reconciles``,
    ``load_slices`` (yields to the loop while building views), ``load_progress`` (rows built by the load in
    progress or the last one).
    """

    def __init__(self, store: Store, refresh_s: float = 1.0, *, on_undecryptable: UndecryptableCallback | None = None,
                 overlap_s: float = 10.0, page_rows: int = 500, slice_ms: float = 5.0,
                 full_reload_after_s: float = 6 * 3600.0) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self.on_undecryptable = on_undecryptable
        self.overlap_s = overlap_s
        self.page_rows = page_rows
        self.slice_s = min(slice_ms, 10.0) / 1000
        self.full_reload_after_s = full_reload_after_s
        self._by_id: dict[str, EndpointView] = {}
        self._by_agent: dict[str, tuple[EndpointView, ...]] = {}
        self._by_org: dict[str, tuple[EndpointView, ...]] = {}
        self._global: tuple[EndpointView, ...] = ()
        self._shared: dict[tuple[str, ...], tuple[str, ...]] = {}  # one events tuple per distinct set of patterns
        self._patterns: dict[str, tuple[str, ...]] = {}  # events JSON text -> its shared tuple
        # endpoint id -> (secret token, previous token, signer, Unix seconds until which it is valid)
        self._signers: dict[str, tuple[str, str | None, Signer, float]] = {}
        self._undecryptable: dict[str, str] = {}  # endpoint id -> the secret token no key decrypts
        self._lock = asyncio.Lock()
        self._absent: dict[str, float] = {}  # endpoint id -> monotonic time until which a lookup found none
        self._cursor: datetime | None = None  # start of the last full load or reconciliation (UTC)
        self.full_loads = 0
        self.applied = 0
        self.reconciles = 0
        self.load_slices = 0
        self.load_progress = 0

    # --- loading and reconciling -------------------------------------------------------------------------------

    async def refresh(self, endpoint_id: str | None = None) -> None:
        """Bring the view up to date now: the first call loads every endpoint (:meth:`load`); later calls
        reconcile (:meth:`reconcile`). With ``endpoint_id``: :meth:`apply` that endpoint only. Raises what the
        database raises (the view is left as it was)."""
        if endpoint_id is not None:
            await self.apply(endpoint_id)
        elif self._cursor is None:
            await self.load()
        else:
            await self.reconcile()

    async def load(self) -> None:
        """Load every endpoint (keyset pages, views built in slices; see the module docstring) and replace the view
        at the end. Changes applied meanwhile wait (one lock). Raises what the database raises."""
        async with self._lock:
            await self._full_load()

    async def _full_load(self) -> None:
        # Nearly everything a load allocates survives it, so the cyclic collector would find nothing, yet each full
        # collection it triggers scans every object so far: 50-80 ms pauses of the loop at 100,000 endpoints.
        # Paused for the load, as it was; the dispatcher freezes start-up objects right after (service.py).
        collecting = gc.isenabled()
        gc.disable()
        try:
            await self._full_load_paged()
        finally:
            if collecting:
                gc.enable()

    async def _full_load_paged(self) -> None:
        started = datetime.now(timezone.utc)
        old, self._shared, self._patterns = self._by_id, {}, {}
        by_id: dict[str, EndpointView] = {}
        by_agent: dict[str, tuple[EndpointView, ...]] = {}
        by_org: dict[str, tuple[EndpointView, ...]] = {}
        glob: list[EndpointView] = []
        self.load_progress = 0
        after = ""
        while True:
            rows = await self.store.endpoint_rows(after_id=after, limit=self.page_rows)
            async for view in self._views(rows):
                previous = old.get(view.id)
                if previous == view:
                    view = previous  # keep the object: its cached signer stays valid
                by_id[view.id] = view
                if view.scope == "agent" and view.agent_id:
                    by_agent[view.agent_id] = by_agent.get(view.agent_id, ()) + (view,)
                elif view.scope == "organization" and view.organization_id:
                    by_org[view.organization_id] = by_org.get(view.organization_id, ()) + (view,)
                elif view.scope == "global":
                    glob.append(view)
                self.load_progress += 1
            if len(rows) < self.page_rows:
                break
            after = rows[-1].id
        self._by_id, self._by_agent, self._by_org, self._global = by_id, by_agent, by_org, tuple(glob)
        for endpoint_id in [i for i in self._signers if i not in by_id]:
            del self._signers[endpoint_id]
        self._absent.clear()
        self._cursor = started
        self.full_loads += 1
        metrics.ENDPOINT_FULL_LOADS.inc()
        metrics.ENDPOINTS_IN_VIEW.set(len(by_id))

    async def reconcile(self) -> None:
        """Apply every endpoint changed (``updated_at``) or deleted (tombstone) since ``overlap_s`` seconds before
        the last reconciliation started; a full :meth:`load` when nothing was loaded yet or the last success is
        older than ``full_reload_after_s``. Raises what the database raises (the cursor stays, so nothing is
        missed)."""
        async with self._lock:
            now = datetime.now(timezone.utc)
            if self._cursor is None or (now - self._cursor).total_seconds() > self.full_reload_after_s:
                await self._full_load()
                return
            since = self._cursor - timedelta(seconds=self.overlap_s)
            after = None
            while True:
                rows = await self.store.endpoint_rows_changed(since, after=after, limit=self.page_rows)
                async for view in self._views(rows):
                    self._install(view)
                if len(rows) < self.page_rows:
                    break
                after = (rows[-1].updated_at, rows[-1].id)
            for endpoint_id in await self.store.endpoint_tombstones_since(since):
                self._remove(endpoint_id)
            self._cursor = now
            self.reconciles += 1
            metrics.ENDPOINTS_IN_VIEW.set(len(self._by_id))

    async def apply(self, endpoint_id: str) -> None:
        """Read one endpoint again and apply it: gone -> removed from the view and its routing group; present ->
        replaced and re-routed. Called for each change notice. Raises what the database raises."""
        async with self._lock:
            row = await self.store.endpoint_row(endpoint_id)
            if row is None:
                self._remove(endpoint_id)
            else:
                self._install(self._view(row, time.time()))
            self.applied += 1
            metrics.ENDPOINT_CHANGES_APPLIED.inc()
            metrics.ENDPOINTS_IN_VIEW.set(len(self._by_id))

    async def _views(self, rows: list):  # noqa: ANN202 - async iterator of EndpointView
        """Views of ``rows``, yielding to the event loop whenever a slice used ``slice_s`` seconds."""
        now = time.time()
        budget_end = time.perf_counter() + self.slice_s
        for i, row in enumerate(rows):
            yield self._view(row, now)
            if i & 31 == 31 and time.perf_counter() > budget_end:
                await asyncio.sleep(0)
                self.load_slices += 1
                budget_end = time.perf_counter() + self.slice_s

    def _view(self, row, now: float) -> EndpointView:  # noqa: ANN001 - a Core Row of VIEW_COLUMNS
        raw = row.events  # JSON text on SQLite; PostgreSQL's driver hands back the decoded list
        events = self._patterns.get(raw) if isinstance(raw, str) else None
        if events is None:
            events = _patterns(row.events)
            events = self._shared.setdefault(events, events)
            if isinstance(row.events, str):
                if len(self._patterns) >= 10_000:  # distinct texts only; bounded all the same
                    self._patterns.clear()
                self._patterns[row.events] = events
        expires = _aware(row.previous_secret_expires_at)
        expires_s = expires.timestamp() if expires is not None else None
        keep_previous = row.previous_secret is not None and expires_s is not None and expires_s > now
        enabled = bool(row.enabled) and self._undecryptable.get(row.id) != row.secret
        return EndpointView(
            id=row.id, scope=_SCOPES.get(row.scope, row.scope), agent_id=row.agent_id,
            organization_id=row.organization_id, url=row.url, events=events, enabled=enabled,
            failing_since=_aware(row.failing_since), secret=row.secret,
            previous_secret=row.previous_secret if keep_previous else None,
            previous_secret_expires_at=expires_s if keep_previous else None,
        )

    def _install(self, view: EndpointView) -> None:
        """Put ``view`` in place of the endpoint's current view (if any) and in its routing group."""
        current = self._by_id.get(view.id)
        if current == view:
            return
        if current is not None:
            self._unroute(current)
            if (current.secret, current.previous_secret) != (view.secret, view.previous_secret):
                self._signers.pop(view.id, None)
                self._undecryptable.pop(view.id, None)
        self._by_id[view.id] = view
        self._route(view)
        self._absent.pop(view.id, None)

    def _remove(self, endpoint_id: str) -> None:
        view = self._by_id.pop(endpoint_id, None)
        if view is not None:
            self._unroute(view)
        self._signers.pop(endpoint_id, None)
        self._undecryptable.pop(endpoint_id, None)

    def _route(self, view: EndpointView) -> None:
        if view.scope == "agent" and view.agent_id:
            self._by_agent[view.agent_id] = self._by_agent.get(view.agent_id, ()) + (view,)
        elif view.scope == "organization" and view.organization_id:
            self._by_org[view.organization_id] = self._by_org.get(view.organization_id, ()) + (view,)
        elif view.scope == "global":
            self._global = self._global + (view,)

    def _unroute(self, view: EndpointView) -> None:
        if view.scope == "global":
            self._global = tuple(v for v in self._global if v.id != view.id)
            return
        groups, key = ((self._by_agent, view.agent_id) if view.scope == "agent"
                       else (self._by_org, view.organization_id))
        if not key or key not in groups:
            return
        rest = tuple(v for v in groups[key] if v.id != view.id)
        if rest:
            groups[key] = rest
        else:
            del groups[key]

    async def run(self) -> None:
        """Reconcile every ``refresh_s`` seconds until cancelled; a failed reconciliation keeps the view and the
        cursor (the next one covers the gap)."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the database may be briefly unavailable
                log.exception("endpoint reconciliation failed; keeping the current endpoints")

    # --- reading -----------------------------------------------------------------------------------------------

    async def lookup(self, endpoint_id: str) -> EndpointView | None:
        """An endpoint that is not in the view, read from the database (issue 10, finding 6: another process's
        fan-out may route to an endpoint created a moment ago, before this process heard of it) and added to the
        view; None when it does not exist. A miss is remembered for ``refresh_s`` seconds (at least 1 s), so the
        backlog of a deleted endpoint costs one query per that time. Raises what the database raises."""
        now = time.monotonic()
        if self._absent.get(endpoint_id, 0.0) > now:
            return None
        row = await self.store.endpoint_row(endpoint_id)
        if row is None:
            if len(self._absent) > 10_000:
                self._absent.clear()
            self._absent[endpoint_id] = now + max(self.refresh_s, 1.0)
            return None
        view = self._by_id.get(endpoint_id)
        if view is None:  # not applied meanwhile
            view = self._view(row, time.time())
            self._install(view)
        return view

    def signer(self, view: EndpointView) -> Signer | None:
        """The signer of ``view``: its secret, plus the previous one until ``previous_secret_expires_at`` (the
        rotation window). Decrypted on first use and cached until the endpoint's tokens change. None when no key in
        ``LETTA_BUS_SECRET_KEYS`` decrypts the secret: the endpoint is then disabled in this view, logged at ERROR
        once, counted, and ``on_undecryptable(view, reason)`` is called (treat None as a disabled endpoint)."""
        now = time.time()
        cached = self._signers.get(view.id)
        if (cached is not None and cached[0] == view.secret and cached[1] == view.previous_secret
                and now < cached[3]):
            return cached[2]
        if self._undecryptable.get(view.id) == view.secret:
            return None
        box = self.store.secret_box
        try:
            secret = box.decrypt(view.secret)
        except SecretKeyError:
            self._undecryptable_secret(view)
            return None
        extra: tuple[str, ...] = ()
        valid_until = math.inf
        expires = view.previous_secret_expires_at
        if view.previous_secret and expires is not None and expires > now:
            try:
                extra = (box.decrypt(view.previous_secret),)
                valid_until = expires
            except SecretKeyError:
                log.warning("endpoint %s: its previous (rotated-out) secret cannot be decrypted with any key in %s; "
                            "signing with the current secret only", view.id, KEYS_SETTING)
        signer = Signer(secret, extra)
        self._signers[view.id] = (view.secret, view.previous_secret, signer, valid_until)
        return signer

    def _undecryptable_secret(self, view: EndpointView) -> None:
        reason = (f"its secret cannot be decrypted with any key in {KEYS_SETTING}: add the key it was encrypted "
                  f"with to {KEYS_SETTING} (and restart), or set a new secret; then enable the endpoint again")
        self._undecryptable[view.id] = view.secret
        metrics.ENDPOINT_SECRETS_UNDECRYPTABLE.inc()
        log.error("endpoint %s (%s) disabled: %s", view.id, view.url, reason)
        self.mark_disabled(view.id)
        if self.on_undecryptable is not None:
            try:
                self.on_undecryptable(view, reason)
            except Exception:  # noqa: BLE001 - the endpoint is disabled in this view either way
                log.exception("on_undecryptable failed for endpoint %s", view.id)

    def mark_disabled(self, endpoint_id: str) -> None:
        """Stop routing to an endpoint now, before the database change reaches the view."""
        view = self._by_id.get(endpoint_id)
        if view is not None and view.enabled:
            disabled = replace(view, enabled=False)
            self._unroute(view)
            self._by_id[endpoint_id] = disabled
            self._route(disabled)

    def get(self, endpoint_id: str) -> EndpointView | None:
        """The endpoint, or None when it was deleted (or is not known yet: see :meth:`lookup`)."""
        return self._by_id.get(endpoint_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def match(self, head: EnvelopeHead) -> list[EndpointView]:
        """Enabled endpoints that want this event: its agent's, its organization's and the global ones. An agent
        endpoint that names an organization takes only the agent's events of that organization, so an endpoint
        registered for another tenant's agent id gets none of them (:mod:`dispatcher.api.scoping`)."""
        candidates = self._by_agent.get(head.agent_id, ())
        if candidates:
            candidates = tuple(e for e in candidates
                               if e.organization_id is None or e.organization_id == head.organization_id)
        if head.organization_id:
            candidates = candidates + self._by_org.get(head.organization_id, ())
        if self._global:
            candidates = candidates + self._global
        return [e for e in candidates if e.enabled and wants(e.events, head.event_type)]


def _patterns(events: str | list[str] | None) -> tuple[str, ...]:
    """The ``events`` column (JSON text, or an already decoded list) as a tuple of patterns."""
    if isinstance(events, str):
        events = json.loads(events)
    return tuple(events or ())


def _aware(when: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; they are UTC."""
    return when.replace(tzinfo=timezone.utc) if when is not None and when.tzinfo is None else when
