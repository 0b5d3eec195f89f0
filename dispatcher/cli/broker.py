"""``letta-bus nats-auth`` and ``letta-bus provision``: the bus's credentials and streams for a broker of your own.

``nats-auth`` writes what ``letta-bus up`` generates for its embedded server (bus/auth.py): one ``<role>.env`` per
role, ``accounts.conf`` with the roles' permissions for the current settings, and ``server.conf`` including
``nats.conf``. ``provision`` creates or updates the streams and durables as the admin role, for deployments whose
dispatcher user may not (``LETTA_BUS_PROVISION=false``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Optional

import typer

from dispatcher.cli.support import console, fail, settings_or_exit


def credentials_summary(directory: Path) -> str:
    """One line telling which generated file each kind of client uses."""
    return (f"NATS credentials (mode 0600) in {directory}: Letta publisher.env, internal services subscriber.env, "
            "operators and the nats CLI admin.env (dispatcher.env: letta-bus itself)")


def nats_auth(
    directory: Annotated[Optional[Path], typer.Option("--dir", help="default: LETTA_BUS_NATS_AUTH_DIR")] = None,
    base_conf: Annotated[Optional[Path], typer.Option(help="server config to include; default LETTA_BUS_NATS_CONF")]
    = None,
) -> None:
    """Write the NATS account, one user per role with its permissions, and each role's credentials file."""
    from bus.auth import CredentialsError, ensure_auth_files

    settings = settings_or_exit()
    try:
        files = ensure_auth_files(settings, directory or settings.nats_auth_dir, base_conf or settings.nats_conf)
    except (OSError, CredentialsError) as exc:
        raise fail(str(exc)) from None
    console.print(f"accounts and permissions: {files.accounts_conf} (include it in your nats-server config)\n"
                  f"complete server config: {files.server_conf} (nats-server -c {files.server_conf})\n"
                  f"{credentials_summary(files.directory)}", highlight=False)


def provision() -> None:
    """Create or update the streams and the dispatcher's durables, as the admin role."""
    from dispatcher.cli.runtime import provision_streams

    settings = settings_or_exit()
    target = settings.model_copy(update={"nats_url": settings.client_url})
    try:
        asyncio.run(provision_streams(target))
    except (ConnectionError, PermissionError, ValueError) as exc:
        raise fail(str(exc)) from None
    console.print(f"provisioned {settings.events_stream}, {settings.webhooks_stream} and durables "
                  f"{settings.fanout_durable}, {settings.sender_durable} on {target.nats_url}", highlight=False)
