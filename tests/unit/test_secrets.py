"""Endpoint secrets at rest (dispatcher.store.secrets): MultiFernet round trip, key rotation, the development key file,
and a "database dump" check that a SQLite file holding an encrypted secret contains no plaintext secret bytes."""

from __future__ import annotations

import base64
import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from dispatcher.store.database import Store
from dispatcher.store.secrets import (KEYS_SETTING, SecretBox, SecretKeyError, generate_key, generate_secret,
                                     load_or_create_key)

pytestmark = pytest.mark.timeout(5)


def test_round_trip():
    box = SecretBox([generate_key()])
    for plaintext in ("whsec_" + "A" * 44, "a user secret with spaces and unicode: \u00e9\u2603", ""):
        assert box.decrypt(box.encrypt(plaintext)) == plaintext


def test_ciphertext_does_not_contain_the_plaintext():
    box = SecretBox([generate_key()])
    secret = generate_secret()
    token = box.encrypt(secret)
    raw = secret.removeprefix("whsec_")
    assert secret not in token and raw not in token and "whsec_" not in token
    assert base64.b64decode(raw) not in base64.urlsafe_b64decode(token)  # not even the key bytes, decoded
    assert box.encrypt(secret) != token  # a fresh IV each time: equal secrets are not linkable


def test_old_token_decrypts_after_a_new_key_is_put_first():
    old, new = generate_key(), generate_key()
    token = SecretBox([old]).encrypt("s3cret-value-1234")
    rotated_box = SecretBox([new, old])
    assert rotated_box.decrypt(token) == "s3cret-value-1234"
    assert not rotated_box.is_current(token)
    fresh = rotated_box.encrypt("another")
    assert rotated_box.is_current(fresh)
    with pytest.raises(SecretKeyError):
        SecretBox([old]).decrypt(fresh)  # new tokens use the first key


def test_rotate_re_encrypts_under_the_new_key_so_the_old_key_can_go():
    old, new = generate_key(), generate_key()
    token = SecretBox([old]).encrypt("s3cret-value-1234")
    rotated = SecretBox([new, old]).rotate(token)
    assert rotated != token
    assert SecretBox([new]).decrypt(rotated) == "s3cret-value-1234"  # old key removed
    with pytest.raises(SecretKeyError):
        SecretBox([old]).decrypt(rotated)


def test_no_fitting_key_names_the_setting_and_leaks_nothing():
    key = generate_key()
    token = SecretBox([generate_key()]).encrypt("s3cret-value-1234")
    box = SecretBox([key])
    for call in (box.decrypt, box.rotate):
        with pytest.raises(SecretKeyError, match=KEYS_SETTING) as info:
            call(token)
        assert key not in str(info.value) and "s3cret" not in str(info.value)
    with pytest.raises(SecretKeyError, match=KEYS_SETTING):
        box.decrypt("not a token")
    with pytest.raises(SecretKeyError, match=KEYS_SETTING):
        box.decrypt("caf\u00e9")
    assert isinstance(SecretKeyError("x"), ValueError)


def test_bad_keys_name_the_setting_without_showing_the_key():
    with pytest.raises(SecretKeyError, match=KEYS_SETTING):
        SecretBox([])
    with pytest.raises(SecretKeyError, match=rf"{KEYS_SETTING}: key #1") as info:
        SecretBox([generate_key(), "too-short-to-be-a-key"])
    assert "too-short" not in str(info.value)


def test_keys_from_settings_text():
    key = generate_key()
    assert SecretBox([f"  {key}\n"]).decrypt(SecretBox([key]).encrypt("x")) == "x"  # whitespace from env files
    assert SecretBox(key).decrypt(SecretBox([key]).encrypt("x")) == "x"  # one key given as a string
    assert key not in repr(SecretBox([key])) and "1 key" in repr(SecretBox([key]))


def test_generate_key_is_a_fresh_fernet_key():
    a, b = generate_key(), SecretBox.generate_key()
    assert a != b and len(base64.urlsafe_b64decode(a)) == 32
    Fernet(a)


def test_key_file_is_created_owner_only_and_reused(tmp_path: Path):
    path = tmp_path / "data" / "secret.key"
    key = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert load_or_create_key(path) == key  # the same key next time
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    Fernet(key)


def test_key_file_mode_ignores_a_permissive_umask(tmp_path: Path):
    old = os.umask(0)
    try:
        path = tmp_path / "secret.key"
        load_or_create_key(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_key_file_with_loose_permissions_is_tightened(tmp_path: Path, caplog):
    path = tmp_path / "secret.key"
    key = load_or_create_key(path)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="dispatcher.store.secrets"):
        assert load_or_create_key(path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "0600" in caplog.text


def test_corrupt_key_file_is_an_error_not_overwritten(tmp_path: Path):
    path = tmp_path / "secret.key"
    path.write_text("garbage\n")
    path.chmod(0o600)
    with pytest.raises(SecretKeyError, match=KEYS_SETTING):
        load_or_create_key(path)
    assert path.read_text() == "garbage\n"


def test_from_config(tmp_path: Path):
    key = generate_key()
    token = SecretBox.from_config([key], tmp_path / "unused.key", production=True).encrypt("x")
    assert SecretBox([key]).decrypt(token) == "x"
    assert not (tmp_path / "unused.key").exists()
    dev = SecretBox.from_config([], tmp_path / "var" / "secret.key", production=False)
    assert dev.decrypt(SecretBox([(tmp_path / "var" / "secret.key").read_text().strip()]).encrypt("y")) == "y"
    with pytest.raises(SecretKeyError, match=KEYS_SETTING):
        SecretBox.from_config([], tmp_path / "prod.key", production=True)
    assert not (tmp_path / "prod.key").exists()


def _dump(db: Path) -> bytes:
    """Every byte SQLite keeps for the database: the main file plus its WAL and shared-memory files."""
    return b"".join(p.read_bytes() for p in sorted(db.parent.glob(db.name + "*")))


class _PlainBox:
    """Stores secrets as they are: the control that shows the dump check can see a leak."""

    def encrypt(self, plaintext: str) -> str:
        return plaintext

    def decrypt(self, token: str) -> str:
        return token


async def _store_webhook(tmp_path: Path, name: str, secret: str, box) -> Path:
    db = tmp_path / name / "letta-bus.db"
    store = Store(f"sqlite+aiosqlite:///{db}", secret_box=box)
    try:
        await store.create_schema()
        await store.set_agent_webhook("agent-dump", url="https://hooks.example.com/letta", secret=secret)
    finally:
        await store.close()
    return db


async def test_database_dump_contains_no_plaintext_secret(tmp_path: Path):
    box = SecretBox([generate_key()])
    secret = generate_secret()
    raw_key = base64.b64decode(secret.removeprefix("whsec_"))
    needles = [secret.encode(), secret.removeprefix("whsec_").encode(), raw_key, b"whsec_"]

    # Control: the same write with the plaintext secret shows up in the dump, so the check can see a leak.
    plain_db = await _store_webhook(tmp_path, "plain", secret, _PlainBox())
    assert secret.encode() in _dump(plain_db)

    db = await _store_webhook(tmp_path, "encrypted", secret, box)
    dump = _dump(db)
    for needle in needles:
        assert needle not in dump, needle
    assert b"hooks.example.com" in dump  # the rest of the row is there, readable

    store = Store(f"sqlite+aiosqlite:///{db}", secret_box=box)
    try:
        (row,) = await store.endpoints()
    finally:
        await store.close()
    assert row.secret.encode() in dump  # the ciphertext is what was stored
    assert box.decrypt(row.secret) == secret
