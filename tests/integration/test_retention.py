"""History retention (issue 11, "Bounded storage"): deliveries older than ``history_retention_days`` go with their
attempts, in bounded batches, on SQLite and PostgreSQL, while the history writer keeps writing; newer rows, and
unfinished deliveries whose task may still come, stay; endpoint tombstones older than a day go."""

from __future__ import annotations

import asyncio
import math
from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select, text

from config.settings import Settings
from dispatcher.store.database import Store
from dispatcher.store.history import DeliveryRecord, HistoryWriter
from dispatcher.store.models import Attempt, Delivery, EndpointTombstone, utcnow
from dispatcher.store.retention import HistoryPruner
from dispatcher.store.secrets import SecretBox, generate_key
from tests.helpers import wait_until


@pytest.fixture
async def store(db_url):
    s = Store(db_url, secret_box=SecretBox([generate_key()]))
    await s.upgrade_schema()
    yield s
    await s.close()


def _settings(**kw) -> Settings:
    base = dict(history_retention_days=30, history_prune_batch=7, history_prune_interval_s=0.05,
                history_prune_pause_s=0.0, events_max_age_s=7 * 86400)
    return Settings(_env_file=None, **{**base, **kw})


async def _add(store: Store, prefix: str, n: int, age: timedelta, status: str = "succeeded",
               touched: timedelta | None = None, attempts: int = 2) -> None:
    now = utcnow()
    rows = [dict(id=f"{prefix}{i:05d}", event_id=f"evt_{prefix}{i}", endpoint_id="ep_1", agent_id="agent-1",
                 event_type="agent.step.completed", status=status, attempts=attempts,
                 created_at=now - age - timedelta(seconds=i), updated_at=now - (touched or age))
            for i in range(n)]
    tries = [dict(delivery_id=r["id"], number=k + 1, status_code=200, duration_ms=1.0, at=r["created_at"])
             for r in rows for k in range(attempts)]
    async with store.session.begin() as s:
        await s.execute(insert(Delivery), rows)
        if tries:
            await s.execute(insert(Attempt), tries)


async def _ids(store: Store) -> set[str]:
    async with store.session() as s:
        return set((await s.execute(select(Delivery.id))).scalars())


async def _attempt_owners(store: Store) -> set[str]:
    async with store.session() as s:
        return set((await s.execute(select(Attempt.delivery_id))).scalars())


async def test_old_history_goes_with_its_attempts_in_bounded_batches(store):
    day = timedelta(days=1)
    await _add(store, "old_", 40, 31 * day)  # finished, past the retention
    await _add(store, "oldfail_", 5, 40 * day, status="failed")
    await _add(store, "new_", 10, 29 * day)  # within it
    # unfinished and past the retention: kept while its task may still come (touched within LETTA_WEBHOOKS'
    # max_age, 2 x events_max_age_s = 14 days), pruned once nothing can finish it
    await _add(store, "waiting_", 3, 31 * day, status="retrying", touched=day)
    await _add(store, "stale_", 4, 31 * day, status="pending", touched=15 * day, attempts=0)
    now = utcnow()
    async with store.session.begin() as s:
        s.add_all([EndpointTombstone(endpoint_id="ep_gone_old", deleted_at=now - timedelta(hours=25)),
                   EndpointTombstone(endpoint_id="ep_gone_new", deleted_at=now - timedelta(hours=1))])

    pruner = HistoryPruner(store, _settings())
    deleted = await pruner.prune_once()

    assert deleted == 40 + 5 + 4
    assert pruner.last_batches == math.ceil(49 / 7)  # at most history_prune_batch deliveries per transaction
    left = await _ids(store)
    assert left == {f"new_{i:05d}" for i in range(10)} | {f"waiting_{i:05d}" for i in range(3)}
    assert await _attempt_owners(store) == left  # the deleted deliveries' attempts are gone, the others' kept
    async with store.session() as s:
        assert set((await s.execute(select(EndpointTombstone.endpoint_id))).scalars()) == {"ep_gone_new"}
        assert (await s.execute(select(func.count()).select_from(Attempt))).scalar() == 2 * 13
    assert await pruner.prune_once() == 0  # nothing due any more


async def test_the_history_writer_keeps_writing_while_pruning(store):
    await _add(store, "old_", 600, timedelta(days=31), attempts=1)
    writer = HistoryWriter(store, flush_s=0.005, batch=100, pending_hold_s=0)
    writer.start()
    settled: list[float] = []
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    async def deliver() -> int:
        n = 0
        while not stop.is_set():
            async def then() -> None:
                settled.append(loop.time())
            writer.add(DeliveryRecord(delivery_id=f"live_{n:05d}", event_id=f"evt_live_{n}", endpoint_id="ep_1",
                                      agent_id="agent-1", event_type="agent.step.completed", status="succeeded",
                                      attempt=1, status_code=200, then=then))
            n += 1
            await asyncio.sleep(0.002)
        return n

    sending = asyncio.create_task(deliver())
    await wait_until(lambda: len(settled) >= 5, 10, what="the writer writing before pruning")
    pruner = HistoryPruner(store, _settings(history_prune_batch=20, history_prune_pause_s=0.01))
    started = loop.time()
    assert await pruner.prune_once() == 600
    ended = loop.time()
    stop.set()
    sent = await sending
    await writer.stop()

    assert pruner.last_batches == 30
    during = [t for t in settled if started <= t <= ended]
    assert len(during) >= 3, (len(during), ended - started)  # writes committed between the pruning batches
    assert len(settled) == sent and writer.lost == writer.refused == 0
    left = await _ids(store)
    assert left == {f"live_{i:05d}" for i in range(sent)}
    assert await _attempt_owners(store) == left


async def test_run_logs_a_failing_round_and_keeps_going(tmp_path, caplog):
    store = Store(f"sqlite+aiosqlite:///{tmp_path}/empty.db", secret_box=SecretBox([generate_key()]))
    pruner = HistoryPruner(store, _settings(history_prune_interval_s=0.02))
    task = asyncio.create_task(pruner.run())
    try:
        await wait_until(lambda: pruner.errors >= 2, 10, what="rounds failing on a database without tables")
        assert not task.done() and "history pruning failed" in caplog.text
        await store.create_schema()
        await _add(store, "old_", 3, timedelta(days=31))
        errors = pruner.errors

        async def pruned() -> bool:
            return not await _ids(store)

        await wait_until(pruned, 10, what="a round pruning once the tables exist")
        assert pruner.errors <= errors + 1  # (one round may have been failing as the tables came)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.close()


async def test_without_autovacuum_the_pruner_vacuums_postgres_itself(postgres_url):
    """PostgreSQL reuses pruned space only after a VACUUM. This project's servers run with autovacuum off, where
    the history grew by all it inserted (bench/history_scale.py); the pruner then vacuums the two tables itself."""
    store = Store(postgres_url, secret_box=SecretBox([generate_key()]))
    try:
        await store.upgrade_schema()
        await _add(store, "old_", 30, timedelta(days=31))
        pruner = HistoryPruner(store, _settings(history_prune_batch=10))
        pruner.vacuum_after_rows = 20
        async with store.engine.connect() as conn:
            autovacuum = (await conn.execute(text("SHOW autovacuum"))).scalar() == "on"
        assert await pruner.prune_once() == 30
        async with store.engine.connect() as conn:
            vacuumed = (await conn.execute(text(
                "SELECT last_vacuum IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'deliveries'"))).scalar()
        if autovacuum:  # the server's autovacuum takes care of it: no VACUUM of the pruner's own
            assert pruner.vacuums == 0 and not vacuumed
        else:
            assert pruner.vacuums == 1 and vacuumed and pruner._unvacuumed == 0  # noqa: SLF001
    finally:
        await store.close()
