"""Portal session tokens: ``lbp_<session id>.<expiry, unix seconds>.<signature>``, where the signature is
HMAC-SHA256 (url-safe base64, no padding) of ``<session id>.<expiry>`` under a key derived from the first
``LETTA_BUS_SECRET_KEYS`` key (:meth:`dispatcher.store.secrets.SecretBox.derive_key`).

A token is checked in this order: shape and signature (constant time; a forged token costs no database read),
expiry, then the ``portal_sessions`` row (revocation). The console's link carries the token after ``#``, which a
browser never sends to a server, so it appears in no access log or proxy log; the page hands it over in a POST
body and keeps it in an ``HttpOnly`` cookie (:mod:`dispatcher.api.console.session`)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

TOKEN_PREFIX = "lbp_"
#: Longest portal session (``ttl``), seconds: 7 days.
MAX_TTL_S = 7 * 86400
#: Default ``ttl``, seconds: 1 hour (issue 13).
DEFAULT_TTL_S = 3600


def _sign(key: bytes, body: str) -> str:
    return base64.urlsafe_b64encode(hmac.new(key, body.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()


def make_token(key: bytes, session_id: str, expires_at_s: int) -> str:
    """The token of session ``session_id`` expiring at ``expires_at_s`` (unix seconds)."""
    body = f"{session_id}.{expires_at_s}"
    return f"{TOKEN_PREFIX}{body}.{_sign(key, body)}"


class TokenRefused(ValueError):
    """A portal token that is malformed, forged (``reason`` ``invalid``) or past its expiry (``expired``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_token(key: bytes, token: str, *, now_s: float | None = None) -> str:
    """The session id of a well-signed, unexpired token. Raises :class:`TokenRefused` otherwise (``invalid`` or
    ``expired``); the row's revocation is the caller's to check."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        raise TokenRefused("invalid")
    body, _, signature = token[len(TOKEN_PREFIX):].rpartition(".")
    session_id, _, expiry = body.partition(".")
    if not session_id or not expiry.isdigit() or not hmac.compare_digest(signature, _sign(key, body)):
        raise TokenRefused("invalid")
    if int(expiry) <= (time.time() if now_s is None else now_s):
        raise TokenRefused("expired")
    return session_id
