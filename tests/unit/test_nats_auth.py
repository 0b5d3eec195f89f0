"""Generated NATS credentials and config (bus/auth.py), the role permission matrix (bus/permissions.py), TLS
contexts (bus/tls.py) and their settings' errors. The server-side proof is tests/integration/test_bus_auth.py."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from bus.auth import CredentialsError, client_credentials, ensure_auth_files, load_credentials
from bus.embedded import nats_server_binary
from bus.permissions import ROLES, role_permissions
from bus.tls import tls_context
from config.settings import PROJECT_ROOT, Settings

SETTINGS = Settings(_env_file=None)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generated_files_are_owner_only_and_passwords_survive_a_restart(tmp_path):
    files = ensure_auth_files(SETTINGS, tmp_path / "var" / "nats-auth", PROJECT_ROOT / "nats.conf")
    assert _mode(files.directory) == 0o700
    for path in [files.server_conf, files.accounts_conf, *files.roles.values()]:
        assert _mode(path) == 0o600, path
    first = {role: load_credentials(path) for role, path in files.roles.items()}
    assert {c.user for c in first.values()} == {f"letta-bus-{r}" for r in ROLES}
    assert len({c.password for c in first.values()}) == len(ROLES) and all(len(c.password) >= 40 for c in first.values())
    assert first["publisher"].inbox_prefix == "_INBOX.letta-bus-publisher"

    again = ensure_auth_files(SETTINGS, files.directory, PROJECT_ROOT / "nats.conf")
    assert {role: load_credentials(path) for role, path in again.roles.items()} == first
    accounts = again.accounts_conf.read_text()
    assert all(c.password in accounts for c in first.values())
    assert first["admin"].password not in repr(first["admin"])  # a logged credentials object keeps it secret


def test_the_repo_nats_conf_and_the_generated_server_conf_are_both_valid(tmp_path):
    binary = str(nats_server_binary())
    alone = subprocess.run([binary, "-t", "-c", str(PROJECT_ROOT / "nats.conf")], capture_output=True, text=True,
                           timeout=10)
    assert alone.returncode == 0, alone.stderr
    files = ensure_auth_files(SETTINGS, tmp_path / "auth", PROJECT_ROOT / "nats.conf")
    generated = subprocess.run([binary, "-t", "-c", str(files.server_conf)], capture_output=True, text=True,
                               timeout=10, cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr


def test_publisher_and_subscriber_have_no_stream_admin_and_only_their_inbox():
    pub = role_permissions("publisher", SETTINGS)
    assert pub.publish_allow == ["letta.>"] and pub.subscribe_allow == ["_INBOX.letta-bus-publisher.>"]
    sub = role_permissions("subscriber", SETTINGS)
    allowed = " ".join(sub.publish_allow)
    assert "letta.>" not in sub.publish_allow and "STREAM.DELETE" not in allowed and "STREAM.CREATE" not in allowed
    assert "LETTA_WEBHOOKS" not in allowed
    assert "$JS.API.CONSUMER.MSG.NEXT.LETTA_EVENTS.webhook-fanout" in sub.publish_deny
    assert "$JS.ACK.LETTA_EVENTS.webhook-fanout.>" in sub.publish_deny


def test_dispatcher_permissions_follow_the_settings():
    custom = Settings(_env_file=None, events_stream="EV", webhooks_stream="WH", fanout_durable="fan",
                      sender_durable="send", webhooks_subject_prefix="hooks", control_subject="ctl.endpoints")
    perms = role_permissions("dispatcher", custom, inbox="_INBOX.mine")
    assert "$JS.API.CONSUMER.MSG.NEXT.WH.*" in perms.publish_allow
    assert "$JS.ACK.EV.fan.>" in perms.publish_allow and "$JS.ACK.WH.send.>" in perms.publish_allow
    assert "hooks.>" in perms.publish_allow and "ctl.endpoints" in perms.publish_allow
    assert perms.subscribe_allow == ["_INBOX.mine.>", "ctl.endpoints", custom.peers_subject]
    # no stream admin; purge only of the parked backlogs' stream (a drained endpoint's subject: delivery/parking.py)
    assert not any("STREAM.DELETE" in s or "STREAM.CREATE" in s or s.startswith("letta.") for s in perms.publish_allow)
    assert [s for s in perms.publish_allow if "STREAM.PURGE" in s] == [f"$JS.API.STREAM.PURGE.{custom.parked_stream}"]
    assert "$JS.API.CONSUMER.DELETE.WH.send" in perms.publish_deny
    # on the events stream only its own durable: no creating, pulling from or deleting other consumers there
    events_consumers = [s for s in perms.publish_allow if s.startswith("$JS.API.CONSUMER.") and ".EV." in s]
    assert events_consumers == ["$JS.API.CONSUMER.MSG.NEXT.EV.fan", "$JS.API.CONSUMER.INFO.EV.fan"]
    assert "$JS.API.DIRECT.GET.EV" in perms.publish_allow
    with pytest.raises(ValueError, match="unknown role"):
        role_permissions("root", SETTINGS)  # type: ignore[arg-type]


def test_explicit_settings_win_over_role_files(tmp_path):
    files = ensure_auth_files(SETTINGS, tmp_path / "auth", PROJECT_ROOT / "nats.conf")
    s = Settings(_env_file=None, nats_auth_dir=files.directory)
    assert client_credentials(s, "subscriber").user == "letta-bus-subscriber"
    assert client_credentials(s, None) is None
    assert client_credentials(Settings(_env_file=None, nats_auth_dir=tmp_path / "none"), "publisher") is None
    explicit = Settings(_env_file=None, nats_auth_dir=files.directory, nats_user="letta", nats_password="pw")
    creds = client_credentials(explicit, "subscriber")
    assert (creds.user, creds.password, creds.inbox_prefix) == ("letta", "pw", "_INBOX.letta")


def test_bad_credentials_input_names_the_setting_or_file(tmp_path):
    with pytest.raises(ValidationError, match="LETTA_BUS_NATS_USER and LETTA_BUS_NATS_PASSWORD go together"):
        Settings(_env_file=None, nats_user="letta")
    with pytest.raises(ValidationError, match="LETTA_BUS_NATS_USER and LETTA_BUS_NATS_PASSWORD"):
        Settings(_env_file=None, nats_password=SecretStr("pw"))
    with pytest.raises(ValidationError, match="nats_inbox_prefix"):
        Settings(_env_file=None, nats_inbox_prefix="_INBOX.>")
    broken = tmp_path / "publisher.env"
    broken.write_text("LETTA_BUS_NATS_USER=letta-bus-publisher\n")
    with pytest.raises(CredentialsError, match="publisher.env lack LETTA_BUS_NATS_PASSWORD"):
        load_credentials(broken)
    with pytest.raises(CredentialsError, match="LETTA_BUS_NATS_AUTH_DIR"):
        load_credentials(tmp_path / "missing.env")


def test_tls_context_from_settings_and_its_errors(tmp_path):
    assert tls_context(SETTINGS) is None
    with pytest.raises(ValidationError, match="LETTA_BUS_NATS_TLS_CERT_FILE and LETTA_BUS_NATS_TLS_KEY_FILE"):
        Settings(_env_file=None, nats_tls_cert_file=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="LETTA_BUS_NATS_TLS_CA_FILE=.*no such file"):
        tls_context(Settings(_env_file=None, nats_tls_ca_file=tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ValueError, match="LETTA_BUS_NATS_TLS_CA_FILE=.*not a PEM"):
        tls_context(Settings(_env_file=None, nats_tls_ca_file=junk))
    with pytest.raises(ValueError, match="LETTA_BUS_NATS_TLS_CERT_FILE / LETTA_BUS_NATS_TLS_KEY_FILE"):
        tls_context(Settings(_env_file=None, nats_tls_cert_file=junk, nats_tls_key_file=junk))
