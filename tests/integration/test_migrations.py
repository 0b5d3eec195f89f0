"""Alembic migrations create exactly the schema of dispatcher/store/models.py, on SQLite and PostgreSQL, upgrade a
database made by create_schema before migrations existed, and go down and up again."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from dispatcher.store.migrate import alembic_config, current_revision, head_revision, upgrade
from dispatcher.store.models import Base


def _diffs(connection) -> list:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return compare_metadata(context, Base.metadata)


async def test_migrated_schema_equals_the_models(db_url):
    engine = create_async_engine(db_url)
    try:
        assert await current_revision(engine) is None
        assert await upgrade(engine) == head_revision() == "0005"
        async with engine.connect() as conn:
            assert await conn.run_sync(_diffs) == []
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            columns = await conn.run_sync(lambda c: {col["name"] for col in inspect(c).get_columns("deliveries")})
        assert {"endpoints", "deliveries", "attempts", "alembic_version"} <= tables
        assert {"event_seq", "replay_id"} <= columns
        assert await upgrade(engine) == head_revision()  # idempotent
    finally:
        await engine.dispose()


async def test_a_database_from_create_schema_is_adopted_and_upgraded(db_url):
    """Made by Store.create_schema with the first release's tables (no alembic_version, none of what 0002 and later add): stamped
    at 0001, then upgraded; rows survive."""
    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.execute(text("DROP INDEX ix_endpoints_updated_id"))  # what 0003 adds
            await conn.execute(text("DROP TABLE endpoint_tombstones"))
            for table in ("api_keys", "portal_sessions"):  # what 0005 adds
                await conn.execute(text(f"DROP TABLE {table}"))
            for name in ("ix_deliveries_endpoint_created_id", "ix_deliveries_agent_created_id",  # and 0004
                         "ix_deliveries_created_id", "ix_deliveries_backlog", "ix_deliveries_failed_updated",
                         "ix_deliveries_failed_agent"):
                await conn.execute(text(f"DROP INDEX {name}"))
            # the first release's indexes that 0004 replaces
            await conn.execute(text("CREATE INDEX ix_deliveries_agent_id ON deliveries (agent_id)"))
            await conn.execute(text(
                "CREATE INDEX ix_deliveries_endpoint_created ON deliveries (endpoint_id, created_at)"))
            await conn.execute(text(
                "INSERT INTO deliveries (id, event_id, endpoint_id, agent_id, event_type, status, attempts, "
                "created_at, updated_at) VALUES ('dlv_1', 'evt_1', 'ep_1', 'agent-1', 'agent.step.completed', "
                "'succeeded', 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        assert await upgrade(engine) == head_revision()
        async with engine.connect() as conn:
            assert await conn.run_sync(_diffs) == []
            assert (await conn.execute(text("SELECT count(*) FROM deliveries"))).scalar() == 1
    finally:
        await engine.dispose()


async def test_downgrade_to_base_and_up_again(db_url):
    from alembic import command

    engine = create_async_engine(db_url)
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0001"))
        assert await current_revision(engine) == "0001"
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "base"))
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert not {"endpoints", "deliveries", "attempts"} & tables
        assert await upgrade(engine) == head_revision()
        async with engine.connect() as conn:
            assert await conn.run_sync(_diffs) == []
    finally:
        await engine.dispose()


async def test_a_database_from_todays_create_schema_is_adopted_as_current(tmp_path):
    """create_schema builds the current models; migrating it afterwards (as `letta-bus up` does) must not try to
    create what is there already."""
    from dispatcher.store.database import Store
    from dispatcher.store.migrate import head_revision
    from dispatcher.store.secrets import SecretBox, generate_key

    store = Store(f"sqlite+aiosqlite:///{tmp_path}/today.db", secret_box=SecretBox([generate_key()]))
    try:
        await store.create_schema()
        assert await store.upgrade_schema() == head_revision()
        assert await store.upgrade_schema() == head_revision()
    finally:
        await store.close()


async def test_attempt_ids_become_64_bit_on_postgres(postgres_url):
    """0003 on a PostgreSQL database at 0002 with attempts: the column and its sequence become bigint, the rows
    stay, and the history writer stores attempts with ids past 2**31 (a 32-bit SERIAL stops there: setval on it
    is refused, as checked at 0002)."""
    import asyncio

    from dispatcher.store.database import Store
    from dispatcher.store.history import DeliveryRecord, HistoryWriter
    from dispatcher.store.secrets import SecretBox, generate_key

    engine = create_async_engine(postgres_url)
    type_sql = text("SELECT data_type FROM information_schema.columns WHERE table_name = 'attempts' "
                    "AND column_name = 'id'")
    seq_sql = text("SELECT data_type::text FROM pg_sequences WHERE sequencename = 'attempts_id_seq'")
    try:
        assert await upgrade(engine, "0002") == "0002"
        async with engine.begin() as conn:
            for n in (1, 2, 3):
                await conn.execute(text(
                    "INSERT INTO attempts (delivery_id, number, status_code, duration_ms, error, at) "
                    "VALUES ('dlv_1', :n, 500, 1.5, 'boom', CURRENT_TIMESTAMP)"), {"n": n})
        async with engine.connect() as conn:
            assert (await conn.execute(type_sql)).scalar() == "integer"
            assert (await conn.execute(seq_sql)).scalar() == "integer"
            with pytest.raises(Exception, match="out of bounds|reached maximum"):
                await conn.execute(text("SELECT setval('attempts_id_seq', 2147483648)"))
        assert await upgrade(engine) == head_revision()
        async with engine.begin() as conn:
            assert (await conn.execute(type_sql)).scalar() == "bigint"
            assert (await conn.execute(seq_sql)).scalar() == "bigint"
            rows = (await conn.execute(text("SELECT id, number, status_code, error FROM attempts ORDER BY id"))).all()
            assert [tuple(r) for r in rows] == [(1, 1, 500, "boom"), (2, 2, 500, "boom"), (3, 3, 500, "boom")]
            await conn.execute(text("SELECT setval('attempts_id_seq', 2147483652)"))  # 2**31 + 4
    finally:
        await engine.dispose()

    store = Store(postgres_url, secret_box=SecretBox([generate_key()]))
    writer = HistoryWriter(store, flush_s=0.01, pending_hold_s=0)
    written = asyncio.Event()

    async def then() -> None:
        written.set()

    writer.start()
    try:
        writer.add(DeliveryRecord(delivery_id="dlv_2", event_id="evt_2", endpoint_id="ep_1", agent_id="agent-1",
                                  event_type="agent.step.completed", status="succeeded", attempt=1, status_code=200,
                                  then=then))
        await asyncio.wait_for(written.wait(), 10)
        await writer.stop()
        assert writer.refused == writer.lost == 0
        async with store.engine.connect() as conn:
            ids = (await conn.execute(text("SELECT id FROM attempts WHERE delivery_id = 'dlv_2'"))).scalars().all()
        assert ids == [2**31 + 5]
    finally:
        await store.close()
