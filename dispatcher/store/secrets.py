"""Endpoint signing secrets: how they are generated, and their encryption at rest with ``cryptography``'s
MultiFernet (DESIGN.md, "Storage").

Generated secrets are ``whsec_`` + base64 of 32 random bytes (:func:`generate_secret`; DESIGN.md, "HTTP"), the
form the Standard Webhooks libraries take as is.

Keys come from the setting ``secret_keys`` (environment ``LETTA_BUS_SECRET_KEYS``, a JSON list of Fernet keys:
url-safe base64 of 32 random bytes, as :func:`generate_key` makes). The FIRST key encrypts; every key decrypts,
so rotation is: put a new key first, keep the old ones, re-encrypt stored values with :meth:`SecretBox.rotate`,
then drop the old keys. A Fernet token is AES-128-CBC + HMAC-SHA256 with a timestamp
(https://github.com/fernet/spec/blob/master/Spec.md); it never contains the plaintext.

Development fallback when no key is configured: :func:`load_or_create_key` keeps one key in a file,
by default ``./var/secret.key`` next to the embedded SQLite database (``<data_dir>/secret.key``), created with
mode 0600. There is no hard-coded key. Production requires ``LETTA_BUS_SECRET_KEYS`` (:meth:`SecretBox.from_config`).
"""

from __future__ import annotations

import base64
import logging
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger(__name__)

#: Prefix of generated signing secrets; the Standard Webhooks key of such a secret is the base64-decoded rest.
SECRET_PREFIX = "whsec_"
#: Environment variable of the key setting, named in every error message.
KEYS_SETTING = "LETTA_BUS_SECRET_KEYS"
#: File name of the development key inside the data directory.
KEY_FILE_NAME = "secret.key"
#: Default development key file (the embedded data directory is ``./var``).
DEFAULT_KEY_FILE = Path("./var") / KEY_FILE_NAME


class SecretKeyError(ValueError):
    """A token could not be decrypted with any configured key, or a key is malformed. The message names
    ``LETTA_BUS_SECRET_KEYS`` and never contains a key or a plaintext."""


def generate_secret() -> str:
    """A new signing secret: ``whsec_`` + base64 of 32 random bytes from ``os.urandom``."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode()


def generate_key() -> str:
    """A new Fernet key: url-safe base64 (44 characters) of 32 bytes from ``os.urandom``."""
    return Fernet.generate_key().decode("ascii")


def _fernet(key: str | bytes, index: int) -> Fernet:
    try:
        return Fernet(key.strip() if isinstance(key, (str, bytes)) else key)
    except (ValueError, TypeError):
        raise SecretKeyError(
            f"{KEYS_SETTING}: key #{index} is not a Fernet key (url-safe base64 of 32 bytes); "
            "make one with `python -c 'from dispatcher.store.secrets import generate_key; print(generate_key())'`"
        ) from None


class SecretBox:
    """Encrypts and decrypts endpoint secrets. ``keys``: Fernet keys (str), first = current, at least one.

    Raises :class:`SecretKeyError` (a ``ValueError``) for an empty list or a malformed key (by position, the key
    itself is not shown). ``repr`` shows only the number of keys.
    """

    __slots__ = ("_current", "_multi", "_count", "_first_key")

    def __init__(self, keys: Sequence[str]) -> None:
        if isinstance(keys, (str, bytes)):
            keys = [keys]  # type: ignore[list-item]
        fernets = [_fernet(k, i) for i, k in enumerate(keys)]
        if not fernets:
            raise SecretKeyError(f"{KEYS_SETTING} is empty: give at least one key, e.g. '[\"{generate_key()}\"]'")
        self._current = fernets[0]
        self._multi = MultiFernet(fernets)
        self._count = len(fernets)
        first = keys[0]
        self._first_key = base64.urlsafe_b64decode(first.strip() if isinstance(first, (str, bytes)) else first)

    @classmethod
    def from_config(
        cls, keys: Sequence[str], key_file: str | os.PathLike[str] = DEFAULT_KEY_FILE, *, production: bool,
    ) -> SecretBox:
        """The box for the settings: ``keys`` (``secret_keys``) when any are given; else, outside production, the
        development key kept in ``key_file`` (``<data_dir>/secret.key``, see :func:`load_or_create_key`). Raises
        :class:`SecretKeyError` in production without keys, or for a malformed key."""
        if keys:
            return cls(keys)
        if production:
            raise SecretKeyError(
                f"{KEYS_SETTING} must be set in production (LETTA_BUS_ENV=production): a JSON list of Fernet keys, "
                f"newest first, e.g. '[\"{generate_key()}\"]'"
            )
        path = Path(key_file)
        log.warning("%s is not set: using the development key file %s", KEYS_SETTING, path)
        return cls([load_or_create_key(path)])

    def derive_key(self, purpose: str) -> bytes:
        """32 bytes for ``purpose`` (e.g. ``"portal-session"``), derived from the first key with HKDF-SHA256
        (RFC 5869; ``info`` = ``letta-bus <purpose>``): a signing key of its own, never the encryption key itself.
        Rotating the first key changes it."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=f"letta-bus {purpose}".encode()).derive(self._first_key)

    def __repr__(self) -> str:
        return f"SecretBox(<{self._count} key(s)>)"

    def encrypt(self, plaintext: str) -> str:
        """The Fernet token (ASCII, url-safe base64, about 1.4 * len + 80 chars) of ``plaintext`` (UTF-8),
        under the current key. A fresh IV each call: equal secrets give different tokens."""
        return self._multi.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str) -> str:
        """The plaintext of a token made with any configured key. Raises :class:`SecretKeyError` naming
        ``LETTA_BUS_SECRET_KEYS`` when no key fits (a removed key, another installation's key, or not a token)."""
        try:
            return self._multi.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise SecretKeyError(self._no_key_message()) from None

    def rotate(self, token: str) -> str:
        """Re-encrypt a token under the current (first) key, keeping its plaintext (``MultiFernet.rotate``).
        After every stored token is rotated the old keys can be removed. Raises :class:`SecretKeyError` when
        no key fits."""
        try:
            return self._multi.rotate(token.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeError):
            raise SecretKeyError(self._no_key_message()) from None

    def is_current(self, token: str) -> bool:
        """True when ``token`` decrypts with the current key (so :meth:`rotate` would only refresh it)."""
        try:
            self._current.decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeError):
            return False
        return True

    def _no_key_message(self) -> str:
        return (f"cannot decrypt a stored secret with any of the {self._count} key(s) in {KEYS_SETTING}: "
                "add the key it was encrypted with back to the list (new key first, old keys after)")

    generate_key = staticmethod(generate_key)


def load_or_create_key(path: str | os.PathLike[str]) -> str:
    """The development Fernet key kept in ``path`` (normally ``<data_dir>/secret.key``), created when missing.

    Creation is atomic and safe between processes: the key is written to a temporary file (mode 0600, owner
    read/write only) in the same directory, then hard-linked to ``path``; when another process won the race its
    key is used. The directory is created with mode 0700 when missing. An existing file readable by group or
    others is tightened to 0600 with a warning. Raises :class:`SecretKeyError` when the file holds no valid key
    (it is never overwritten: the secrets stored with it would be lost).
    """
    target = Path(path)
    if not target.exists():
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = generate_key()
        fd, tmp = tempfile.mkstemp(prefix=".secret-", dir=target.parent)  # mkstemp: mode 0600
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(key + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, target)
                log.warning("created the development secret key %s (mode 0600); set %s in production",
                            target, KEYS_SETTING)
            except FileExistsError:
                pass  # another process created it first: use theirs
        finally:
            os.unlink(tmp)
    mode = stat.S_IMODE(target.stat().st_mode)
    if mode & 0o077:
        log.warning("secret key file %s had mode %o; setting 0600", target, mode)
        os.chmod(target, 0o600)
    key = target.read_text(encoding="ascii").strip()
    try:
        Fernet(key)
    except (ValueError, TypeError):
        raise SecretKeyError(
            f"{target} does not hold a Fernet key; restore it, or set {KEYS_SETTING} (secrets encrypted with the "
            "lost key must then be set again)"
        ) from None
    return key
