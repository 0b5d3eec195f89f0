"""Pure helpers of the management API and CLI: cursors, replay filter subjects, pattern checks, error messages,
API key resolution."""

from __future__ import annotations

import stat
from datetime import datetime, timezone

import pytest
from pydantic import SecretStr

from config.settings import Settings
from dispatcher.api.auth import ApiKeyError, resolve_api_keys
from dispatcher.api.validation import unknown_patterns
from dispatcher.cli.api_client import ApiError
from dispatcher.ops.replay import read_subject
from dispatcher.store.models import Delivery
from dispatcher.store.queries import decode_cursor, encode_cursor


def test_cursor_round_trip_and_garbage():
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    cursor = encode_cursor(Delivery(id="dlv_abc", created_at=when))
    assert "=" not in cursor and decode_cursor(cursor) == (when, "dlv_abc")
    naive = encode_cursor(Delivery(id="dlv_abc", created_at=when.replace(tzinfo=None)))  # SQLite gives naive UTC
    assert decode_cursor(naive) == (when, "dlv_abc")
    for bad in ("garbage!", "", "Zm9v", encode_cursor(Delivery(id="", created_at=when))):
        with pytest.raises(ValueError, match="cursor"):
            decode_cursor(bad)


def test_replay_reads_one_subject_covering_the_patterns():
    assert read_subject("letta", []) == "letta.>"
    assert read_subject("letta", ["agent.>", "agent.step.*", "agent.run.completed"]) == "letta.agent.>"
    assert read_subject("letta", ["agent.step.*", "agent.run.completed"]) == "letta.>"  # matched in the dispatcher
    assert read_subject("letta", ["agent.step.completed", "agent.step.completed"]) == "letta.agent.step.completed"


def test_unknown_patterns():
    assert unknown_patterns(["agent.step.*", "agent.>", "*.execution.completed", "webhook.test", ">"]) == []
    assert unknown_patterns(["agent.stpe.completed", "agent.memory.*"]) == ["agent.stpe.completed", "agent.memory.*"]


def test_api_error_messages_name_the_field():
    detail = [{"loc": ["body", "url"], "msg": "bad url"}, {"loc": ["body", "events", 2], "msg": "bad pattern"},
              {"loc": ["query", "cursor"], "msg": "bad cursor"}]
    assert ApiError(422, detail).message == "url: bad url; events[2]: bad pattern; cursor: bad cursor"
    assert ApiError(404, "agent a has no webhook").message == "agent a has no webhook"


def test_api_keys_from_settings_or_a_development_file(tmp_path):
    configured = Settings(_env_file=None, api_keys=[SecretStr("k1"), SecretStr("k2")], api_key_file=tmp_path / "x")
    assert resolve_api_keys(configured) == ["k1", "k2"] and not (tmp_path / "x").exists()
    dev = Settings(_env_file=None, api_key_file=tmp_path / "var" / "api.key")
    assert resolve_api_keys(dev, create=False) == []
    [key] = resolve_api_keys(dev)
    assert key.startswith("lbk_") and len(key) > 40
    assert stat.S_IMODE((tmp_path / "var" / "api.key").stat().st_mode) == 0o600
    assert resolve_api_keys(dev) == [key]  # read back, not regenerated
    with pytest.raises(ApiKeyError, match="LETTA_BUS_API_KEYS"):
        resolve_api_keys(Settings(_env_file=None, env="production", api_key_file=tmp_path / "var" / "api.key",
                                  secret_keys=[SecretStr("x" * 44)]))
