"""Index for the delivery history API: an agent's deliveries, newest first (GET .../webhook/deliveries).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_deliveries_agent_created", "deliveries", ["agent_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_agent_created", table_name="deliveries")
