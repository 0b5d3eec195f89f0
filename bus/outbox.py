"""The transactional outbox: no event lost across a broker outage or a crash.

Source: DESIGN.md, "Publishing". The caller adds the event to the ``letta_bus_outbox`` table in the same
SQLAlchemy transaction that commits the step (:func:`add_event`); the event exists exactly when the step does. An
:class:`OutboxRelay` publishes pending rows with ``Nats-Msg-Id`` = event_id and marks them published only after
the PubAck. A relay that dies between the PubAck and the mark leaves the rows pending; the next relay publishes them
again and JetStream's duplicate window (``duplicate_window_s``, 2 minutes by default) drops the copies, so the stream
holds each event once as long as the rows are re-published within that window (consumers should still be idempotent
on ``event_id``, which webhook receivers see as ``webhook-id``).

PostgreSQL: a relay claims a batch with ``SELECT ... FOR UPDATE SKIP LOCKED`` and keeps the row locks until it
marked them, so several relays (one per Letta server process, say) share the table without publishing a row twice.
SQLite: one relay per database (a plain ``SELECT``; SQLite has no row locks). Each relay publishes its batch in
``id`` order; with several relays, batches interleave, so consumers that care about order use the envelope's
``timestamp`` (and the time-ordered ``event_id``), not the stream sequence.

The table has its own ``MetaData`` (:data:`metadata`): create it with :func:`create_schema`, or add it to the host
application's Alembic migrations (docs/letta-integration.md gives the DDL).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from nats.aio.client import Client
from nats.js.api import PubAck
from sqlalchemy import JSON, BigInteger, DateTime, Index, Integer, LargeBinary, MetaData, String, Text, delete, func
from sqlalchemy import select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bus import envelope as env
from bus.catalog import EventValidationError
from bus.connection import close_client, connect
from bus.pipeline import Prepared, is_refusal, prepare, publish_batch
from bus.publisher import EventPublisher
from config.settings import Settings

log = logging.getLogger(__name__)

TABLE = "letta_bus_outbox"
#: Longest ``last_error`` kept (characters).
MAX_ERROR_CHARS = 500


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class OutboxBase(DeclarativeBase):
    """Declarative base with the outbox's own MetaData: independent of the host application's models."""

    metadata = MetaData()


#: The outbox's MetaData (only ``letta_bus_outbox``).
metadata = OutboxBase.metadata


class OutboxEvent(OutboxBase):
    """One event waiting for (or done with) publishing. ``body`` is the envelope JSON exactly as it will be
    published; ``headers`` the NATS headers (``Nats-Msg-Id`` = ``event_id``). ``published_at`` is set after the
    PubAck; ``attempts`` counts publish tries and ``last_error`` keeps the latest failure."""

    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    subject: Mapped[str] = mapped_column(String(255), nullable=False)
    headers: Mapped[dict[str, str]] = mapped_column(JSON, nullable=False)
    body: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        # the relay's scan: pending rows in id order (a partial index stays small however many rows are published)
        Index("ix_letta_bus_outbox_pending", "id", postgresql_where=text("published_at IS NULL"),
              sqlite_where=text("published_at IS NULL")),
        Index("ix_letta_bus_outbox_published_at", "published_at"),
    )


outbox_table = OutboxEvent.__table__


class EnvelopeBuilder(Protocol):
    """What :func:`add_event` needs to build an event: ``settings`` and ``build(...)``, as
    :class:`bus.publisher.EventPublisher` and :class:`bus.letta.LettaEventBus` have."""

    settings: Settings

    def build(self, agent_id: str, event_type: str, data: dict[str, Any], *, organization_id: str | None = None,
              event_id: str | None = None) -> env.Envelope: ...


def add_event(
    session: Any,
    publisher_or_builder: EnvelopeBuilder | Settings,
    agent_id: str,
    event_type: str,
    data: dict[str, Any],
    organization_id: str | None = None,
    *,
    strict: bool = False,
) -> str | None:
    """Validate an event and add it to the outbox inside the caller's transaction; the caller commits.

    ``session``: a SQLAlchemy ``Session`` or ``AsyncSession`` (``session.add`` is synchronous on both, so this is a
    plain function: call it right before the ``commit`` of the step, job or run it reports). The row becomes
    visible to the relay when that transaction commits and disappears with a rollback.
    ``publisher_or_builder``: an :class:`EventPublisher`, a :class:`bus.letta.LettaEventBus`, or ``Settings``.
    ``data``: the event's fields per bus/catalog.py.

    Returns the ``event_id``. Invalid events (bad type, missing field, value JSON cannot carry, over
    ``max_event_bytes``) are logged and return ``None`` so they never fail the caller's transaction; with
    ``strict=True`` they raise :class:`EventValidationError` (or ``TypeError`` for unencodable data) instead.
    """
    builder = EventPublisher(publisher_or_builder) if isinstance(publisher_or_builder, Settings) \
        else publisher_or_builder
    try:
        item = prepare(builder.settings, builder.build(agent_id, event_type, data, organization_id=organization_id))
    except (EventValidationError, TypeError) as exc:
        if strict:
            raise
        log.error("outbox: event %s for agent %s not added: %s", event_type, agent_id, exc)
        return None
    session.add(OutboxEvent(event_id=item.event_id, subject=item.subject, headers=item.headers, body=item.body))
    return item.event_id


async def create_schema(engine: AsyncEngine) -> None:
    """Create ``letta_bus_outbox`` and its indexes when missing (idempotent)."""
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)


async def purge_published(engine: AsyncEngine, older_than_s: float) -> int:
    """Delete rows published more than ``older_than_s`` seconds ago; returns how many. Pending rows are never
    deleted. Raises ``sqlalchemy.exc.SQLAlchemyError`` on database errors."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    async with engine.begin() as conn:
        result = await conn.execute(
            delete(outbox_table).where(outbox_table.c.published_at.is_not(None), outbox_table.c.published_at < cutoff))
    return int(result.rowcount or 0)


async def pending_count(engine: AsyncEngine) -> int:
    """Rows not yet published (for health checks: a growing number means no relay runs or the broker is down)."""
    async with engine.connect() as conn:
        return int((await conn.execute(
            select(func.count()).select_from(outbox_table).where(outbox_table.c.published_at.is_(None)))).scalar_one())


@dataclass
class RelayStats:
    """Counters of one relay: ``published`` rows marked (``duplicates`` of them JetStream already had),
    ``failed`` publish tries not acknowledged, ``rounds`` batches claimed, ``errors`` rounds that failed on the
    database or the broker."""

    published: int = 0
    duplicates: int = 0
    failed: int = 0
    rounds: int = 0
    errors: int = 0


#: ``after_publish(event_ids)``: awaited after a batch's PubAcks and before the rows are marked (tests use it to
#: crash a relay at exactly that point).
AfterPublish = Callable[[list[str]], Awaitable[None]]


class OutboxRelay:
    """Publishes pending outbox rows, oldest first, and marks them published after their PubAck.

    ``engine``: an ``AsyncEngine`` or a database URL (``sqlite+aiosqlite:///...``, ``postgresql+asyncpg://...``;
    an engine made from a URL is disposed at :meth:`stop`). ``nc``: an open NATS connection, else :meth:`start`
    connects to ``settings.nats_url``. ``batch_size``: rows per round; ``poll_interval_s``: seconds between scans
    when the table has nothing pending (:meth:`notify` wakes the relay at once); ``max_backoff_s``: longest pause
    (seconds) after a broker or database error (exponential from 0.1 s, with jitter); ``retain_published_s``:
    when set, published rows older than that many seconds are purged every ``purge_every_s`` seconds.

    On PostgreSQL any number of relays may run at once; on SQLite run one.
    """

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine | str,
        nc: Client | None = None,
        *,
        batch_size: int = 256,
        poll_interval_s: float = 0.5,
        max_backoff_s: float = 5.0,
        retain_published_s: float | None = None,
        purge_every_s: float = 60.0,
        after_publish: AfterPublish | None = None,
    ) -> None:
        if batch_size < 1 or poll_interval_s <= 0 or max_backoff_s <= 0:
            raise ValueError("batch_size >= 1, poll_interval_s > 0 and max_backoff_s > 0 are required")
        self.settings = settings
        self._owns_engine = isinstance(engine, str)
        self.engine: AsyncEngine = create_async_engine(engine) if isinstance(engine, str) else engine
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self._nc = nc
        self._js = nc.jetstream() if nc is not None else None  # one context: publish_async subscribes once per context
        self._owns_connection = nc is None
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.max_backoff_s = max_backoff_s
        self.retain_published_s = retain_published_s
        self.purge_every_s = purge_every_s
        self.after_publish = after_publish
        self.stats = RelayStats()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    async def start(self) -> "OutboxRelay":
        """Connect (without ``nc``; bounded by ``connect_timeout_s``, raises ``ConnectionError``) and run the relay
        loop in a background task until :meth:`stop`."""
        if self._nc is None:
            if not self.settings.nats_url:
                raise ValueError("OutboxRelay needs LETTA_BUS_NATS_URL or an open connection (nc=...)")
            self._nc = await connect(self.settings.nats_url, name="letta-bus-outbox-relay",
                                     timeout_s=self.settings.connect_timeout_s, settings=self.settings,
                                     role="publisher")
            self._js = self._nc.jetstream()
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="letta-bus-outbox-relay")
        return self

    def notify(self) -> None:
        """Scan now instead of at the next poll (call after committing an outbox row in the same process)."""
        self._wake.set()

    async def run(self) -> None:
        """The relay loop: publish batches until nothing is pending, then wait ``poll_interval_s`` (or
        :meth:`notify`); back off after errors. Returns when :meth:`stop` is called; never raises otherwise."""
        backoff = 0.0
        last_purge = asyncio.get_running_loop().time()
        while not self._stopping:
            try:
                published, failed = await self.relay_once()
                backoff = 0.0 if not failed else min(self.max_backoff_s, max(0.1, backoff * 2))
            except Exception as exc:  # noqa: BLE001 - the relay outlives database outages (asyncpg may raise OSError)
                self.stats.errors += 1
                backoff = min(self.max_backoff_s, max(0.1, backoff * 2))
                kind = "database error" if isinstance(exc, (SQLAlchemyError, OSError)) else "unexpected error"
                log.warning("outbox relay: %s (%r); retrying in %.1f s", kind, exc, backoff)
                published = 0
            if self.retain_published_s is not None and \
                    asyncio.get_running_loop().time() - last_purge >= self.purge_every_s:
                last_purge = asyncio.get_running_loop().time()
                try:
                    await purge_published(self.engine, self.retain_published_s)
                except Exception as exc:  # noqa: BLE001 - purging is housekeeping; the relay goes on
                    log.warning("outbox relay: purge failed: %r", exc)
            if backoff:
                await self._sleep(backoff * random.uniform(0.8, 1.2))
            elif published < self.batch_size:
                await self._sleep(self.poll_interval_s)

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def relay_once(self) -> tuple[int, int]:
        """One round: claim up to ``batch_size`` pending rows, publish them pipelined, mark the acknowledged ones
        and record the error on the others, all in one transaction (PostgreSQL keeps the claimed rows locked until
        then). Returns ``(published, failed)``. Raises ``sqlalchemy.exc.SQLAlchemyError`` (or the driver's ``OSError``)
        on database errors; broker errors are results, not exceptions."""
        async with self.engine.begin() as conn:
            rows = await self._claim(conn)
            if not rows:
                return 0, 0
            self.stats.rounds += 1
            items = [Prepared(r.subject, r.body, dict(r.headers), r.event_id) for r in rows]
            results = await self._publish(items)
            acked = [(row.id, res) for row, res in zip(rows, results) if isinstance(res, PubAck)]
            failed = [(row.id, res) for row, res in zip(rows, results) if not isinstance(res, PubAck)]
            if self.after_publish is not None:
                await self.after_publish([item.event_id for item in items])
            now = utcnow()
            if acked:
                await conn.execute(
                    update(outbox_table)
                    .where(outbox_table.c.id.in_([row_id for row_id, _ in acked]))
                    .values(published_at=now, attempts=outbox_table.c.attempts + 1, last_error=None))
            for error, ids in _group_errors(failed).items():
                await conn.execute(
                    update(outbox_table).where(outbox_table.c.id.in_(ids))
                    .values(attempts=outbox_table.c.attempts + 1, last_error=error))
        self.stats.published += len(acked)
        self.stats.duplicates += sum(1 for _, ack in acked if ack.duplicate)
        self.stats.failed += len(failed)
        if failed:
            self.stats.errors += 1
            sample = next(iter(_group_errors(failed)))
            log.warning("outbox relay: %d of %d events not acknowledged (%s); they stay pending and are retried "
                        "with the same event ids", len(failed), len(rows), sample)
        return len(acked), len(failed)

    async def _claim(self, conn: AsyncConnection) -> Sequence[Any]:
        stmt = (select(outbox_table.c.id, outbox_table.c.event_id, outbox_table.c.subject, outbox_table.c.headers,
                       outbox_table.c.body)
                .where(outbox_table.c.published_at.is_(None))
                .order_by(outbox_table.c.id)
                .limit(self.batch_size))
        if self.is_postgres:
            stmt = stmt.with_for_update(skip_locked=True)
        return (await conn.execute(stmt)).all()

    async def _publish(self, items: list[Prepared]) -> list[PubAck | BaseException]:
        if self._nc is None or self._js is None or not self._nc.is_connected:
            return [ConnectionError("not connected to NATS")] * len(items)
        return await publish_batch(self._js, items, self.settings.publish_timeout_s)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop (a round in progress may finish for at most ``timeout_s`` seconds, else it is cancelled and
        its rows stay pending), then close what this relay opened. Never raises."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
            if not done:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        if self._owns_connection:
            await close_client(self._nc, what="the outbox relay's NATS connection")
        if self._owns_engine:
            await self.engine.dispose()


def _group_errors(failed: list[tuple[int, BaseException]]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for row_id, exc in failed:
        kind = "refused" if is_refusal(exc) else "not acknowledged"
        groups.setdefault(f"{kind}: {type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS], []).append(row_id)
    return groups
