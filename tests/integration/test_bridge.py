"""The stock-Letta bridge against a real nats-server and a Letta REST stand-in (real HTTP on 127.0.0.1): step
statuses -> event types and data, auth, Letta's repeated notifications, Letta REST errors, run and job callbacks."""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import SecretStr

from bus.envelope import decode
from dispatcher.bridge.events import NO_AGENT_ID, bridge_event_id
from dispatcher.bridge.server import BridgeServer
from tests.helpers import closed_port
from tests.letta_standin import (ORG_ID, LettaStandIn, letta_id, make_failed_step, make_job, make_run, make_step,
                                 make_usage)

pytestmark = pytest.mark.timeout(10)

KEY = "step-complete-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def letta():
    standin = await LettaStandIn().start()
    yield standin
    await standin.stop()


@pytest.fixture
def bridge_settings(settings, letta):
    return settings.model_copy(update={
        "letta_base_url": letta.url, "letta_token": SecretStr(letta.token), "bridge_key": SecretStr(KEY),
        "bridge_port": 0, "letta_timeout_s": 2.0, "publish_timeout_s": 0.5, "publish_attempts": 2,
    })


@pytest.fixture
async def bridge(bridge_settings, provisioned):
    server = await BridgeServer(bridge_settings).start()
    yield server
    await server.stop()


@pytest.fixture
async def http(bridge):
    async with httpx.AsyncClient(base_url=bridge.url, timeout=5) as client:
        yield client


async def stored(js, settings) -> list:
    """Every message in the events stream, in order: (subject, headers, envelope)."""
    info = await js.stream_info(settings.events_stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else []:
        msg = await js.get_msg(settings.events_stream, seq)
        out.append((msg.subject, msg.headers or {}, decode(msg.data)))
    return out


# --- step-complete webhook ------------------------------------------------------------------------------------------


async def test_completed_step_becomes_agent_step_completed(http, letta, provisioned, settings):
    step = make_step()
    letta.steps[step["id"]] = step
    response = await http.post("/letta/step-complete", json={"step_id": step["id"]}, headers=AUTH)
    assert response.status_code == 200, response.text
    expected_id = bridge_event_id("step", step["id"], "success")
    assert response.json() == {"event_id": expected_id, "event_type": "agent.step.completed", "duplicate": False}

    [(subject, headers, env)] = await stored(provisioned, settings)
    assert subject == "letta.agent.step.completed"
    assert headers["Nats-Msg-Id"] == expected_id and headers["Letta-Organization-Id"] == ORG_ID
    assert env.event_id == expected_id and env.agent_id == step["agent_id"] and env.organization_id == ORG_ID
    assert env.data == {
        "step_id": step["id"], "run_id": step["run_id"], "status": "success",
        "usage": {"message_type": "usage_statistics", "completion_tokens": 42, "prompt_tokens": 1200,
                  "total_tokens": 1242, "step_count": 1, "run_ids": [step["run_id"]]},
        "tool_calls": [{"id": "call_9f2c", "type": "function",
                        "function": {"name": "send_message", "arguments": "{\"message\": \"Hello!\"}"}}],
        "stop_reason": "end_turn", "model": "gpt-4o-mini", "provider_name": "openai",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
    }
    path, headers = letta.requests[-1]
    assert path == f"/v1/steps/{step['id']}" and headers["Authorization"] == f"Bearer {letta.token}"


async def test_failed_and_cancelled_steps(http, letta, provisioned, settings):
    failed = make_failed_step()
    cancelled = make_step(status="cancelled", stop_reason="cancelled", messages=[])
    letta.steps.update({failed["id"]: failed, cancelled["id"]: cancelled})
    for step in (failed, cancelled):
        response = await http.post("/letta/step-complete", json={"step_id": step["id"]}, headers=AUTH)
        assert response.status_code == 200, response.text

    (s1, _, fail_env), (s2, _, cancel_env) = await stored(provisioned, settings)
    assert s1 == "letta.agent.step.failed" and fail_env.event_id == bridge_event_id("step", failed["id"], "failed")
    assert fail_env.data["error"] == "Rate limit reached for gpt-4o-mini"
    assert fail_env.data["error_type"] == "RateLimitError" and fail_env.data["run_id"] == failed["run_id"]
    assert fail_env.data["error_data"] == {"message": "Rate limit reached for gpt-4o-mini",
                                           "details": {"provider": "openai", "status_code": 429}}  # no traceback
    assert fail_env.data["usage"]["prompt_tokens"] == 1200 and fail_env.data["stop_reason"] == "llm_api_error"
    assert s2 == "letta.agent.step.cancelled"
    assert cancel_env.data == {"step_id": cancelled["id"], "run_id": cancelled["run_id"], "stop_reason": "cancelled",
                               "model": "gpt-4o-mini", "provider_name": "openai",
                               "trace_id": "0af7651916cd43dd8448eb211c80319c"}


async def test_older_server_step_without_status_uses_job_id(http, letta, provisioned, settings):
    """Servers before StepStatus/run_id: no ``status`` (error_type decides), ``job_id`` instead of ``run_id``."""
    job_id = letta_id("run")
    ok = make_step(status=..., run_id=..., job_id=job_id, error_type=..., error_data=..., messages=...)
    bad = make_step(status=..., run_id=..., job_id=job_id, error_type="ValueError", error_data=None, messages=...)
    letta.steps.update({ok["id"]: ok, bad["id"]: bad})
    for step in (ok, bad):
        assert (await http.post("/letta/step-complete", json={"step_id": step["id"]}, headers=AUTH)).status_code == 200
    (s1, _, e1), (s2, _, e2) = await stored(provisioned, settings)
    assert s1 == "letta.agent.step.completed" and e1.data["run_id"] == job_id and e1.data["tool_calls"] == []
    assert s2 == "letta.agent.step.failed" and e2.data["error"] == "ValueError" and e2.data["run_id"] == job_id


async def test_auth_is_checked(http, letta, provisioned, settings):
    step = make_step()
    letta.steps[step["id"]] = step
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = await http.post("/letta/step-complete", json={"step_id": step["id"]}, headers=headers)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert "LETTA_BUS_BRIDGE_KEY" in response.json()["detail"]
    assert letta.requests == [] and await stored(provisioned, settings) == []  # refused before reading Letta
    response = await http.post("/letta/step-complete", json={"step_id": step["id"]},
                               headers={"authorization": f"bearer {KEY}"})  # scheme is case-insensitive
    assert response.status_code == 200


async def test_letta_retrying_a_step_publishes_one_event(http, letta, provisioned, settings):
    step = make_step()
    letta.steps[step["id"]] = step
    first = await http.post("/letta/step-complete", json={"step_id": step["id"]}, headers=AUTH)
    again = await http.post("/letta/step-complete", json={"step_id": step["id"]}, headers=AUTH)
    assert first.status_code == again.status_code == 200
    assert first.json()["event_id"] == again.json()["event_id"]
    assert (first.json()["duplicate"], again.json()["duplicate"]) == (False, True)
    assert len(await stored(provisioned, settings)) == 1


async def test_letta_rest_errors_give_5xx_then_recover(http, letta, provisioned, settings):
    step = make_step()
    letta.steps[step["id"]] = step
    letta.fail[f"/v1/steps/{step['id']}"] = 500
    response = await http.post("/letta/step-complete", json={"step_id": step["id"]}, headers=AUTH)
    assert response.status_code == 502 and "HTTP 500" in response.json()["detail"]
    assert await stored(provisioned, settings) == []

    del letta.fail[f"/v1/steps/{step['id']}"]  # Letta is back: the retried notification goes through
    response = await http.post("/letta/step-complete", json={"step_id": step["id"]}, headers=AUTH)
    assert response.status_code == 200 and len(await stored(provisioned, settings)) == 1


async def test_letta_token_rejected_or_server_unreachable_is_502(bridge_settings, provisioned, letta):
    step = make_step()
    letta.steps[step["id"]] = step
    cases = [({"letta_token": SecretStr("not-the-token")}, "LETTA_BUS_LETTA_TOKEN"),
             ({"letta_base_url": f"http://127.0.0.1:{closed_port()}"}, "LETTA_BUS_LETTA_BASE_URL")]
    for update, hint in cases:
        async with BridgeServer(bridge_settings.model_copy(update=update)) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
                response = await client.post("/letta/step-complete", json={"step_id": step["id"]}, headers=AUTH)
        assert response.status_code == 502 and hint in response.json()["detail"], response.text


async def test_unknown_step_and_bad_input_are_422_naming_the_field(http, letta, provisioned, settings):
    unknown = letta_id("step")
    response = await http.post("/letta/step-complete", json={"step_id": unknown}, headers=AUTH)
    assert response.status_code == 422 and response.json()["detail"].startswith("step_id: ")
    assert "404" in response.json()["detail"]
    for body, field in ((b"{not json", "body"), (b"[1]", "body"), (b"{}", "step_id"),
                        (b'{"step_id": 7}', "step_id"), (b'{"step_id": "../agents"}', "step_id")):
        response = await http.post("/letta/step-complete", content=body, headers=AUTH)
        assert response.status_code == 422 and response.json()["detail"].startswith(f"{field}:"), (body, response.text)
    no_agent = make_step(agent_id=...)
    letta.steps[no_agent["id"]] = no_agent
    response = await http.post("/letta/step-complete", json={"step_id": no_agent["id"]}, headers=AUTH)
    assert response.status_code == 422 and response.json()["detail"].startswith("agent_id:")
    assert await stored(provisioned, settings) == []


async def test_pending_step_asks_to_retry(http, letta, provisioned, settings):
    step = make_step(status="pending")
    letta.steps[step["id"]] = step
    response = await http.post("/letta/step-complete", json={"step_id": step["id"]}, headers=AUTH)
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert "pending" in response.json()["detail"] and await stored(provisioned, settings) == []


async def test_broker_down_is_503_not_200(bridge_settings, provisioned, letta, nats_server):
    step = make_step()
    letta.steps[step["id"]] = step
    async with BridgeServer(bridge_settings) as server:
        nats_server.stop()
        async with httpx.AsyncClient(base_url=server.url, timeout=8) as client:
            response = await client.post("/letta/step-complete", json={"step_id": step["id"]}, headers=AUTH)
            health = await client.get("/healthz")
    assert response.status_code == 503 and "not stored" in response.json()["detail"], response.text
    assert health.status_code == 503


# --- run and job callbacks ------------------------------------------------------------------------------------------


def run_callback(run: dict, **metadata) -> dict:
    """The body Letta's RunManager._dispatch_callback_async POSTs."""
    return {"run_id": run["id"], "status": run["status"], "completed_at": "2026-01-01T12:00:03.120000",
            "metadata": metadata}


async def test_run_callback_with_result_in_metadata(http, letta, provisioned, settings):
    run = make_run()
    letta.runs[run["id"]] = run
    result = {"messages": [{"message_type": "assistant_message", "content": "Hello!"}],
              "stop_reason": {"message_type": "stop_reason", "stop_reason": "end_turn"},
              "usage": {"message_type": "usage_statistics", "completion_tokens": 84, "prompt_tokens": 2400,
                        "total_tokens": 2484, "step_count": 2, "run_ids": None}}
    body = run_callback(run, result=result, source="support-portal")
    response = await http.post("/letta/callback", json=body, params={"key": KEY})
    assert response.status_code == 200, response.text
    assert response.json()["event_type"] == "agent.run.completed"

    [(subject, headers, env)] = await stored(provisioned, settings)
    assert subject == "letta.agent.run.completed" and env.agent_id == run["agent_id"]
    assert env.event_id == headers["Nats-Msg-Id"] == bridge_event_id("run", run["id"], "completed")
    assert env.data == {
        "run_id": run["id"], "status": "completed", "completed_at": "2026-01-01T12:00:03.120000Z",
        "usage": {"message_type": "usage_statistics", "completion_tokens": 84, "prompt_tokens": 2400,
                  "total_tokens": 2484, "step_count": 2, "run_ids": [run["id"]]},
        "stop_reason": "end_turn", "metadata": {"source": "support-portal"},  # the bulky result stays out
    }
    assert [p for p, _ in letta.requests] == [f"/v1/runs/{run['id']}"]  # agent id read; usage came with the result


async def test_run_callback_reads_usage_and_old_servers_send_job_id(http, letta, provisioned, settings):
    run = make_run(status="failed", stop_reason="error")
    letta.runs[run["id"]] = run
    letta.usages[run["id"]] = make_usage()
    response = await http.post("/letta/callback", json=run_callback(run), headers=AUTH)  # Bearer works too
    assert response.status_code == 200, response.text

    old = {"job_id": run["id"], "status": "cancelled", "completed_at": None,
           "metadata": {"agent_id": run["agent_id"], "job_type": "send_message_async"}}
    response = await http.post("/letta/callback", json=old, params={"key": KEY})
    assert response.status_code == 200 and response.json()["event_type"] == "agent.run.completed"

    (_, _, failed), (_, _, cancelled) = await stored(provisioned, settings)
    assert failed.data["status"] == "failed" and failed.data["stop_reason"] == "error"
    assert failed.data["usage"]["total_tokens"] == 2484 and failed.data["usage"]["run_ids"] == [run["id"]]
    assert cancelled.data["run_id"] == run["id"] and cancelled.data["status"] == "cancelled"
    assert cancelled.agent_id == run["agent_id"] and cancelled.data["completed_at"] is None
    assert cancelled.event_id == bridge_event_id("run", run["id"], "cancelled") != failed.event_id


async def test_job_callback(http, letta, provisioned, settings):
    agent_id = letta_id("agent")
    job = make_job(metadata={"agent_id": agent_id})
    batch = make_job()  # a batch spans agents: no agent id anywhere
    letta.jobs.update({job["id"]: job, batch["id"]: batch})
    for j in (job, batch):
        body = {"job_id": j["id"], "status": "completed", "completed_at": "2026-01-01T12:00:09", "metadata": {}}
        response = await http.post("/letta/callback", json=body, params={"key": KEY})
        assert response.status_code == 200, response.text
        again = await http.post("/letta/callback", json=body, params={"key": KEY})
        assert again.json()["duplicate"] is True

    (subject, _, env), (_, _, batch_env) = await stored(provisioned, settings)
    assert subject == "letta.agent.job.completed" and env.agent_id == agent_id and env.organization_id == ORG_ID
    assert env.event_id == bridge_event_id("job", job["id"], "completed")
    assert env.data == {"job_id": job["id"], "status": "completed", "completed_at": "2026-01-01T12:00:09.000000Z",
                        "job_type": "batch"}
    assert batch_env.agent_id == NO_AGENT_ID and batch_env.organization_id == ORG_ID


async def test_callback_auth_and_bad_input(http, letta, provisioned, settings):
    run = make_run()
    letta.runs[run["id"]] = run
    assert (await http.post("/letta/callback", json=run_callback(run))).status_code == 401
    assert (await http.post("/letta/callback", json=run_callback(run), params={"key": "nope"})).status_code == 401
    cases = [
        ({"status": "completed"}, "run_id or job_id"),
        ({"run_id": run["id"]}, "status"),
        ({"run_id": run["id"], "status": "completed", "completed_at": "yesterday"}, "completed_at"),
        ({"run_id": run["id"], "status": "completed", "metadata": [1]}, "metadata"),
        ({"job_id": "job/../x", "status": "completed"}, "job_id"),
        ({"run_id": letta_id("run"), "status": "completed"}, "run_id"),  # Letta: 404
    ]
    for body, field in cases:
        response = await http.post("/letta/callback", content=json.dumps(body), params={"key": KEY})
        assert response.status_code == 422 and response.json()["detail"].startswith(f"{field}:"), (body, response.text)
    assert await stored(provisioned, settings) == []


async def test_production_requires_a_key(bridge_settings, provisioned):
    with pytest.raises(ValueError, match="LETTA_BUS_BRIDGE_KEY"):
        await BridgeServer(bridge_settings.model_copy(update={"env": "production", "bridge_key": None})).start()


@pytest.mark.timeout(20)  # a subprocess; about 3 s, the bound leaves room for a loaded machine
async def test_cli_bridge_serves_until_ctrl_c(letta, settings, provisioned):
    """``letta-bus bridge`` as an operator runs it: configured by environment, stopped by Ctrl-C."""
    import asyncio
    import os
    import signal
    import sys
    from pathlib import Path

    port = closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETTA_BUS_") and not k.startswith("STEP_")}
    env.update({"LETTA_BUS_NATS_URL": settings.nats_url, "LETTA_BUS_NATS_AUTH_DIR": str(settings.nats_auth_dir),
                "LETTA_BUS_BRIDGE_PORT": str(port),
                "LETTA_BUS_LETTA_BASE_URL": letta.url, "LETTA_BUS_LETTA_TOKEN": letta.token,
                "LETTA_BUS_BRIDGE_KEY": KEY, "COLUMNS": "200"})
    step = make_step()
    letta.steps[step["id"]] = step
    proc = await asyncio.create_subprocess_exec(str(Path(sys.executable).parent / "letta-bus"), "bridge", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as client:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 12
            while True:
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert loop.time() < deadline and proc.returncode is None, "the bridge did not come up"
                await asyncio.sleep(0.05)
            response = await client.post("/letta/step-complete", json={"step_id": step["id"]}, headers=AUTH)
            assert response.status_code == 200, response.text
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(proc.communicate(), 5)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text
    assert f"STEP_COMPLETE_WEBHOOK = http://127.0.0.1:{port}/letta/step-complete" in text and "stopped" in text
    [(subject, _, env_)] = await stored(provisioned, settings)
    assert subject == "letta.agent.step.completed" and env_.data["step_id"] == step["id"]
