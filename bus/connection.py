"""Connecting to NATS the way every letta-bus process should: retry the first connect, reconnect forever, present
the process's role credentials (bus/auth.py) and TLS (bus/tls.py) from the settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats.aio.client import Client

from bus.auth import client_credentials
from bus.permissions import Role
from bus.tls import tls_context
from config.settings import Settings

log = logging.getLogger(__name__)


class NatsAuthError(ConnectionError):
    """The server refused this client's credentials (or their absence) at connect: ``Authorization Violation``."""


def connect_options(settings: Settings | None, role: Role | None) -> dict[str, Any]:
    """Keyword arguments for nats-py's ``Client.connect``: ``user``/``password``/``inbox_prefix`` of
    :func:`bus.auth.client_credentials` for ``role`` and ``tls`` of :func:`bus.tls.tls_context`. Empty without
    ``settings``. Raises ``ValueError`` naming the setting for unreadable credential or TLS files."""
    if settings is None:
        return {}
    opts: dict[str, Any] = {}
    creds = client_credentials(settings, role)
    if creds is not None:
        opts.update(user=creds.user, password=creds.password, inbox_prefix=creds.inbox_prefix)
    context = tls_context(settings)
    if context is not None:
        opts["tls"] = context
    return opts


def _refused(exc: BaseException) -> bool:
    return "authorization violation" in str(exc).lower() or type(exc).__name__ == "AuthorizationError"


def server_list(url: str) -> list[str]:
    """``"nats://a:4222, nats://b:4222"`` -> ``["nats://a:4222", "nats://b:4222"]``."""
    return [u.strip() for u in url.split(",") if u.strip()]


async def open_client(url: str, *, name: str, settings: Settings | None = None, role: Role | None = None) -> Client:
    """Connect to ``url`` (comma-separated for a cluster), retrying the first connect and every reconnect forever.

    ``name`` shows in ``nats server report connections``. ``settings`` and ``role`` (``"admin"``, ``"dispatcher"``,
    ``"publisher"``, ``"subscriber"``) choose the credentials and TLS (:func:`connect_options`); without them the
    connection is anonymous and plain. Never returns while no server answers: bound it with ``asyncio.wait_for``
    (see :func:`connect`) or run it in a background task. Raises :class:`NatsAuthError` when the server refuses the
    credentials at the first connect (a refusal at a later reconnect is logged and retried), ``ValueError`` naming
    the setting for bad credential or TLS files.
    """
    options = connect_options(settings, role)
    who = options.get("user", "anonymous")
    first_connect = True

    async def on_error(exc: Exception) -> None:
        if first_connect and _refused(exc):
            raise NatsAuthError(
                f"NATS at {url} refused the connection of {who!r} ({name}): Authorization Violation. Set "
                "LETTA_BUS_NATS_USER and LETTA_BUS_NATS_PASSWORD to this role's credentials (the embedded server's "
                "are generated into LETTA_BUS_NATS_AUTH_DIR; `letta-bus up` prints where)")
        log.warning("nats %s: %s", name, exc or type(exc).__name__)

    async def on_disconnect() -> None:
        if not nc.is_closed:  # a close we asked for is not worth a warning
            log.warning("nats %s: disconnected", name)

    async def on_reconnect() -> None:
        log.info("nats %s: reconnected to %s", name, nc.connected_url.netloc if nc.connected_url else "?")

    nc = Client()
    try:
        await nc.connect(
            servers=server_list(url),
            name=name,
            connect_timeout=2,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            **options,
        )
    except NatsAuthError as exc:
        log.error("%s", exc)
        await nc.close()
        raise
    first_connect = False
    return nc


async def connect(
    url: str, *, name: str, timeout_s: float = 5.0, settings: Settings | None = None, role: Role | None = None,
) -> Client:
    """:func:`open_client`, bounded: raises ``ConnectionError`` naming ``url`` and ``LETTA_BUS_NATS_URL`` when no
    server answers within ``timeout_s`` seconds, and :class:`NatsAuthError` (a ``ConnectionError``) at once when the
    server refuses the credentials."""
    try:
        return await asyncio.wait_for(open_client(url, name=name, settings=settings, role=role), timeout_s)
    except asyncio.TimeoutError:
        raise ConnectionError(
            f"no NATS server answered at {url} within {timeout_s:g} s: start one, or fix LETTA_BUS_NATS_URL"
        ) from None


async def close_client(nc: Client | None, *, what: str, timeout_s: float | None = None) -> None:
    """Shut down a connection this process owns: drain it (buffered publishes are flushed, subscriptions end) for
    at most ``timeout_s`` seconds (None: no bound), or close it at once while it is reconnecting (nats-py's
    ``drain()`` refuses then, and nothing could be flushed). Never raises: a failure is logged naming ``what``
    and the connection is closed anyway. Does nothing for ``None`` or a closed client."""
    if nc is None or nc.is_closed:
        return
    try:
        if nc.is_connected:
            await asyncio.wait_for(nc.drain(), timeout_s)
        else:
            await nc.close()
    except Exception as exc:  # noqa: BLE001 - shutdown must go on
        log.warning("closing %s: %r", what, exc)
        if not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()
