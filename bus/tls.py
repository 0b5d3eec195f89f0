"""TLS for NATS connections: the ``ssl.SSLContext`` nats-py's ``connect(tls=...)`` takes, built from the settings.

Source: docs.nats.io "TLS" (the server's ``tls { cert_file, key_file, ca_file, verify }`` block; with ``verify:
true`` clients must present a certificate signed by ``ca_file``) and nats-py's ``Client.connect(tls=, tls_hostname=)``.
The server certificate is verified against ``nats_tls_ca_file`` including its host name (the URL's host; for
``nats://127.0.0.1`` the certificate needs that IP address as a subject alternative name).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from config.settings import Settings


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """A client context verifying the server with ``nats_tls_ca_file`` and presenting ``nats_tls_cert_file`` /
    ``nats_tls_key_file`` when set (mutual TLS); ``None`` when no TLS setting is set (plain TCP, unless the URL says
    ``tls://``). Raises ``ValueError`` naming the setting whose file is missing or not PEM."""
    if settings.nats_tls_ca_file is None and settings.nats_tls_cert_file is None:
        return None
    ca = settings.nats_tls_ca_file
    _readable(ca, "LETTA_BUS_NATS_TLS_CA_FILE")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    except ssl.SSLError as exc:
        raise ValueError(f"LETTA_BUS_NATS_TLS_CA_FILE={ca} is not a PEM CA bundle: {exc}") from None
    if settings.nats_tls_cert_file is not None:
        _readable(settings.nats_tls_cert_file, "LETTA_BUS_NATS_TLS_CERT_FILE")
        _readable(settings.nats_tls_key_file, "LETTA_BUS_NATS_TLS_KEY_FILE")
        try:
            context.load_cert_chain(str(settings.nats_tls_cert_file), str(settings.nats_tls_key_file))
        except ssl.SSLError as exc:
            raise ValueError(
                f"LETTA_BUS_NATS_TLS_CERT_FILE / LETTA_BUS_NATS_TLS_KEY_FILE are not a matching PEM certificate and "
                f"key: {exc}") from None
    return context


def _readable(path: Path | None, setting: str) -> None:
    if path is not None and not Path(path).is_file():
        raise ValueError(f"{setting}={path}: no such file")
