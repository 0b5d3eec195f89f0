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

What the database may refuse is made storable when a record is queued (:func:`storable_text`), the same on every
dialect: NUL (PostgreSQL ``TEXT`` refuses it; binary and gzip error pages hold it) and lone surrogates (not UTF-8)
become U+FFFD, the replacement character the sender already decodes invalid bytes to; ids and names are clamped to
their column's length (logged: they are validated where events enter, so a clamp means a bug upstream), errors to
``MAX_ERROR_CHARS``. Excerpts keep their length (``response_excerpt_bytes`` already bounds them).

A failing write is one of two things (:func:`is_refusal`):

- **The database refused these rows**: a data or integrity error (SQLSTATE classes 22, 23, 54; SQLAlchemy's
  ``DataError``, ``IntegrityError``, a ``StatementError`` of a parameter; a value the driver cannot encode). The
  batch is split in halves, again and again, until only the refused records are left out: each is logged with its
  delivery id and the database's reason, counted in ``letta_bus_history_records_refused_total``, and settled (its
  ack or callback runs): one bad row never holds up a batch, never stalls the sender at ``max_ack_pending``.
- **The database is unavailable** (anything else: connection refused or lost, timeouts, ``OperationalError``, a
  missing table, a deadlock): the batch is retried as a whole with backoff (0.1 s doubling to 2 s) for as long as
  it takes. No ack goes out meanwhile, so the sender stops fetching at its ``max_ack_pending`` (memory stays
  bounded; the fan-out waits in :meth:`HistoryWriter.room`), and the JetStream message of every record waiting
  (``msg``, or ``ack``) is kept alive with ``in_progress()`` every ``keepalive_s`` seconds (the dispatcher sets it
  to ``ack_wait_s / 3``; also at once when a write first fails, and when one hangs), so nothing is redelivered and
  nothing is POSTed twice while the database is away. An outage delays settling; it drops nothing. A record with a
  callback but no message cannot be kept alive (it is redelivered after ``ack_wait`` if the outage lasts that
  long): pass ``msg``.

``give_up_s`` (``LETTA_BUS_HISTORY_GIVE_UP_S``, unset by default) is an optional hard bound: past it, a batch the
database did not take is settled without its rows, counted in ``letta_bus_history_records_lost_total`` and logged.
On :meth:`HistoryWriter.stop` a batch the database does not take within ``stop_give_up_s`` is left unsettled (no
ack: JetStream redelivers it after ``ack_wait`` to the next dispatcher, which records the attempt again).

The rows are written as two ``executemany`` of statements compiled once per writer (an upsert of ``deliveries``,
an insert of ``attempts``) with driver-ready tuples: going through SQLAlchemy's per-row parameter processing was
about a fifth of the dispatcher's CPU at a few thousand deliveries per second.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from nats.aio.msg import Msg
from prometheus_client import Counter
from sqlalchemy import exc as sa_exc
from sqlalchemy import insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from dispatcher.store.database import Store
from dispatcher.store.models import Attempt, Delivery, DeliveryStatus, utcnow

log = logging.getLogger(__name__)

#: Served with the delivery metrics (dispatcher.delivery.metrics) from the same process-wide registry.
HISTORY_LOST = Counter("letta_bus_history_records_lost_total",
                       "Delivery-history records settled without their rows after the database was unavailable for "
                       "LETTA_BUS_HISTORY_GIVE_UP_S seconds (only when that bound is set).")
HISTORY_REFUSED = Counter("letta_bus_history_records_refused_total",
                          "Delivery-history records the database refused for their data (the batch split until only "
                          "they were left out); each is logged with its delivery id and settled without its row.")

Then = Callable[[], Awaitable[None]]

#: Longest ``error`` / ``last_error`` kept, characters (errors may quote what a receiver sent).
MAX_ERROR_CHARS = 2000
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL (PostgreSQL TEXT refuses it) and lone surrogates (not UTF-8)
#: SQLSTATE classes of errors about the rows themselves (PostgreSQL, Appendix A): data exception, integrity
#: constraint violation, program limit exceeded. Every other class (08 connection, 40 rollback, 53 resources,
#: 57 operator intervention, 42 a missing table...) means the database cannot take any batch right now.
_REFUSAL_CLASSES = frozenset({"22", "23", "54"})


def storable_text(value: str, limit: int | None = None) -> str:
    """``value`` as every database stores it: NUL and lone surrogates replaced by U+FFFD, cut to ``limit``
    characters (PostgreSQL's ``varchar(n)`` counts characters). ``bytes`` are decoded as UTF-8 with replacement."""
    if value.__class__ is not str:
        value = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
    if "\x00" in value or not value.isascii():
        value = _UNSTORABLE.sub("\ufffd", value)
    if limit is not None and len(value) > limit:
        value = value[:limit]
    return value


def is_refusal(exc: BaseException) -> bool:
    """True when the database (or its driver) refused the rows for their data, so the same rows fail again on any
    connection; False when it is unavailable (or the error is unknown), which is retried as a whole."""
    if isinstance(exc, (sa_exc.DataError, sa_exc.IntegrityError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError):  # asyncpg's errors arrive as the generic DBAPIError with a SQLSTATE
        code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        return isinstance(code, str) and code[:2] in _REFUSAL_CLASSES
    if isinstance(exc, sa_exc.StatementError):  # a parameter SQLAlchemy could not process
        return True
    # a value the driver could not encode (sqlite3: UnicodeEncodeError, OverflowError) or the row could not be built
    return isinstance(exc, (ValueError, TypeError, OverflowError))


def _reason(exc: BaseException) -> str:
    """The database's reason, short: the driver's message (no SQL, no parameters) and the SQLSTATE if any."""
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    name = type(orig.__cause__ or orig).__name__  # asyncpg's own class under SQLAlchemy's adapter
    text = f"{name}: {str(orig).splitlines()[0] if str(orig) else ''}"[:300]
    return f"{text} (SQLSTATE {code})" if code else text


class _GiveUp(Exception):
    """A batch the database did not take within ``give_up_s`` (settled without rows) or by the stop deadline
    (``settle`` False: left unsettled)."""

    def __init__(self, settle: bool) -> None:
        self.settle = settle


@dataclass(slots=True)
class DeliveryRecord:
    """The state of one delivery after a fan-out (``attempt`` None) or an attempt. ``duration_ms`` is milliseconds.

    ``ack``: a message acked after the commit (the common ``then``). ``msg``: the JetStream message this record
    settles, kept alive with ``in_progress()`` while the database is unavailable; set it on every record with a
    callback (``ack`` counts as one: a record with ``ack`` needs no ``msg``).
    """

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
    msg: Msg | None = None  # the message ``then`` settles: kept alive (in_progress) while its row waits


#: (field, column length) of the records' short strings: clamped to fit (see ``storable_text``).
_SHORT_FIELDS = tuple((name, Delivery.__table__.c[column].type.length) for name, column in (
    ("delivery_id", "id"), ("event_id", "event_id"), ("endpoint_id", "endpoint_id"), ("agent_id", "agent_id"),
    ("event_type", "event_type"), ("status", "status"), ("replay_id", "replay_id")))


def _make_storable(r: DeliveryRecord) -> None:
    """Make a record's strings storable in place (module docstring); logs a clamped or rewritten id."""
    for name, limit in _SHORT_FIELDS:
        value = getattr(r, name)
        if value is not None and (len(value) > limit or "\x00" in value or not value.isascii()):
            clean = storable_text(value, limit)
            if clean != value:
                log.warning("delivery %s: %s of %d characters stored as %r (%d allowed, no NUL or lone "
                            "surrogate)", r.delivery_id, name, len(value), clean[:40], limit)
                setattr(r, name, clean)
    excerpt = r.response_excerpt
    if excerpt is not None and (excerpt.__class__ is not str or "\x00" in excerpt or not excerpt.isascii()):
        r.response_excerpt = storable_text(excerpt)
    error = r.error
    if error is not None and (error.__class__ is not str or len(error) > MAX_ERROR_CHARS or "\x00" in error
                              or not error.isascii()):
        r.error = storable_text(error, MAX_ERROR_CHARS)


class HistoryWriter:
    """Queues :class:`DeliveryRecord` s and writes them in batches; ``start()`` / ``stop()`` bracket its tasks.

    ``flush_s``: seconds between writes; ``batch``: most records per transaction; ``give_up_s``: None (retry while
    the database is unavailable, as long as it takes) or seconds after which a batch is settled without its rows;
    ``keepalive_s``: seconds between ``in_progress()`` of each waiting record's message while the database is
    unavailable (at most a third of the consumer's ``ack_wait``); ``stop_give_up_s``: seconds :meth:`stop` keeps
    retrying an unavailable database before leaving the rest unsettled (redelivered after ``ack_wait``).
    """

    def __init__(self, store: Store, *, flush_s: float = 0.05, batch: int = 1000, give_up_s: float | None = None,
                 pending_hold_s: float = 1.0, max_backlog: int | None = None, keepalive_s: float = 10.0,
                 stop_give_up_s: float = 10.0) -> None:
        if keepalive_s <= 0:
            raise ValueError(f"keepalive_s must be > 0 seconds (a third of ack_wait_s), got {keepalive_s}")
        if give_up_s is not None and give_up_s <= 0:
            raise ValueError(f"give_up_s must be > 0 seconds or None (retry until the database is back), got "
                             f"{give_up_s}")
        self.store = store
        self.flush_s = flush_s
        self.pending_hold_s = pending_hold_s
        self._held: dict[str, tuple[float, DeliveryRecord]] = {}  # delivery id -> (monotonic time, pending record)
        self.batch = batch
        self.give_up_s = give_up_s
        self.keepalive_s = keepalive_s
        self.stop_give_up_s = stop_give_up_s
        self.max_backlog = max_backlog if max_backlog is not None else 20 * batch
        self._urgent: list[DeliveryRecord] = []  # records with a callback (ack, nak, ...): written first
        self._queue: list[DeliveryRecord] = []  # records without one
        self._writing: list[DeliveryRecord] = []  # the batch being written (kept alive with the urgent ones)
        self._write_started = 0.0  # monotonic time the current batch's write began
        self._down_since: float | None = None  # monotonic time the database stopped taking writes, while it does
        self._touch_now = asyncio.Event()  # keep every waiting message alive at once (a write just failed)
        self._room = asyncio.Event()
        self._room.set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_deadline = float("inf")
        self._abandon = False  # stopping, and the database did not come back in time: settle nothing more
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
        self.lost = 0  # records settled without rows after `give_up_s` seconds of an unavailable database
        self.refused = 0  # records the database refused (left out of their batch, settled)
        self.unsettled = 0  # records left unacked at stop (the database did not come back within stop_give_up_s)
        self.kept_alive = 0  # in_progress() sent for waiting records

    def add(self, record: DeliveryRecord) -> None:
        """Queue a record (never blocks). A pending record without callback is held (see the module docstring).
        Its strings are made storable first (:func:`storable_text`)."""
        _make_storable(record)
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
        """Records queued or held, not written yet (the batch being written included)."""
        return len(self._urgent) + len(self._queue) + len(self._held) + len(self._writing)

    @property
    def database_down_s(self) -> float:
        """Seconds the database has not been taking writes (0.0 while it does)."""
        return 0.0 if self._down_since is None else time.monotonic() - self._down_since

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
        """Start the background flush loop and the keep-alive of waiting messages."""
        self._task = asyncio.create_task(self._run(), name="history-writer")
        self._keepalive = asyncio.create_task(self._keep_alive(), name="history-keepalive")

    async def stop(self) -> None:
        """Write everything queued and run its callbacks, then end the loop. While the database is unavailable,
        retry for at most ``stop_give_up_s`` seconds, then leave what is left unsettled (not acked: JetStream
        redelivers it after ``ack_wait``; counted in ``unsettled``)."""
        self._stopping = True
        self._stop_deadline = time.monotonic() + self.stop_give_up_s
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.stop_give_up_s + 5.0)
            except TimeoutError:  # a write hanging on a dead connection
                self._task.cancel()
                left = self.backlog
                self.unsettled += left
                log.error("delivery history: a write hung past stop; %d records left unsettled (redelivered after "
                          "ack_wait)", left)
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
        if self._keepalive is not None:
            self._keepalive.cancel()
            try:
                await self._keepalive
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            except TimeoutError:
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
        """Write a batch (splitting out refused records, retrying while the database is unavailable), then settle
        every record of it: acks first, then the other callbacks."""
        if self._abandon:
            self.unsettled += len(batch)
            return
        self._writing = batch
        self._write_started = time.monotonic()
        give_up_at = None if self.give_up_s is None else self._write_started + self.give_up_s
        pieces = [batch]
        done: list[DeliveryRecord] = []  # written or refused: settled whatever happens to the rest
        try:
            while pieces:
                piece = pieces.pop()
                refusal = await self._write_retrying(piece, give_up_at)
                if refusal is None:
                    done += piece
                    continue
                if len(piece) > 1:
                    half = len(piece) // 2
                    pieces += [piece[half:], piece[:half]]  # the first half is written first
                    continue
                r = piece[0]
                done.append(r)
                self.refused += 1
                HISTORY_REFUSED.inc()
                log.error("delivery history: the database refused the record of delivery %s (event %s, attempt %d, "
                          "%s): %s; settled without its row", r.delivery_id, r.event_id, r.attempt, r.status,
                          _reason(refusal))
        except _GiveUp as stop:
            left = len(batch) - len(done)
            if not stop.settle:
                self.unsettled += left
                log.error("delivery history: the database did not come back within %.0f s of stop; %d records "
                          "left unsettled (JetStream redelivers them after ack_wait)", self.stop_give_up_s, left)
                batch = done
            else:
                self.lost += left
                HISTORY_LOST.inc(left)
                log.error("delivery history: the database was unavailable for %.0f s (history_give_up_s); settling "
                          "%d records without their rows", self.give_up_s, left)
        finally:
            self._writing = []
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

    async def _write_retrying(self, piece: list[DeliveryRecord], give_up_at: float | None) -> Exception | None:
        """Write ``piece`` in one transaction, retrying with backoff while the database is unavailable. Returns
        None when written, the error when the database refused the rows; raises :class:`_GiveUp` past
        ``give_up_at`` (monotonic) or the stop deadline."""
        pause = 0.1
        tries = 0
        while True:
            tries += 1
            try:
                await self._write(piece)
            except Exception as exc:  # noqa: BLE001 - refused rows or an unavailable database, told apart below
                if is_refusal(exc):
                    return exc
                now = time.monotonic()
                if self._down_since is None:
                    self._down_since = now
                    self._touch_now.set()  # the waiting messages may be near their ack_wait: keep them alive now
                    log.warning("delivery history: the database is unavailable (%s); keeping %d records waiting "
                                "(their messages kept alive) and retrying until it is back", _reason(exc),
                                self.backlog, exc_info=True)
                elif tries % 30 == 0:
                    log.warning("delivery history: the database still unavailable after %.0f s (%s); %d records "
                                "waiting", now - self._down_since, _reason(exc), self.backlog)
                if self._stopping and now >= self._stop_deadline:
                    self._abandon = True
                    raise _GiveUp(settle=False) from exc
                if give_up_at is not None and now >= give_up_at:
                    raise _GiveUp(settle=True) from exc
                wait = pause
                if give_up_at is not None:
                    wait = min(wait, max(give_up_at - now, 0.0))
                if self._stopping:
                    wait = min(wait, max(self._stop_deadline - now, 0.0))
                await asyncio.sleep(wait)
                pause = min(pause * 2, 2.0)
            else:
                if self._down_since is not None:
                    log.warning("delivery history: the database is back after %.1f s; writing %d waiting records",
                                time.monotonic() - self._down_since, self.backlog)
                    self._down_since = None
                return None

    async def _keep_alive(self) -> None:
        """Every ``keepalive_s`` seconds (and at once when a write first fails), while the database is unavailable
        or a write has run for ``keepalive_s / 2`` seconds, send ``in_progress()`` for the message of every record
        waiting to be written, so JetStream's ``ack_wait`` does not run out on it."""
        period = self.keepalive_s
        while True:
            try:
                await asyncio.wait_for(self._touch_now.wait(), period)
            except TimeoutError:
                pass
            self._touch_now.clear()
            writing = self._writing
            if not writing:
                continue
            if self._down_since is None and time.monotonic() - self._write_started < period / 2:
                continue
            msgs = [m for r in (*writing, *self._urgent) if (m := r.msg or r.ack) is not None]
            failed = 0
            for m in msgs:
                try:
                    await m.in_progress()
                except Exception:  # noqa: BLE001 - NATS down too: JetStream redelivers later; the history is kept
                    failed += 1
            self.kept_alive += len(msgs) - failed
            if failed:
                log.warning("delivery history: in_progress() failed for %d of %d waiting messages", failed, len(msgs))

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
