"""NATS credentials of the letta-bus roles: generated once for the embedded server, found again by every process.

Source: docs.nats.io "Authentication" (users and passwords in the server config), "Authorization" (permissions per
user; bus/permissions.py) and "Multi Tenancy using Accounts" (an account with ``jetstream: enabled`` holds the
streams; clients outside every account's users are refused). nats-server resolves ``include`` paths against the
including file's directory, refuses a missing include and does not share variables across files, which is why the
generated files are laid out as they are:

``<auth_dir>/`` (mode 0700, default ``./var/nats-auth``)
    ``<role>.env``   one per role (admin, dispatcher, publisher, subscriber, bridge), mode 0600, written once and kept:
                     ``LETTA_BUS_NATS_USER``, ``LETTA_BUS_NATS_PASSWORD``, ``LETTA_BUS_NATS_INBOX_PREFIX``. Letta
                     and internal services use theirs (``set -a; . publisher.env; set +a``), or run on this machine
                     with the same ``LETTA_BUS_NATS_AUTH_DIR`` and find it by their role.
    ``accounts.conf`` mode 0600, rewritten at every start from the settings (streams, durables, subjects): the
                     ``LETTA_BUS`` account with JetStream and one user per role with its permissions.
    ``svc-<name>.env`` one per service identity (``letta-bus nats-auth add-service <name>``, :func:`add_service`),
                     mode 0600, written once and kept: the three values above for user ``svc-<name>`` plus
                     ``LETTA_BUS_NATS_DURABLES`` (the durables it owns). Every start renders them into
                     ``accounts.conf`` with :func:`bus.permissions.service_permissions`.
    ``server.conf``  mode 0600, rewritten at every start: ``include`` of the project's ``nats.conf`` and of
                     ``accounts.conf``, and ``pid_file`` ``nats-server.pid`` (beside it) so that
                     :func:`reload_server` finds the server to reload. The embedded server runs
                     ``nats-server -c server.conf``.

The project's ``nats.conf`` stays valid on its own (``nats-server -t -c nats.conf``): it holds the server settings
and refers to these files in a comment.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bus.permissions import (ROLES, SERVICE_USER_PREFIX, Role, check_service_durables, inbox_prefix,
                             role_permissions, service_permissions, service_user, user_name)
from config.settings import Settings

#: The NATS account that holds letta-bus's streams and users.
ACCOUNT = "LETTA_BUS"
ACCOUNTS_FILE = "accounts.conf"
SERVER_FILE = "server.conf"
PID_FILE = "nats-server.pid"
_KEYS = ("LETTA_BUS_NATS_USER", "LETTA_BUS_NATS_PASSWORD", "LETTA_BUS_NATS_INBOX_PREFIX")


class CredentialsError(ValueError):
    """A credentials file is missing a value or cannot be read; the message names the file and the setting."""


@dataclass(frozen=True)
class NatsCredentials:
    """What a client presents: ``user`` and ``password``, and the ``inbox_prefix`` its replies come back on (the
    only reply subjects its permissions let it subscribe to)."""

    user: str
    password: str
    inbox_prefix: str

    def __repr__(self) -> str:  # never print the password
        return f"NatsCredentials(user={self.user!r}, inbox_prefix={self.inbox_prefix!r})"


@dataclass(frozen=True)
class AuthFiles:
    """Paths of the generated files (see the module docstring)."""

    directory: Path
    server_conf: Path
    accounts_conf: Path
    roles: dict[Role, Path]
    services: dict[str, Path] = field(default_factory=dict)  # service name -> its svc-<name>.env
    pid_file: Path | None = None  # written by a nats-server started with server_conf


@dataclass(frozen=True)
class ServiceIdentity:
    """A service's own NATS user (``svc-<name>``): its ``credentials`` and the ``durables`` on the events stream it
    owns (:func:`bus.permissions.service_permissions`)."""

    name: str
    credentials: NatsCredentials
    durables: tuple[str, ...]


def role_file(auth_dir: Path, role: Role) -> Path:
    """``<auth_dir>/<role>.env``."""
    return Path(auth_dir) / f"{role}.env"


def service_file(auth_dir: Path, service: str) -> Path:
    """``<auth_dir>/svc-<service>.env``."""
    return Path(auth_dir) / f"{service_user(service)}.env"


def load_services(auth_dir: Path, settings: Settings) -> list[ServiceIdentity]:
    """Every ``svc-<name>.env`` in ``auth_dir``, sorted by name (none when the directory does not exist). Raises
    :class:`CredentialsError` naming the file when one is incomplete or its name or durables break the rule of
    :func:`bus.permissions.check_service_durables`."""
    found = []
    for path in sorted(Path(auth_dir).glob(f"{SERVICE_USER_PREFIX}*.env")):
        name = path.name[len(SERVICE_USER_PREFIX):-len(".env")]
        creds = load_credentials(path)
        listed = [d.strip() for d in _read_values(path).get("LETTA_BUS_NATS_DURABLES", "").split(",") if d.strip()]
        try:
            durables = check_service_durables(name, listed, settings)
        except ValueError as exc:
            raise CredentialsError(f"service identity {path}: {exc}") from None
        if creds.user != service_user(name):
            raise CredentialsError(f"service identity {path}: LETTA_BUS_NATS_USER is {creds.user!r}, expected "
                                   f"{service_user(name)!r} (the file name gives the service)")
        found.append(ServiceIdentity(name, creds, tuple(durables)))
    return found


def add_service(settings: Settings, auth_dir: Path, base_conf: Path, service: str,
                durables: Sequence[str] = ()) -> tuple[ServiceIdentity, AuthFiles, bool]:
    """Create the identity of ``service`` (user ``svc-<service>``, a random 256-bit password, inbox prefix
    ``_INBOX.svc-<service>``) owning ``durables`` (default ``[service]``; rule of
    :func:`bus.permissions.check_service_durables`), then rewrite the server files (:func:`ensure_auth_files`).
    Idempotent: an existing identity keeps its password; given ``durables`` replace its list. Returns the identity,
    the files and whether it was created. The running server does not see it until reloaded
    (:func:`reload_server`). Raises ``ValueError`` for a bad name, a durable another service owns, and like
    :func:`ensure_auth_files`."""
    owned = check_service_durables(service, durables, settings)
    directory = Path(auth_dir).resolve()
    path = service_file(directory, service)
    others = {d: s.name for s in load_services(directory, settings) if s.name != service for d in s.durables}
    if service in others or any(d in others for d in owned):
        clash = next(d for d in [service, *owned] if d in others)
        raise ValueError(f"durable {clash!r} is owned by service {others[clash]!r}: pick another name")
    created = not path.exists()
    if created:
        user = service_user(service)
        creds = NatsCredentials(user, secrets.token_urlsafe(32), inbox_prefix(user))
    else:
        creds = load_credentials(path)
        if not durables:
            owned = list(next(s for s in load_services(directory, settings) if s.name == service).durables)
    if created or durables:
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        _write_private(path, _service_file_text(service, creds, owned))
    files = ensure_auth_files(settings, directory, base_conf)
    return ServiceIdentity(service, creds, tuple(owned)), files, created


def remove_service(settings: Settings, auth_dir: Path, base_conf: Path, service: str) -> tuple[bool, AuthFiles]:
    """Delete the identity of ``service`` (its ``svc-<service>.env``) and rewrite the server files; returns whether
    it existed, and the files. Its durables stay on the server (delete them as admin if unwanted) and, once the
    server is reloaded (:func:`reload_server`), the user is refused and its connections are closed. Raises like
    :func:`ensure_auth_files`."""
    path = service_file(Path(auth_dir).resolve(), service)
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed, ensure_auth_files(settings, auth_dir, base_conf)


def reload_server(files: AuthFiles) -> int | None:
    """Make the nats-server started with ``files.server_conf`` re-read its config (new users, new permissions):
    SIGHUP, nats-server's documented reload signal (``nats-server --signal reload`` sends the same). The server is
    found by its ``pid_file``; a stale file (no such process, or on Linux one that is not a nats-server) is ignored.
    Returns the PID signalled, or ``None`` when no such server runs (reload your own server yourself). The reload
    is asynchronous: it completes a moment later, and a config error leaves the old one running (in its log)."""
    path = files.pid_file or files.directory / PID_FILE
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        if cmdline.parent.parent.exists() and b"nats-server" not in cmdline.read_bytes():
            return None
        os.kill(pid, signal.SIGHUP)
    except (OSError, ProcessLookupError):
        return None
    return pid


def load_credentials(path: Path) -> NatsCredentials:
    """Read a ``<role>.env`` file (``KEY=VALUE`` lines; ``#`` comments). Raises :class:`CredentialsError` naming the
    file when it is unreadable or lacks ``LETTA_BUS_NATS_USER`` / ``LETTA_BUS_NATS_PASSWORD``."""
    values = _read_values(path)
    missing = [k for k in _KEYS[:2] if not values.get(k)]
    if missing:
        raise CredentialsError(f"NATS credentials {path} lack {', '.join(missing)}: delete the file to have "
                               "`letta-bus up` generate it again, or write the values in")
    user = values["LETTA_BUS_NATS_USER"]
    return NatsCredentials(user, values["LETTA_BUS_NATS_PASSWORD"],
                           values.get("LETTA_BUS_NATS_INBOX_PREFIX") or inbox_prefix(user))


def client_credentials(settings: Settings, role: Role | None) -> NatsCredentials | None:
    """The credentials a process in ``role`` connects with: ``nats_user``/``nats_password`` when set (whatever the
    role: the operator chose this process's identity), else the role's generated file in ``nats_auth_dir`` when it
    exists, else ``None`` (anonymous, which a server with letta-bus's accounts refuses). ``role=None``: the
    explicit settings only. Raises :class:`CredentialsError` for an unreadable or incomplete file."""
    if settings.nats_user is not None and settings.nats_password is not None:
        return NatsCredentials(settings.nats_user, settings.nats_password.get_secret_value(),
                               settings.nats_inbox_prefix or inbox_prefix(settings.nats_user))
    path = role_file(settings.nats_auth_dir, role) if role is not None else None
    if path is not None and path.exists():
        return load_credentials(path)
    return None


def ensure_auth_files(settings: Settings, auth_dir: Path, base_conf: Path) -> AuthFiles:
    """Create ``auth_dir`` (0700) and each missing ``<role>.env`` (0600, a random 256-bit password), then rewrite
    ``accounts.conf`` and ``server.conf`` (0600) from ``settings`` so that ``nats-server -c server.conf`` runs
    ``base_conf`` (the project's nats.conf) with the letta-bus account, the service identities found in ``auth_dir``
    (:func:`load_services`) and ``pid_file`` ``<auth_dir>/nats-server.pid``. Existing role files are kept (their
    passwords stay valid across restarts). Returns the paths. Raises ``OSError`` when the directory is not
    writable and :class:`CredentialsError` for a damaged role or service file."""
    directory = Path(auth_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    creds: dict[Role, NatsCredentials] = {}
    paths: dict[Role, Path] = {}
    for role in ROLES:
        path = role_file(directory, role)
        if not path.exists():
            user = user_name(role)
            _write_private(path, _role_file_text(role, NatsCredentials(
                user, secrets.token_urlsafe(32), inbox_prefix(user))))
        creds[role] = load_credentials(path)
        paths[role] = path
    services = load_services(directory, settings)
    accounts = directory / ACCOUNTS_FILE
    _write_private(accounts, render_accounts(settings, creds, services))
    server = directory / SERVER_FILE
    pid_file = directory / PID_FILE
    rel = os.path.relpath(Path(base_conf).resolve(), directory)
    _write_private(server, (
        "# Generated by letta-bus (bus/auth.py) at every start: the project's nats.conf plus the letta-bus account\n"
        f"# and its users. Run the broker exactly as `letta-bus up` does: nats-server -c {server}\n"
        "# pid_file: `letta-bus nats-auth add-service` finds the server here to reload it (SIGHUP).\n"
        f"include {json.dumps(rel)}\ninclude {json.dumps(ACCOUNTS_FILE)}\npid_file: {json.dumps(str(pid_file))}\n"))
    return AuthFiles(directory, server, accounts, paths, {s.name: service_file(directory, s.name) for s in services},
                     pid_file)


def render_accounts(settings: Settings, creds: dict[Role, NatsCredentials],
                    services: Sequence[ServiceIdentity] = ()) -> str:
    """The ``accounts`` block of nats-server's config: account ``LETTA_BUS`` with JetStream, one user per role of
    ``creds`` with :func:`bus.permissions.role_permissions` and one per service identity with
    :func:`bus.permissions.service_permissions` (whose durables the shared subscriber role may then not touch).
    Strings are JSON-quoted (a quoted ``$JS...`` is a subject, not a variable reference)."""
    owned = [d for s in services for d in s.durables]
    entries = [(role, c, role_permissions(role, settings, inbox=c.inbox_prefix, service_durables=owned))
               for role, c in creds.items()]
    entries += [(f"service {s.name}: durables {', '.join(s.durables)}", s.credentials,
                 service_permissions(s.name, s.durables, settings, inbox=s.credentials.inbox_prefix))
                for s in services]
    users = []
    for what, c, perms in entries:
        users.append(f"      # {what}\n      {{user: {json.dumps(c.user)}, password: {json.dumps(c.password)},\n"
                     f"       permissions: {json.dumps(perms.as_conf())}}}")
    return (
        "# letta-bus account and users, generated from the settings at every start (bus/auth.py). Mode 0600:\n"
        "# the passwords are those of the <role>.env files beside it. Anonymous clients are refused.\n"
        f"accounts {{\n  {ACCOUNT}: {{\n    jetstream: enabled\n    users: [\n" + "\n".join(users) + "\n    ]\n  }\n}\n"
    )


def _read_values(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a credentials file (``#`` comments skipped). Raises :class:`CredentialsError`."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CredentialsError(f"cannot read NATS credentials {path}: {exc.strerror} "
                               "(LETTA_BUS_NATS_AUTH_DIR)") from None
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _service_file_text(service: str, c: NatsCredentials, durables: Sequence[str]) -> str:
    return (
        f"# letta-bus NATS identity of the service {service!r} (generated by `letta-bus nats-auth add-service`; keep\n"
        "# private, mode 0600). It may create, pull from, ack and delete only the durables below on the events\n"
        "# stream.\n"
        "# Use them: set -a; . <this file>; set +a. nats.js: connect({user, pass, inboxPrefix}); Go: nats.UserInfo()\n"
        "# and nats.CustomInboxPrefix() with these values (README: \"Service identities\").\n"
        f"LETTA_BUS_NATS_USER={c.user}\nLETTA_BUS_NATS_PASSWORD={c.password}\n"
        f"LETTA_BUS_NATS_INBOX_PREFIX={c.inbox_prefix}\nLETTA_BUS_NATS_DURABLES={','.join(durables)}\n"
    )


def _role_file_text(role: Role, c: NatsCredentials) -> str:
    return (
        f"# letta-bus NATS credentials of the {role} role (generated; keep private, mode 0600).\n"
        "# Use them: set -a; . <this file>; set +a   (or copy the three values into the service's environment)\n"
        f"LETTA_BUS_NATS_USER={c.user}\nLETTA_BUS_NATS_PASSWORD={c.password}\n"
        f"LETTA_BUS_NATS_INBOX_PREFIX={c.inbox_prefix}\n"
    )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (0600), never briefly wider: the file is created with
    that mode, replaced atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
