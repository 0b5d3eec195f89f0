"""Storage of scoped API keys and portal sessions (issue 13; tables ``api_keys`` and ``portal_sessions``).

A key is ``lbk_`` + 32 random bytes (url-safe base64); only its SHA-256 (hex) is stored, so a leaked database
yields no usable key. Lookups are by that hash (unique index). Revocation sets ``revoked_at``; a revoked key or
session is refused from the next request on (nothing caches them)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import select, update

from dispatcher.store.database import Store
from dispatcher.store.models import ApiKey, PortalSession, utcnow
from dispatcher.store.queries import aware

KEY_PREFIX = "lbk_"
ScopeKind = Literal["operator", "organization", "agent"]
Role = Literal["admin", "read"]
SCOPE_KINDS: tuple[str, ...] = ("operator", "organization", "agent")
ROLES: tuple[str, ...] = ("admin", "read")


@dataclass(frozen=True)
class Grant:
    """What a credential may reach: ``scope`` with its ``organization_id`` / ``agent_id``, and ``role``.

    Rules (checked by :meth:`check`): ``operator`` takes no ids, ``organization`` needs ``organization_id``,
    ``agent`` needs ``agent_id`` (``organization_id`` optional: the agent's organization)."""

    scope: ScopeKind
    role: Role
    organization_id: str | None = None
    agent_id: str | None = None

    def check(self) -> "Grant":
        """Raise ``ValueError`` naming the field unless the ids fit the scope and the role is known."""
        if self.scope not in SCOPE_KINDS:
            raise ValueError(f"scope must be one of {', '.join(SCOPE_KINDS)}, got {self.scope!r}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.scope == "organization" and not self.organization_id:
            raise ValueError("organization_id is required for scope 'organization'")
        if self.scope == "agent" and not self.agent_id:
            raise ValueError("agent_id is required for scope 'agent'")
        if self.scope != "agent" and self.agent_id:
            raise ValueError(f"agent_id must be empty for scope {self.scope!r}")
        if self.scope == "operator" and self.organization_id:
            raise ValueError("organization_id must be empty for scope 'operator'")
        return self

    def covers(self, other: "Grant") -> bool:
        """True when every resource ``other`` reaches is reachable by this grant with at least its role."""
        return not (self.role == "read" and other.role == "admin") and self.reaches(other)

    def reaches(self, other: "Grant") -> bool:
        """True when ``other``'s scope lies within this one's (roles aside)."""
        if self.scope == "operator":
            return True
        if self.scope == "organization":
            return other.scope in ("organization", "agent") and other.organization_id == self.organization_id
        return (other.scope == "agent" and other.agent_id == self.agent_id
                and other.organization_id == self.organization_id)


def hash_key(key: str) -> str:
    """SHA-256 of ``key`` (UTF-8), hex: what ``api_keys.key_hash`` holds."""
    return hashlib.sha256(key.encode()).hexdigest()


async def create_key(store: Store, grant: Grant, *, name: str = "", created_by: str | None = None,
                     ) -> tuple[ApiKey, str]:
    """Store a new key for ``grant``; returns ``(row, key)``: the plaintext key exists only in this return value.
    Raises ``ValueError`` naming the field for a bad grant."""
    grant.check()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id="key_" + secrets.token_hex(8), key_hash=hash_key(key), prefix=key[:12], name=name,
                 scope=grant.scope, organization_id=grant.organization_id, agent_id=grant.agent_id,
                 role=grant.role, created_by=created_by, created_at=utcnow())
    async with store.session.begin() as s:
        s.add(row)
    return row, key


async def key_by_secret(store: Store, key: str) -> tuple[ApiKey, Grant] | None:
    """The live (not revoked) key whose hash matches ``key``, with its grant; None otherwise."""
    async with store.session() as s:
        row = (await s.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))).scalar_one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    return row, key_grant(row)


async def list_keys(store: Store, *, organization_id: str | None = None, agent_id: str | None = None,
                    include_revoked: bool = False) -> list[ApiKey]:
    """Keys, oldest first, optionally only those of one organization / agent."""
    stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if organization_id is not None:
        stmt = stmt.where(ApiKey.organization_id == organization_id)
    if agent_id is not None:
        stmt = stmt.where(ApiKey.agent_id == agent_id)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    async with store.session() as s:
        return list((await s.execute(stmt)).scalars())


async def get_key(store: Store, key_id: str) -> ApiKey | None:
    """One key by id (revoked or not), or None."""
    async with store.session() as s:
        return await s.get(ApiKey, key_id)


def key_grant(row: ApiKey | PortalSession) -> Grant:
    """The grant of a stored key or session."""
    return Grant(scope=row.scope, role=row.role, organization_id=row.organization_id,  # type: ignore[arg-type]
                 agent_id=row.agent_id)


async def revoke_key(store: Store, key_id: str) -> bool:
    """Revoke a key (idempotent); False when there is no such key."""
    async with store.session.begin() as s:
        row = await s.get(ApiKey, key_id)
        if row is None:
            return False
        row.revoked_at = row.revoked_at or utcnow()
    return True


async def create_session(store: Store, grant: Grant, *, ttl_s: float, created_by: str | None = None,
                         ) -> PortalSession:
    """Store a portal session for ``grant`` lasting ``ttl_s`` seconds from now. Raises ``ValueError`` for a bad
    grant."""
    grant.check()
    now = utcnow()
    row = PortalSession(id="ps_" + secrets.token_hex(12), scope=grant.scope, organization_id=grant.organization_id,
                        agent_id=grant.agent_id, role=grant.role, created_by=created_by, created_at=now,
                        expires_at=now + timedelta(seconds=ttl_s))
    async with store.session.begin() as s:
        s.add(row)
    return row


async def get_session(store: Store, session_id: str) -> PortalSession | None:
    """A portal session by id, or None."""
    async with store.session() as s:
        return await s.get(PortalSession, session_id)


async def revoke_session(store: Store, session_id: str) -> bool:
    """Revoke a portal session (idempotent); False when there is none."""
    async with store.session.begin() as s:
        result = await s.execute(update(PortalSession).where(PortalSession.id == session_id)
                                 .values(revoked_at=utcnow()))
    return result.rowcount > 0


def is_live(row: PortalSession, now: datetime | None = None) -> bool:
    """Not revoked and not expired."""
    return row.revoked_at is None and aware(row.expires_at) > (now or utcnow())
