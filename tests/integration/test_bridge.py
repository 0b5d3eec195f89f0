"""The stock-Letta bridge against a real nats-server and a Letta REST stand-in built from the real server's answers
(real HTTP on 127.0.0.1): the 202 once a notification is stored, the enricher reading Letta back (steps and their
messages, runs with their steps and usage, jobs), waiting for what Letta has not written yet, dropping what Letta
does not confirm, retrying while Letta or NATS fail; auth, repeated notifications, bad input."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from pydantic import SecretStr

from bus.envelope import decode
from dispatcher.bridge.events import NO_AGENT_ID, bridge_event_id
from dispatcher.bridge.server import BridgeServer
from tests.helpers import closed_port
from tests.letta_standin import (ORG_ID, LettaStandIn, letta_id, make_failed_step, make_job, make_messages,
                                 make_run, make_step, make_usage)

pytestmark = pytest.mark.timeout(15)

KEY = "step-complete-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: the enricher's settle window in these tests (seconds)
SETTLE_S = 1.5


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
        "bridge_settle_s": SETTLE_S,
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


async def wait_stored(js, settings, count: int, timeout_s: float = 5.0) -> list:
    """The events stream once it holds ``count`` events (``AssertionError`` after ``timeout_s`` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while len(events := await stored(js, settings)) < count:
        assert loop.time() < deadline, f"{len(events)} events stored, expected {count}"
        await asyncio.sleep(0.02)
    return events


async def settled(js, settings) -> None:
    """Wait until the enricher has finished every notification (the work queue is empty)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_S + 5
    while (await js.stream_info(settings.bridge_stream)).state.messages:
        assert loop.time() < deadline, "notifications still waiting in LETTA_BRIDGE"
        await asyncio.sleep(0.02)


async def notify_step(http, step_id: str) -> httpx.Response:
    response = await http.post("/letta/step-complete", json={"step_id": step_id}, headers=AUTH)
    assert response.status_code == 202, response.text
    return response


def add_step(letta, step: dict, messages: list | None = None) -> dict:
    letta.steps[step["id"]] = step
    letta.messages[step["id"]] = make_messages(step) if messages is None else messages
    return step


# --- step-complete webhook ------------------------------------------------------------------------------------------


async def test_a_step_is_accepted_at_once_then_published_with_letta_s_data(http, letta, provisioned, settings):
    step = add_step(letta, make_step())
    response = await notify_step(http, step["id"])
    assert response.json() == {"kind": "step", "id": step["id"], "duplicate": False}

    [(subject, headers, env)] = await wait_stored(provisioned, settings, 1)
    expected_id = bridge_event_id("step", step["id"], "success")
    assert subject == "letta.agent.step.completed"
    assert headers["Nats-Msg-Id"] == expected_id and headers["Letta-Organization-Id"] == ORG_ID
    assert env.event_id == expected_id and env.agent_id == step["agent_id"] and env.organization_id == ORG_ID
    assert env.data == {
        "step_id": step["id"], "run_id": step["run_id"], "status": "success",
        "usage": {"message_type": "usage_statistics", "completion_tokens": step["completion_tokens"],
                  "prompt_tokens": step["prompt_tokens"], "total_tokens": step["total_tokens"], "step_count": 1,
                  "run_ids": [step["run_id"]]},
        "tool_calls": [{"id": "call_000001", "type": "function",
                        "function": {"name": "conversation_search", "arguments": "{\"query\": \"hello\"}"}}],
        "stop_reason": "end_turn", "model": "fake-model", "provider_name": "openai",
    }
    paths = [p for p, _ in letta.requests]
    assert paths == [f"/v1/steps/{step['id']}", f"/v1/steps/{step['id']}/messages"]
    assert all(h["Authorization"] == f"Bearer {letta.token}" for _, h in letta.requests)


async def test_a_step_waits_for_the_messages_letta_saves_after_its_webhook(http, letta, provisioned, settings):
    """Letta 0.16.8 sends the step webhook before it saves the step's messages (issue 12, finding 2)."""
    step = add_step(letta, make_step(), messages=[])
    await notify_step(http, step["id"])
    await asyncio.sleep(0.4)
    assert await stored(provisioned, settings) == []  # not published with tool_calls []
    letta.messages[step["id"]] = make_messages(step)
    [(_, _, env)] = await wait_stored(provisioned, settings, 1)
    assert [c["function"]["name"] for c in env.data["tool_calls"]] == ["conversation_search"]


async def test_a_step_whose_messages_never_appear_is_published_after_the_settle_window(http, letta, provisioned,
                                                                                       settings):
    step = add_step(letta, make_step(), messages=[])
    await notify_step(http, step["id"])
    [(_, _, env)] = await wait_stored(provisioned, settings, 1, timeout_s=SETTLE_S + 5)
    assert env.data["tool_calls"] == [] and env.data["step_id"] == step["id"]


async def test_failed_and_cancelled_steps(http, letta, provisioned, settings):
    failed = add_step(letta, make_failed_step(), messages=[])
    cancelled = add_step(letta, make_step(status="cancelled", stop_reason="cancelled"), messages=[])
    for step in (failed, cancelled):
        await notify_step(http, step["id"])
    events = {subject: env for subject, _, env in await wait_stored(provisioned, settings, 2)}
    fail_env, cancel_env = events["letta.agent.step.failed"], events["letta.agent.step.cancelled"]
    assert fail_env.event_id == bridge_event_id("step", failed["id"], "failed")
    assert fail_env.data["error"] == failed["error_data"]["message"]
    assert fail_env.data["error_type"] == failed["error_type"] and fail_env.data["run_id"] == failed["run_id"]
    assert "traceback" not in fail_env.data["error_data"] and fail_env.data["stop_reason"] == "llm_api_error"
    assert cancel_env.data == {"step_id": cancelled["id"], "run_id": cancelled["run_id"], "stop_reason": "cancelled",
                               "model": "fake-model", "provider_name": "openai"}
    assert f"/v1/steps/{failed['id']}/messages" not in [p for p, _ in letta.requests]  # only successes wait


async def test_older_server_step_without_status_uses_job_id(http, letta, provisioned, settings):
    """Servers before StepStatus/run_id: no ``status`` (error_type decides), ``job_id`` instead of ``run_id``."""
    job_id = letta_id("run")
    ok = add_step(letta, make_step(status=..., run_id=..., job_id=job_id, error_type=..., error_data=...))
    bad = add_step(letta, make_step(status=..., run_id=..., job_id=job_id, error_type="ValueError", error_data=None))
    for step in (ok, bad):
        await notify_step(http, step["id"])
    events = {subject: env for subject, _, env in await wait_stored(provisioned, settings, 2)}
    assert events["letta.agent.step.completed"].data["run_id"] == job_id
    e2 = events["letta.agent.step.failed"]
    assert e2.data["error"] == "ValueError" and e2.data["run_id"] == job_id


async def test_step_webhook_auth_is_checked(http, letta, provisioned, settings):
    step = add_step(letta, make_step())
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = await http.post("/letta/step-complete", json={"step_id": step["id"]}, headers=headers)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert "LETTA_BUS_BRIDGE_KEY" in response.json()["detail"]
    await settled(provisioned, settings)
    assert letta.requests == [] and await stored(provisioned, settings) == []  # nothing stored, nothing read
    response = await http.post("/letta/step-complete", json={"step_id": step["id"]},
                               headers={"authorization": f"bearer {KEY}"})  # scheme is case-insensitive
    assert response.status_code == 202
    await wait_stored(provisioned, settings, 1)


async def test_letta_repeating_a_notification_publishes_one_event(http, letta, provisioned, settings):
    step = add_step(letta, make_step())
    first, again = await notify_step(http, step["id"]), await notify_step(http, step["id"])
    assert (first.json()["duplicate"], again.json()["duplicate"]) == (False, True)
    await wait_stored(provisioned, settings, 1)
    await settled(provisioned, settings)
    assert len(await stored(provisioned, settings)) == 1


async def test_letta_errors_are_retried_until_letta_answers(http, letta, provisioned, settings):
    step = add_step(letta, make_step())
    letta.fail[f"/v1/steps/{step['id']}"] = 500
    await notify_step(http, step["id"])  # accepted: Letta's failure is the enricher's to retry
    await asyncio.sleep(SETTLE_S + 0.5)  # retried past the settle window: a transient failure is no reason to drop
    assert await stored(provisioned, settings) == [] and len(letta.requests) >= 2
    del letta.fail[f"/v1/steps/{step['id']}"]
    [(_, _, env)] = await wait_stored(provisioned, settings, 1, timeout_s=5)
    assert env.data["step_id"] == step["id"]


async def test_unknown_and_pending_steps(http, letta, provisioned, settings):
    unknown = letta_id("step")
    pending = add_step(letta, make_step(status="pending"), messages=[])
    await notify_step(http, unknown)
    await notify_step(http, pending["id"])
    await asyncio.sleep(0.3)
    pending["status"] = "success"
    letta.messages[pending["id"]] = make_messages(pending)
    [(_, _, env)] = await wait_stored(provisioned, settings, 1)
    assert env.data["step_id"] == pending["id"]  # published once Letta finished it
    await settled(provisioned, settings)  # the unknown one was dropped (term), not kept
    assert len(await stored(provisioned, settings)) == 1


async def test_bad_input_is_422_naming_the_field(http, provisioned, settings):
    for body, field in ((b"{not json", "body"), (b"[1]", "body"), (b"{}", "step_id"),
                        (b'{"step_id": 7}', "step_id"), (b'{"step_id": "../agents"}', "step_id")):
        response = await http.post("/letta/step-complete", content=body, headers=AUTH)
        assert response.status_code == 422 and response.json()["detail"].startswith(f"{field}:"), (body, response.text)
    for body, field in (({"status": "completed"}, "run_id or job_id"), ({"job_id": "job/../x"}, "job_id"),
                        ({"run_id": None}, "run_id")):
        response = await http.post("/letta/callback", content=json.dumps(body))
        assert response.status_code == 422 and response.json()["detail"].startswith(f"{field}:"), (body, response.text)
    response = await http.post("/letta/callback", content=b"x" * (4 * 1024 * 1024 + 1))
    assert response.status_code == 413
    assert (await provisioned.stream_info(settings.bridge_stream)).state.messages == 0


async def test_broker_down_is_503_not_202(bridge_settings, provisioned, letta, nats_server):
    step = add_step(letta, make_step())
    async with BridgeServer(bridge_settings) as server:
        nats_server.stop()
        async with httpx.AsyncClient(base_url=server.url, timeout=8) as client:
            response = await client.post("/letta/step-complete", json={"step_id": step["id"]}, headers=AUTH)
            health = await client.get("/healthz")
    assert response.status_code == 503 and "not stored" in response.json()["detail"], response.text
    assert health.status_code == 503


# --- run and job callbacks ------------------------------------------------------------------------------------------


def run_callback(run: dict, **fields) -> dict:
    """The body Letta's RunManager._dispatch_callback_async POSTs (``fields`` override it)."""
    return {"run_id": run["id"], "status": run["status"], "completed_at": "2026-01-01T12:00:03.950466",
            "metadata": {"result": {"usage": {"completion_tokens": 0, "prompt_tokens": 0, "total_tokens": 0}}},
            **fields}


def add_run(letta, run: dict, steps: int = 1) -> dict:
    letta.runs[run["id"]] = run
    letta.usages[run["id"]] = make_usage()
    letta.run_steps[run["id"]] = [make_step(run_id=run["id"], agent_id=run["agent_id"]) for _ in range(steps)]
    return run


async def test_a_run_event_carries_what_letta_stores_not_what_the_callback_says(http, letta, provisioned, settings,
                                                                               caplog):
    run = add_run(letta, make_run(), steps=2)
    body = run_callback(run, status="hacked", completed_at="2030-01-01T00:00:00")
    with caplog.at_level(logging.WARNING, logger="dispatcher.bridge.server"):
        for _ in range(2):
            response = await http.post("/letta/callback", json=body, params={"key": "anything"})
            assert response.status_code == 202, response.text
    assert [r.message for r in caplog.records].count(
        "bridge: a callback_url carries ?key=: Letta shows it to every API user (GET /v1/runs/{id}); callbacks need "
        "no key, remove it from callback_url") == 1

    [(subject, headers, env)] = await wait_stored(provisioned, settings, 1)
    usage = letta.usages[run["id"]]
    assert subject == "letta.agent.run.completed" and env.agent_id == run["agent_id"]
    assert env.organization_id == ORG_ID  # from the run's steps: Letta's run has none
    assert env.event_id == headers["Nats-Msg-Id"] == bridge_event_id("run", run["id"], "completed")
    assert env.data == {
        "run_id": run["id"], "status": "completed", "completed_at": run["completed_at"] + "Z",
        "usage": {"message_type": "usage_statistics", "completion_tokens": usage["completion_tokens"],
                  "prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["total_tokens"], "step_count": 2,
                  "run_ids": [run["id"]]},
        "stop_reason": "end_turn", "metadata": {"run_type": "send_message_async", "lettuce": None},
    }


async def test_a_forged_or_unfinished_run_publishes_nothing(http, letta, provisioned, settings):
    forged = letta_id("run")  # Letta answers 400
    running = add_run(letta, make_run(status="running", completed_at=None, stop_reason=None))
    for body in ({"run_id": forged, "status": "completed", "metadata": {"agent_id": letta_id("agent")}},
                 run_callback(running, status="completed")):
        assert (await http.post("/letta/callback", json=body)).status_code == 202
    await settled(provisioned, settings)  # the running one waited SETTLE_S, then was dropped
    assert await stored(provisioned, settings) == []


async def test_a_cancelled_run_waits_for_its_steps_and_names_the_last_one(http, letta, provisioned, settings):
    run = add_run(letta, make_run(status="cancelled", stop_reason="cancelled"), steps=2)
    last = letta.run_steps[run["id"]][-1]
    last["status"] = "pending"  # the step that was running when the run was cancelled
    assert (await http.post("/letta/callback", json=run_callback(run))).status_code == 202
    await asyncio.sleep(0.4)
    assert await stored(provisioned, settings) == []  # its usage is not final yet
    last["status"] = "success"
    (s1, _, run_env), (s2, _, step_env) = await wait_stored(provisioned, settings, 2)
    assert s1 == "letta.agent.run.completed" and run_env.data["status"] == "cancelled"
    assert run_env.data["usage"]["total_tokens"] == letta.usages[run["id"]]["total_tokens"]
    assert s2 == "letta.agent.step.cancelled" and step_env.organization_id == ORG_ID
    assert step_env.data == {"step_id": last["id"], "run_id": run["id"], "stop_reason": "cancelled",
                             "step_status": "success"}


async def test_old_servers_send_job_id_for_runs(http, letta, provisioned, settings):
    run = add_run(letta, make_run(status="failed", stop_reason="error"))
    old = {"job_id": run["id"], "status": "failed", "completed_at": None, "metadata": {}}
    response = await http.post("/letta/callback", json=old)
    assert response.status_code == 202 and response.json()["kind"] == "run"
    [(subject, _, env)] = await wait_stored(provisioned, settings, 1)
    assert subject == "letta.agent.run.completed" and env.data["status"] == "failed"
    assert env.data["stop_reason"] == "error"


async def test_job_callback(http, letta, provisioned, settings):
    agent_id = letta_id("agent")
    job = make_job(metadata={"agent_id": agent_id})
    batch = make_job(status="failed")  # a batch spans agents: no agent id anywhere, only its user
    letta.jobs.update({job["id"]: job, batch["id"]: batch})
    for j in (job, batch):
        body = {"job_id": j["id"], "status": "completed", "completed_at": None, "metadata": {}}
        response = await http.post("/letta/callback", json=body)
        assert response.status_code == 202 and response.json()["kind"] == "job", response.text
    events = {env.data["job_id"]: env for _, _, env in await wait_stored(provisioned, settings, 2)}
    env, batch_env = events[job["id"]], events[batch["id"]]
    assert env.agent_id == agent_id and env.organization_id == ORG_ID
    assert env.event_id == bridge_event_id("job", job["id"], "completed")
    assert env.data == {"job_id": job["id"], "status": "completed", "completed_at": "2026-01-01T12:00:09.000000Z",
                        "job_type": "batch", "metadata": {"agent_id": agent_id}}
    assert batch_env.agent_id == NO_AGENT_ID and batch_env.organization_id == ORG_ID  # the user's organization
    assert batch_env.data["status"] == "failed"


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
    step = add_step(letta, make_step())
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
            assert response.status_code == 202, response.text
            await wait_stored(provisioned, settings, 1)
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
