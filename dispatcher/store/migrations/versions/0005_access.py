"""Scoped access (issue 13): ``api_keys`` (hashed, scoped API keys) and ``portal_sessions`` (console sessions
handed to a tenant). Agent endpoints may now carry the ``organization_id`` of their agent (the column exists
since 0001); no change is needed for that.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TZ = sa.DateTime(timezone=True)


def _scope_columns() -> list[sa.Column]:
    return [sa.Column("scope", sa.String(16), nullable=False),
            sa.Column("organization_id", sa.String(128), nullable=True),
            sa.Column("agent_id", sa.String(128), nullable=True),
            sa.Column("role", sa.String(8), nullable=False),
            sa.Column("created_by", sa.String(64), nullable=True),
            sa.Column("created_at", _TZ, nullable=False)]


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        *_scope_columns(),
        sa.Column("revoked_at", _TZ, nullable=True),
    )
    op.create_index("ix_api_keys_organization_id", "api_keys", ["organization_id"])
    op.create_table(
        "portal_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        *_scope_columns(),
        sa.Column("expires_at", _TZ, nullable=False),
        sa.Column("revoked_at", _TZ, nullable=True),
    )
    op.create_index("ix_portal_sessions_organization_id", "portal_sessions", ["organization_id"])


def downgrade() -> None:
    op.drop_index("ix_portal_sessions_organization_id", table_name="portal_sessions")
    op.drop_table("portal_sessions")
    op.drop_index("ix_api_keys_organization_id", table_name="api_keys")
    op.drop_table("api_keys")
