"""The database behind the dispatcher: engine, schema and endpoint configuration (SQLAlchemy 2, async).

SQLite (``sqlite+aiosqlite:///./var/letta-bus.db``) is the embedded default; PostgreSQL
(``postgresql+asyncpg://...``) is the production store.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, Text, event, select, tuple_, type_coerce, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from bus.ids import new_endpoint_id
from config.settings import Settings
from dispatcher.rules.matching import check_patterns
from dispatcher.rules.ssrf import check_webhook_url
from dispatcher.rules.urls import normalize_webhook_url
from dispatcher.store.models import Base, Endpoint, EndpointTombstone, utcnow
from dispatcher.store.secrets import SecretBox, generate_secret

MIN_SECRET_CHARS = 16

#: Columns of an endpoint that delivery needs (:mod:`dispatcher.delivery.endpoints`), read with a Core select
#: (rows, not ORM objects) by the ``endpoint_rows*`` methods, plus ``updated_at`` for the reconciliation cursor.
#: ``events`` comes back as its JSON text (most endpoints share a few distinct texts).
VIEW_COLUMNS = (
    Endpoint.id, Endpoint.scope, Endpoint.agent_id, Endpoint.organization_id, Endpoint.url,
    type_coerce(Endpoint.events, Text).label("events"),  # JSON text: the reader parses each distinct text once
    Endpoint.enabled, Endpoint.failing_since, Endpoint.secret, Endpoint.previous_secret,
    Endpoint.previous_secret_expires_at, Endpoint.updated_at,
)


class Store:
    """Engine and session factory for ``database_url``; creates the SQLite file's directory when needed.

    ``secret_box`` encrypts webhook secrets at rest (build it with :meth:`from_settings`); ``production`` and
    ``ssrf_allow_cidrs`` drive URL validation on write (:func:`dispatcher.rules.ssrf.check_webhook_url`).
    """

    def __init__(
        self, database_url: str, *, secret_box: SecretBox, production: bool = False,
        ssrf_allow_cidrs: Sequence[str] = (),
    ) -> None:
        url = make_url(database_url)
        self.is_sqlite = url.get_backend_name() == "sqlite"
        if self.is_sqlite and url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: AsyncEngine = create_async_engine(url, pool_pre_ping=not self.is_sqlite)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.session: async_sessionmaker[AsyncSession] = async_sessionmaker(self.engine, expire_on_commit=False)
        self.secret_box = secret_box
        self.production = production
        self.ssrf_allow_cidrs = tuple(ssrf_allow_cidrs)

    @classmethod
    def from_settings(cls, settings: Settings, database_url: str | None = None) -> "Store":
        """The store the settings describe. Raises :class:`dispatcher.store.secrets.SecretKeyError` in production
        without ``LETTA_BUS_SECRET_KEYS`` or for a malformed key."""
        production = settings.env == "production"
        box = SecretBox.from_config([k.get_secret_value() for k in settings.secret_keys], settings.secret_key_file,
                                    production=production)
        return cls(database_url or settings.database_url, secret_box=box, production=production,
                   ssrf_allow_cidrs=settings.ssrf_allow_cidrs)

    async def create_schema(self) -> None:
        """Create missing tables straight from the models (idempotent; for throwaway databases in tests and
        benchmarks). Real databases use :meth:`upgrade_schema`."""
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

    async def upgrade_schema(self) -> str | None:
        """Apply the Alembic migrations (:func:`dispatcher.store.migrate.upgrade`); returns the revision reached."""
        from dispatcher.store.migrate import upgrade

        return await upgrade(self.engine)

    async def close(self) -> None:
        """Dispose of the connection pool."""
        await self.engine.dispose()

    def check_url(self, url: str) -> str:
        """Validate a webhook URL for writing and return the form to store: normalised and refused when it cannot
        be sent as written (:func:`dispatcher.rules.urls.normalize_webhook_url`), then scheme, host and SSRF rules
        (:func:`dispatcher.rules.ssrf.check_webhook_url`). Raises ``ValueError`` naming ``url``."""
        url = normalize_webhook_url(url)
        check_webhook_url(url, production=self.production, allow_cidrs=self.ssrf_allow_cidrs)
        return url

    async def set_agent_webhook(
        self, agent_id: str, *, url: str, events: Sequence[str] = (), secret: str | None = None, enabled: bool = True,
        organization_id: str | None = None,
    ) -> tuple[Endpoint, str | None]:
        """Create or replace the webhook of one agent. Returns ``(endpoint, new_secret)``: ``new_secret`` is the
        generated secret when none was given and the endpoint had none, else ``None``. ``endpoint.secret`` is the
        encrypted token. ``organization_id``: the agent's organization, set on a new webhook (an existing one keeps
        its own).

        Raises ``ValueError`` naming the field for a bad URL (see :meth:`check_url`), a bad ``webhook_events``
        pattern or a secret shorter than 16 characters; nothing is written then.
        """
        url = self.check_url(url)
        patterns = check_patterns(events)
        check_secret(secret)
        async with self.session.begin() as s:
            endpoint = await self._agent_endpoint(s, agent_id)
            generated = None
            if endpoint is None:
                generated = None if secret else generate_secret()
                endpoint = Endpoint(id=new_endpoint_id(), scope="agent", agent_id=agent_id,
                                    organization_id=organization_id,
                                    secret=self.secret_box.encrypt(secret or generated), created_at=utcnow())
                s.add(endpoint)
            elif secret:
                endpoint.secret = self.secret_box.encrypt(secret)
            endpoint.url = url
            endpoint.events = patterns
            endpoint.enabled = enabled
            endpoint.disabled_reason = None if enabled else "disabled by configuration"
            endpoint.failing_since = None
            endpoint.updated_at = utcnow()
        return endpoint, generated

    async def rotate_secret(self, agent_id: str, *, window_s: float, secret: str | None = None) -> str:
        """Give an agent's endpoint a new secret (generated unless given) and keep the old one signing for
        ``window_s`` seconds: during the window every delivery carries a ``webhook-signature`` for each, and
        ``X-Letta-Signature`` uses the new one. Returns the new secret (shown once). Raises ``LookupError`` when
        the agent has no webhook, ``ValueError`` for a secret shorter than 16 characters."""
        async with self.session() as s:
            endpoint = await self._agent_endpoint(s, agent_id)
        if endpoint is None:
            raise LookupError(f"agent {agent_id} has no webhook: set one first (letta-bus webhooks set)")
        return await self.rotate_endpoint_secret(endpoint.id, window_s=window_s, secret=secret)

    async def rotate_endpoint_secret(self, endpoint_id: str, *, window_s: float, secret: str | None = None) -> str:
        """:meth:`rotate_secret` for any endpoint, by id. Raises ``LookupError`` when there is no such endpoint."""
        check_secret(secret)
        new = secret or generate_secret()
        async with self.session.begin() as s:
            endpoint = await s.get(Endpoint, endpoint_id)
            if endpoint is None:
                raise LookupError(f"no endpoint {endpoint_id}")
            endpoint.previous_secret = endpoint.secret
            endpoint.previous_secret_expires_at = utcnow() + timedelta(seconds=window_s)
            endpoint.secret = self.secret_box.encrypt(new)
            endpoint.updated_at = utcnow()
        return new

    async def reencrypt_secrets(self) -> int:
        """Re-encrypt every stored secret under the current key (after a new key was put first in
        ``LETTA_BUS_SECRET_KEYS``); returns how many tokens changed. Old keys can be removed afterwards."""
        changed = 0
        async with self.session.begin() as s:
            for endpoint in (await s.execute(select(Endpoint))).scalars():
                for field in ("secret", "previous_secret"):
                    token = getattr(endpoint, field)
                    if token and not self.secret_box.is_current(token):
                        setattr(endpoint, field, self.secret_box.rotate(token))
                        endpoint.updated_at = utcnow()  # dispatchers reconcile by it (new token, same secret)
                        changed += 1
        return changed

    @staticmethod
    async def _agent_endpoint(s: AsyncSession, agent_id: str) -> Endpoint | None:
        return (await s.execute(
            select(Endpoint).where(Endpoint.scope == "agent", Endpoint.agent_id == agent_id)
        )).scalar_one_or_none()

    async def get_agent_webhook(self, agent_id: str) -> Endpoint | None:
        """The agent-scoped endpoint of ``agent_id``, or None."""
        async with self.session() as s:
            return await self._agent_endpoint(s, agent_id)

    async def delete_agent_webhook(self, agent_id: str) -> Endpoint | None:
        """Delete an agent's webhook; returns the deleted row, or None when it had none. Tasks already queued for
        it are skipped by the sender (endpoint deleted)."""
        async with self.session.begin() as s:
            endpoint = await self._agent_endpoint(s, agent_id)
            if endpoint is not None:
                await s.delete(endpoint)
                await s.merge(EndpointTombstone(endpoint_id=endpoint.id, deleted_at=utcnow()))
        return endpoint

    async def create_endpoint(
        self, *, scope: str, url: str, agent_id: str | None = None, organization_id: str | None = None,
        events: Sequence[str] = (), secret: str | None = None, enabled: bool = True,
    ) -> tuple[Endpoint, str | None]:
        """Create an endpoint of any scope: ``agent`` (``agent_id`` required; one per agent), ``organization``
        (``organization_id`` required) or ``global`` (neither). Returns ``(endpoint, generated_secret)``
        (``generated_secret`` None when ``secret`` was given).

        Raises ``ValueError`` naming the field (scope and owner ids, url, events, secret) and
        :class:`EndpointConflict` when the agent already has a webhook."""
        check_scope(scope, agent_id, organization_id)
        url = self.check_url(url)
        patterns = check_patterns(events)
        check_secret(secret)
        generated = None if secret else generate_secret()
        async with self.session.begin() as s:
            if scope == "agent" and await self._agent_endpoint(s, agent_id or "") is not None:
                raise EndpointConflict(f"agent {agent_id} already has a webhook: update it instead")
            now = utcnow()
            endpoint = Endpoint(
                id=new_endpoint_id(), scope=scope, agent_id=agent_id if scope == "agent" else None,
                organization_id=organization_id if scope != "global" else None, url=url, events=patterns,
                secret=self.secret_box.encrypt(secret or generated), enabled=enabled,
                disabled_reason=None if enabled else "disabled by configuration", created_at=now, updated_at=now,
            )
            s.add(endpoint)
        return endpoint, generated

    async def update_endpoint(
        self, endpoint_id: str, *, url: str | None = None, events: Sequence[str] | None = None,
        secret: str | None = None, enabled: bool | None = None,
    ) -> Endpoint:
        """Change the given fields of an endpoint (None: unchanged). Enabling clears ``disabled_reason`` and the
        failure clock. Raises ``LookupError`` when there is no such endpoint, ``ValueError`` naming a bad field."""
        if url is not None:
            url = self.check_url(url)
        patterns = check_patterns(events) if events is not None else None
        check_secret(secret)
        async with self.session.begin() as s:
            endpoint = await s.get(Endpoint, endpoint_id)
            if endpoint is None:
                raise LookupError(f"no endpoint {endpoint_id}")
            if url is not None:
                endpoint.url = url
            if patterns is not None:
                endpoint.events = patterns
            if secret:
                endpoint.secret = self.secret_box.encrypt(secret)
            if enabled is not None:
                endpoint.enabled = enabled
                endpoint.disabled_reason = None if enabled else "disabled by configuration"
                endpoint.failing_since = None
            endpoint.updated_at = utcnow()
        return endpoint

    async def get_endpoint(self, endpoint_id: str) -> Endpoint | None:
        """One endpoint by id, or None."""
        async with self.session() as s:
            return await s.get(Endpoint, endpoint_id)

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        """Delete an endpoint by id; False when there was none. Both deletions write an
        :class:`~dispatcher.store.models.EndpointTombstone` in the same transaction, so dispatchers reconciling
        their view by time (:meth:`endpoint_tombstones_since`) see the deletion even without the change notice."""
        async with self.session.begin() as s:
            endpoint = await s.get(Endpoint, endpoint_id)
            if endpoint is None:
                return False
            await s.delete(endpoint)
            await s.merge(EndpointTombstone(endpoint_id=endpoint_id, deleted_at=utcnow()))
        return True

    async def list_endpoints(
        self, *, scope: str | None = None, agent_id: str | None = None, organization_id: str | None = None,
        where: ColumnElement[bool] | None = None, offset: int = 0, limit: int | None = None,
    ) -> list[Endpoint]:
        """Endpoints filtered by scope and owner (None: any) and ``where`` (a caller's scope,
        :mod:`dispatcher.api.scoping`), oldest first; ``offset`` / ``limit`` take one page of them."""
        stmt = select(Endpoint).order_by(Endpoint.created_at, Endpoint.id).offset(offset).limit(limit)
        if where is not None:
            stmt = stmt.where(where)
        for column, value in ((Endpoint.scope, scope), (Endpoint.agent_id, agent_id),
                              (Endpoint.organization_id, organization_id)):
            if value is not None:
                stmt = stmt.where(column == value)
        async with self.session() as s:
            return list((await s.execute(stmt)).scalars())

    async def endpoints(self) -> list[Endpoint]:
        """Every endpoint, enabled or not."""
        async with self.session() as s:
            return list((await s.execute(select(Endpoint))).scalars())

    async def endpoint_rows(self, *, after_id: str = "", limit: int = 1000) -> list:
        """One keyset page of endpoints for the dispatcher's start-up load: at most ``limit`` rows with
        ``id > after_id``, by id (the primary key index), as Core rows of :data:`VIEW_COLUMNS` (attribute access:
        ``row.id``, ``row.secret`` is the encrypted token). An empty list ends the walk."""
        stmt = select(*VIEW_COLUMNS).where(Endpoint.id > after_id).order_by(Endpoint.id).limit(limit)
        async with self.engine.connect() as conn:
            return list(await conn.execute(stmt))

    async def endpoint_row(self, endpoint_id: str):  # noqa: ANN201 - a Core Row of VIEW_COLUMNS, or None
        """One endpoint as a Core row of :data:`VIEW_COLUMNS`, or None when it does not exist."""
        async with self.engine.connect() as conn:
            return (await conn.execute(select(*VIEW_COLUMNS).where(Endpoint.id == endpoint_id))).first()

    async def endpoint_rows_changed(self, since: datetime, *, after: tuple[datetime, str] | None = None,
                                    limit: int = 1000) -> list:
        """Endpoints with ``updated_at >= since`` (the indexed column), ordered by ``(updated_at, id)``; ``after``:
        the ``(updated_at, id)`` of the last row of the previous page (keyset paging). At most ``limit`` Core rows of
        :data:`VIEW_COLUMNS`."""
        stmt = select(*VIEW_COLUMNS).where(Endpoint.updated_at >= since)
        if after is not None:
            stmt = stmt.where(tuple_(Endpoint.updated_at, Endpoint.id) > tuple_(*after))  # ix_endpoints_updated_id
        stmt = stmt.order_by(Endpoint.updated_at, Endpoint.id).limit(limit)
        async with self.engine.connect() as conn:
            return list(await conn.execute(stmt))

    async def endpoint_tombstones_since(self, since: datetime, *, limit: int = 10_000) -> list[str]:
        """Ids of endpoints deleted at or after ``since`` (indexed ``deleted_at``), at most ``limit``, oldest
        first. Tombstones older than the retention pruner's horizon (one day) are gone."""
        stmt = (select(EndpointTombstone.endpoint_id).where(EndpointTombstone.deleted_at >= since)
                .order_by(EndpointTombstone.deleted_at).limit(limit))
        async with self.engine.connect() as conn:
            return list((await conn.execute(stmt)).scalars())

    async def set_failing_since(self, endpoint_id: str, since: datetime | None) -> None:
        """Record when an endpoint started failing (None: it succeeded again). Bumps ``updated_at``: the other
        dispatchers' views carry ``failing_since`` (the disable clock), and they reconcile by ``updated_at``."""
        async with self.session.begin() as s:
            await s.execute(update(Endpoint).where(Endpoint.id == endpoint_id)
                            .values(failing_since=since, updated_at=utcnow()))

    async def disable_endpoint(self, endpoint_id: str, reason: str) -> None:
        """Disable an endpoint and record why (e.g. it answered 410 Gone)."""
        async with self.session.begin() as s:
            endpoint = await s.get(Endpoint, endpoint_id)
            if endpoint is not None:
                endpoint.enabled = False
                endpoint.disabled_reason = reason
                endpoint.failing_since = None
                endpoint.updated_at = utcnow()


class EndpointConflict(Exception):
    """The write would give an agent a second webhook (an agent has at most one agent-scoped endpoint)."""


SCOPES = ("agent", "organization", "global")


def check_scope(scope: str, agent_id: str | None, organization_id: str | None) -> None:
    """Raise ``ValueError`` naming the field unless the owner ids fit the scope: ``agent`` needs ``agent_id``,
    ``organization`` needs ``organization_id``, ``global`` takes neither. An agent endpoint may name its agent's
    organization (``organization_id``): it then receives only that organization's events of the agent."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if scope == "agent" and not agent_id:
        raise ValueError("agent_id is required for scope 'agent'")
    if scope == "organization" and not organization_id:
        raise ValueError("organization_id is required for scope 'organization'")
    if scope != "agent" and agent_id:
        raise ValueError(f"agent_id must be empty for scope {scope!r}")
    if scope == "global" and organization_id:
        raise ValueError("organization_id must be empty for scope 'global'")


def check_secret(secret: str | None) -> None:
    """Raise ``ValueError`` naming ``secret`` when a user-supplied secret is shorter than 16 characters."""
    if secret is not None and len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"secret must be at least {MIN_SECRET_CHARS} characters (or omit it to generate one)")


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DB-API objects
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (CLI, API) do not block the history writer
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()
