"""The API as users reach it: `letta-bus up` (subprocess, embedded nats-server on free ports, API on a free port,
cwd a temporary directory), called with httpx as curl would, and the CLI commands that mirror it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from dispatcher.store.migrate import head_revision

LETTA_BUS = str(Path(sys.executable).parent / "letta-bus")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append({"headers": dict(self.headers), "body": body})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`letta-bus up` running in a temporary directory; yields (env for CLI calls, cwd, api url, nats url, hook)."""
    cwd = tmp_path_factory.mktemp("up")
    hook = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    api_port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETTA_BUS_")}
    env.update({"LETTA_BUS_EMBEDDED_PORT": "-1", "LETTA_BUS_EMBEDDED_MONITOR_PORT": "-1", "COLUMNS": "200",
                "LETTA_BUS_API_PORT": str(api_port), "LETTA_BUS_METRICS_PORT": "0",
                "LETTA_BUS_SSRF_ALLOW_CIDRS": '["127.0.0.0/8"]', "LETTA_BUS_RETRY_SCHEDULE_S": "[0.2, 0.2]"})
    proc = subprocess.Popen([LETTA_BUS, "up"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "dispatcher running" in line or not line:
                break
        out = "".join(lines)
        assert "dispatcher running" in out, out
        nats_url = re.search(r"(nats://127\.0\.0\.1:\d+)", out).group(1)
        assert f"API http://127.0.0.1:{api_port}" in out and "var/api.key" in out
        env["LETTA_BUS_NATS_URL"] = nats_url
        yield {"env": env, "cwd": cwd, "api": f"http://127.0.0.1:{api_port}", "hook": hook, "proc": proc}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        hook.shutdown()


def cli(stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LETTA_BUS, *args], cwd=stack["cwd"], env=stack["env"], capture_output=True, text=True,
                          timeout=timeout)


def test_up_serves_the_api_with_a_generated_development_key(stack):
    key_file = stack["cwd"] / "var" / "api.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert key.startswith("lbk_")
    health = httpx.get(f"{stack['api']}/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert health.json()["dispatcher"]["running"] and health.json()["database"]["revision"] == head_revision()
    assert httpx.get(f"{stack['api']}/v1/webhooks", timeout=5).status_code == 401
    hook_url = f"http://127.0.0.1:{stack['hook'].server_address[1]}/curl"
    auth = {"Authorization": f"Bearer {key}"}
    r = httpx.put(f"{stack['api']}/v1/agents/agent-curl/webhook", headers=auth, timeout=5,
                  json={"url": hook_url, "events": ["agent.step.*"]})
    assert r.status_code == 201 and r.json()["secret"].startswith("whsec_"), r.text
    bad = httpx.put(f"{stack['api']}/v1/agents/agent-curl/webhook", headers=auth, timeout=5, json={"url": "ftp://x"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "url"]
    test = httpx.post(f"{stack['api']}/v1/agents/agent-curl/webhook/test", headers=auth, timeout=20)
    assert test.json()["status"] == "succeeded" and test.json()["status_code"] == 200, test.text


def test_the_cli_mirrors_the_api(stack):
    hook_url = f"http://127.0.0.1:{stack['hook'].server_address[1]}/cli"
    r = cli(stack, "webhooks", "set", "agent-cli", "--url", hook_url, "--events", "agent.step.*")
    assert r.returncode == 0 and "signing secret (shown once): whsec_" in r.stdout, r.stdout + r.stderr
    assert "writing the database" not in r.stderr  # it went through the API
    bad = cli(stack, "webhooks", "set", "agent-cli", "--url", hook_url, "--events", "agent.stpe.done")
    assert bad.returncode == 2 and "events[0]" in bad.stderr and "matches no known event type" in bad.stderr

    r = cli(stack, "webhooks", "get", "agent-cli")
    assert r.returncode == 0 and "agent.step.*" in r.stdout and "has_secret" in r.stdout and "whsec_" not in r.stdout
    r = cli(stack, "webhooks", "test", "agent-cli")
    assert r.returncode == 0 and "succeeded: HTTP 200" in r.stdout, r.stdout + r.stderr

    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 2))
    r = cli(stack, "publish", "agent.step.completed", "--agent", "agent-cli",
            "--data", '{"step_id": "step-1", "status": "success"}')
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        listed = cli(stack, "deliveries", "list", "agent-cli", "--json")
        rows = json.loads(listed.stdout)["data"]
        if any(d["event_type"] == "agent.step.completed" and d["status"] == "succeeded" for d in rows):
            break
        time.sleep(0.2)
    step = next(d for d in rows if d["event_type"] == "agent.step.completed")
    shown = cli(stack, "deliveries", "show", step["id"])
    assert shown.returncode == 0 and "succeeded" in shown.stdout and "200" in shown.stdout

    retried = cli(stack, "deliveries", "retry", step["id"])
    assert retried.returncode == 0 and "queued" in retried.stdout, retried.stderr
    replayed = cli(stack, "replay", "agent-cli", "--since", since)
    assert replayed.returncode == 0 and "1 deliveries queued" in replayed.stdout, replayed.stdout + replayed.stderr
    bulk = cli(stack, "deliveries", "retry", "--agent", "agent-cli", "--failed-since", since)
    assert bulk.returncode == 0 and "queued 0 failed deliveries" in bulk.stdout, bulk.stdout + bulk.stderr

    rotated = cli(stack, "webhooks", "rotate-secret", "agent-cli")
    assert rotated.returncode == 0 and "new signing secret (shown once): whsec_" in rotated.stdout

    status = cli(stack, "status")
    assert status.returncode == 0, status.stderr
    for text in ("LETTA_EVENTS", "LETTA_WEBHOOKS", "webhook-fanout", "webhook-sender", "ack pending", "redelivered",
                 "agent-cli", "closed"):
        assert text in status.stdout, (text, status.stdout)
    as_json = json.loads(cli(stack, "status", "--json").stdout)
    assert {s["name"] for s in as_json["streams"]} == {"LETTA_EVENTS", "LETTA_WEBHOOKS"}

    assert cli(stack, "webhooks", "rm", "agent-cli").returncode == 0
    gone = cli(stack, "webhooks", "get", "agent-cli")
    assert gone.returncode == 1 and "has no webhook" in gone.stderr
    paths = [h["headers"].get("X-Letta-Event") for h in _Hook.received if h["headers"].get("X-Letta-Event")]
    assert "webhook.test" in paths and paths.count("agent.step.completed") >= 3  # delivery, retry, replay


def test_cli_without_a_key_is_refused(stack):
    env = dict(stack["env"])
    env["LETTA_BUS_API_KEY_FILE"] = str(stack["cwd"] / "nope.key")
    r = subprocess.run([LETTA_BUS, "webhooks", "get", "agent-x"], cwd=stack["cwd"], env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "missing or invalid API key" in r.stderr and "HTTP 401" in r.stderr


def test_scoped_keys_and_portal_links_from_the_cli(stack):
    """keys create/list/revoke and portal create/revoke against `letta-bus up`; the scoped key works, then not."""
    made = cli(stack, "keys", "create", "--scope", "organization", "--org", "org-cli", "--role", "read",
               "--name", "tenant")
    assert made.returncode == 0, made.stdout + made.stderr
    key = made.stdout.strip().splitlines()[-1]
    key_id = made.stdout.split()[1]
    assert key.startswith("lbk_") and key_id.startswith("key_")
    listed = cli(stack, "keys", "list")
    assert listed.returncode == 0 and key_id in listed.stdout and key not in listed.stdout
    seen = httpx.get(f"{stack['api']}/v1/webhooks", headers={"Authorization": f"Bearer {key}"}, timeout=5)
    assert seen.status_code == 200 and seen.json()["data"] == []  # org-cli has no endpoints
    bad = cli(stack, "keys", "create", "--scope", "organization", "--role", "read")
    assert bad.returncode == 2 and "organization_id" in bad.stderr
    assert cli(stack, "keys", "revoke", key_id).returncode == 0
    assert httpx.get(f"{stack['api']}/v1/webhooks", headers={"Authorization": f"Bearer {key}"},
                     timeout=5).status_code == 401
    link = cli(stack, "portal", "create", "--scope", "organization", "--org", "org-cli", "--ttl", "60")
    assert link.returncode == 0, link.stderr
    url = link.stdout.strip().splitlines()[-1]
    assert url.startswith(f"{stack['api']}/console/#token=lbp_"), url
    session_id = link.stdout.split()[2]
    assert cli(stack, "portal", "revoke", session_id).returncode == 0
    token = url.partition("#token=")[2]
    assert httpx.get(f"{stack['api']}/v1/webhooks", headers={"Authorization": f"Bearer {token}"},
                     timeout=5).status_code == 401
