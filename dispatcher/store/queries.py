"""Reading and claiming delivery history for the API and the CLI: filtered, cursor-paginated listing (newest
first), one delivery with its attempts, failed deliveries for a bulk retry, per-endpoint backlog and failures.

Times are timezone-aware UTC (SQLite hands back naive values; they are UTC and made aware here). A cursor is an
opaque string encoding the last row's ``(created_at, id)``; the next page holds rows strictly older than it.

Every query here walks an index of ``deliveries`` (models.py, migration 0004), never the whole table: a page is
an index range read backwards from the cursor, ``(created_at, id) < (:at, :id)`` as a row value (an ``OR`` of the
two comparisons is not answered as one index range); backlog and failures read the partial indexes, matched by
writing their predicates with the same literals (:data:`~dispatcher.store.models.BACKLOG_PREDICATE`). The plans are
checked on SQLite and PostgreSQL by ``tests/integration/test_query_plans.py``.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from sqlalchemy import ColumnElement, case, func, literal, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from dispatcher.store.database import Store
from dispatcher.store.models import (
    BACKLOG_PREDICATE,
    FAILED_PREDICATE,
    Attempt,
    Delivery,
    DeliveryStatus,
    Endpoint,
    utcnow,
)

#: Statuses a manual retry may start from; a pending or retrying delivery already has an attempt coming.
RETRYABLE = (DeliveryStatus.FAILED, DeliveryStatus.SKIPPED, DeliveryStatus.SUCCEEDED)
STATUSES = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING, DeliveryStatus.SUCCEEDED, DeliveryStatus.FAILED,
            DeliveryStatus.SKIPPED)


def aware(when: datetime | None) -> datetime | None:
    """A datetime as timezone-aware UTC (naive values are taken as UTC)."""
    if when is None:
        return None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def encode_cursor(row: Delivery) -> str:
    """The cursor after ``row``: urlsafe base64 of ``<created_at ISO>|<id>``."""
    raw = f"{aware(row.created_at).isoformat()}|{row.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """``(created_at, id)`` of a cursor. Raises ``ValueError`` naming ``cursor`` when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, _, delivery_id = raw.partition("|")
        parsed = aware(datetime.fromisoformat(when))
    except (ValueError, UnicodeDecodeError):
        raise ValueError("cursor is not valid: pass the next_cursor of a previous page unchanged") from None
    if not delivery_id or parsed is None:
        raise ValueError("cursor is not valid: pass the next_cursor of a previous page unchanged")
    return parsed, delivery_id


async def list_deliveries(
    store: Store, *, agent_id: str | None = None, endpoint_id: str | None = None, status: str | None = None,
    event_type: str | None = None, since: datetime | None = None, until: datetime | None = None,
    cursor: str | None = None, limit: int = 50, where: ColumnElement[bool] | None = None,
) -> tuple[list[Delivery], str | None]:
    """One page of deliveries, newest first (``created_at`` then ``id``, descending), and the cursor of the next
    page (None on the last). Filters are equalities except ``since`` (inclusive) and ``until`` (exclusive) on
    ``created_at``; ``where`` is one more condition (a caller's scope, :mod:`dispatcher.api.scoping`). Raises
    ``ValueError`` for a bad cursor."""
    stmt = select(Delivery).order_by(Delivery.created_at.desc(), Delivery.id.desc()).limit(limit + 1)
    if where is not None:
        stmt = stmt.where(where)
    for column, value in ((Delivery.agent_id, agent_id), (Delivery.endpoint_id, endpoint_id),
                          (Delivery.status, status), (Delivery.event_type, event_type)):
        if value is not None:
            stmt = stmt.where(column == value)
    if since is not None:
        stmt = stmt.where(Delivery.created_at >= aware(since))
    if until is not None:
        stmt = stmt.where(Delivery.created_at < aware(until))
    if cursor:
        at, last_id = decode_cursor(cursor)
        stmt = stmt.where(tuple_(Delivery.created_at, Delivery.id) < tuple_(_at(at), last_id))
    async with store.session() as s:
        rows = list((await s.execute(stmt)).scalars())
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1])
    return rows, None


async def get_delivery(store: Store, delivery_id: str) -> tuple[Delivery | None, list[Attempt]]:
    """A delivery and every attempt of it (by attempt number, then time); ``(None, [])`` when unknown."""
    async with store.session() as s:
        delivery = await s.get(Delivery, delivery_id)
        if delivery is None:
            return None, []
        stmt = select(Attempt).where(Attempt.delivery_id == delivery_id).order_by(Attempt.number, Attempt.id)
        return delivery, list((await s.execute(stmt)).scalars())


async def failed_deliveries(store: Store, *, agent_id: str | None, since: datetime,
                            endpoint_ids: Sequence[str] | None = None, limit: int = 1000) -> list[Delivery]:
    """Failed deliveries of an agent's events (None: any agent's) created at or after ``since``, oldest first (at
    most ``limit``); only to ``endpoint_ids`` when given."""
    stmt = (select(Delivery).where(text(FAILED_PREDICATE), Delivery.created_at >= aware(since))
            .order_by(Delivery.created_at, Delivery.id).limit(limit))
    if agent_id is not None:
        stmt = stmt.where(Delivery.agent_id == agent_id)
    if endpoint_ids is not None:
        stmt = stmt.where(Delivery.endpoint_id.in_(list(endpoint_ids)))
    async with store.session() as s:
        return list((await s.execute(stmt)).scalars())


async def claim_for_retry(store: Store, delivery_id: str) -> bool:
    """Mark a finished delivery ``pending`` again, atomically, so two retries of it cannot both queue a task.
    True when this call claimed it; False when it is unknown or not in a :data:`RETRYABLE` status."""
    async with store.session.begin() as s:
        result = await s.execute(
            update(Delivery).where(Delivery.id == delivery_id, Delivery.status.in_(RETRYABLE))
            .values(status=DeliveryStatus.PENDING, updated_at=utcnow()))
        return result.rowcount == 1


async def unclaim(store: Store, delivery_id: str, status: str, error: str) -> None:
    """Undo :func:`claim_for_retry` when the task could not be queued: back to ``status`` with ``error``."""
    async with store.session.begin() as s:
        await s.execute(update(Delivery).where(Delivery.id == delivery_id, Delivery.status == DeliveryStatus.PENDING)
                        .values(status=status, last_error=error, updated_at=utcnow()))


async def add_pending(store: Store, rows: list[dict]) -> None:
    """Insert ``pending`` delivery rows (column dicts) unless they exist already (a replay made twice)."""
    if not rows:
        return
    insert = sqlite_insert if store.is_sqlite else pg_insert
    async with store.session.begin() as s:
        # executemany form: one cached statement whatever the row count (a multi-row VALUES recompiles per size)
        await s.execute(insert(Delivery).on_conflict_do_nothing(index_elements=[Delivery.id]), rows)


async def endpoint_stats(store: Store, *, window_s: float = 86400,
                         limit: int | None = None) -> dict[str, dict[str, int]]:
    """Per endpoint id with a backlog or recent failures: ``backlog`` (deliveries pending or retrying) and
    ``failed`` (deliveries failed in the last ``window_s`` seconds, default 24 h). With ``limit``: only the
    ``limit`` endpoints with the largest backlog and the ``limit`` with the most failures (at most ``2 * limit``
    entries). Reads the partial indexes only: the cost grows with the backlog and the day's failures, not with the
    history."""
    since = utcnow() - timedelta(seconds=window_s)
    backlog_n = func.count().label("n")
    backlog = (select(Delivery.endpoint_id, backlog_n).where(text(BACKLOG_PREDICATE))
               .group_by(Delivery.endpoint_id))
    failed_n = func.count().label("n")
    failed = (select(Delivery.endpoint_id, failed_n).where(text(FAILED_PREDICATE), Delivery.updated_at >= since)
              .group_by(Delivery.endpoint_id))
    if limit is not None:
        backlog = backlog.order_by(backlog_n.desc(), Delivery.endpoint_id).limit(limit)
        failed = failed.order_by(failed_n.desc(), Delivery.endpoint_id).limit(limit)
    stats: dict[str, dict[str, int]] = {}
    async with store.session() as s:
        for endpoint_id, count in await s.execute(backlog):
            stats.setdefault(endpoint_id, {"backlog": 0, "failed": 0})["backlog"] = count
        for endpoint_id, count in await s.execute(failed):
            stats.setdefault(endpoint_id, {"backlog": 0, "failed": 0})["failed"] = count
    return stats


async def history_totals(store: Store, *, window_s: float = 86400) -> dict[str, int]:
    """``{"backlog": deliveries pending or retrying, "failed": deliveries failed in the last window_s seconds}``
    over every endpoint (the partial indexes only, as :func:`endpoint_stats`)."""
    since = utcnow() - timedelta(seconds=window_s)
    async with store.session() as s:
        backlog = (await s.execute(select(func.count()).select_from(Delivery).where(text(BACKLOG_PREDICATE)))).scalar()
        failed = (await s.execute(select(func.count()).select_from(Delivery).where(
            text(FAILED_PREDICATE), Delivery.updated_at >= since))).scalar()
    return {"backlog": int(backlog or 0), "failed": int(failed or 0)}


async def endpoint_totals(store: Store) -> dict[str, int]:
    """``{"endpoints", "enabled", "disabled", "failing"}``: counts over the ``endpoints`` table (one pass over it:
    the fleet's size, not the history's; ``failing`` = a failure clock is running)."""
    stmt = select(func.count(), func.coalesce(func.sum(case((Endpoint.enabled, 0), else_=1)), 0),
                  func.count(Endpoint.failing_since))
    async with store.session() as s:
        total, disabled, failing = (await s.execute(stmt)).one()
    return {"endpoints": int(total), "enabled": int(total) - int(disabled), "disabled": int(disabled),
            "failing": int(failing)}


async def troubled_endpoints(store: Store, *, limit: int) -> list[Endpoint]:
    """At most ``limit`` endpoints disabled or failing (a failure clock running), by id."""
    stmt = (select(Endpoint).where((Endpoint.enabled.is_(False)) | (Endpoint.failing_since.is_not(None)))
            .order_by(Endpoint.id).limit(limit))
    async with store.session() as s:
        return list((await s.execute(stmt)).scalars())


async def endpoints_by_id(store: Store, ids: Sequence[str]) -> list[Endpoint]:
    """The endpoints of ``ids`` that exist (primary key lookups), in no particular order."""
    if not ids:
        return []
    async with store.session() as s:
        return list((await s.execute(select(Endpoint).where(Endpoint.id.in_(list(ids))))).scalars())


async def first_endpoints(store: Store, *, limit: int) -> list[Endpoint]:
    """The first ``limit`` endpoints by id (the primary key: an index walk that stops after ``limit`` rows)."""
    async with store.session() as s:
        return list((await s.execute(select(Endpoint).order_by(Endpoint.id).limit(limit))).scalars())


def _at(when: datetime):  # noqa: ANN202 - a SQL expression
    """A cursor time as a bound value of ``created_at``'s type (SQLite compares the stored text form)."""
    return literal(when, Delivery.__table__.c.created_at.type)
