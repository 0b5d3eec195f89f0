"""Delivery-history retention: deliveries older than ``history_retention_days`` (``LETTA_BUS_HISTORY_RETENTION_DAYS``,
default 30; Svix keeps 90) are deleted with their attempts, in small batches off the hot path, on SQLite and
PostgreSQL; endpoint tombstones older than a day go too.

Each batch is its own short transaction: at most ``history_prune_batch`` deliveries (oldest first, read from the
``(created_at, id)`` index) and their attempts (by ``ix_attempts_delivery_id``), then a pause of
``history_prune_pause_s`` seconds, so the history writer never waits long for the database (SQLite has one writer
at a time; on PostgreSQL the rows are locked with ``SKIP LOCKED``, so a row the writer holds is left for the next
round). A round runs every ``history_prune_interval_s`` seconds and deletes batches until nothing is due.

Which deliveries are due: those created before ``now - retention`` that are finished (succeeded, failed, skipped).
A pending or retrying one may still get an attempt (its task in ``LETTA_WEBHOOKS``, a manual retry just claimed
it); deleting it then would leave its attempt writing a fresh row with no past. So an unfinished delivery is due
only when it is also untouched (``updated_at``) for longer than ``LETTA_WEBHOOKS`` keeps a task
(``2 * events_max_age_s``, bus/streams.py): its task is gone, nothing will ever finish it, and it would otherwise
count as backlog forever.

On PostgreSQL one pruner runs at a time across dispatcher processes (a transaction-scoped advisory lock; the others
skip the batch); on SQLite the database's single writer lock serialises them.

Space: SQLite reuses freed pages at once. PostgreSQL reuses the space of deleted rows only once the table is
vacuumed; migration 0004 makes autovacuum visit both tables after 1 % of their rows changed. On a server with
autovacuum off (found on this project's machines: the database then grows by everything inserted), the pruner
vacuums ``deliveries`` and ``attempts`` itself after every :data:`VACUUM_AFTER_ROWS` deliveries it deleted, and warns
once that autovacuum should be on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from config.settings import Settings
from dispatcher.store.database import Store
from dispatcher.store.models import Attempt, Delivery, DeliveryStatus, EndpointTombstone, utcnow

log = logging.getLogger(__name__)

#: Statuses of a finished delivery: nothing will write to it again unless someone retries it by hand.
FINISHED = (DeliveryStatus.SUCCEEDED, DeliveryStatus.FAILED, DeliveryStatus.SKIPPED)
#: How long a tombstone of a deleted endpoint is kept (seconds): far longer than any reconciliation period.
TOMBSTONE_KEEP_S = 86400.0
#: On PostgreSQL with autovacuum off: deliveries pruned between two vacuums of the pruner's own.
VACUUM_AFTER_ROWS = 100_000
_PG_LOCK_KEY = 0x1E77A_B06  # pg_try_advisory_xact_lock key of history pruning (any constant)


class HistoryPruner:
    """Deletes delivery history older than the retention, in batches (module docstring).

    ``settings``: ``history_retention_days`` (days), ``history_prune_batch`` (deliveries per transaction),
    ``history_prune_interval_s`` (seconds between rounds), ``history_prune_pause_s`` (seconds between batches),
    ``events_max_age_s`` (seconds; ``LETTA_WEBHOOKS`` keeps tasks twice that long).

    Figures of the last round: ``last_deleted`` (deliveries), ``last_batches``, ``last_longest_batch_s``
    (seconds, the longest batch transaction); ``rounds`` and ``errors`` count rounds run and failed.
    """

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.retention = timedelta(days=settings.history_retention_days)
        self.batch = settings.history_prune_batch
        self.interval_s = settings.history_prune_interval_s
        self.pause_s = settings.history_prune_pause_s
        # an unfinished delivery untouched this long has no task left in LETTA_WEBHOOKS (max_age, bus/streams.py)
        self.task_horizon = timedelta(seconds=2 * settings.events_max_age_s)
        self.last_deleted = 0
        self.last_batches = 0
        self.last_longest_batch_s = 0.0
        self.rounds = 0
        self.errors = 0
        self.vacuums = 0  # VACUUMs run by the pruner itself (PostgreSQL with autovacuum off)
        self.vacuum_after_rows = VACUUM_AFTER_ROWS
        self._autovacuum: bool | None = None  # the server's setting, read once (PostgreSQL)
        self._unvacuumed = 0  # deliveries deleted since the last vacuum of the pruner's own
        due = select(Delivery.id).where(
            Delivery.created_at < bindparam("cutoff", type_=Delivery.created_at.type),
            or_(Delivery.status.in_(FINISHED),
                Delivery.updated_at < bindparam("stale", type_=Delivery.updated_at.type)),
        ).order_by(Delivery.created_at, Delivery.id).limit(bindparam("n"))
        if not store.is_sqlite:
            due = due.with_for_update(skip_locked=True)
        self._delete_deliveries = delete(Delivery).where(Delivery.id.in_(due.scalar_subquery())).returning(Delivery.id)
        self._delete_attempts = delete(Attempt).where(Attempt.delivery_id.in_(bindparam("ids", expanding=True)))
        before = bindparam("before", type_=EndpointTombstone.deleted_at.type)
        tombstones = (select(EndpointTombstone.endpoint_id).where(EndpointTombstone.deleted_at < before)
                      .order_by(EndpointTombstone.deleted_at).limit(bindparam("n")))
        self._delete_tombstones = delete(EndpointTombstone).where(
            EndpointTombstone.endpoint_id.in_(tombstones.scalar_subquery()))

    async def run(self) -> None:
        """A round every ``history_prune_interval_s`` seconds (the first at once) until cancelled. A failing round
        (the database away, say) is logged and counted in ``errors``, never raised; the next round tries again."""
        while True:
            try:
                await self.prune_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - pruning is housekeeping: log it, try again next round
                self.errors += 1
                log.warning("history pruning failed; trying again in %.0f s", self.interval_s, exc_info=True)
            await asyncio.sleep(self.interval_s)

    async def prune_once(self, now: datetime | None = None) -> int:
        """One round: delete, batch after batch, the deliveries due at ``now`` (default: the current time) with
        their attempts, then tombstones older than a day. Returns the number of deliveries deleted. Raises the
        database's error (``sqlalchemy.exc.SQLAlchemyError``) when a batch fails; batches done before stay done."""
        now = now or utcnow()
        params = {"cutoff": now - self.retention, "stale": now - self.task_horizon, "n": self.batch}
        deleted = batches = 0
        longest = 0.0
        try:
            while True:
                started = time.monotonic()
                async with self.store.engine.begin() as conn:
                    if not await self._lock(conn):
                        log.debug("history pruning: another process is pruning; skipping this round")
                        break
                    ids = [row[0] for row in await conn.execute(self._delete_deliveries, params)]
                    if ids:
                        await conn.execute(self._delete_attempts, {"ids": ids})
                longest = max(longest, time.monotonic() - started)
                if not ids:
                    break
                deleted += len(ids)
                batches += 1
                if len(ids) < self.batch:
                    break
                await asyncio.sleep(self.pause_s)
            await self._prune_tombstones(now)
            self._unvacuumed += deleted
            await self._vacuum_if_needed()
        finally:
            self.rounds += 1
            self.last_deleted, self.last_batches, self.last_longest_batch_s = deleted, batches, longest
        if deleted:
            log.info("history pruning: deleted %d deliveries older than %s (with their attempts) in %d batches; "
                     "longest batch %.0f ms", deleted, params["cutoff"].isoformat(), batches, longest * 1000)
        return deleted

    async def _prune_tombstones(self, now: datetime) -> None:
        before = now - timedelta(seconds=TOMBSTONE_KEEP_S)
        while True:
            async with self.store.engine.begin() as conn:
                result = await conn.execute(self._delete_tombstones, {"before": before, "n": self.batch})
            if result.rowcount < self.batch:
                return
            await asyncio.sleep(self.pause_s)

    async def _vacuum_if_needed(self) -> None:
        """On PostgreSQL with autovacuum off, ``VACUUM (ANALYZE)`` both tables once ``vacuum_after_rows``
        deliveries were deleted since the last one (an autocommit connection: VACUUM cannot run in a transaction;
        it takes no lock that stops the history writer)."""
        if self.store.is_sqlite or self._unvacuumed < self.vacuum_after_rows:
            return
        if self._autovacuum is None:
            async with self.store.engine.connect() as conn:
                self._autovacuum = (await conn.execute(text("SHOW autovacuum"))).scalar() == "on"
            if not self._autovacuum:
                log.warning("autovacuum is off on this PostgreSQL server: pruned history space is reused only after "
                            "a VACUUM, so the history pruner vacuums deliveries and attempts itself every %d pruned "
                            "deliveries; turn autovacuum on (postgresql.conf)", self.vacuum_after_rows)
        if self._autovacuum:
            return
        started = time.monotonic()
        async with self.store.engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("VACUUM (ANALYZE) deliveries, attempts"))
        self._unvacuumed = 0
        self.vacuums += 1
        log.info("history pruning: vacuumed deliveries and attempts in %.1f s", time.monotonic() - started)

    async def _lock(self, conn: AsyncConnection) -> bool:
        if self.store.is_sqlite:
            return True
        return bool((await conn.execute(select(func.pg_try_advisory_xact_lock(_PG_LOCK_KEY)))).scalar())


__all__ = ["FINISHED", "HistoryPruner", "TOMBSTONE_KEEP_S", "VACUUM_AFTER_ROWS"]
