"""Schema migrations (Alembic; scripts in ``dispatcher/store/migrations``) applied from Python, on SQLite and
PostgreSQL.

``letta-bus up`` calls :func:`upgrade` before starting the dispatcher. A database created before migrations
existed, or by ``Store.create_schema`` (tables but no ``alembic_version``), is stamped first: with the newest
revision when it already matches the models, else with the initial one, and then upgraded. On PostgreSQL the upgrade holds a transaction-scoped advisory lock, so several processes starting
at once migrate one after the other instead of racing.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from dispatcher.store.models import Base

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
INITIAL_REVISION = "0001"
_PG_LOCK_KEY = 0x1E77A_B05  # pg_advisory_xact_lock key of letta-bus migrations (any constant)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` for the packaged scripts; ``connection`` (sync, from ``run_sync``) is used by
    ``migrations/env.py`` instead of opening its own engine."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest revision of the packaged scripts, e.g. ``"0002"``."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _upgrade(connection: Connection, revision: str) -> str | None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    cfg = alembic_config(connection)
    tables = set(inspect(connection).get_table_names())
    if "alembic_version" not in tables and "endpoints" in tables:
        # made by create_schema: from the current models (nothing to compare differs) or an earlier release's
        current = not compare_metadata(MigrationContext.configure(connection), Base.metadata)
        command.stamp(cfg, "head" if current else INITIAL_REVISION)
    command.upgrade(cfg, revision)
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> str | None:
    """Bring the database to ``revision`` (default: the newest) in one transaction; returns the revision it is
    at afterwards. Idempotent. Raises ``sqlalchemy.exc.SQLAlchemyError`` when the database refuses a step (nothing
    is applied then on PostgreSQL; SQLite commits DDL per statement where it must)."""
    async with engine.begin() as conn:
        return await conn.run_sync(_upgrade, revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    async with engine.connect() as conn:
        return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
