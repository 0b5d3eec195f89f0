"""The stock-Letta bridge against the real letta==0.16.8 server: every event a stock Letta can give, through
Letta's own REST API, asserted at a real receiver behind ``letta-bus up`` with its data equal to what Letta's API
returns for the same step, run or job; and each finding of the first meeting with the real server (issue 12) as a
test: tool calls of a step, the run's organization, stored completion time and usage, forged callbacks, cancelled
runs, batch jobs.

Each finding is a test here: tool calls read from the step's messages once Letta saved them; the run's
organization (from its steps), stored completion time, final usage; a forged callback published as nothing; a
cancelled run's last step as ``agent.step.cancelled``; a batch's callback (it carried no key, and the bridge
refused it: callbacks need none now, since Letta shows their URL to every API user).
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from dispatcher.bridge.events import rfc3339
from tests.letta_real.conftest import LETTA_ORG
from tests.letta_real.harness import assert_step_completed, step_ids, token_counts

pytestmark = pytest.mark.letta_real


@pytest.fixture(scope="module")
def agent(stock_letta):
    return stock_letta.api.create_agent(f"bridge-{uuid.uuid4().hex[:8]}")


def _callback(stock_letta) -> str:
    return f"{stock_letta.bridge_url}/letta/callback"


def test_one_step_message_gives_its_step_event_with_letta_s_data(stock_letta, bus, receiver, agent):
    response = stock_letta.api.send(agent["id"], "hello from the tier")
    (step_id,) = step_ids(response)
    step = stock_letta.api.get(f"/v1/steps/{step_id}")
    secret = bus.endpoints["global"]["secret"]
    event = receiver.wait_event("/global", "agent.step.completed", secret, step_id=step_id)
    assert_step_completed(event, step, agent["id"], LETTA_ORG)
    receiver.wait_event("/org", "agent.step.completed", bus.endpoints["org"]["secret"], step_id=step_id)


def test_a_tool_call_gives_two_step_events_the_first_with_letta_s_tool_call(stock_letta, bus, receiver, agent):
    response = stock_letta.api.send(agent["id"], '[[tool:conversation_search {"query": "hello"}]]')
    first, second = step_ids(response)
    secret = bus.endpoints["global"]["secret"]
    event = receiver.wait_event("/global", "agent.step.completed", secret, step_id=first)
    letta_calls = [call for m in stock_letta.api.get(f"/v1/steps/{first}/messages")
                   if m["message_type"] == "tool_call_message" for call in m["tool_calls"]]
    assert [c["name"] for c in letta_calls] == ["conversation_search"]
    assert event["data"]["tool_calls"] == [{
        "id": c["tool_call_id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]},
    } for c in letta_calls]
    later = receiver.wait_event("/global", "agent.step.completed", secret, step_id=second)
    assert later["data"]["tool_calls"] == []
    assert later["data"]["run_id"] == event["data"]["run_id"]


def test_a_failed_llm_call_gives_step_failed_with_letta_s_error(stock_letta, bus, receiver, agent):
    stock_letta.api.send(agent["id"], "[[fail]]", 500)
    secret = bus.endpoints["global"]["secret"]

    def failed():
        return [d for d in receiver.matching("/global", "agent.step.failed") if d.json["agent_id"] == agent["id"]]

    event = receiver.wait_for(failed, 30, "agent.step.failed")[0].json
    step = stock_letta.api.get(f"/v1/steps/{event['data']['step_id']}")
    assert step["status"] == "failed"
    assert event["data"]["error_type"] == step["error_type"]
    assert event["data"]["error"] == step["error_data"]["message"]
    assert "traceback" not in event["data"].get("error_data", {})
    receiver.wait_event("/global", "agent.step.failed", secret, step_id=step["id"])


def test_an_async_run_gives_run_completed_with_the_stored_time_org_and_usage(stock_letta, bus, receiver, agent):
    run = stock_letta.api.send_async(agent["id"], "async hello", _callback(stock_letta))
    event = receiver.wait_event("/org", "agent.run.completed", bus.endpoints["org"]["secret"], run_id=run["id"])
    stored = stock_letta.api.get(f"/v1/runs/{run['id']}")
    usage = stock_letta.api.get(f"/v1/runs/{run['id']}/usage")
    assert event["organization_id"] == LETTA_ORG
    assert event["agent_id"] == agent["id"]
    assert event["data"]["status"] == stored["status"] == "completed"
    assert event["data"]["completed_at"] == rfc3339(stored["completed_at"], "completed_at")
    assert token_counts(event["data"]["usage"]) == token_counts(usage)
    assert event["data"]["stop_reason"] == stored["stop_reason"]
    # the callback URL Letta shows every API user carries no key
    assert "key=" not in stored["callback_url"]


def test_a_cancelled_run_gives_step_cancelled_and_its_real_usage(stock_letta, bus, receiver, agent, fake_llm):
    marker = f"cancel-me-{uuid.uuid4().hex[:8]}"
    run = stock_letta.api.send_async(agent["id"], f'[[slow:3]]{marker}[[tool:conversation_search {{"query": "x"}}]]',
                                     _callback(stock_letta))
    # cancelled while its first LLM call is in flight (the fake LLM holds it 3 s)
    receiver.wait_for(lambda: any(marker in json.dumps(r) for r in list(fake_llm.requests)), 20,
                      "the run's first LLM call")
    cancelled = stock_letta.api.post(f"/v1/agents/{agent['id']}/messages/cancel", {"run_ids": [run["id"]]})
    assert cancelled == {run["id"]: "cancelled"}
    secret = bus.endpoints["global"]["secret"]
    event = receiver.wait_event("/global", "agent.run.completed", secret, run_id=run["id"])
    assert event["data"]["status"] == "cancelled"
    usage = stock_letta.api.get(f"/v1/runs/{run['id']}/usage")
    assert usage["total_tokens"] > 0  # the callback itself says 0/0/0
    assert token_counts(event["data"]["usage"]) == token_counts(usage)
    steps = stock_letta.api.get(f"/v1/runs/{run['id']}/steps")
    step_cancelled = receiver.wait_event("/global", "agent.step.cancelled", secret, run_id=run["id"])
    assert step_cancelled["data"]["step_id"] == steps[-1]["id"]
    assert step_cancelled["data"]["stop_reason"] == "cancelled"


def test_a_forged_callback_publishes_nothing(stock_letta, bus, receiver, agent):
    forged = f"run-{uuid.uuid4()}"
    answer = httpx.post(_callback(stock_letta), json={
        "run_id": forged, "status": "hacked", "completed_at": "2026-01-01T00:00:00",
        "metadata": {"agent_id": agent["id"]}}, timeout=10)
    assert answer.status_code < 500
    stock_letta.api.get(f"/v1/runs/{forged}", 400, 404)  # Letta does not know it
    # an ordering barrier: a real run's event, published after the forged callback was handled
    run = stock_letta.api.send_async(agent["id"], "after the forgery", _callback(stock_letta))
    receiver.wait_event("/global", "agent.run.completed", bus.endpoints["global"]["secret"], run_id=run["id"])
    assert receiver.matching("/global", "agent.run.completed", run_id=forged) == []
    assert [d for d in receiver.deliveries if d.json.get("data", {}).get("status") == "hacked"] == []


def test_a_batch_gives_job_completed_with_letta_s_status(stock_letta, bus, receiver, agent):
    # Letta 0.16.8 runs batches only with providers that have a batch API (Anthropic); with an OpenAI-compatible
    # model the batch fails at creation (HTTP 500), is marked failed, and its callback is still sent.
    earlier = len(receiver.deliveries)  # the session's receiver hears other servers too
    stock_letta.api.post("/v1/messages/batches", {
        "requests": [{"agent_id": agent["id"], "messages": [{"role": "user", "content": "batch hello"}]}],
        "callback_url": _callback(stock_letta)}, 500)
    secret = bus.endpoints["global"]["secret"]
    event = receiver.wait_for(lambda: [d for d in receiver.deliveries[earlier:] if d.path == "/global"
                                       and d.json.get("event_type") == "agent.job.completed"], 30,
                              "agent.job.completed")[0].json
    job = stock_letta.api.get(f"/v1/messages/batches/{event['data']['job_id']}")
    assert event["data"]["status"] == job["status"] == "failed"
    # Letta's job names no agent (the batch's agents are only in its request) and no organization, only its user
    assert event["agent_id"] == "agent-none" and event["organization_id"] == LETTA_ORG
    receiver.wait_event("/global", "agent.job.completed", secret, job_id=job["id"])
