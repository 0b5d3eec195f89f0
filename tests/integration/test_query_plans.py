"""The queries behind the history API, ``/v1/status`` and retention pruning walk an index of ``deliveries``, never
the whole table, on SQLite and PostgreSQL (issue 11, "Bounded storage").

Each query function is run for real; the SQL it sent is captured from the engine and explained with the same
parameters: ``EXPLAIN QUERY PLAN`` on SQLite (a ``SEARCH ... USING [COVERING] INDEX <name>`` and no ``SCAN
deliveries`` except over a named partial index), ``EXPLAIN`` on PostgreSQL with ``enable_seqscan`` off (the planner
then still falls back to a ``Seq Scan`` when no index fits, so a missing index shows) and the index named.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlalchemy import event

from dispatcher.store import queries
from dispatcher.store.database import Store
from dispatcher.store.models import utcnow
from dispatcher.store.retention import HistoryPruner
from dispatcher.store.secrets import SecretBox, generate_key


@pytest.fixture
async def store(db_url):
    s = Store(db_url, secret_box=SecretBox([generate_key()]))
    await s.upgrade_schema()
    now = utcnow()
    rows = [dict(id=f"dlv_{i:04d}", event_id=f"evt_{i}", endpoint_id=f"ep_{i % 3}", agent_id=f"agent-{i % 3}",
                 event_type="agent.step.completed", status=("succeeded", "failed", "pending")[i % 3], attempts=1,
                 created_at=now - timedelta(minutes=i), updated_at=now - timedelta(minutes=i)) for i in range(60)]
    await queries.add_pending(s, rows)
    yield s
    await s.close()


class Captured:
    """The statements an engine sent, with their parameters (``before_cursor_execute``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.sent: list[tuple[str, object]] = []
        event.listen(store.engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        self.sent.append((statement, parameters))

    def close(self) -> None:
        if event.contains(self.store.engine.sync_engine, "before_cursor_execute", self._seen):
            event.remove(self.store.engine.sync_engine, "before_cursor_execute", self._seen)

    async def plans(self, keep=lambda sql: "deliveries" in sql) -> list[tuple[str, str]]:
        """``(statement, plan text)`` of each captured statement ``keep`` selects."""
        self.close()
        out = []
        async with self.store.engine.connect() as conn:
            if not self.store.is_sqlite:
                await conn.exec_driver_sql("SET enable_seqscan = off")
            for sql, params in self.sent:
                if not keep(sql):
                    continue
                prefix = "EXPLAIN QUERY PLAN " if self.store.is_sqlite else "EXPLAIN "
                result = await conn.exec_driver_sql(prefix + sql, params)
                lines = [str(row[-1]) for row in result]
                out.append((sql, "\n".join(lines)))
            await conn.rollback()
        return out


async def _plans(store: Store, call, keep=lambda sql: "deliveries" in sql) -> list[str]:
    captured = Captured(store)
    try:
        await call()
    finally:
        captured.close()
    found = await captured.plans(keep)
    assert found, "no statement captured"
    return [plan for _, plan in found]


def _assert_index(store: Store, plan: str, *indexes: str) -> None:
    """``plan`` reads one of ``indexes`` and scans no more of ``deliveries`` than a partial index."""
    if store.is_sqlite:
        assert any(re.search(rf"INDEX {index}\b", plan) for index in indexes), plan
        for line in plan.splitlines():
            if "deliveries" in line and line.strip().startswith("SCAN"):
                # a scan is bounded only over a partial index (its rows are the backlog or the failures)
                assert "USING" in line and ("backlog" in line or "failed" in line), plan
    else:
        assert "Seq Scan on deliveries" not in plan, plan
        assert any(index in plan for index in indexes), plan


async def test_listing_one_agent_first_and_deep_page(store):
    page, cursor = await queries.list_deliveries(store, agent_id="agent-1", limit=5)
    assert cursor is not None
    for _ in range(2):  # a deeper page
        _, cursor = await queries.list_deliveries(store, agent_id="agent-1", cursor=cursor, limit=5)
    assert cursor is not None
    [first] = await _plans(store, lambda: queries.list_deliveries(store, agent_id="agent-1", limit=5))
    _assert_index(store, first, "ix_deliveries_agent_created_id")
    [deep] = await _plans(store, lambda: queries.list_deliveries(store, agent_id="agent-1", cursor=cursor, limit=5))
    _assert_index(store, deep, "ix_deliveries_agent_created_id")
    if store.is_sqlite:  # the index answers both the cursor range and the order: no sort
        assert "(created_at,id)<(?,?)" in deep.replace(" ", "") and "TEMP B-TREE" not in deep, deep
    else:
        assert "Sort" not in deep, deep


async def test_listing_one_endpoint_and_the_other_filters(store):
    _, cursor = await queries.list_deliveries(store, endpoint_id="ep_1", limit=5)
    [plan] = await _plans(store, lambda: queries.list_deliveries(store, agent_id="agent-1", endpoint_id="ep_1",
                                                                 cursor=cursor, limit=5))
    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan
    _assert_index(store, plan, "ix_deliveries_endpoint_created_id", "ix_deliveries_agent_created_id")
    since = utcnow() - timedelta(hours=1)
    [plan] = await _plans(store, lambda: queries.list_deliveries(
        store, agent_id="agent-1", status="failed", event_type="agent.step.completed", since=since,
        until=utcnow(), cursor=cursor, limit=5))
    _assert_index(store, plan, "ix_deliveries_agent_created_id", "ix_deliveries_failed_agent")
    [plan] = await _plans(store, lambda: queries.list_deliveries(store, endpoint_id="ep_2", limit=5))
    _assert_index(store, plan, "ix_deliveries_endpoint_created_id")


async def test_one_delivery_and_its_attempts(store):
    plans = await _plans(store, lambda: queries.get_delivery(store, "dlv_0001"),
                         keep=lambda sql: "deliveries" in sql or "attempts" in sql)
    assert len(plans) == 2
    if store.is_sqlite:
        assert "SEARCH deliveries USING INDEX sqlite_autoindex_deliveries_1 (id=?)" in plans[0], plans[0]
        assert "SEARCH attempts USING INDEX ix_attempts_delivery_id (delivery_id=?)" in plans[1], plans[1]
    else:
        assert "deliveries_pkey" in plans[0] and "ix_attempts_delivery_id" in plans[1], plans


async def test_failed_deliveries_for_retry_failed(store):
    since = utcnow() - timedelta(days=1)
    [plan] = await _plans(store, lambda: queries.failed_deliveries(store, agent_id="agent-1", since=since,
                                                                   endpoint_ids=["ep_1"]))
    _assert_index(store, plan, "ix_deliveries_failed_agent")


async def test_status_queries_read_the_partial_indexes(store):
    stats = await queries.endpoint_stats(store, limit=10)
    assert stats["ep_2"]["backlog"] == 20 and stats["ep_1"]["failed"] == 20
    assert await queries.history_totals(store) == {"backlog": 20, "failed": 20}
    failed_indexes = ("ix_deliveries_failed_updated", "ix_deliveries_failed_agent")  # both hold failed rows only
    for call in (lambda: queries.endpoint_stats(store, limit=10), lambda: queries.history_totals(store)):
        backlog, failed = await _plans(store, call)
        _assert_index(store, backlog, "ix_deliveries_backlog")
        _assert_index(store, failed, *failed_indexes)


async def test_pruning_walks_the_created_at_index(store):
    from config.settings import Settings

    pruner = HistoryPruner(store, Settings(history_retention_days=1, history_prune_batch=10))
    plans = await _plans(store, lambda: pruner.prune_once(now=utcnow() + timedelta(days=1, minutes=30)),
                         keep=lambda sql: sql.lstrip().upper().startswith("DELETE"))
    deliveries = [p for p in plans if "ix_deliveries_created_id" in p or "deliveries" in p]
    assert deliveries
    for plan in plans:
        if store.is_sqlite:
            assert not any(line.strip().startswith("SCAN") for line in plan.splitlines()), plan
        else:
            assert "Seq Scan" not in plan, plan
    assert any("ix_deliveries_created_id" in p for p in plans), plans
