"""NATS credentials of the letta-bus roles: generated once for the embedded server, found again by every process.

Source: docs.nats.io "Authentication" (users and passwords in the server config), "Authorization" (permissions per
user; bus/permissions.py) and "Multi Tenancy using Accounts" (an account with ``jetstream: enabled`` holds the
streams; clients outside every account's users are refused). nats-server resolves ``include`` paths against the
including file's directory, refuses a missing include and does not share variables across files, which is why the
generated files are laid out as they are:

``<auth_dir>/`` (mode 0700, default ``./var/nats-auth``)
    ``<role>.env``   one per role (admin, dispatcher, publisher, subscriber), mode 0600, written once and kept:
                     ``LETTA_BUS_NATS_USER``, ``LETTA_BUS_NATS_PASSWORD``, ``LETTA_BUS_NATS_INBOX_PREFIX``. Letta
                     and internal services use theirs (``set -a; . publisher.env; set +a``), or run on this machine
                     with the same ``LETTA_BUS_NATS_AUTH_DIR`` and find it by their role.
    ``accounts.conf`` mode 0600, rewritten at every start from the settings (streams, durables, subjects): the
                     ``LETTA_BUS`` account with JetStream and one user per role with its permissions.
    ``server.conf``  mode 0600, rewritten at every start: ``include`` of the project's ``nats.conf`` and of
                     ``accounts.conf``. The embedded server runs ``nats-server -c server.conf``.

The project's ``nats.conf`` stays valid on its own (``nats-server -t -c nats.conf``): it holds the server settings
and refers to these files in a comment.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from bus.permissions import ROLES, Role, inbox_prefix, role_permissions, user_name
from config.settings import Settings

#: The NATS account that holds letta-bus's streams and users.
ACCOUNT = "LETTA_BUS"
ACCOUNTS_FILE = "accounts.conf"
SERVER_FILE = "server.conf"
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


def role_file(auth_dir: Path, role: Role) -> Path:
    """``<auth_dir>/<role>.env``."""
    return Path(auth_dir) / f"{role}.env"


def load_credentials(path: Path) -> NatsCredentials:
    """Read a ``<role>.env`` file (``KEY=VALUE`` lines; ``#`` comments). Raises :class:`CredentialsError` naming the
    file when it is unreadable or lacks ``LETTA_BUS_NATS_USER`` / ``LETTA_BUS_NATS_PASSWORD``."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CredentialsError(f"cannot read NATS credentials {path}: {exc.strerror} (LETTA_BUS_NATS_AUTH_DIR)") from None
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
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
    ``base_conf`` (the project's nats.conf) with the letta-bus account. Existing role files are kept (their
    passwords stay valid across restarts). Returns the paths. Raises ``OSError`` when the directory is not
    writable and :class:`CredentialsError` for a damaged role file."""
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
    accounts = directory / ACCOUNTS_FILE
    _write_private(accounts, render_accounts(settings, creds))
    server = directory / SERVER_FILE
    rel = os.path.relpath(Path(base_conf).resolve(), directory)
    _write_private(server, (
        "# Generated by letta-bus (bus/auth.py) at every start: the project's nats.conf plus the letta-bus account\n"
        f"# and its users. Run the broker exactly as `letta-bus up` does: nats-server -c {server}\n"
        f"include {json.dumps(rel)}\ninclude {json.dumps(ACCOUNTS_FILE)}\n"))
    return AuthFiles(directory, server, accounts, paths)


def render_accounts(settings: Settings, creds: dict[Role, NatsCredentials]) -> str:
    """The ``accounts`` block of nats-server's config: account ``LETTA_BUS`` with JetStream and one user per role of
    ``creds`` with :func:`bus.permissions.role_permissions`. Strings are JSON-quoted (a quoted ``$JS...`` is a
    subject, not a variable reference)."""
    users = []
    for role, c in creds.items():
        perms = role_permissions(role, settings, inbox=c.inbox_prefix).as_conf()
        users.append(f"      # {role}\n      {{user: {json.dumps(c.user)}, password: {json.dumps(c.password)},\n"
                     f"       permissions: {json.dumps(perms)}}}")
    return (
        "# letta-bus account and users, generated from the settings at every start (bus/auth.py). Mode 0600:\n"
        "# the passwords are those of the <role>.env files beside it. Anonymous clients are refused.\n"
        f"accounts {{\n  {ACCOUNT}: {{\n    jetstream: enabled\n    users: [\n" + "\n".join(users) + "\n    ]\n  }\n}\n"
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
