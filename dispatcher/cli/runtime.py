"""``letta-bus up``: the broker (embedded or remote), provisioning, the store and the dispatcher, until a signal.

Ctrl-C (SIGINT) or SIGTERM stops in order: the dispatcher stops fetching and finishes or leaves unacked what is in
flight, the NATS connection drains, then the embedded nats-server child (if any) is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client

import nats.errors

from bus.auth import AuthFiles, ensure_auth_files
from bus.connection import connect
from bus.embedded import EmbeddedServer
from bus.streams import provision, supports_schedules
from config.settings import Settings
from dispatcher.api.app import create_app
from dispatcher.api.auth import resolve_api_keys
from dispatcher.api.context import ApiContext
from dispatcher.api.server import ApiServer
from dispatcher.delivery.service import Dispatcher
from dispatcher.store.database import Store

log = logging.getLogger(__name__)


def run_loop(main: Coroutine[object, object, None], settings: Settings) -> None:
    """Run ``main`` to completion on the event loop chosen by ``LETTA_BUS_EVENT_LOOP`` (``uvloop`` or
    ``asyncio``). Raises ``ValueError`` naming the setting when uvloop is chosen but not installed (Windows)."""
    if settings.event_loop == "asyncio":
        asyncio.run(main)
        return
    try:
        import uvloop
    except ImportError:
        main.close()
        raise ValueError("LETTA_BUS_EVENT_LOOP=uvloop but uvloop is not installed (it has no Windows build): "
                         "install it, or set LETTA_BUS_EVENT_LOOP=asyncio") from None
    uvloop.run(main)


@dataclass
class Stack:
    """What :func:`running_stack` started: the effective settings (``nats_url`` filled in), the embedded server
    (None when joining a remote one), the NATS connection (dispatcher role), the store, the running dispatcher, the
    API and, embedded, the generated credential files (``auth``)."""

    settings: Settings
    server: EmbeddedServer | None
    nc: Client
    store: Store
    dispatcher: Dispatcher
    api: ApiServer | None = None
    auth: AuthFiles | None = None


@contextlib.asynccontextmanager
async def running_stack(settings: Settings, *, workdir: Path | None = None) -> AsyncIterator[Stack]:
    """Start everything ``letta-bus up`` runs, yield it, and stop it in order on exit.

    Without ``nats_url`` an embedded nats-server starts from ``settings.nats_conf`` in ``workdir`` (default: the
    current directory, so its store is ``./var/nats``) with authentication: each role's credentials are generated
    on first run into ``nats_auth_dir`` (relative to ``workdir``; bus/auth.py), the dispatcher connects as the
    dispatcher role and provisioning as admin. Joining a remote server, both use the configured credentials
    (``nats_user``; or the role files in ``nats_auth_dir``); with ``provision`` false nothing is provisioned.
    The database is migrated to the newest schema
    (:mod:`dispatcher.store.migrate`). Unless ``api_port`` is 0 the management API listens on ``api_host:api_port``.
    Raises :class:`bus.embedded.EmbeddedServerError` (port in use, binary missing), ``ConnectionError`` (remote
    server unreachable, credentials refused), ``PermissionError`` (provisioning refused, see
    :func:`provision_streams`) or :class:`dispatcher.api.auth.ApiKeyError` (production without API keys) before
    anything else is started, and ``OSError`` naming ``LETTA_BUS_API_PORT`` when the API port is taken.
    """
    api_keys = resolve_api_keys(settings) if settings.api_port != 0 else []
    server = auth = None
    if settings.embedded:
        base = Path(workdir or Path.cwd())
        auth = ensure_auth_files(settings, base / settings.nats_auth_dir, settings.nats_conf)
        server = EmbeddedServer(
            workdir=base, conf=auth.server_conf, port=settings.embedded_port,
            monitor_port=settings.embedded_monitor_port,
        ).start()
        # the embedded server knows only the generated users: every process of this stack uses their files
        settings = settings.model_copy(update={"nats_url": server.url, "nats_auth_dir": auth.directory,
                                               "nats_user": None, "nats_password": None, "nats_inbox_prefix": None})
    try:
        if settings.provision:
            await provision_streams(settings)
        nc = await connect(settings.nats_url, name="letta-bus-dispatcher", timeout_s=settings.connect_timeout_s,
                           settings=settings, role="dispatcher")
        store = Store.from_settings(settings)
        try:
            await store.upgrade_schema()
            dispatcher = Dispatcher(settings, nc, store)
            await dispatcher.start()
            api = None
            try:
                if settings.api_port != 0:
                    ctx = ApiContext(settings, store, nc, api_keys=api_keys, dispatcher=dispatcher)
                    api = await ApiServer(create_app(ctx), settings.api_host, settings.api_port).start()
                yield Stack(settings, server, nc, store, dispatcher, api, auth)
            finally:
                if api is not None:
                    await api.stop()
                await dispatcher.stop()
        finally:
            await store.close()
            await nc.drain()
    finally:
        if server is not None:
            server.stop()


async def provision_streams(settings: Settings) -> None:
    """Create or update the streams and the dispatcher's durables (:func:`bus.streams.provision`) on a connection
    of the admin role, closed afterwards. Raises ``ConnectionError`` (server unreachable or credentials refused) and
    ``PermissionError`` naming ``LETTA_BUS_PROVISION`` when the server does not answer the JetStream API (what a
    user without stream-admin permissions sees: its requests are dropped)."""
    admin = await connect(settings.nats_url, name="letta-bus-provision", timeout_s=settings.connect_timeout_s,
                          settings=settings, role="admin")
    try:
        await provision(admin.jetstream(), settings, schedules=supports_schedules(admin))
    except nats.errors.TimeoutError:
        raise PermissionError(
            f"provisioning {settings.events_stream} and {settings.webhooks_stream} got no answer from "
            f"{settings.nats_url}: if the log shows 'Permissions Violation', this NATS user may not administer "
            "streams; run `letta-bus provision` with the admin role's credentials and set LETTA_BUS_PROVISION=false "
            "for the dispatcher") from None
    finally:
        await admin.close()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[asyncio.Event]:
    """An event set at the first SIGINT or SIGTERM, for the duration of the block. Install it before starting
    anything, so a Ctrl-C during start-up also ends in an orderly stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
