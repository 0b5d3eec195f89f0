"""Letta's step-complete webhook as a subscriber, against a real nats-server and a real receiver on 127.0.0.1:
Letta's exact request, retries with backoff, rejects, the max_deliver bound, timeouts and isolation."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from pydantic import SecretStr

from bus.publisher import EventPublisher
from config.settings import Settings
from subscribers import Event, Subscriber
from bus.retry_after import parse_retry_after as retry_after_s
from subscribers.legacy_step_webhook import LegacyStepWebhook
from tests.helpers import CATALOG_SAMPLES, wait_until

pytestmark = pytest.mark.timeout(10)

PATH = "/step-complete"
KEY = "legacy-key-123"


@pytest.fixture
def legacy_settings(settings, receiver) -> Settings:
    return settings.model_copy(update={
        "step_complete_webhook": receiver.url(PATH), "step_complete_key": SecretStr(KEY),
        "legacy_webhook_timeout_s": 2.0,
    })


@pytest.fixture
def publisher(settings, nc, provisioned):
    return EventPublisher(settings, nc)


def make(settings: Settings, nc=None, **kw) -> LegacyStepWebhook:
    kw.setdefault("base_backoff_s", 0.1)
    kw.setdefault("fetch_timeout_s", 0.3)
    return LegacyStepWebhook(settings, nc=nc, **kw)


async def settled(js, settings: Settings, durable: str) -> bool:
    info = await js.consumer_info(settings.events_stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_posts_letta_payload_for_terminal_steps_only(legacy_settings, nc, provisioned, publisher, receiver):
    async with make(legacy_settings, nc) as legacy:
        for event_type in CATALOG_SAMPLES:  # all nine types; three are terminal step events
            data = dict(CATALOG_SAMPLES[event_type])
            if event_type.startswith("agent.step."):
                data["step_id"] = f"step-{event_type.rsplit('.', 1)[1]}"
            await publisher.publish_event("agent-1", event_type, data, strict=True)
        got = await receiver.wait_for(3, 5, PATH)
        await wait_until(lambda: settled(provisioned, legacy_settings, "legacy-step-complete-webhook"))
    assert sorted(json.loads(r.body)["step_id"] for r in got) == ["step-cancelled", "step-completed", "step-failed"]
    for r in got:
        assert json.loads(r.body) == {"step_id": json.loads(r.body)["step_id"]}  # exactly Letta's payload
        assert r.headers["Authorization"] == f"Bearer {KEY}"
        assert r.headers["Content-Type"] == "application/json"
    assert len(receiver.received) == 3 and legacy.stats.acked == 3
    info = await provisioned.consumer_info(legacy_settings.events_stream, "legacy-step-complete-webhook")
    assert set(info.config.filter_subjects) == {"letta.agent.step.completed", "letta.agent.step.failed",
                                                "letta.agent.step.cancelled"}
    assert info.config.max_deliver == legacy_settings.legacy_webhook_max_deliver


async def test_no_key_sends_no_authorization(legacy_settings, nc, provisioned, publisher, receiver):
    async with make(legacy_settings.model_copy(update={"step_complete_key": None}), nc):
        await publisher.publish_event("agent-1", "agent.step.completed", {"step_id": "step-1", "status": "success"})
        [r] = await receiver.wait_for(1, 5, PATH)
    assert "Authorization" not in r.headers


async def test_failures_are_retried_with_backoff_then_acked(legacy_settings, nc, provisioned, publisher, receiver):
    receiver.respond(PATH, 503, 500, 429)
    async with make(legacy_settings, nc, base_backoff_s=0.2) as legacy:
        await publisher.publish_event("agent-1", "agent.step.completed", {"step_id": "step-1", "status": "success"})
        got = await receiver.wait_for(4, 8, PATH)
        await wait_until(lambda: settled(provisioned, legacy_settings, "legacy-step-complete-webhook"))
    assert [r.status for r in got] == [503, 500, 429, 200]
    gaps = [b.at - a.at for a, b in zip(got, got[1:])]
    assert gaps[0] >= 0.15 and gaps[1] >= 0.35 and gaps[2] >= 0.75, gaps  # 0.2, 0.4, 0.8 s
    assert legacy.stats.retried == 3 and legacy.stats.acked == 1


async def test_client_errors_are_not_retried(legacy_settings, nc, provisioned, publisher, receiver):
    receiver.respond(PATH, 401)
    async with make(legacy_settings, nc) as legacy:
        await publisher.publish_event("agent-1", "agent.step.failed", {"step_id": "step-9", "error": "boom"})
        await receiver.wait_for(1, 5, PATH)
        await wait_until(lambda: settled(provisioned, legacy_settings, "legacy-step-complete-webhook"))
        await asyncio.sleep(0.5)
    assert len(receiver.received) == 1 and legacy.stats.rejected == 1


async def test_max_deliver_bounds_retries_and_others_are_not_affected(legacy_settings, provisioned, publisher,
                                                                      receiver, settings, nc):
    """A receiver that always fails (slowly) costs the legacy durable max_deliver attempts and nothing else: another
    service on the same events sees and acks everything meanwhile. The legacy webhook has its own connection."""
    receiver.respond(PATH, *[500] * 10)
    receiver.delay_s[PATH] = 0.2
    bounded = legacy_settings.model_copy(update={"legacy_webhook_max_deliver": 3})
    seen: list[str] = []
    other = Subscriber("billing", ["letta.agent.>"], settings=settings, nc=nc, fetch_timeout_s=0.3)

    @other.handler
    async def on_event(event: Event) -> None:
        seen.append(event.event_id)

    async with make(bounded, base_backoff_s=0.1) as legacy, other:
        assert legacy.subscriber._nc is not nc  # its own NATS connection
        ids = [await publisher.publish_event("agent-1", "agent.step.completed",
                                             {"step_id": f"step-{i}", "status": "success"}) for i in range(3)]
        await wait_until(lambda: sorted(seen) == sorted(ids), 3, what="the other service saw every event")
        assert len(receiver.received) < 9  # it did not wait for the legacy receiver
        await receiver.wait_for(9, 8, PATH)
        await wait_until(lambda: settled(provisioned, bounded, "legacy-step-complete-webhook"), 3)
    assert len(receiver.received) == 9 and legacy.stats.gave_up == 3  # 3 events x max_deliver 3
    assert other.stats.acked == 3


async def test_timeout_is_retried(legacy_settings, nc, provisioned, publisher, receiver):
    receiver.delay_s[PATH] = 1.0
    fast = legacy_settings.model_copy(update={"legacy_webhook_timeout_s": 0.3})
    async with make(fast, nc) as legacy:
        await publisher.publish_event("agent-1", "agent.step.cancelled", {"step_id": "step-3"})
        await receiver.wait_for(1, 5, PATH)
        del receiver.delay_s[PATH]
        await receiver.wait_for(2, 5, PATH)
        await wait_until(lambda: legacy.stats.acked == 1, 5)
    assert legacy.stats.retried >= 1


async def test_needs_the_url(settings):
    with pytest.raises(ValueError, match="STEP_COMPLETE_WEBHOOK"):
        LegacyStepWebhook(settings.model_copy(update={"step_complete_webhook": None}))


def test_reads_letta_variables(monkeypatch):
    monkeypatch.setenv("STEP_COMPLETE_WEBHOOK", "https://hooks.example.com/letta/step")
    monkeypatch.setenv("STEP_COMPLETE_KEY", "k-1")
    s = Settings(_env_file=None)
    assert s.step_complete_webhook == "https://hooks.example.com/letta/step"
    assert s.step_complete_key.get_secret_value() == "k-1"
    monkeypatch.setenv("STEP_COMPLETE_WEBHOOK", "")  # empty = unset, as in Letta
    assert Settings(_env_file=None).step_complete_webhook is None
    monkeypatch.setenv("STEP_COMPLETE_WEBHOOK", "hooks.example.com")
    with pytest.raises(ValueError, match="STEP_COMPLETE_WEBHOOK must be an http"):
        Settings(_env_file=None)


def test_retry_after_parsing():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert retry_after_s("7") == 7.0
    assert retry_after_s(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None


def _cli_env(**extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("LETTA_BUS_") and not k.startswith("STEP_")}
    env.update({"COLUMNS": "200", **extra})
    return env


async def _run_cli(args: list[str], env: dict[str, str], ready: str, then) -> str:  # noqa: ANN001
    """Start ``letta-bus <args>``, wait for a line containing ``ready``, run ``await then()``, Ctrl-C it, return
    its output; asserts exit code 0."""
    import signal
    import sys
    from pathlib import Path

    proc = await asyncio.create_subprocess_exec(str(Path(sys.executable).parent / "letta-bus"), *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    lines: list[str] = []
    try:
        while not any(ready in line for line in lines):
            line = (await asyncio.wait_for(proc.stdout.readline(), 8)).decode()
            assert line, "".join(lines)
            lines.append(line)
        await then()
        proc.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(proc.communicate(), 8)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    out = "".join(lines) + rest.decode()
    assert proc.returncode == 0, out
    return out


@pytest.mark.timeout(20)  # a subprocess; about 3 s, the bound leaves room for a loaded machine
async def test_cli_legacy_step_webhook(settings, provisioned, publisher, receiver):
    env = _cli_env(LETTA_BUS_NATS_URL=settings.nats_url, LETTA_BUS_NATS_AUTH_DIR=str(settings.nats_auth_dir), STEP_COMPLETE_WEBHOOK=receiver.url(PATH),
                   STEP_COMPLETE_KEY=KEY)

    async def publish_and_receive() -> None:
        await wait_until(lambda: consumer_exists(provisioned, settings), 5, what="the legacy durable")
        await publisher.publish_event("agent-1", "agent.step.completed", {"step_id": "step-cli", "status": "success"})
        [r] = await receiver.wait_for(1, 5, PATH)
        assert json.loads(r.body) == {"step_id": "step-cli"} and r.headers["Authorization"] == f"Bearer {KEY}"

    out = await _run_cli(["legacy-step-webhook"], env, "Ctrl-C stops it", publish_and_receive)
    assert f"legacy step-complete webhook -> {receiver.url(PATH)}" in out and "stopped" in out


@pytest.mark.timeout(20)  # a subprocess; about 5 s, the bound leaves room for a loaded machine
async def test_up_runs_the_legacy_webhook_when_step_complete_webhook_is_set(settings, provisioned, publisher,
                                                                            receiver, tmp_path):
    env = _cli_env(LETTA_BUS_NATS_URL=settings.nats_url, LETTA_BUS_NATS_AUTH_DIR=str(settings.nats_auth_dir), LETTA_BUS_METRICS_PORT="0", LETTA_BUS_API_PORT="0",
                   LETTA_BUS_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/up.db",
                   LETTA_BUS_SECRET_KEY_FILE=str(tmp_path / "secret.key"), STEP_COMPLETE_WEBHOOK=receiver.url(PATH))

    async def publish_and_receive() -> None:
        await publisher.publish_event("agent-1", "agent.step.failed", {"step_id": "step-up", "error": "boom"})
        [r] = await receiver.wait_for(1, 5, PATH)
        assert json.loads(r.body) == {"step_id": "step-up"} and "Authorization" not in r.headers

    out = await _run_cli(["up"], env, "dispatcher running", publish_and_receive)
    assert f"legacy step-complete webhook -> {receiver.url(PATH)} (durable legacy-step-complete-webhook)" in out


async def consumer_exists(js, settings: Settings) -> bool:
    try:
        await js.consumer_info(settings.events_stream, "legacy-step-complete-webhook")
    except Exception:  # noqa: BLE001 - not yet
        return False
    return True
