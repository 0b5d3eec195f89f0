"""Delivery history, written in batches off the hot path.

A database round trip per delivery would cap throughput (DESIGN.md, "Storage"), so records queue up and one
transaction every ``history_flush_s`` seconds (or ``history_batch`` records) writes them. A record may carry a
``then`` callback: the JetStream ack/nak/term of that attempt, run after the transaction commits, so a crash never
acks an attempt whose history was not written (the task is redelivered instead: at-least-once). ``ack`` is the
common case of ``then`` (a plain ack of that message), run without a coroutine task of its own.

A delivery's first record, ``pending`` (written by the fan-out, no callback), is held back ``pending_hold_s``
seconds: when the attempt's record comes within that time (the usual case when the sender keeps up), only the
attempt's row is written, with the pending record's time as ``created_at``; one row write instead of two, about a
third of the database work per delivery. Deliveries waiting longer show as ``pending`` after ``pending_hold_s``.

Records with a callback (an attempt's: the sender's ack waits for them) are written first; records without one (the
fan-out's pending rows) fill the rest of each transaction. The fan-out waits (:meth:`HistoryWriter.room`) while
more than ``max_backlog`` records without a callback are queued, so a backlog of events on the bus never becomes
a backlog in memory, and acks never wait behind it (the sender's ``max_ack_pending`` would stall it). A pending row
queued behind such a backlog may be written after the attempt's row; the upsert keeps the attempt's.

A failing write (the database is down or refuses) is retried with backoff (0.1 s doubling to 2 s) for up to
``give_up_s`` seconds; meanwhile no ack goes out, so the sender stops fetching at its ``max_ack_pending``. The
dispatcher sets ``give_up_s`` to half of ``ack_wait_s``: past it, the batch's acks go out without its rows (they
are counted in ``letta_bus_history_records_lost_total`` and logged), because holding them longer would make
JetStream redeliver every message in flight and POST it again: a storm of duplicate webhooks is worse for
receivers than a gap in the history.

The rows are written as two ``executemany`` of statements compiled once per writer (an upsert of ``deliveries``,
an insert of ``attempts``) with driver-ready tuples: going through SQLAlchemy's per-row parameter processing was
about a fifth of the dispatcher's CPU at a few thousand deliveries per second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from nats.aio.msg import Msg
from prometheus_client import Counter
from sqlalchemy import insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from dispatcher.store.database import Store
from dispatcher.store.models import Attempt, Delivery, DeliveryStatus, utcnow

log = logging.getLogger(__name__)

#: Served with the delivery metrics (dispatcher.delivery.metrics) from the same process-wide registry.
HISTORY_LOST = Counter("letta_bus_history_records_lost_total",
                       "Delivery-history records settled without their rows after the database failed for "
                       "ack_wait_s / 2 seconds.")

Then = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class DeliveryRecord:
    """The state of one delivery after a fan-out (``attempt`` None) or an attempt. ``duration_ms`` is milliseconds."""

    delivery_id: str
    event_id: str
    endpoint_id: str
    agent_id: str
    event_type: str
    status: str
    attempt: int = 0
    status_code: int | None = None
    duration_ms: float = 0.0
    response_excerpt: str | None = None
    error: str | None = None
    at: datetime = field(default_factory=utcnow)
    then: Then | None = None
    ack: Msg | None = None  # acked after the commit (the common ``then``)
    event_seq: int | None = None  # the event's sequence in LETTA_EVENTS
    replay_id: str | None = None  # set when a replay made this delivery
    created_at: datetime | None = None  # when the delivery was created, if before ``at`` (a held pending record)


class HistoryWriter:
    """Queues :class:`DeliveryRecord` s and writes them in batches; ``start()`` / ``stop()`` bracket its task."""

    def __init__(self, store: Store, *, flush_s: float = 0.05, batch: int = 1000, give_up_s: float = 15.0,
                 pending_hold_s: float = 1.0, max_backlog: int | None = None) -> None:
        self.store = store
        self.flush_s = flush_s
        self.pending_hold_s = pending_hold_s
        self._held: dict[str, tuple[float, DeliveryRecord]] = {}  # delivery id -> (monotonic time, pending record)
        self.batch = batch
        self.give_up_s = give_up_s
        self.max_backlog = max_backlog if max_backlog is not None else 20 * batch
        self._urgent: list[DeliveryRecord] = []  # records with a callback (ack, nak, ...): written first
        self._queue: list[DeliveryRecord] = []  # records without one
        self._room = asyncio.Event()
        self._room.set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        upsert = (sqlite_insert if store.is_sqlite else pg_insert)(Delivery.__table__)
        upsert = upsert.on_conflict_do_update(
            index_elements=[Delivery.id],
            set_={
                "status": upsert.excluded.status, "attempts": upsert.excluded.attempts,
                "last_status_code": upsert.excluded.last_status_code, "last_error": upsert.excluded.last_error,
                "updated_at": upsert.excluded.updated_at,
            },
            # never let a late fan-out record (attempt 0, pending) overwrite a recorded attempt
            where=(upsert.excluded.attempts > 0) & (upsert.excluded.attempts >= Delivery.__table__.c.attempts),
        )
        dialect = store.engine.dialect
        self._upsert = _Compiled(upsert, Delivery.__table__, _DELIVERY_KEYS, dialect)
        self._insert_attempt = _Compiled(insert(Attempt.__table__), Attempt.__table__, _ATTEMPT_KEYS, dialect)
        self.lost = 0  # records given up on after failing for `give_up_s` seconds

    def add(self, record: DeliveryRecord) -> None:
        """Queue a record (never blocks). A pending record without callback is held (see the module docstring)."""
        if record.then is None and record.ack is None:
            if record.attempt == 0 and self.pending_hold_s > 0:
                self._held[record.delivery_id] = (time.monotonic(), record)
            else:
                self._queue.append(record)
            if len(self._held) + len(self._queue) > self.max_backlog:
                self._room.clear()
            return
        if self._held:
            held = self._held.pop(record.delivery_id, None)
            if held is not None and record.created_at is None:
                record.created_at = held[1].at
        self._urgent.append(record)
        if len(self._urgent) >= self.batch:
            self._wake.set()

    async def room(self) -> None:
        """Wait while more than ``max_backlog`` records without a callback wait to be written."""
        await self._room.wait()

    @property
    def has_room(self) -> bool:
        """False while more than ``max_backlog`` records without a callback wait to be written."""
        return self._room.is_set()

    @property
    def backlog(self) -> int:
        """Records queued or held, not written yet."""
        return len(self._urgent) + len(self._queue) + len(self._held)

    def _release_held(self, everything: bool = False) -> None:
        """Queue the pending records held for ``pending_hold_s`` seconds or more (all of them when stopping)."""
        held = self._held
        if not held:
            return
        due = time.monotonic() - self.pending_hold_s
        while held:
            delivery_id, (since, record) = next(iter(held.items()))
            if since > due and not everything:
                break
            del held[delivery_id]
            self._queue.append(record)

    def start(self) -> None:
        """Start the background flush loop."""
        self._task = asyncio.create_task(self._run(), name="history-writer")

    async def stop(self) -> None:
        """Write everything queued, run its callbacks, and end the loop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            self._release_held(everything=self._stopping)
            while self._urgent or self._queue:
                batch, self._urgent = self._urgent[: self.batch], self._urgent[self.batch:]
                if len(batch) < self.batch and self._queue:
                    n = self.batch - len(batch)
                    batch += self._queue[:n]
                    del self._queue[:n]
                await self._flush(batch)
                if len(self._held) + len(self._queue) <= self.max_backlog:
                    self._room.set()
            if len(self._held) + len(self._queue) <= self.max_backlog:
                self._room.set()
            if self._stopping:
                return

    async def _flush(self, batch: list[DeliveryRecord]) -> None:
        give_up_at = time.monotonic() + self.give_up_s
        pause = 0.1
        tries = 0
        while True:
            tries += 1
            try:
                await self._write(batch)
                break
            except Exception:  # noqa: BLE001 - any database failure: retry until give_up_at, then ack anyway
                left = give_up_at - time.monotonic()
                if left <= 0:
                    self.lost += len(batch)
                    HISTORY_LOST.inc(len(batch))
                    log.exception("delivery history write failed %d times in %.0f s: settling %d records without "
                                  "their rows", tries, self.give_up_s, len(batch))
                    break
                log.warning("delivery history write failed (try %d, %d records); retrying in %.1f s", tries,
                            len(batch), min(pause, left), exc_info=tries == 1)
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, 2.0)
        for r in batch:
            if r.ack is not None:
                try:
                    await r.ack.ack()
                except Exception as exc:  # noqa: BLE001 - redelivered after ack_wait; its history is written
                    log.warning("ack after history write failed: %r", exc)
        callbacks = [r.then() for r in batch if r.then is not None]
        if callbacks:
            for result in await asyncio.gather(*callbacks, return_exceptions=True):
                if isinstance(result, BaseException):
                    log.warning("ack after history write failed: %r", result)

    async def _write(self, batch: list[DeliveryRecord]) -> None:
        latest: dict[str, DeliveryRecord] = {}
        attempts = []
        upsert, insert_attempt = self._upsert, self._insert_attempt
        for r in batch:
            if r.attempt:
                attempts.append(insert_attempt.row([
                    r.delivery_id, r.attempt, r.status_code, r.duration_ms, r.response_excerpt, r.error, r.at]))
            seen = latest.get(r.delivery_id)
            if seen is None or r.attempt >= seen.attempt:
                latest[r.delivery_id] = r
        rows = [upsert.row([
            r.delivery_id, r.event_id, r.endpoint_id, r.agent_id, r.event_type, r.status, r.attempt, r.status_code,
            r.error, r.event_seq, r.replay_id, r.created_at or r.at, r.at,
        ]) for r in latest.values()]
        async with self.store.engine.begin() as conn:
            await conn.exec_driver_sql(upsert.sql, rows)
            if attempts:
                await conn.exec_driver_sql(insert_attempt.sql, attempts)


_DELIVERY_KEYS = ("id", "event_id", "endpoint_id", "agent_id", "event_type", "status", "attempts", "last_status_code",
                  "last_error", "event_seq", "replay_id", "created_at", "updated_at")  # the table's column order
_ATTEMPT_KEYS = ("delivery_id", "number", "status_code", "duration_ms", "response_excerpt", "error", "at")


class _Compiled:
    """A statement compiled once for the database's dialect, fed positional driver-ready rows.

    ``row(values)`` takes a list of the values of ``keys`` in that order and returns the tuple the DBAPI expects:
    in the compiled statement's parameter order, column types' bind processors applied (e.g. SQLite stores
    datetimes as text; the last few conversions are remembered, as a batch's records share timestamps), literals
    bound in the statement (``attempts > 0``) appended.
    """

    def __init__(self, statement, table, keys: tuple[str, ...], dialect) -> None:  # noqa: ANN001
        compiled = statement.compile(dialect=dialect, column_keys=list(keys), for_executemany=True)
        self.sql = compiled.string
        order = compiled.positiontup
        if order is None:
            raise RuntimeError(f"the history writer needs a positional paramstyle, {dialect.name} has "
                               f"{dialect.paramstyle}")
        literals = compiled.params
        if list(order[:len(keys)]) != list(keys) or any(name in keys for name in order[len(keys):]):
            raise RuntimeError(f"unexpected parameter order {order} for {table.name}")
        self._literals = [literals[name] for name in order[len(keys):]]
        self._processors = [(i, p) for i, k in enumerate(keys)
                            if (p := table.c[k].type.dialect_impl(dialect).bind_processor(dialect)) is not None]
        self._memo: dict[object, object] = {}

    def row(self, values: list) -> tuple:
        if self._processors:
            memo = self._memo
            for i, processor in self._processors:
                value = values[i]
                if value is not None:
                    done = memo.get(value)
                    if done is None:
                        if len(memo) > 4096:
                            memo.clear()
                        done = memo[value] = processor(value)
                    values[i] = done
        if self._literals:
            values.extend(self._literals)
        return tuple(values)


__all__ = ["DeliveryRecord", "DeliveryStatus", "HistoryWriter"]
