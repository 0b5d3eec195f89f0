"""64-bit attempt ids, endpoint changes findable by time, and tombstones of deleted endpoints (issue 11).

- ``attempts.id`` becomes BIGINT on PostgreSQL, its sequence too: a 32-bit SERIAL runs out after 2**31 attempts,
  about 8 days at 3,000 deliveries/s. The column change rewrites the table under an ACCESS EXCLUSIVE lock (minutes
  for hundreds of millions of rows: run it in a maintenance window). SQLite's INTEGER PRIMARY KEY is 64-bit already.
- ``ix_endpoints_updated_id``: dispatchers reconcile their endpoint view with "changed since <cursor>", paging on
  ``(updated_at, id)``.
- ``endpoint_tombstones``: a deletion leaves its id and time, so that reconciliation sees deletions too.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("attempts", "id", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False)
        op.execute("ALTER SEQUENCE IF EXISTS attempts_id_seq AS bigint")
    op.create_index("ix_endpoints_updated_id", "endpoints", ["updated_at", "id"])
    op.create_table(
        "endpoint_tombstones",
        sa.Column("endpoint_id", sa.String(64), primary_key=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_endpoint_tombstones_deleted_at", "endpoint_tombstones", ["deleted_at"])


def downgrade() -> None:
    op.drop_index("ix_endpoint_tombstones_deleted_at", table_name="endpoint_tombstones")
    op.drop_table("endpoint_tombstones")
    op.drop_index("ix_endpoints_updated_id", table_name="endpoints")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER SEQUENCE IF EXISTS attempts_id_seq AS integer")
        op.alter_column("attempts", "id", type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False)
