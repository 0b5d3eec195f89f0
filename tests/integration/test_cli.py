"""The letta-bus command line, run as a user runs it: a subprocess, bounded in time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LETTA_BUS = str(Path(sys.executable).parent / "letta-bus")


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LETTA_BUS_")}
    full_env.update(env or {})
    full_env["COLUMNS"] = "200"
    return subprocess.run([LETTA_BUS, *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


def test_demo_exits_zero_with_every_delivery_verified(tmp_path):
    result = run("demo", "--timeout", "45", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "OK: every expected delivery arrived" in out
    # support-bot: all 10 events; research-bot: 5 of 10 (agent.step.* and agent.run.completed); batch-bot: none
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[3:9]]
            for line in out.splitlines() if line.startswith("│ ") and "-bot" in line}
    assert rows["support-bot"] == ["10", "10", "10", "10", "0", "10"]
    assert rows["research-bot"] == ["10", "5", "5", "5", "0", "6"]  # one 503 then a retry
    assert rows["batch-bot (disabled)"] == ["10", "0", "0", "0", "0", "0"]


def test_webhooks_set_and_publish_against_a_running_server(nats_server, nats_auth, tmp_path):
    from tests.helpers import closed_port

    env = {"LETTA_BUS_NATS_URL": nats_server.url, "LETTA_BUS_NATS_AUTH_DIR": str(nats_auth.directory),
           "LETTA_BUS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/db.sqlite",
           "LETTA_BUS_API_URL": f"http://127.0.0.1:{closed_port()}"}  # no API: the CLI writes the database itself
    ok = run("webhooks", "set", "agent-1", "--url", "https://example.com/hook", "--events", "agent.step.*,agent.>",
             env=env)
    assert ok.returncode == 0, ok.stderr
    assert "signing secret (shown once): whsec_" in ok.stdout
    bad = run("webhooks", "set", "agent-1", "--url", "ftp://example.com/x", env=env)
    assert bad.returncode == 2 and "scheme must be http or https" in bad.stderr
    bad = run("webhooks", "set", "agent-1", "--url", "https://example.com/x", "--events", "agent.**", env=env)
    assert bad.returncode == 2 and "webhook_events pattern 'agent.**'" in bad.stderr
    short = run("webhooks", "set", "agent-1", "--url", "https://example.com/x", "--secret", "short", env=env)
    assert short.returncode == 2 and "at least 16 characters" in short.stderr

    # No stream yet: the error says which setting to check.
    missing = run("publish", "agent.step.completed", "--agent", "agent-1",
                  "--data", '{"step_id": "step-1", "status": "success"}', env=env)
    assert missing.returncode == 1 and "LETTA_BUS_NATS_URL" in missing.stderr


def test_publish_validates_before_sending(nats_server, nats_auth):
    env = {"LETTA_BUS_NATS_URL": nats_server.url, "LETTA_BUS_NATS_AUTH_DIR": str(nats_auth.directory)}
    bad_json = run("publish", "agent.step.completed", "--agent", "agent-1", "--data", "{nope", env=env)
    assert bad_json.returncode == 2 and "--data is not JSON" in bad_json.stderr
    missing = run("publish", "agent.step.completed", "--agent", "agent-1", "--data", '{"status": "success"}',
                  env=env)
    assert missing.returncode == 2 and "step_id" in missing.stderr


def test_bad_setting_names_the_variable():
    result = run("publish", "agent.x", "--agent", "a", env={"LETTA_BUS_HTTP_TIMEOUT_S": "soon"})
    assert result.returncode == 2 and "LETTA_BUS_HTTP_TIMEOUT_S" in result.stderr


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_runs_and_ctrl_c_stops_the_broker_child(tmp_path):
    import re
    import signal
    import socket
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("LETTA_BUS_")}
    with socket.socket() as probe:  # a free port for /metrics
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    env.update({"LETTA_BUS_EMBEDDED_PORT": "-1", "LETTA_BUS_EMBEDDED_MONITOR_PORT": "-1", "COLUMNS": "200",
                "LETTA_BUS_API_PORT": "-1",
                "LETTA_BUS_METRICS_PORT": str(metrics_port)})
    proc = subprocess.Popen([LETTA_BUS, "up"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "dispatcher running" in line or not line:
                break
        assert "dispatcher running" in "".join(lines), "".join(lines)
        log = (tmp_path / "var" / "nats-server.log").read_text()
        broker_pid = int(re.match(r"\[(\d+)\]", log).group(1))
        assert _pid_alive(broker_pid)
        assert (tmp_path / "var" / "nats").is_dir() and (tmp_path / "var" / "letta-bus.db").exists()
        text = "".join(lines)
        auth_dir = (tmp_path / "var" / "nats-auth").resolve()
        assert f"NATS credentials (mode 0600) in {auth_dir}: Letta publisher.env" in text
        assert oct((auth_dir / "publisher.env").stat().st_mode & 0o777) == "0o600"
        url = re.search(r"embedded nats-server (nats://127\.0\.0\.1:\d+)", text).group(1)
        step = '{"step_id": "step-1", "status": "success"}'
        published = run("publish", "agent.step.completed", "--agent", "agent-9", "--data", step, cwd=tmp_path,
                        env={"LETTA_BUS_NATS_URL": url}, timeout=30)  # finds var/nats-auth/publisher.env
        assert published.returncode == 0, published.stderr
        anonymous = run("publish", "agent.step.completed", "--agent", "agent-9", "--data", step, cwd=tmp_path,
                        env={"LETTA_BUS_NATS_URL": url, "LETTA_BUS_NATS_AUTH_DIR": str(tmp_path / "none")}, timeout=30)
        assert anonymous.returncode == 1 and "Authorization Violation" in anonymous.stderr
        import urllib.request

        scrape, scrape_deadline = "", time.monotonic() + 20
        while time.monotonic() < scrape_deadline and 'consumer_pending{consumer="webhook-sender"}' not in scrape:
            scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            time.sleep(0.2)
        assert 'letta_bus_consumer_pending{consumer="webhook-sender"} 0.0' in scrape
        assert "letta_bus_deliveries_total" in scrape and "letta_bus_attempt_duration_seconds_bucket" in scrape
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "stopped" in out
    assert not _pid_alive(broker_pid), "the embedded nats-server must stop with letta-bus up"


def test_up_names_the_setting_when_the_port_is_taken(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("up", env={"LETTA_BUS_EMBEDDED_PORT": str(port), "LETTA_BUS_EMBEDDED_MONITOR_PORT": "-1",
                                "LETTA_BUS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/db.sqlite"}, timeout=30,
                     cwd=tmp_path)
    assert result.returncode == 1
    assert f"port {port}" in result.stderr and "LETTA_BUS_NATS_URL" in result.stderr


def test_tail_prints_events_and_stops_after_count(nats_server, settings, tmp_path):
    import asyncio

    from bus.connection import connect
    from bus.publisher import EventPublisher
    from bus.streams import provision

    async def publish() -> str:
        nc = await connect(settings.nats_url, name="test", settings=settings, role="admin")
        await provision(nc.jetstream(), settings)
        event_id = await EventPublisher(settings, nc).publish_event(
            "agent-7", "agent.step.completed", {"step_id": "step-1", "status": "success"}, strict=True)
        await nc.close()
        return event_id

    event_id = asyncio.run(publish())
    result = run("tail", "letta.agent.>", "--since", "all", "--count", "1", timeout=30,
                 env={"LETTA_BUS_NATS_URL": settings.nats_url, "LETTA_BUS_NATS_AUTH_DIR": str(settings.nats_auth_dir)})
    assert result.returncode == 0, result.stderr
    assert "agent.step.completed" in result.stdout and "agent-7" in result.stdout and event_id in result.stdout


def test_nats_auth_writes_the_files_and_provision_uses_the_admin_role(nats_server, nats_auth, tmp_path):
    out_dir = tmp_path / "mine"
    written = run("nats-auth", "--dir", str(out_dir), timeout=30)
    assert written.returncode == 0, written.stderr
    assert "accounts.conf" in written.stdout and sorted(p.name for p in out_dir.iterdir()) == [
        "accounts.conf", "admin.env", "bridge.env", "dispatcher.env", "publisher.env", "server.conf", "subscriber.env"]
    env = {"LETTA_BUS_NATS_URL": nats_server.url, "LETTA_BUS_NATS_AUTH_DIR": str(nats_auth.directory)}
    provisioned = run("provision", env=env, timeout=30)
    assert provisioned.returncode == 0, provisioned.stderr
    assert "provisioned LETTA_EVENTS, LETTA_WEBHOOKS" in provisioned.stdout
    refused = run("provision", env={**env, "LETTA_BUS_NATS_AUTH_DIR": str(out_dir)}, timeout=30)  # other passwords
    assert refused.returncode == 1 and "Authorization Violation" in refused.stderr
