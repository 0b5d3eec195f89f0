"""``letta-bus instrument -- letta server`` against the real letta==0.16.8: every one of the 9 catalog event types
comes out of the unmodified server, through ``letta-bus up``, to a real receiver (signature verified), with its
data equal to what Letta's REST API returns for the same step, run, tool or job.

Plus the coexistence of the two packages in one venv (``test_letta_bus_and_letta_coexist``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from datetime import datetime

import pytest

from bus.catalog import CATALOG
from bus.instrument.shapes import rfc3339
from tests.letta_real.conftest import LETTA_ORG
from tests.letta_real.harness import assert_step_completed, start_letta, step_ids, stop_group, stop_letta, token_counts

pytestmark = pytest.mark.letta_real


@pytest.fixture(scope="module")
def instrumented_letta(letta_env, fake_llm, bus):
    letta = start_letta(letta_env, fake_llm.url, bus.client_env(), instrument=True)
    try:
        yield letta
    finally:
        stop_letta(letta)


@pytest.fixture(scope="module")
def agent(instrumented_letta):
    return instrumented_letta.api.create_agent(f"instr-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def secret(bus):
    return bus.endpoints["global"]["secret"]


def _time(stored: str | None) -> str | None:
    return rfc3339(datetime.fromisoformat(stored.replace("Z", "+00:00"))) if stored else None


def _of_agent(receiver, event_type: str, agent_id: str) -> list[dict]:
    return [d.json for d in receiver.matching("/global", event_type) if d.json["agent_id"] == agent_id]


def test_instrumented_server_logs_that_it_is_instrumented(instrumented_letta):
    log = instrumented_letta.server.tail(200_000)
    assert "letta-bus instrument: INFO instrumenting letta 0.16.8" in log
    assert "letta-bus instrument: INFO publishing to nats://" in log  # started with the app, before any event
    assert "letta-bus instrument: WARNING" not in log and "point " not in log


def test_one_step_message_gives_step_message_and_run_events_with_letta_s_data(instrumented_letta, bus, receiver,
                                                                              agent, secret):
    api = instrumented_letta.api
    response = api.send(agent["id"], "hello instrumented")
    (step_id,) = step_ids(response)
    step = api.get(f"/v1/steps/{step_id}")
    event = receiver.wait_event("/global", "agent.step.completed", secret, step_id=step_id)
    assert_step_completed(event, step, agent["id"], LETTA_ORG)
    receiver.wait_event("/org", "agent.step.completed", bus.endpoints["org"]["secret"], step_id=step_id)

    run_id = step["run_id"]
    sent = receiver.wait_event("/global", "agent.message.sent", secret, run_id=run_id)
    assert sent["agent_id"] == agent["id"] and sent["organization_id"] == LETTA_ORG
    assert sent["data"]["message_count"] == 1
    assert token_counts(sent["data"]["usage"]) == token_counts(response.json()["usage"])

    run = receiver.wait_event("/global", "agent.run.completed", secret, run_id=run_id)
    stored = api.get(f"/v1/runs/{run_id}")
    assert run["organization_id"] == LETTA_ORG and run["agent_id"] == agent["id"]
    assert run["data"]["status"] == stored["status"] == "completed"
    assert run["data"]["completed_at"] == _time(stored["completed_at"])
    assert run["data"]["stop_reason"] == stored["stop_reason"]
    assert token_counts(run["data"]["usage"]) == token_counts(api.get(f"/v1/runs/{run_id}/usage"))


def test_a_tool_call_gives_the_step_s_tool_calls_and_a_tool_execution(instrumented_letta, receiver, agent, secret):
    api = instrumented_letta.api
    response = api.send(agent["id"], '[[tool:conversation_search {"query": "hello"}]]')
    first, second = step_ids(response)
    event = receiver.wait_event("/global", "agent.step.completed", secret, step_id=first)
    messages = api.get(f"/v1/steps/{first}/messages")
    letta_calls = [call for m in messages if m["message_type"] == "tool_call_message" for call in m["tool_calls"]]
    assert [c["name"] for c in letta_calls] == ["conversation_search"]
    assert event["data"]["tool_calls"] == [{
        "id": c["tool_call_id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]},
    } for c in letta_calls]
    later = receiver.wait_event("/global", "agent.step.completed", secret, step_id=second)
    assert later["data"]["tool_calls"] == []
    assert later["data"]["run_id"] == event["data"]["run_id"]

    execution = receiver.wait_event("/global", "tool.execution.completed", secret, step_id=first)
    (tool_return,) = [m for m in messages if m["message_type"] == "tool_return_message"]
    assert execution["agent_id"] == agent["id"] and execution["organization_id"] == LETTA_ORG
    assert execution["data"]["tool_name"] == "conversation_search"
    assert execution["data"]["status"] == tool_return["status"] == "success"
    assert execution["data"]["tool_args"] == json.loads(letta_calls[0]["arguments"])
    assert execution["data"]["execution_time_ms"] > 0
    tool = api.get(f"/v1/tools/{execution['data']['tool_id']}")
    assert tool["name"] == "conversation_search"


def test_a_failed_llm_call_gives_step_failed_with_letta_s_error(instrumented_letta, receiver, agent, secret):
    api = instrumented_letta.api
    api.send(agent["id"], "[[fail]]", 500)
    event = receiver.wait_for(lambda: _of_agent(receiver, "agent.step.failed", agent["id"]), 30,
                              "agent.step.failed")[0]
    step = api.get(f"/v1/steps/{event['data']['step_id']}")
    assert step["status"] == "failed"
    assert event["data"]["error_type"] == step["error_type"]
    assert event["data"]["error"] == step["error_data"]["message"]
    assert event["data"]["run_id"] == step["run_id"]
    assert "traceback" not in event["data"]["error_data"]
    receiver.wait_event("/global", "agent.step.failed", secret, step_id=step["id"])


def test_attach_and_detach_give_tool_events_with_letta_s_tool(instrumented_letta, receiver, agent, secret):
    api = instrumented_letta.api
    attached = {t["id"] for t in api.get(f"/v1/agents/{agent['id']}/tools")}
    tool = next(t for t in api.get("/v1/tools/") if t["id"] not in attached)
    api.http.patch(f"/v1/agents/{agent['id']}/tools/attach/{tool['id']}").raise_for_status()
    event = receiver.wait_event("/global", "agent.tool.attached", secret, tool_id=tool["id"])
    assert event["agent_id"] == agent["id"] and event["organization_id"] == LETTA_ORG
    assert event["data"]["tool_name"] == tool["name"]
    assert tool["id"] in {t["id"] for t in api.get(f"/v1/agents/{agent['id']}/tools")}
    api.http.patch(f"/v1/agents/{agent['id']}/tools/detach/{tool['id']}").raise_for_status()
    event = receiver.wait_event("/global", "agent.tool.detached", secret, tool_id=tool["id"])
    assert event["agent_id"] == agent["id"] and event["data"]["tool_name"] == tool["name"]
    assert tool["id"] not in {t["id"] for t in api.get(f"/v1/agents/{agent['id']}/tools")}


def test_an_async_run_gives_run_completed_with_the_stored_time_org_and_usage(instrumented_letta, bus, receiver, agent):
    api = instrumented_letta.api
    run = api.send_async(agent["id"], "async hello", f"{receiver.url}/callback")
    event = receiver.wait_event("/org", "agent.run.completed", bus.endpoints["org"]["secret"], run_id=run["id"])
    stored = api.get(f"/v1/runs/{run['id']}")
    assert event["organization_id"] == LETTA_ORG and event["agent_id"] == agent["id"]
    assert event["data"]["status"] == stored["status"] == "completed"
    assert event["data"]["completed_at"] == _time(stored["completed_at"])
    assert token_counts(event["data"]["usage"]) == token_counts(api.get(f"/v1/runs/{run['id']}/usage"))
    assert event["data"]["stop_reason"] == stored["stop_reason"]
    sent = receiver.wait_event("/global", "agent.message.sent", bus.endpoints["global"]["secret"], run_id=run["id"])
    assert sent["data"]["message_count"] == 1


def test_a_cancelled_run_gives_step_cancelled_and_its_real_usage(instrumented_letta, receiver, agent, secret):
    api = instrumented_letta.api
    run = api.send_async(agent["id"], '[[slow:2]][[tool:conversation_search {"query": "x"}]]',
                         f"{receiver.url}/callback")
    # Letta 0.16.8 keeps a background run "created" until it ends (never "running"): cancel while the first step
    # waits on the slow LLM
    time.sleep(0.8)
    assert api.get(f"/v1/runs/{run['id']}")["status"] == "created"
    assert api.post(f"/v1/agents/{agent['id']}/messages/cancel", {"run_ids": [run["id"]]}) == {run["id"]: "cancelled"}
    event = receiver.wait_event("/global", "agent.run.completed", secret, run_id=run["id"])
    assert event["data"]["status"] == api.get(f"/v1/runs/{run['id']}")["status"] == "cancelled"
    usage = api.get(f"/v1/runs/{run['id']}/usage")
    assert usage["total_tokens"] > 0
    assert token_counts(event["data"]["usage"]) == token_counts(usage)
    steps = api.get(f"/v1/runs/{run['id']}/steps")
    cancelled = receiver.wait_event("/global", "agent.step.cancelled", secret, run_id=run["id"])
    assert cancelled["agent_id"] == agent["id"] and cancelled["organization_id"] == LETTA_ORG
    assert cancelled["data"]["step_id"] == steps[-1]["id"]
    assert cancelled["data"]["stop_reason"] == "cancelled"


def test_a_batch_gives_job_completed_with_letta_s_status(instrumented_letta, receiver, agent, secret):
    api = instrumented_letta.api
    earlier = len(receiver.deliveries)  # the session's receiver also has the bridge tier's batch (another server)
    api.post("/v1/messages/batches", {
        "requests": [{"agent_id": agent["id"], "messages": [{"role": "user", "content": "batch hello"}]}],
        "callback_url": f"{receiver.url}/callback"}, 500)

    def jobs():
        return [d.json for d in receiver.deliveries[earlier:] if d.path == "/global"
                and d.json.get("event_type") == "agent.job.completed" and d.json["organization_id"] == LETTA_ORG
                and d.json["data"].get("job_type") == "batch"]

    event = receiver.wait_for(jobs, 30, "agent.job.completed")[-1]
    job = api.get(f"/v1/messages/batches/{event['data']['job_id']}")
    assert event["data"]["status"] == job["status"] == "failed"
    assert event["data"]["completed_at"] == _time(job.get("completed_at")) or "completed_at" not in job
    receiver.wait_event("/global", "agent.job.completed", secret, job_id=job["id"])


def test_all_nine_event_types_arrived_from_the_instrumented_server(instrumented_letta, receiver, agent):
    seen = {d.json["event_type"] for d in receiver.deliveries if d.path == "/global"
            and (d.json["agent_id"] == agent["id"] or d.json["event_type"] == "agent.job.completed")}
    assert seen >= set(CATALOG), f"missing: {set(CATALOG) - seen}"
    log = instrumented_letta.server.tail(2_000_000)
    ours = [line for line in log.splitlines() if line.startswith("letta-bus instrument:") and " INFO " not in line]
    assert ours == []  # no point disabled, no publishing failure, no refused event
    assert "letta-bus: event" not in log  # LettaEventBus refused nothing (invalid data would be logged so)


def test_a_stopping_server_flushes_its_events_and_reports_its_counters(letta_env, fake_llm, bus, receiver):
    letta = start_letta(letta_env, fake_llm.url, bus.client_env(), instrument=True)
    try:
        agent = letta.api.create_agent(f"instr-stop-{uuid.uuid4().hex[:8]}")
        response = letta.api.send(agent["id"], "last words")
        run_id = response.json()["messages"][0]["run_id"]
        stop_group(letta.server.proc)  # SIGTERM right after the answer: uvicorn's graceful shutdown
        log = letta.server.tail(200_000)
    finally:
        stop_letta(letta)
    assert "letta-bus instrument: INFO closed: {" in log
    counters = json.loads(log.split("INFO closed: ", 1)[1].splitlines()[0].replace("'", '"'))
    assert counters["dropped"] == 0 and counters["accepted"] == counters["published"] >= 3
    for event_type in ("agent.step.completed", "agent.message.sent", "agent.run.completed"):
        receiver.wait_event("/global", event_type, bus.endpoints["global"]["secret"], run_id=run_id)


def test_letta_bus_and_letta_coexist(letta_env, tmp_path):
    """In the Letta venv, our top-level packages (config, bus, subscribers, dispatcher) belong to letta-bus only
    and Letta ships none of them; importing Letta and its server app works with letta-bus installed.

    Letta's pins decide some of our dependencies' versions there (tests/letta_real/constraints.txt, from Letta's
    uv.lock): uvicorn 0.29 (letta-bus alone would take the newest), and likewise fastapi, pydantic, httpx,
    sqlalchemy; letta-bus's own ranges accept them (build_env.sh's resolver fails otherwise)."""
    script = r"""
import importlib.metadata as md, json
mapping = md.packages_distributions()
ours = {name: sorted(set(mapping.get(name, []))) for name in ("config", "bus", "subscribers", "dispatcher")}
letta_top = sorted({line.split("/")[0] for line in (md.distribution("letta").read_text("RECORD") or "").splitlines()
                    if line and not line.startswith(("..", "/"))})
import letta.server.rest_api.app as app
print(json.dumps({"ours": ours, "letta_top": letta_top, "app": hasattr(app, "create_application"),
                  "uvicorn": md.version("uvicorn")}))
"""
    # in a scratch directory: importing Letta's app writes openapi_letta.json to the working directory (and ~/.letta)
    proc = subprocess.run([letta_env.bin("python"), "-c", script], capture_output=True, text=True, timeout=180,
                          cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["ours"] == {name: ["letta-bus"] for name in ("config", "bus", "subscribers", "dispatcher")}
    assert not {"config", "bus", "subscribers", "dispatcher"} & set(answer["letta_top"])
    assert answer["app"] is True
    assert answer["uvicorn"].startswith("0.29")
