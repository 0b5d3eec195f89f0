"""``letta-bus nats-auth`` and ``letta-bus provision``: the bus's credentials and streams for a broker of your own.

``nats-auth`` writes what ``letta-bus up`` generates for its embedded server (bus/auth.py): one ``<role>.env`` per
role, ``accounts.conf`` with the roles' permissions for the current settings, and ``server.conf`` including
``nats.conf``; ``nats-auth add-service <name>`` adds a service identity (user ``svc-<name>``, only its own durables)
and reloads the server started from those files. ``provision`` creates or updates the streams and durables as the
admin role, for deployments whose dispatcher user may not (``LETTA_BUS_PROVISION=false``).
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
            "operators and the nats CLI admin.env (dispatcher.env: letta-bus itself, bridge.env: letta-bus bridge)")


nats_auth_app = typer.Typer(invoke_without_command=True, add_completion=False,
                            help="NATS credentials: the roles' files (no subcommand) and service identities.")
_DIR = typer.Option("--dir", help="default: LETTA_BUS_NATS_AUTH_DIR")
_BASE = typer.Option(help="server config to include; default LETTA_BUS_NATS_CONF")
_RELOAD = typer.Option(help="SIGHUP the nats-server started from these files (its pid file)")


@nats_auth_app.callback()
def nats_auth(
    ctx: typer.Context,
    directory: Annotated[Optional[Path], _DIR] = None,
    base_conf: Annotated[Optional[Path], _BASE] = None,
) -> None:
    """Write the NATS account, one user per role with its permissions, and each role's credentials file."""
    from bus.auth import CredentialsError, ensure_auth_files

    if ctx.invoked_subcommand is not None:
        return
    settings = settings_or_exit()
    try:
        files = ensure_auth_files(settings, directory or settings.nats_auth_dir, base_conf or settings.nats_conf)
    except (OSError, CredentialsError) as exc:
        raise fail(str(exc)) from None
    console.print(f"accounts and permissions: {files.accounts_conf} (include it in your nats-server config)\n"
                  f"complete server config: {files.server_conf} (nats-server -c {files.server_conf})\n"
                  f"{credentials_summary(files.directory)}", highlight=False)


@nats_auth_app.command("add-service")
def add_service(
    name: Annotated[str, typer.Argument(help="service name, e.g. billing: user svc-<name>, durable <name>")],
    durable: Annotated[Optional[list[str]], typer.Option(
        "--durable", help="a durable it owns (repeatable): <name> or <name>-<suffix>; default <name> alone")] = None,
    directory: Annotated[Optional[Path], _DIR] = None,
    base_conf: Annotated[Optional[Path], _BASE] = None,
    reload: Annotated[bool, _RELOAD] = True,
) -> None:
    """Give one internal service its own NATS user: it may create, pull from, ack and delete only its durables."""
    from bus import auth

    settings = settings_or_exit()
    try:
        identity, files, created = auth.add_service(settings, directory or settings.nats_auth_dir,
                                                    base_conf or settings.nats_conf, name, durable or ())
    except (OSError, ValueError) as exc:  # CredentialsError is a ValueError
        raise fail(str(exc), 2 if not isinstance(exc, (OSError, auth.CredentialsError)) else 1) from None
    c = identity.credentials
    console.print(f"{'created' if created else 'kept'} service identity {c.user} (durables "
                  f"{', '.join(identity.durables)}): {files.services[name]} (mode 0600)\n"
                  f"clients set user {c.user}, its password and inbox prefix {c.inbox_prefix} (nats.js inboxPrefix, "
                  "Go nats.CustomInboxPrefix)", highlight=False, soft_wrap=True)
    _reload(files, reload)


@nats_auth_app.command("remove-service")
def remove_service(
    name: Annotated[str, typer.Argument(help="service name given to add-service")],
    directory: Annotated[Optional[Path], _DIR] = None,
    base_conf: Annotated[Optional[Path], _BASE] = None,
    reload: Annotated[bool, _RELOAD] = True,
) -> None:
    """Delete a service identity: after the reload its user is refused (its durables stay; an admin deletes them)."""
    from bus import auth

    settings = settings_or_exit()
    try:
        existed, files = auth.remove_service(settings, directory or settings.nats_auth_dir,
                                             base_conf or settings.nats_conf, name)
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    if not existed:
        raise fail(f"no service identity {name!r} in {files.directory} (its file svc-{name}.env)", 2)
    console.print(f"removed service identity svc-{name} from {files.accounts_conf}", highlight=False)
    _reload(files, reload)


def _reload(files, reload: bool) -> None:  # noqa: ANN001 - bus.auth.AuthFiles, imported lazily
    from bus.auth import reload_server

    pid = reload_server(files) if reload else None
    if pid is not None:
        console.print(f"reloaded nats-server (pid {pid}) with {files.accounts_conf}", highlight=False)
    else:
        console.print(f"no running nats-server from {files.server_conf}: start it, or reload yours after including "
                      f"{files.accounts_conf} (nats-server --signal reload=<pid>, or kill -HUP <pid>)",
                      highlight=False, soft_wrap=True)


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
