"""Indexes for bounded history (issue 11): every query of the history API, ``/v1/status`` and retention pruning
walks an index instead of scanning ``deliveries``.

- ``(agent_id, created_at, id)`` and ``(endpoint_id, created_at, id)`` replace ``(agent_id, created_at)`` and
  ``(endpoint_id, created_at)``: the listings order by ``(created_at, id)`` and page with the row-value cursor
  ``(created_at, id) < (:at, :id)``, which these indexes answer without sorting. ``ix_deliveries_agent_id`` goes:
  the composite index's prefix serves it, and one index less is one write less per delivery.
- ``(created_at, id)``: retention pruning deletes the oldest first.
- partial ``ix_deliveries_backlog`` (``endpoint_id`` of pending and retrying rows), ``ix_deliveries_failed_updated``
  (``endpoint_id, updated_at`` of failed rows: failures in the last 24 h) and ``ix_deliveries_failed_agent``
  (``agent_id, created_at, id`` of failed rows: retry-failed): they hold only the few rows not delivered, so a
  delivery that succeeds never writes to them.

On PostgreSQL, autovacuum of ``deliveries`` and ``attempts`` starts after 1 % of their rows changed (the default,
20 %, is 2,000,000 dead rows of a 10,000,000-row history): retention pruning deletes every day what a day added, and
the space is reused only once vacuumed, so the tables stay the same size instead of growing by the pruned rows.

Creating the indexes reads the whole table once; on PostgreSQL with a large history, create them beforehand with
``CREATE INDEX CONCURRENTLY`` under the same names and definitions (``IF NOT EXISTS`` below then skips them).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_BACKLOG = "status IN ('pending', 'retrying')"  # = models.BACKLOG_PREDICATE (a migration keeps its own copy)
_FAILED = "status = 'failed'"  # = models.FAILED_PREDICATE

_VACUUMED = ("deliveries", "attempts")
_AUTOVACUUM = "autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.01"

_CREATE = (
    ("ix_deliveries_endpoint_created_id", "endpoint_id, created_at, id", None),
    ("ix_deliveries_agent_created_id", "agent_id, created_at, id", None),
    ("ix_deliveries_created_id", "created_at, id", None),
    ("ix_deliveries_backlog", "endpoint_id", _BACKLOG),
    ("ix_deliveries_failed_updated", "endpoint_id, updated_at", _FAILED),
    ("ix_deliveries_failed_agent", "agent_id, created_at, id", _FAILED),
)


def upgrade() -> None:
    for name, columns, where in _CREATE:
        op.execute(f"CREATE INDEX IF NOT EXISTS {name} ON deliveries ({columns})"
                   + (f" WHERE {where}" if where else ""))
    op.drop_index("ix_deliveries_agent_created", table_name="deliveries")
    op.drop_index("ix_deliveries_endpoint_created", table_name="deliveries")
    op.drop_index("ix_deliveries_agent_id", table_name="deliveries")
    if op.get_bind().dialect.name == "postgresql":
        for table in _VACUUMED:
            op.execute(f"ALTER TABLE {table} SET ({_AUTOVACUUM})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in _VACUUMED:
            op.execute(f"ALTER TABLE {table} RESET (autovacuum_vacuum_scale_factor, autovacuum_analyze_scale_factor)")
    op.create_index("ix_deliveries_agent_id", "deliveries", ["agent_id"])
    op.create_index("ix_deliveries_endpoint_created", "deliveries", ["endpoint_id", "created_at"])
    op.create_index("ix_deliveries_agent_created", "deliveries", ["agent_id", "created_at"])
    for name, _, _ in reversed(_CREATE):
        op.drop_index(name, table_name="deliveries")
