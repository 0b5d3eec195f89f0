"""Bearer API keys: ``Authorization: Bearer <key>`` on every route but ``/healthz``; 401 otherwise.

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
from collections.abc import Sequence
from pathlib import Path

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from config.settings import Settings
from dispatcher.api.context import ApiContext, get_ctx

KEY_PREFIX = "lbk_"
_bearer = HTTPBearer(auto_error=False, description="An API key from LETTA_BUS_API_KEYS or ./var/api.key")


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


def _accepted(given: bytes | None, keys: Sequence[str]) -> bool:
    ok = False
    for key in keys:  # every key compared, in constant time each
        ok |= given is not None and hmac.compare_digest(given, key.encode())
    return ok


def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                    ctx: ApiContext = Depends(get_ctx)) -> None:
    """FastAPI dependency: 401 (with ``WWW-Authenticate: Bearer``) unless the request carries an accepted key."""
    given = credentials.credentials.encode() if credentials and credentials.scheme.lower() == "bearer" else None
    if not _accepted(given, ctx.api_keys):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid API key: send "
                            "'Authorization: Bearer <key>' (LETTA_BUS_API_KEYS, or ./var/api.key in development)",
                            headers={"WWW-Authenticate": "Bearer"})


DOCS_REALM = "letta-bus API docs"


def require_docs_key(request: Request, ctx: ApiContext = Depends(get_ctx)) -> None:
    """FastAPI dependency of the docs routes: an accepted key as ``Authorization: Bearer <key>`` or as the password
    of ``Authorization: Basic`` (any user name, e.g. ``api``). 401 otherwise, with
    ``WWW-Authenticate: Basic realm="letta-bus API docs"`` so that a browser asks for it."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    given: bytes | None = None
    if scheme.lower() == "bearer":
        given = value.strip().encode()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            given = None
    if not _accepted(given, ctx.api_keys):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid API key: the API docs need the key "
                            "like every route but /healthz (Authorization: Bearer <key>, or in a browser the key "
                            "as the password; LETTA_BUS_API_KEYS, or ./var/api.key in development)",
                            headers={"WWW-Authenticate": f'Basic realm="{DOCS_REALM}", charset="UTF-8"'})
