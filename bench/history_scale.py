"""Delivery history at scale (issue 11, "Bounded storage"), on SQLite and PostgreSQL.

For each database: a schema made by the migrations, ``--rows`` deliveries (default 10,000,000) spread over the last
31 days with about 1.2 attempts each, bulk-loaded (SQLite: ``executemany`` with the secondary indexes built after;
PostgreSQL: ``COPY`` through asyncpg, the same), then:

- **list**: the first page (50) of one agent's deliveries to its webhook, random agents, through
  ``dispatcher.store.queries.list_deliveries``; **deep page**: a page whose cursor is deep in an agent's history
  (90 % of the way); **status**: ``dispatcher.ops.status.endpoint_report`` (what ``/v1/status`` runs), p99 ms.
- **prune ratio**: records/s the ``HistoryWriter`` settles at a steady offered rate (``--rate``/s) while a
  ``HistoryPruner`` deletes the oldest day's rows (``--rows`` / 31 deliveries), over the same records/s measured
  without pruning; with the p99 of record-to-commit latency and the longest pruning batch (ms).
- **growth**: the history's on-disk size (SQLite: the file and its WAL; PostgreSQL: the two tables with their
  indexes and TOAST) over ``--growth-s`` seconds that insert at ``--rate``/s while pruning the same number of rows.

PostgreSQL: a database of its own (``bench_history`` on ``--postgres``, default ``LETTA_BUS_TEST_POSTGRES_URL``),
dropped at the end. Prints each database's figures, then one line
``RESULT list_p99_ms=.. deep_page_p99_ms=.. status_p99_ms=.. prune_ratio=.. db_growth_pct=..`` (the worse of the
two databases). Goals: the three p99 <= 50 ms, prune_ratio >= 0.9, growth about 0.

    .venv/bin/python bench/history_scale.py                 # 10,000,000 rows on each database
    .venv/bin/python bench/history_scale.py --rows 1000000 --only sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from config.settings import Settings  # noqa: E402
from dispatcher.ops.status import endpoint_report  # noqa: E402
from dispatcher.store import queries  # noqa: E402
from dispatcher.store.database import Store  # noqa: E402
from dispatcher.store.history import DeliveryRecord, HistoryWriter  # noqa: E402
from dispatcher.store.models import Attempt, Delivery  # noqa: E402
from dispatcher.store.retention import HistoryPruner  # noqa: E402
from dispatcher.store.secrets import SecretBox, generate_key  # noqa: E402

DAYS = 31  # the history spans 31 days; the retention is 30: the oldest day is due
BACKLOG = 20_000  # pending/retrying deliveries of 100 dead endpoints, created in the last 2 hours
DEAD_ENDPOINTS = 100
D_COLS = ("id", "event_id", "endpoint_id", "agent_id", "event_type", "status", "attempts", "last_status_code",
          "last_error", "event_seq", "replay_id", "created_at", "updated_at")
A_COLS = ("delivery_id", "number", "status_code", "duration_ms", "response_excerpt", "error", "at")


def p99(samples: list[float]) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * 0.99))] * 1000 if s else float("nan")


def rows(n: int, agents: int, now: datetime):
    """Yields ``(delivery tuple, [attempt tuples])``: uniform over DAYS, 0.5 % failed, every 10th with 3 attempts;
    then BACKLOG recent pending/retrying ones to DEAD_ENDPOINTS endpoints."""
    span = DAYS * 86400.0
    start = now - timedelta(seconds=span)
    step = span / max(n, 1)
    for i in range(n):
        at = start + timedelta(seconds=i * step)
        agent = i % agents
        failed = i % 200 == 0
        tries = 3 if i % 10 == 0 else 1
        d = (f"dlv_{i:012d}", f"evt_{i:012d}", f"ep_{agent:06d}", f"agent-{agent:06d}", "agent.step.completed",
             "failed" if failed else "succeeded", tries, 500 if failed else 200, "HTTP 500" if failed else None,
             i, None, at, at + timedelta(seconds=tries))
        yield d, [(d[0], k + 1, 500 if (failed or k < tries - 1) else 200, 12.5, "ok", None,
                   at + timedelta(seconds=k)) for k in range(tries)]
    for j in range(BACKLOG):
        at = now - timedelta(seconds=7200 * (BACKLOG - j) / BACKLOG)
        agent = j % DEAD_ENDPOINTS
        d = (f"dlv_b{j:011d}", f"evt_b{j:011d}", f"ep_{agent:06d}", f"agent-{agent:06d}", "agent.step.completed",
             "retrying" if j % 2 else "pending", j % 2, 503 if j % 2 else None, None, n + j, None, at, at)
        yield d, ([(d[0], 1, 503, 30000.0, None, "timeout", at)] if j % 2 else [])


def _sqlite_text(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")  # SQLAlchemy's SQLite DateTime form


SECONDARY = ("ix_deliveries_endpoint_created_id", "ix_deliveries_agent_created_id", "ix_deliveries_created_id",
             "ix_deliveries_backlog", "ix_deliveries_failed_updated", "ix_deliveries_failed_agent",
             "ix_deliveries_event_id", "ix_attempts_delivery_id")


def _index_ddl(dialect) -> list[str]:  # noqa: ANN001
    from sqlalchemy.schema import CreateIndex

    out = []
    for table in (Delivery.__table__, Attempt.__table__):
        for index in table.indexes:
            if index.name in SECONDARY:
                out.append(str(CreateIndex(index).compile(dialect=dialect)))
    return out


async def load_sqlite(path: str, store: Store, n: int, agents: int, now: datetime) -> None:
    ddl = _index_ddl(store.engine.dialect)
    await store.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-1000000")
    for name in SECONDARY:
        db.execute(f"DROP INDEX IF EXISTS {name}")
    d_sql = f"INSERT INTO deliveries ({', '.join(D_COLS)}) VALUES ({', '.join('?' * len(D_COLS))})"
    a_sql = f"INSERT INTO attempts ({', '.join(A_COLS)}) VALUES ({', '.join('?' * len(A_COLS))})"
    ds, ats = [], []
    for d, a in rows(n, agents, now):
        ds.append(d[:11] + (_sqlite_text(d[11]), _sqlite_text(d[12])))
        ats.extend(x[:6] + (_sqlite_text(x[6]),) for x in a)
        if len(ds) >= 200_000:
            db.executemany(d_sql, ds)
            db.executemany(a_sql, ats)
            ds, ats = [], []
    db.executemany(d_sql, ds)
    db.executemany(a_sql, ats)
    db.executemany("INSERT INTO endpoints (id, scope, agent_id, url, secret, events, enabled, created_at, updated_at)"
                   " VALUES (?, 'agent', ?, 'https://hooks.example.com/x', 'token', '[]', 1, ?, ?)",
                   [(f"ep_{a:06d}", f"agent-{a:06d}", _sqlite_text(now), _sqlite_text(now)) for a in range(agents)])
    db.commit()
    for statement in ddl:
        db.execute(statement)
    db.execute("ANALYZE")
    db.commit()
    db.execute("PRAGMA journal_mode=WAL")
    db.close()


async def load_postgres(url: str, store: Store, n: int, agents: int, now: datetime) -> None:
    import asyncpg

    ddl = _index_ddl(store.engine.dialect)
    await store.close()
    conn = await asyncpg.connect(make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        for name in SECONDARY:
            await conn.execute(f"DROP INDEX IF EXISTS {name}")
        ds, ats = [], []

        async def flush() -> None:
            await conn.copy_records_to_table("deliveries", records=ds, columns=D_COLS)
            await conn.copy_records_to_table("attempts", records=ats, columns=A_COLS)

        for d, a in rows(n, agents, now):
            ds.append(d)
            ats.extend(a)
            if len(ds) >= 200_000:
                await flush()
                ds, ats = [], []
        await flush()
        await conn.copy_records_to_table(
            "endpoints", columns=("id", "scope", "agent_id", "url", "secret", "events", "enabled", "created_at",
                                  "updated_at"),
            records=[(f"ep_{a:06d}", "agent", f"agent-{a:06d}", "https://hooks.example.com/x", "token", "[]", True,
                      now, now) for a in range(agents)])
        await conn.execute("SET maintenance_work_mem = '512MB'")
        for statement in ddl:
            await conn.execute(statement)
        await conn.execute("SELECT setval('attempts_id_seq', (SELECT max(id) FROM attempts))")
        await conn.execute("VACUUM ANALYZE deliveries")
        await conn.execute("VACUUM ANALYZE attempts")
        await conn.execute("ANALYZE endpoints")
    finally:
        await conn.close()


async def timed(calls, repeat: int) -> list[float]:
    out = []
    for i in range(repeat):
        t = time.perf_counter()
        await calls(i)
        out.append(time.perf_counter() - t)
    return out


async def query_figures(store: Store, n: int, agents: int, repeat: int) -> dict[str, float]:
    rnd = random.Random(7)
    picks = [rnd.randrange(DEAD_ENDPOINTS, agents) for _ in range(repeat)]
    per_agent = (n + agents - 1) // agents
    cursors = []
    async with store.session() as s:  # deep cursors, 90 % into an agent's history (not timed)
        for a in picks:
            row = (await s.execute(
                select(Delivery.created_at, Delivery.id).where(Delivery.agent_id == f"agent-{a:06d}")
                .order_by(Delivery.created_at.desc(), Delivery.id.desc()).limit(1).offset(int(per_agent * 0.9))
            )).one()
            cursors.append(queries.encode_cursor(Delivery(created_at=row[0], id=row[1])))

    async def first(i: int) -> None:
        a = picks[i]
        page, _ = await queries.list_deliveries(store, agent_id=f"agent-{a:06d}", endpoint_id=f"ep_{a:06d}", limit=50)
        assert len(page) == 50

    async def deep(i: int) -> None:
        a = picks[i]
        page, _ = await queries.list_deliveries(store, agent_id=f"agent-{a:06d}", endpoint_id=f"ep_{a:06d}",
                                                cursor=cursors[i], limit=50)
        assert page

    async def status(_: int) -> None:
        report = await endpoint_report(store, None)
        assert report["endpoint_totals"]["backlog"] >= BACKLOG * 0.9

    await first(0), await deep(0), await status(0)  # warm
    return {"list_p99_ms": p99(await timed(first, repeat)), "deep_page_p99_ms": p99(await timed(deep, repeat)),
            "status_p99_ms": p99(await timed(status, max(20, repeat // 5)))}


class Steady:
    """Offers ``rate`` attempt records per second to a HistoryWriter; counts those settled and their latency."""

    def __init__(self, writer: HistoryWriter, rate: int, agents: int, prefix: str) -> None:
        self.writer, self.rate, self.agents, self.prefix = writer, rate, agents, prefix
        self.sent = self.settled = 0
        self.latency: list[float] = []

    async def run(self, stop: asyncio.Event) -> None:
        tick = 0.01
        started = time.perf_counter()
        while not stop.is_set():
            due = int((time.perf_counter() - started) * self.rate)
            while self.sent < due:
                self._one()
            await asyncio.sleep(tick)

    def _one(self) -> None:
        i = self.sent
        self.sent += 1
        t = time.perf_counter()
        agent = i % self.agents

        async def then() -> None:
            self.settled += 1
            self.latency.append(time.perf_counter() - t)

        self.writer.add(DeliveryRecord(
            delivery_id=f"dlv_{self.prefix}{i:010d}", event_id=f"evt_{self.prefix}{i:010d}",
            endpoint_id=f"ep_{agent:06d}", agent_id=f"agent-{agent:06d}", event_type="agent.step.completed",
            status="succeeded", attempt=1, status_code=200, duration_ms=10.0, then=then))


async def writer_rate(store: Store, rate: int, agents: int, prefix: str, seconds: float | None,
                      during=None) -> tuple[float, float]:  # noqa: ANN001
    """Records/s settled (and p99 record-to-commit latency, ms) over ``seconds``, or while ``during`` runs."""
    writer = HistoryWriter(store, flush_s=0.05, batch=1000, pending_hold_s=0)
    writer.start()
    steady = Steady(writer, rate, agents, prefix)
    stop = asyncio.Event()
    offer = asyncio.create_task(steady.run(stop))
    await asyncio.sleep(1.0)  # warm up
    settled0, t0 = steady.settled, time.perf_counter()
    lat0 = len(steady.latency)
    if during is not None:
        await during
    else:
        await asyncio.sleep(seconds)
    settled, elapsed = steady.settled - settled0, time.perf_counter() - t0
    latency = steady.latency[lat0:]
    stop.set()
    await offer
    await writer.stop()
    return settled / elapsed, p99(latency)


async def size_of(store: Store, path: str | None) -> int:
    if path is not None:
        return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    async with store.engine.connect() as conn:
        return int((await conn.execute(text(
            "SELECT pg_total_relation_size('deliveries') + pg_total_relation_size('attempts')"))).scalar())


async def bench_one(name: str, url: str, path: str | None, args) -> dict[str, float]:  # noqa: ANN001
    now = datetime.now(timezone.utc)
    store = Store(url, secret_box=SecretBox([generate_key()]))
    await store.upgrade_schema()
    t = time.perf_counter()
    await (load_sqlite(path, store, args.rows, args.agents, now) if path else
           load_postgres(url, store, args.rows, args.agents, now))
    load_s = time.perf_counter() - t
    store = Store(url, secret_box=SecretBox([generate_key()]))
    figures: dict[str, float] = {"load_s": load_s}
    print(f"[{name}] loaded {args.rows:,} deliveries (+{BACKLOG:,} backlog) with attempts in {load_s:.0f} s; "
          f"{await size_of(store, path) / 2**30:.2f} GiB", flush=True)
    figures.update(await query_figures(store, args.rows, args.agents, args.repeat))
    print(f"[{name}] list p99 {figures['list_p99_ms']:.1f} ms, deep page p99 {figures['deep_page_p99_ms']:.1f} ms, "
          f"status p99 {figures['status_p99_ms']:.1f} ms", flush=True)

    settings = Settings(_env_file=None, history_retention_days=30, history_prune_batch=args.prune_batch,
                        history_prune_pause_s=args.prune_pause_s)
    base_rate, base_lat = await writer_rate(store, args.rate, args.agents, "base", args.baseline_s)
    pruner = HistoryPruner(store, settings)
    pruned: list[int] = []

    async def prune_a_day() -> None:
        t = time.perf_counter()
        pruned.append(await pruner.prune_once(now=now))  # the oldest of the 31 days is due
        took.append(time.perf_counter() - t)

    async def prune_window() -> None:  # the pruning round, measured over at least --baseline-s seconds
        await asyncio.gather(prune_a_day(), asyncio.sleep(args.baseline_s))

    took: list[float] = []

    prune_rate, prune_lat = await writer_rate(store, args.rate, args.agents, "prune", None, prune_window())
    prune_s = took[0]
    figures.update(prune_ratio=prune_rate / base_rate, pruned=pruned[0], prune_s=prune_s,
                   longest_batch_ms=pruner.last_longest_batch_s * 1000)
    print(f"[{name}] writer at {args.rate}/s offered: {base_rate:.0f}/s settled (commit p99 {base_lat:.0f} ms) "
          f"without pruning; {prune_rate:.0f}/s (commit p99 {prune_lat:.0f} ms) while pruning {pruned[0]:,} "
          f"deliveries (a day) in {prune_s:.1f} s, longest batch {figures['longest_batch_ms']:.0f} ms; ratio "
          f"{figures['prune_ratio']:.3f}", flush=True)

    # growth: insert at `rate`/s and prune as many: the retention cut-off moves so that `rate` old rows/s are due
    per_second_old = args.rows / (DAYS * 86400.0)
    speed = args.rate / per_second_old  # virtual seconds of old history per real second
    before = await size_of(store, path)
    start_virtual = now + timedelta(days=1)  # the first day is gone already
    started = time.perf_counter()
    stop = asyncio.Event()
    deleted = [0]

    async def keep_pruning() -> None:
        while not stop.is_set():
            virtual = start_virtual + timedelta(seconds=(time.perf_counter() - started) * speed)
            deleted[0] += await pruner.prune_once(now=virtual)
            await asyncio.sleep(1.0)

    pruning = asyncio.create_task(keep_pruning())

    sizes: list[int] = []

    async def until_done() -> None:  # a warm-up of --growth-s (WAL, free pages, autovacuum), then measured as long
        await asyncio.sleep(args.growth_s)
        sizes.append(await size_of(store, path))
        await asyncio.sleep(args.growth_s)

    growth_rate, _ = await writer_rate(store, args.rate, args.agents, "grow", None, until_done())
    stop.set()
    await pruning
    warm, after = sizes[0], await size_of(store, path)
    print(f"[{name}] size before inserting and pruning {before / 2**20:.0f} MiB, after the warm-up "
          f"{warm / 2**20:.0f} MiB", flush=True)
    before = warm
    figures["db_growth_pct"] = (after - before) / before * 100
    print(f"[{name}] {2 * args.growth_s:.0f} s inserting {growth_rate:.0f}/s and pruning {deleted[0]:,} deliveries: "
          f"{before / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB ({figures['db_growth_pct']:+.2f} %)", flush=True)
    await store.close()
    return figures


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="deliveries loaded (default 10,000,000)")
    ap.add_argument("--agents", type=int, default=10_000, help="agents, one webhook each (default 10,000)")
    ap.add_argument("--rate", type=int, default=2000, help="records/s offered to the history writer")
    ap.add_argument("--repeat", type=int, default=200, help="samples per query")
    ap.add_argument("--baseline-s", type=float, default=20.0, help="seconds of writing without pruning")
    ap.add_argument("--growth-s", type=float, default=60.0,
                    help="seconds of inserting and pruning together, twice: a warm-up, then the measured half")
    ap.add_argument("--prune-batch", type=int, default=1000)
    ap.add_argument("--prune-pause-s", type=float, default=0.05)
    ap.add_argument("--only", choices=("sqlite", "postgres"))
    ap.add_argument("--postgres", default=os.environ.get("LETTA_BUS_TEST_POSTGRES_URL",
                                                         "postgresql+asyncpg://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--dir", default=None, help="directory of the SQLite file (default: a temporary one)")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    if args.only in (None, "sqlite"):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            path = f"{tmp}/history.db"
            results["sqlite"] = await bench_one("sqlite", f"sqlite+aiosqlite:///{path}", path, args)
    if args.only in (None, "postgres"):
        import asyncpg

        base = make_url(args.postgres)
        admin = await asyncpg.connect(base.set(drivername="postgresql").render_as_string(hide_password=False))
        await admin.execute("DROP DATABASE IF EXISTS bench_history WITH (FORCE)")
        await admin.execute("CREATE DATABASE bench_history")
        try:
            url = base.set(database="bench_history").render_as_string(hide_password=False)
            results["postgres"] = await bench_one("postgres", url, None, args)
        finally:
            await admin.execute("DROP DATABASE IF EXISTS bench_history WITH (FORCE)")
            await admin.close()
    for name, f in results.items():
        print(f"{name}: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in f.items()))
    keys = ("list_p99_ms", "deep_page_p99_ms", "status_p99_ms", "db_growth_pct")
    worst = {k: max(f[k] for f in results.values()) for k in keys}
    ratio = min(f["prune_ratio"] for f in results.values())
    print(f"RESULT list_p99_ms={worst['list_p99_ms']:.1f} deep_page_p99_ms={worst['deep_page_p99_ms']:.1f} "
          f"status_p99_ms={worst['status_p99_ms']:.1f} prune_ratio={ratio:.3f} "
          f"db_growth_pct={worst['db_growth_pct']:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
