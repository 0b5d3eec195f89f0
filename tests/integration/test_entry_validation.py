"""Bad ids are refused where events enter, so none is accepted and then lost (issue 10, finding 8).

Before: ``letta-bus publish --agent $'agent\\nnewline'`` printed ``published`` and exited 0, then the fan-out termed
the event as undecodable (``$.agent_id``); ids with non-ASCII characters went raw into NATS headers; ids longer
than the history columns (agent 128, event 64) were published and then refused by PostgreSQL. Now the publisher
(and through it the CLI and the bridge) refuses them naming the field, nothing is stored, and an event with
ids at the grammar's limits is delivered and recorded. Real nats-server, real receiver, real SQLite.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from prometheus_client import REGISTRY

from bus.catalog import EventValidationError
from bus.publisher import EventPublisher
from tests.helpers import deliveries, wait_until
from tests.integration.test_bridge import (AUTH, add_step, bridge, bridge_settings, http, letta,  # noqa: F401
                                           settled, stored)
from tests.integration.test_cli import run
from tests.letta_standin import make_run, make_step

pytestmark = pytest.mark.timeout(60)

STEP = {"step_id": "step-1", "status": "success"}
SECRET = "whsec_entry-validation-secret-0123"
#: What the finding found accepted at entry (then lost or sent as something else).
BAD_IDS = ["agent\nnewline", "agent\x00nul", "agent\tx", "agent-\u202eevil", "a" * 5000, "agént-1", "agent 1"]


async def _messages(js, settings) -> int:
    return (await js.stream_info(settings.events_stream)).state.messages


def _cli_env(nats_server, nats_auth) -> dict[str, str]:
    return {"LETTA_BUS_NATS_URL": nats_server.url, "LETTA_BUS_NATS_AUTH_DIR": str(nats_auth.directory)}


async def test_cli_publish_refuses_a_bad_id_naming_the_option(nats_server, nats_auth, provisioned, settings):
    env = _cli_env(nats_server, nats_auth)
    data = json.dumps(STEP)
    for option, value in (("--agent", "agent\nnewline"), ("--agent", "agent-\u202e"), ("--agent", "a" * 5000),
                          ("--org", "org\t1"), ("--event-id", "e" * 65), ("--event-id", "evt 1")):
        args = ["publish", "agent.step.completed", "--agent", "agent-1", "--data", data]
        if option == "--agent":
            args[3] = value
        else:
            args += [option, value]
        result = await asyncio.to_thread(run, *args, env=env, timeout=30)
        assert result.returncode == 2, (option, value[:20], result.stdout, result.stderr)
        assert f"{option}: " in result.stderr and "must be 1-" in result.stderr, result.stderr
        assert "published" not in result.stdout
    assert await _messages(provisioned, settings) == 0
    ok = await asyncio.to_thread(run, "publish", "agent.step.completed", "--agent", "agent-1", "--data", data,
                                 env=env, timeout=30)
    assert ok.returncode == 0 and "published" in ok.stdout, ok.stderr
    assert await _messages(provisioned, settings) == 1


async def test_publisher_refuses_bad_ids_and_stores_nothing(settings, nc, provisioned):
    publisher = EventPublisher(settings, nc)
    for value in BAD_IDS:
        for field in ("agent_id", "organization_id", "event_id"):
            kwargs = {"organization_id": None, "event_id": None, field: value}
            agent = kwargs.pop("agent_id", "agent-1")
            with pytest.raises(EventValidationError, match=f"^{field} must be 1-"):
                await publisher.publish_event(agent, "agent.step.completed", STEP, strict=True, **kwargs)
            assert await publisher.publish_event(agent, "agent.step.completed", STEP, **kwargs) is None
    assert await _messages(provisioned, settings) == 0


async def test_ids_at_the_limits_are_delivered_and_recorded(settings, nc, store, receiver, dispatcher, provisioned):
    """What the publisher accepts the fan-out decodes and the history stores: 128-character agent and
    organization ids, a 64-character event id, every character of the grammar."""
    agent = ("agent-" + "Az09_.:-" * 20)[:128]
    org = ("org:" + "x" * 200)[:128]
    event_id = ("evt_" + "0123456789abcdef" * 4)[:64]
    receiver.secrets["/limits"] = SECRET
    await store.set_agent_webhook(agent, url=receiver.url("/limits"), secret=SECRET)
    await dispatcher.endpoints.refresh()
    poison = REGISTRY.get_sample_value("letta_bus_poison_events_total") or 0.0
    publisher = EventPublisher(settings, nc)
    # one character more than a column holds is refused at entry (before: published, then refused by PostgreSQL)
    for too_long in ({"agent_id": agent + "x"}, {"organization_id": org + "x"}, {"event_id": event_id + "x"}):
        args = {"agent_id": agent, "organization_id": org, "event_id": event_id, **too_long}
        with pytest.raises(EventValidationError, match=f"^{next(iter(too_long))} must be 1-"):
            await publisher.publish_event(args.pop("agent_id"), "agent.step.completed", STEP, strict=True, **args)
    published = await publisher.publish_event(agent, "agent.step.completed", STEP, organization_id=org,
                                              event_id=event_id, strict=True)
    assert published == event_id
    [got] = await receiver.wait_for(1, 20, "/limits")
    assert got.headers["webhook-id"] == event_id and json.loads(got.body)["agent_id"] == agent
    assert got.standard_verified and got.letta_verified
    rows = await wait_until(lambda: deliveries(store, event_id=event_id), what="the delivery row", timeout_s=20)
    assert rows[0].agent_id == agent
    assert (REGISTRY.get_sample_value("letta_bus_poison_events_total") or 0.0) == poison


def test_cli_webhooks_set_checks_the_agent_id_and_stores_the_url_normalised(tmp_path):
    from tests.helpers import closed_port

    env = {"LETTA_BUS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/db.sqlite",
           "LETTA_BUS_API_URL": f"http://127.0.0.1:{closed_port()}"}  # no API: the CLI writes the database itself
    bad = run("webhooks", "set", "agent\nnewline", "--url", "https://example.com/hook", env=env)
    assert bad.returncode == 2 and "AGENT_ID: agent_id must be 1-128" in bad.stderr, bad.stderr
    bad = run("webhooks", "set", "agent-1", "--url", "https://example.com/a b", env=env)
    assert bad.returncode == 2 and "--url: url 'https://example.com/a b'" in bad.stderr, bad.stderr
    assert "U+0020 (space)" in bad.stderr
    ok = run("webhooks", "set", "agent-1", "--url", "HTTPS://Example.COM:443/hook%7e", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "agent-1: https://example.com/hook~ " in ok.stdout, ok.stdout


async def test_bridge_refuses_ids_it_cannot_publish(http, letta, provisioned, settings, caplog):  # noqa: F811
    """Ids Letta answers with that the bus cannot carry: the notification is dropped and logged, nothing published."""
    step = add_step(letta, make_step(agent_id="agent\nnewline"))
    org_step = add_step(letta, make_step(organization_id="org-\u202e"))
    run_ = make_run(agent_id="agént")
    letta.runs[run_["id"]] = run_
    letta.usages[run_["id"]], letta.run_steps[run_["id"]] = {}, []
    with caplog.at_level(logging.WARNING, logger="dispatcher.bridge.enricher"):
        for s in (step, org_step):
            response = await http.post("/letta/step-complete", json={"step_id": s["id"]}, headers=AUTH)
            assert response.status_code == 202, response.text
        response = await http.post("/letta/callback", json={"run_id": run_["id"], "status": "completed"})
        assert response.status_code == 202, response.text
        await settled(provisioned, settings)
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    for letta_id, field, event_type in ((step["id"], "agent_id", "agent.step.completed"),
                                        (org_step["id"], "organization_id", "agent.step.completed"),
                                        (run_["id"], "agent_id", "agent.run.completed")):
        assert any(letta_id in m and f"{field}: {event_type} not published: {field} must be" in m for m in dropped), \
            dropped
    assert await stored(provisioned, settings) == []
