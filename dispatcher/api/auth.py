"""Who is asking: ``Authorization: Bearer <credential>`` on every route but ``/healthz``; 401 otherwise.

A credential is one of (:func:`get_principal`):

- a bootstrap key from ``LETTA_BUS_API_KEYS`` (or ``./var/api.key``): operator scope, role admin;
- a scoped API key (``lbk_...``, table ``api_keys``, :mod:`dispatcher.store.access`): operator, one organization
  or one agent, role ``admin`` or ``read``;
- a portal session token (``lbp_...``, :mod:`dispatcher.api.portal`), as a bearer token or in the console's
  ``HttpOnly`` cookie ``letta_bus_portal``. A request authenticated by the cookie that changes something must
  also carry ``HX-Request`` or ``X-Requested-With`` (a header a cross-site form cannot send).

What the resulting :class:`Principal` may see and change is enforced by :mod:`dispatcher.api.scoping`.

The API docs (``/docs``, ``/redoc``, ``/openapi.json``) need the key too; since a browser cannot send a bearer
header when it opens a page, they also take it as the password of HTTP Basic (any user name): the 401 asks the
browser for it, and the browser then sends it with the page's own request for ``/openapi.json``
(:func:`require_docs_key`).

Keys come from ``LETTA_BUS_API_KEYS`` (JSON list; required in production). In development without keys, one is
generated into ``LETTA_BUS_API_KEY_FILE`` (default ``./var/api.key``, mode 0600) on first start and read from
there afterwards; ``letta-bus up`` prints where it is, and the CLI reads the same file. Keys are compared in
constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from config.settings import Settings
from dispatcher.api.context import ApiContext, get_ctx
from dispatcher.api.portal import TOKEN_PREFIX, TokenRefused, check_token
from dispatcher.store.access import Grant, get_session, is_live, key_by_secret, key_grant

KEY_PREFIX = "lbk_"
PORTAL_COOKIE = "letta_bus_portal"
_bearer = HTTPBearer(auto_error=False, description="An API key (LETTA_BUS_API_KEYS, ./var/api.key, or a scoped "
                     "lbk_ key from POST /v1/api-keys) or a portal session token (lbp_, POST /v1/portal-sessions)")
_cookie = APIKeyCookie(name=PORTAL_COOKIE, auto_error=False,
                       description="The console's portal session (set by POST /console/session)")
OPERATOR = Grant(scope="operator", role="admin")


class ApiKeyError(ValueError):
    """No usable API key: production without ``LETTA_BUS_API_KEYS``."""


def generate_api_key() -> str:
    """A new key: ``lbk_`` + 32 random bytes, URL-safe base64 (43 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def resolve_api_keys(settings: Settings, *, create: bool = True) -> list[str]:
    """The keys the API accepts: ``api_keys``, else (development only) the key in ``api_key_file``, created with
    mode 0600 when missing and ``create`` is true. Raises :class:`ApiKeyError` in production without keys."""
    keys = [k.get_secret_value() for k in settings.api_keys if k.get_secret_value()]
    if keys:
        return keys
    if settings.env == "production":
        raise ApiKeyError("LETTA_BUS_API_KEYS is required in production (JSON list of bearer keys, e.g. "
                          "'[\"lbk_...\"]'; generate one with: python -c 'import secrets; "
                          "print(\"lbk_\" + secrets.token_urlsafe(32))')")
    path = Path(settings.api_key_file)
    if path.exists():
        return [path.read_text().strip()]
    if not create:
        return []
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_api_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return [key]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its :class:`~dispatcher.store.access.Grant` (scope and role), the id of the
    credential (``bootstrap``, a key id ``key_...`` or a portal session id ``ps_...``) and how it came."""

    grant: Grant
    credential_id: str
    via: Literal["bootstrap", "api_key", "portal"]

    @property
    def is_operator(self) -> bool:
        return self.grant.scope == "operator"

    def need_admin(self) -> None:
        """403 unless the role is ``admin``."""
        if self.grant.role != "admin":
            raise HTTPException(status.HTTP_403_FORBIDDEN, "this credential is read-only (role 'read'): changes, "
                                "retries, replays and rotations need a key or portal session with role 'admin'")

    def need_operator(self) -> None:
        """403 unless the scope is ``operator``."""
        if not self.is_operator:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"only an operator key may do this (this credential is "
                                f"scoped to {describe(self.grant)})")


def describe(grant: Grant) -> str:
    """``organization org-1``, ``agent agent-1 (organization org-1)`` or ``operator``."""
    if grant.scope == "organization":
        return f"organization {grant.organization_id}"
    if grant.scope == "agent":
        return f"agent {grant.agent_id}" + (f" (organization {grant.organization_id})" if grant.organization_id else "")
    return "operator"


def _unauthorized(detail: str, scheme: str = "Bearer") -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": scheme})


_NO_KEY = ("missing or invalid API key: send 'Authorization: Bearer <key>' (LETTA_BUS_API_KEYS, ./var/api.key in "
           "development, or a key from POST /v1/api-keys)")


async def principal_of(given: str | None, ctx: ApiContext) -> Principal | None:
    """The principal of a credential, or None when it is unknown or revoked. Raises a 401 ``HTTPException``
    saying so for an expired or revoked portal token (the console shows that message)."""
    if not given:
        return None
    if given.startswith(TOKEN_PREFIX):
        try:
            session_id = check_token(ctx.portal_key, given)
        except TokenRefused as exc:
            if exc.reason == "expired":
                raise _unauthorized("portal session expired: ask whoever gave you the link for a new one") from None
            return None
        row = await get_session(ctx.store, session_id)
        if row is None:
            return None
        if not is_live(row):
            raise _unauthorized("portal session revoked or expired: ask whoever gave you the link for a new one")
        return Principal(key_grant(row), row.id, "portal")
    encoded = given.encode()
    bootstrap = False
    for key in ctx.api_keys:  # every key compared, in constant time each
        bootstrap |= hmac.compare_digest(encoded, key.encode())
    if bootstrap:
        return Principal(OPERATOR, "bootstrap", "bootstrap")
    found = await key_by_secret(ctx.store, given)
    return None if found is None else Principal(found[1], found[0].id, "api_key")


_SAFE = ("GET", "HEAD", "OPTIONS")


async def get_principal(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                        cookie: str | None = Depends(_cookie), ctx: ApiContext = Depends(get_ctx)) -> Principal:
    """FastAPI dependency: the caller, from the bearer header or else the portal cookie. 401 (with
    ``WWW-Authenticate: Bearer``) without an accepted credential; 403 for a change by cookie without
    ``HX-Request`` / ``X-Requested-With`` (cross-site request forgery)."""
    given = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else None
    by_cookie = given is None and cookie is not None
    principal = await principal_of(given or cookie, ctx)
    if principal is None:
        raise _unauthorized(_NO_KEY)
    if by_cookie and request.method not in _SAFE and not (
            request.headers.get("hx-request") or request.headers.get("x-requested-with")):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "a change made with the console's cookie needs the header "
                            "HX-Request or X-Requested-With")
    request.state.principal = principal
    return principal


DOCS_REALM = "letta-bus API docs"


async def require_docs_key(request: Request, ctx: ApiContext = Depends(get_ctx)) -> None:
    """FastAPI dependency of the docs routes: any accepted credential as ``Authorization: Bearer <key>`` or as the
    password of ``Authorization: Basic`` (any user name, e.g. ``api``). 401 otherwise, with
    ``WWW-Authenticate: Basic realm="letta-bus API docs"`` so that a browser asks for it."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    given: str | None = None
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).partition(b":")[2].decode()
        except (binascii.Error, ValueError):
            given = None
    if await principal_of(given, ctx) is None:
        raise _unauthorized("missing or invalid API key: the API docs need the key like every route but /healthz "
                            "(Authorization: Bearer <key>, or in a browser the key as the password; "
                            "LETTA_BUS_API_KEYS, or ./var/api.key in development)",
                            f'Basic realm="{DOCS_REALM}", charset="UTF-8"')
