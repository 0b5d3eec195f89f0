"""Database tables: webhook endpoints, deliveries (one per event and endpoint) and attempts (one per try).

Source: DESIGN.md, "Storage". Times are timezone-aware UTC; durations are milliseconds.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base of the letta-bus schema."""


class DeliveryStatus:
    """Values of ``deliveries.status``."""

    PENDING = "pending"  # fanned out, not tried yet
    RETRYING = "retrying"  # last attempt failed, another is scheduled
    SUCCEEDED = "succeeded"  # a 2xx answer
    FAILED = "failed"  # terminal: non-retryable answer or attempts exhausted
    SKIPPED = "skipped"  # endpoint deleted or disabled before the attempt


class Endpoint(Base):
    """A webhook endpoint. ``scope`` is ``agent`` (``agent_id`` set), ``organization`` (``organization_id`` set)
    or ``global``. ``events`` holds ``webhook_events`` patterns; an empty list means every event."""

    __tablename__ = "endpoints"
    # dispatchers reconcile their endpoint view by "changed since", paging on (updated_at, id) (endpoints.py)
    __table_args__ = (Index("ix_endpoints_updated_id", "updated_at", "id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    scope: Mapped[str] = mapped_column(String(16), default="agent")
    agent_id: Mapped[str | None] = mapped_column(String(128), index=True)
    organization_id: Mapped[str | None] = mapped_column(String(128), index=True)
    url: Mapped[str] = mapped_column(Text)
    secret: Mapped[str] = mapped_column(Text)  # Fernet token (dispatcher.store.secrets), never the plaintext
    previous_secret: Mapped[str | None] = mapped_column(Text)  # rotated-out secret (Fernet token) ...
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # ... valid until
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    failing_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class EndpointTombstone(Base):
    """A deleted endpoint, kept for a while so a dispatcher reconciling by ``updated_at`` sees the deletion too
    (a deleted row has no ``updated_at`` left to find). Written in the deleting transaction; pruned with history."""

    __tablename__ = "endpoint_tombstones"

    endpoint_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


#: The predicates of the partial indexes, as SQL text; a query uses such an index only when its WHERE clause
#: holds the same terms with these literals (a bound parameter does not match on SQLite, nor in a generic plan on
#: PostgreSQL).
BACKLOG_PREDICATE = "status IN ('pending', 'retrying')"
FAILED_PREDICATE = "status = 'failed'"


class Delivery(Base):
    """One event for one endpoint, across all its attempts. ``attempts`` counts tries made so far."""

    __tablename__ = "deliveries"
    # Every query of the API, /v1/status and the pruner walks one of these (migration 0004; the plans are checked
    # by tests/integration/test_query_plans.py). The listings order by (created_at, id) and page with a row-value
    # cursor, so both columns are in their indexes. The two partial indexes hold only the few rows not yet
    # delivered or failed, so the history writer's usual write (a delivery that succeeded) never touches them;
    # their predicates are matched by the queries written with the same literals (dispatcher/store/queries.py).
    __table_args__ = (
        Index("ix_deliveries_endpoint_created_id", "endpoint_id", "created_at", "id"),
        Index("ix_deliveries_agent_created_id", "agent_id", "created_at", "id"),  # an agent's, newest first
        Index("ix_deliveries_created_id", "created_at", "id"),  # retention pruning, oldest first
        Index("ix_deliveries_backlog", "endpoint_id", sqlite_where=text(BACKLOG_PREDICATE),
              postgresql_where=text(BACKLOG_PREDICATE)),
        Index("ix_deliveries_failed_updated", "endpoint_id", "updated_at", sqlite_where=text(FAILED_PREDICATE),
              postgresql_where=text(FAILED_PREDICATE)),
        Index("ix_deliveries_failed_agent", "agent_id", "created_at", "id", sqlite_where=text(FAILED_PREDICATE),
              postgresql_where=text(FAILED_PREDICATE)),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), index=True)
    endpoint_id: Mapped[str] = mapped_column(String(64))
    agent_id: Mapped[str] = mapped_column(String(128))
    event_type: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    event_seq: Mapped[int | None] = mapped_column(BigInteger)  # sequence in LETTA_EVENTS (manual retry reads it)
    replay_id: Mapped[str | None] = mapped_column(String(64))  # set when a replay made this delivery
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Attempt(Base):
    """One HTTP try of a delivery. ``status_code`` is None when no response came (``error`` says why)."""

    __tablename__ = "attempts"

    # 64-bit: a 32-bit SERIAL lasts about 8 days at 3,000 attempts/s (migration 0003). SQLite's INTEGER PRIMARY
    # KEY is the 64-bit rowid already, and only that spelling autoincrements there.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(String(64), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[float] = mapped_column(Float)
    response_excerpt: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """A scoped API key (issue 13). Only the SHA-256 of the key is stored (``key_hash``, hex): a key is 32 random
    bytes, so a fast hash is enough, and the key is never shown again after it is created. ``scope`` is
    ``operator`` (everything), ``organization`` (``organization_id`` set) or ``agent`` (``agent_id`` set, with the
    agent's ``organization_id`` when known); ``role`` is ``admin`` (change, retry, replay, rotate) or ``read``."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the key's first characters, to recognise it in a listing
    name: Mapped[str] = mapped_column(String(200), default="")
    scope: Mapped[str] = mapped_column(String(16))
    organization_id: Mapped[str | None] = mapped_column(String(128), index=True)
    agent_id: Mapped[str | None] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(8))
    created_by: Mapped[str | None] = mapped_column(String(64))  # id of the key that created it; None: bootstrap
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PortalSession(Base):
    """A console session handed to a tenant (``POST /v1/portal-sessions``): the same scope and role fields as
    :class:`ApiKey`, valid until ``expires_at`` unless revoked. Its token is signed (HMAC-SHA256, see
    :mod:`dispatcher.api.portal`) and not stored at all: the row is what makes it revocable."""

    __tablename__ = "portal_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    scope: Mapped[str] = mapped_column(String(16))
    organization_id: Mapped[str | None] = mapped_column(String(128), index=True)
    agent_id: Mapped[str | None] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(8))
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
