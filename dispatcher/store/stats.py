"""Delivery statistics for the console (issue 13): per-endpoint success rate and latency percentiles over the
last hour and day, and per-bucket series for its charts. Durations are milliseconds, windows and buckets seconds,
times timezone-aware UTC.

Every query is bounded and walks an index of ``deliveries`` (models.py), never the whole table, on SQLite and
PostgreSQL alike:

- :func:`endpoint_stats` reads, per endpoint, at most ``sample`` most recent deliveries created in the last
  ``DAY_S`` (a backwards range of ``ix_deliveries_endpoint_created_id`` stopping at the limit, one ``UNION ALL``
  member per endpoint), with their attempts in that window (``ix_attempts_delivery_id``). Percentiles are computed
  here, exactly (nearest rank), on those rows: at most ``len(endpoint_ids) * sample`` deliveries.
- :func:`outcome_series` and :func:`latency_series` aggregate in SQL, grouped by time bucket (and outcome or
  latency class), so they return at most a few thousand rows whatever the traffic; the latency percentiles of a
  bucket come from a histogram of :data:`LATENCY_BOUNDS_MS` classes and are exact to within one class (each class
  reports the largest duration it holds).

Both count deliveries (and their attempts) by the delivery's creation time: an attempt made today for a delivery
created before the window (a manual retry of an old one) is not counted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import BigInteger, ColumnElement, Integer, case, cast, extract, func, select, union_all

from dispatcher.store.database import Store
from dispatcher.store.models import Attempt, Delivery, DeliveryStatus, utcnow
from dispatcher.store.queries import aware

HOUR_S = 3600
DAY_S = 86400
#: The windows of :func:`endpoint_stats`, seconds.
WINDOWS_S = (HOUR_S, DAY_S)
#: Deliveries read per endpoint by :func:`endpoint_stats` (the most recent ones of the day).
SAMPLE_DELIVERIES = 500
#: Most endpoints one :func:`endpoint_stats` call takes (one page of the console).
MAX_ENDPOINTS = 50
#: Upper bounds of the latency classes of :func:`latency_series`, milliseconds; a last class holds the rest.
LATENCY_BOUNDS_MS = (5, 10, 20, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 30000)
#: What a delivery status counts as in :func:`outcome_series`.
OUTCOMES = {DeliveryStatus.SUCCEEDED: "succeeded", DeliveryStatus.FAILED: "failed",
            DeliveryStatus.RETRYING: "retrying", DeliveryStatus.PENDING: "retrying"}


def percentile(sorted_ms: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 1) of ascending values: the smallest value with at least
    ``q`` of all values at or below it. None for no values."""
    if not sorted_ms:
        return None
    return sorted_ms[max(0, math.ceil(q * len(sorted_ms)) - 1)]


def is_success(status_code: int | None) -> bool:
    """An attempt succeeded when the receiver answered 2xx."""
    return status_code is not None and 200 <= status_code < 300


@dataclass(frozen=True)
class WindowStats:
    """Attempts of one window: how many, how many succeeded, and their latency p50/p99 in milliseconds."""

    attempts: int = 0
    succeeded: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def success_rate(self) -> float | None:
        """Succeeded attempts / attempts (0..1); None without attempts."""
        return self.succeeded / self.attempts if self.attempts else None

    @classmethod
    def of(cls, attempts: Sequence[tuple[int | None, float]]) -> "WindowStats":
        """From ``(status_code, duration_ms)`` pairs."""
        durations = sorted(d for _, d in attempts)
        return cls(attempts=len(attempts), succeeded=sum(1 for code, _ in attempts if is_success(code)),
                   p50_ms=percentile(durations, 0.5), p99_ms=percentile(durations, 0.99))


@dataclass(frozen=True)
class EndpointStats:
    """One endpoint's numbers: ``windows`` by window length (seconds, :data:`WINDOWS_S`), the last successful
    attempt seen, and how many deliveries were read (``truncated``: the sample limit was reached, so the numbers
    are those of the most recent ``sampled`` deliveries)."""

    endpoint_id: str
    windows: dict[int, WindowStats] = field(default_factory=dict)
    last_success_at: datetime | None = None
    sampled: int = 0
    truncated: bool = False


def _recent_deliveries(endpoint_ids: Sequence[str], since: datetime, sample: int):  # noqa: ANN202 - a subquery
    """``(endpoint_id, id)`` of at most ``sample`` newest deliveries per endpoint created at or after ``since``."""
    members = []
    for endpoint_id in endpoint_ids:
        one = (select(Delivery.endpoint_id, Delivery.id)
               .where(Delivery.endpoint_id == endpoint_id, Delivery.created_at >= since)
               .order_by(Delivery.created_at.desc(), Delivery.id.desc()).limit(sample).subquery())
        members.append(select(one.c.endpoint_id, one.c.id))  # SQLite takes no LIMIT on a bare compound member
    return (members[0] if len(members) == 1 else union_all(*members)).subquery("recent")


async def endpoint_stats(store: Store, endpoint_ids: Sequence[str], *, now: datetime | None = None,
                         sample: int = SAMPLE_DELIVERIES) -> dict[str, EndpointStats]:
    """Success rate and latency p50/p99 of each endpoint's attempts over the last hour and day (see the module
    docstring for what is read). Raises ``ValueError`` for more than :data:`MAX_ENDPOINTS` endpoints."""
    if len(endpoint_ids) > MAX_ENDPOINTS:
        raise ValueError(f"endpoint_stats takes at most {MAX_ENDPOINTS} endpoints, got {len(endpoint_ids)}")
    result = {e: EndpointStats(e) for e in endpoint_ids}
    if not endpoint_ids:
        return result
    now = aware(now) or utcnow()
    day_ago = now - timedelta(seconds=DAY_S)
    recent = _recent_deliveries(endpoint_ids, day_ago, sample)
    stmt = (select(recent.c.endpoint_id, recent.c.id, Attempt.status_code, Attempt.duration_ms, Attempt.at)
            .select_from(recent)
            .outerjoin(Attempt, (Attempt.delivery_id == recent.c.id) & (Attempt.at >= day_ago)))
    async with store.session() as s:
        rows = (await s.execute(stmt)).all()
    deliveries: dict[str, set[str]] = defaultdict(set)
    attempts: dict[str, list[tuple[datetime, int | None, float]]] = defaultdict(list)
    for endpoint_id, delivery_id, code, duration_ms, at in rows:
        deliveries[endpoint_id].add(delivery_id)
        if at is not None:
            attempts[endpoint_id].append((aware(at), code, duration_ms))
    for endpoint_id, stats in result.items():
        mine = attempts[endpoint_id]
        windows = {w: WindowStats.of([(c, d) for at, c, d in mine if at >= now - timedelta(seconds=w)])
                   for w in WINDOWS_S}
        successes = [at for at, c, _ in mine if is_success(c)]
        result[endpoint_id] = EndpointStats(endpoint_id, windows, max(successes, default=None),
                                            len(deliveries[endpoint_id]), len(deliveries[endpoint_id]) >= sample)
    return result


def epoch_s(column, dialect: str) -> ColumnElement[int]:  # noqa: ANN001 - a DateTime column
    """Unix seconds (integer) of a timestamp column, on SQLite (stored as UTC text) or PostgreSQL."""
    if dialect == "sqlite":
        return cast(func.strftime("%s", column), Integer)
    return cast(func.floor(extract("epoch", column)), BigInteger)


@dataclass(frozen=True)
class Series:
    """Values per time bucket: bucket ``i`` covers ``[start + i * bucket_s, start + (i + 1) * bucket_s)``."""

    start: datetime
    bucket_s: int
    values: dict[str, list[float | None]]

    @property
    def buckets(self) -> int:
        return len(next(iter(self.values.values()), []))

    def bucket_start(self, i: int) -> datetime:
        return self.start + timedelta(seconds=i * self.bucket_s)


def _window(now: datetime | None, window_s: int, bucket_s: int) -> tuple[datetime, int, int]:
    """``(start, start as unix seconds, number of buckets)`` of the ``window_s`` seconds up to ``now``, the start
    aligned to a bucket boundary so a refresh moves the buckets by whole steps."""
    now = aware(now) or utcnow()
    n = math.ceil(window_s / bucket_s)
    end_s = (int(now.timestamp()) // bucket_s + 1) * bucket_s
    start_s = end_s - n * bucket_s
    return datetime.fromtimestamp(start_s, timezone.utc), start_s, n


def _deliveries_filter(endpoint_ids: Sequence[str] | None, where: ColumnElement[bool] | None,
                       since: datetime) -> list[ColumnElement[bool]]:
    """The conditions on ``deliveries`` shared by the series: created since ``since``, to ``endpoint_ids`` (None:
    any) and ``where`` (a caller's scope)."""
    conditions = [Delivery.created_at >= since]
    if endpoint_ids is not None:
        conditions.append(Delivery.endpoint_id.in_(list(endpoint_ids)))
    if where is not None:
        conditions.append(where)
    return conditions


async def outcome_series(store: Store, *, endpoint_ids: Sequence[str] | None = None,
                         where: ColumnElement[bool] | None = None, now: datetime | None = None,
                         window_s: int = DAY_S, bucket_s: int = 600) -> Series:
    """Deliveries per minute by outcome (``succeeded``, ``failed``, ``retrying``: pending or retrying; skipped
    ones are left out), per ``bucket_s``-second bucket of creation time over the last ``window_s`` seconds.
    One ``GROUP BY`` (bucket, status): at most buckets x 5 rows."""
    start, start_s, n = _window(now, window_s, bucket_s)
    bucket = (epoch_s(Delivery.created_at, store.engine.dialect.name) - start_s) // bucket_s
    stmt = (select(bucket.label("b"), Delivery.status, func.count())
            .where(*_deliveries_filter(endpoint_ids, where, start)).group_by(bucket, Delivery.status))
    values: dict[str, list[float | None]] = {o: [0.0] * n for o in ("succeeded", "retrying", "failed")}
    async with store.session() as s:
        for b, status, count in (await s.execute(stmt)).all():
            outcome = OUTCOMES.get(status)
            if outcome is not None and 0 <= b < n:
                values[outcome][b] += count * 60 / bucket_s
    return Series(start, bucket_s, values)


def _latency_class() -> ColumnElement[int]:
    return case(*((Attempt.duration_ms <= bound, i) for i, bound in enumerate(LATENCY_BOUNDS_MS)),
                else_=len(LATENCY_BOUNDS_MS))


def histogram_percentile(classes: dict[int, tuple[int, float]], q: float) -> float | None:
    """The ``q`` percentile of a latency histogram ``{class: (count, largest duration in ms)}``: the largest
    duration of the class holding the nearest rank (an upper bound within one class of the exact value)."""
    total = sum(count for count, _ in classes.values())
    if not total:
        return None
    rank, seen = max(1, math.ceil(q * total)), 0
    for cls in sorted(classes):
        count, largest = classes[cls]
        seen += count
        if seen >= rank:
            return largest
    return None  # unreachable: seen ends at total


async def latency_series(store: Store, *, endpoint_ids: Sequence[str] | None = None,
                         where: ColumnElement[bool] | None = None, now: datetime | None = None,
                         window_s: int = DAY_S, bucket_s: int = 600) -> Series:
    """Attempt latency p50 and p99 (milliseconds; None for a bucket without attempts) per ``bucket_s``-second
    bucket of attempt time over the last ``window_s`` seconds, for deliveries created in that window. One
    ``GROUP BY`` (bucket, latency class): at most buckets x (len(LATENCY_BOUNDS_MS) + 1) rows."""
    start, start_s, n = _window(now, window_s, bucket_s)
    bucket = (epoch_s(Attempt.at, store.engine.dialect.name) - start_s) // bucket_s
    latency_class = _latency_class()
    stmt = (select(bucket.label("b"), latency_class.label("c"), func.count(), func.max(Attempt.duration_ms))
            .join(Delivery, Delivery.id == Attempt.delivery_id)
            .where(Attempt.at >= start, *_deliveries_filter(endpoint_ids, where, start))
            .group_by(bucket, latency_class))
    histograms: dict[int, dict[int, tuple[int, float]]] = defaultdict(dict)
    async with store.session() as s:
        for b, cls, count, largest in (await s.execute(stmt)).all():
            if 0 <= b < n:
                histograms[b][cls] = (count, largest)
    values: dict[str, list[float | None]] = {
        "p50": [histogram_percentile(histograms.get(i, {}), 0.5) for i in range(n)],
        "p99": [histogram_percentile(histograms.get(i, {}), 0.99) for i in range(n)],
    }
    return Series(start, bucket_s, values)
