"""Webhook signatures: ``X-Letta-Signature`` and the Standard Webhooks ``webhook-*`` headers.

Sources: Standard Webhooks spec (https://www.standardwebhooks.com/, "Signature scheme"): the signed content is
``{webhook-id}.{webhook-timestamp}.{body}``, the signature ``v1,<base64 HMAC-SHA256>``, several separated by
spaces. DESIGN.md, "HTTP": for generated ``whsec_`` secrets the Standard Webhooks key is the base64-decoded part
(so the ``standardwebhooks`` package verifies with the secret string as is); for other secrets it is the secret's
UTF-8 bytes. ``X-Letta-Signature: sha256=<hex HMAC-SHA256(secret UTF-8, body)>`` matches Letta's existing docs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from dispatcher.store.secrets import SECRET_PREFIX


def standard_key(secret: str) -> bytes:
    """The Standard Webhooks HMAC key of a secret (see the module docstring)."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
        except binascii.Error:
            pass  # a user-chosen secret that merely starts with whsec_: use its bytes
    return secret.encode()


class Signer:
    """Signs bodies for one endpoint; keys are derived once. ``extra_secrets`` are rotated-out secrets whose
    Standard Webhooks signatures are added while they stay valid."""

    __slots__ = ("_letta_key", "_standard_keys")

    def __init__(self, secret: str, extra_secrets: tuple[str, ...] = ()) -> None:
        self._letta_key = secret.encode()
        self._standard_keys = [standard_key(s) for s in (secret, *extra_secrets)]

    def letta_signature(self, body: bytes) -> str:
        """``sha256=<hex>`` for ``X-Letta-Signature``."""
        return "sha256=" + hmac.new(self._letta_key, body, hashlib.sha256).hexdigest()

    def standard_signature(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """``v1,<base64> [v1,<base64> ...]`` for ``webhook-signature``; ``timestamp`` is Unix seconds."""
        prefix = f"{msg_id}.{timestamp}.".encode()
        sigs = []
        for key in self._standard_keys:
            mac = hmac.new(key, prefix, hashlib.sha256)
            mac.update(body)
            sigs.append("v1," + base64.b64encode(mac.digest()).decode())
        return " ".join(sigs)
