"""A NATS identity per internal service (issue 10, finding 9) on a real nats-server: ``letta-bus nats-auth
add-service billing`` creates user ``svc-billing`` and reloads the running server; that user may start a JetStream
client of any language (``$JS.API.INFO``, stream lookup by subject, stream info) and create, update, pull from, ack
and delete its own durable ``billing``, and nothing else: not another service's durable (the legacy step-complete
webhook's, which the shared subscriber user could delete), not the dispatcher's, no stream admin, no events. Each
case runs with nats-py and with the Node clients from npm (``@nats-io/jetstream``, tests/node/)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess

import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig
from pydantic import SecretStr

from bus.auth import ServiceIdentity, add_service, load_credentials, load_services
from bus.connection import NatsAuthError, connect
from bus.permissions import service_permissions
from bus.publisher import EventPublisher
from config.settings import PROJECT_ROOT, Settings
from subscribers import Subscriber
from tests.helpers import wait_until
from tests.integration.test_bus_auth import denied, violation
from tests.integration.test_cli import run

NODE_DIR = PROJECT_ROOT / "tests" / "node"
LEGACY, FANOUT = "legacy-step-complete-webhook", "webhook-fanout"
RUN = {"run_id": "run-1", "status": "completed", "completed_at": "2026-01-01T00:00:00Z"}


def as_service(settings: Settings, identity: ServiceIdentity) -> Settings:
    """Settings of a process running as ``identity`` (what `set -a; . svc-billing.env; set +a` gives)."""
    c = identity.credentials
    return settings.model_copy(update={"nats_user": c.user, "nats_password": SecretStr(c.password),
                                       "nats_inbox_prefix": c.inbox_prefix})


@pytest.fixture
async def billing(settings, nats_auth, nats_server, provisioned, tmp_path) -> ServiceIdentity:
    """``letta-bus nats-auth add-service billing`` as an operator runs it, against the test's running server (found
    by its pid file and reloaded); returns the identity once the server accepts it. The legacy webhook's durable
    exists, as on a deployment with STEP_COMPLETE_WEBHOOK set."""
    await provisioned.add_consumer("LETTA_EVENTS", ConsumerConfig(durable_name=LEGACY, name=LEGACY))
    result = run("nats-auth", "add-service", "billing", "--dir", str(nats_auth.directory), cwd=tmp_path, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "created service identity svc-billing (durables billing)" in result.stdout
    assert f"reloaded nats-server (pid {nats_server.process.pid})" in result.stdout
    [identity] = load_services(nats_auth.directory, settings)
    mine = as_service(settings, identity)

    await wait_until(lambda: _accepts(mine), timeout_s=10, interval_s=0.1,  # the reload is asynchronous
                     what="the reloaded server accepts svc-billing")
    return identity


@pytest.fixture
async def svc(settings, billing):
    """A nats-py connection as svc-billing (its inbox prefix included)."""
    client = await connect(settings.nats_url, name="test-svc-billing", settings=as_service(settings, billing))
    yield client
    await client.close()


# --- the rule, without a server -------------------------------------------------------------------------------

def test_add_service_validates_names_and_keeps_passwords(tmp_path):
    s = Settings(_env_file=None)
    base = PROJECT_ROOT / "nats.conf"
    first, files, created = add_service(s, tmp_path, base, "billing")
    assert created and first.credentials.user == "svc-billing" and first.durables == ("billing",)
    assert first.credentials.inbox_prefix == "_INBOX.svc-billing"
    again, _, created = add_service(s, tmp_path, base, "billing")
    assert not created and again.credentials == first.credentials
    wider, files, _ = add_service(s, tmp_path, base, "billing", ["billing", "billing-invoices"])
    assert wider.durables == ("billing", "billing-invoices") and wider.credentials == first.credentials
    assert load_credentials(files.services["billing"]).password == first.credentials.password
    assert '"$JS.ACK.LETTA_EVENTS.billing-invoices.>"' in files.accounts_conf.read_text()
    for name, durables, message in [
        ("Billing", [], "service name 'Billing'"),
        ("bill.ing", [], "service name 'bill.ing'"),
        ("billing", ["search"], "durable 'search' of service 'billing'"),
        ("webhook", ["webhook-fanout"], "belongs to letta-bus itself"),
        ("legacy-step-complete-webhook", [], "belongs to letta-bus itself"),
        ("billing-invoices", [], "owned by service 'billing'"),
    ]:
        with pytest.raises(ValueError, match=message):
            add_service(s, tmp_path, base, name, durables)
    perms = service_permissions("billing", ["billing"], s)
    assert perms.subscribe_allow == ["_INBOX.svc-billing.>"]
    assert not any(x in " ".join(perms.publish_allow) for x in ("letta.", "STREAM.DELETE", "STREAM.PURGE",
                                                                 "STREAM.UPDATE", "LETTA_WEBHOOKS", ".*"))


# --- nats-py --------------------------------------------------------------------------------------------------

async def test_service_identity_starts_and_runs_its_own_durable_with_nats_py(settings, nc, billing, svc):
    js = svc.jetstream(timeout=2)
    assert (await js.account_info()).streams >= 2  # $JS.API.INFO: the account, its streams counted
    assert (await js.stream_info("LETTA_EVENTS")).config.name == "LETTA_EVENTS"
    assert await js.find_stream_name_by_subject("letta.agent.run.completed") == "LETTA_EVENTS"  # STREAM.NAMES
    config = ConsumerConfig(durable_name="billing", name="billing", ack_policy=AckPolicy.EXPLICIT,
                            filter_subject="letta.agent.>")
    assert (await js.add_consumer("LETTA_EVENTS", config)).name == "billing"
    config.description = "billing, updated"
    assert (await js.add_consumer("LETTA_EVENTS", config)).config.description == "billing, updated"  # update
    event_id = await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    pull = await js.pull_subscribe_bind("billing", "LETTA_EVENTS")
    [msg] = await pull.fetch(1, timeout=5)
    assert json.loads(msg.data)["event_id"] == event_id
    await msg.ack_sync(timeout=2)  # the server confirms on the service's inbox
    info = await js.consumer_info("LETTA_EVENTS", "billing")
    assert info.ack_floor.stream_seq == 1 and info.num_ack_pending == 0
    assert await js.delete_consumer("LETTA_EVENTS", "billing")
    names = sorted(c.name for c in await nc.jetstream().consumers_info("LETTA_EVENTS"))
    assert names == [LEGACY, FANOUT]


async def test_the_subscriber_library_runs_as_the_service_identity(settings, nc, billing):
    received = []

    async def handle(event) -> None:  # noqa: ANN001
        received.append(event.event_id)

    sub = Subscriber("billing", ["letta.agent.run.completed"], settings=as_service(settings, billing),
                     handler=handle, fetch_timeout_s=0.3)
    await sub.start()
    try:
        assert sub._nc.options["user"] == "svc-billing"
        event_id = await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN,
                                                                   strict=True)
        await wait_until(lambda: event_id in received, timeout_s=10, what="the event reaches the handler")

        async def acked() -> bool:
            info = await nc.jetstream().consumer_info("LETTA_EVENTS", "billing")
            return info.ack_floor.stream_seq >= 1 and info.num_ack_pending == 0
        await wait_until(acked, timeout_s=10, what="the event acked")
    finally:
        await sub.stop()


async def test_service_identity_is_refused_everything_else_with_nats_py(settings, nc, billing, svc, caplog):
    caplog.set_level(logging.WARNING, logger="bus.connection")
    js = svc.jetstream(timeout=0.5)
    api = "$JS.API"
    for other in (LEGACY, FANOUT):
        await denied(caplog, js.delete_consumer("LETTA_EVENTS", other), f"{api}.CONSUMER.DELETE.LETTA_EVENTS.{other}")
        await denied(caplog, js.add_consumer("LETTA_EVENTS", ConsumerConfig(durable_name=other, name=other)),
                     f"{api}.CONSUMER.CREATE.LETTA_EVENTS.{other}")
        steal = await js.pull_subscribe_bind(other, "LETTA_EVENTS")
        with pytest.raises(nats.errors.TimeoutError):
            await steal.fetch(1, timeout=0.5)
        await violation(caplog, f"{api}.CONSUMER.MSG.NEXT.LETTA_EVENTS.{other}")
    await denied(caplog, js.add_consumer("LETTA_EVENTS", ConsumerConfig(durable_name="search", name="search")),
                 f"{api}.CONSUMER.CREATE.LETTA_EVENTS.search")
    await denied(caplog, js.add_consumer("LETTA_EVENTS", ConsumerConfig(ack_policy=AckPolicy.EXPLICIT)),
                 f"{api}.CONSUMER.CREATE.LETTA_EVENTS")  # ephemeral
    await denied(caplog, js.delete_stream("LETTA_EVENTS"), f"{api}.STREAM.DELETE.LETTA_EVENTS")
    await denied(caplog, js.purge_stream("LETTA_EVENTS"), f"{api}.STREAM.PURGE.LETTA_EVENTS")
    stream = (await nc.jetstream().stream_info("LETTA_EVENTS")).config
    stream.description = "mine"
    await denied(caplog, js.update_stream(stream), f"{api}.STREAM.UPDATE.LETTA_EVENTS")
    await denied(caplog, js.stream_info("LETTA_WEBHOOKS"), f"{api}.STREAM.INFO.LETTA_WEBHOOKS")
    await denied(caplog, js.publish("letta.agent.step.completed", b"{}", timeout=0.5), "letta.agent.step.completed")
    await svc.subscribe("_INBOX.>")  # the other roles' replies
    await svc.flush()
    await violation(caplog, "_INBOX.>", "Subscription")
    admin = nc.jetstream()
    assert sorted(c.name for c in await admin.consumers_info("LETTA_EVENTS")) == [LEGACY, FANOUT]
    assert (await admin.stream_info("LETTA_EVENTS")).state.messages == 0


async def test_the_shared_subscriber_may_not_touch_a_service_durable(settings, nc, billing, svc, as_role, caplog):
    caplog.set_level(logging.WARNING, logger="bus.connection")
    await svc.jetstream().add_consumer("LETTA_EVENTS", ConsumerConfig(durable_name="billing", name="billing"))
    shared = (await as_role("subscriber")).jetstream(timeout=0.5)
    await denied(caplog, shared.delete_consumer("LETTA_EVENTS", "billing"),
                 "$JS.API.CONSUMER.DELETE.LETTA_EVENTS.billing")
    steal = await shared.pull_subscribe_bind("billing", "LETTA_EVENTS")
    with pytest.raises(nats.errors.TimeoutError):
        await steal.fetch(1, timeout=0.5)
    await violation(caplog, "$JS.API.CONSUMER.MSG.NEXT.LETTA_EVENTS.billing")
    assert (await nc.jetstream().consumer_info("LETTA_EVENTS", "billing")).name == "billing"
    # the finding itself: the shared user deleted the legacy webhook's durable, which came back with
    # deliver_policy new and skipped the pending steps
    await denied(caplog, shared.delete_consumer("LETTA_EVENTS", LEGACY),
                 f"$JS.API.CONSUMER.DELETE.LETTA_EVENTS.{LEGACY}")
    assert (await nc.jetstream().consumer_info("LETTA_EVENTS", LEGACY)).name == LEGACY


async def test_remove_service_refuses_the_user_after_the_reload(settings, nats_auth, nats_server, billing, svc,
                                                              tmp_path):
    result = run("nats-auth", "remove-service", "billing", "--dir", str(nats_auth.directory), cwd=tmp_path,
                 timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"reloaded nats-server (pid {nats_server.process.pid})" in result.stdout
    assert load_services(nats_auth.directory, settings) == []
    mine = as_service(settings, billing)

    async def refused() -> bool:
        return not await _accepts(mine)

    await wait_until(refused, timeout_s=10, interval_s=0.1, what="the reloaded server refuses svc-billing")
    await wait_until(lambda: not svc.is_connected, timeout_s=10, what="its open connection closed by the server")
    again = run("nats-auth", "remove-service", "billing", "--dir", str(nats_auth.directory), cwd=tmp_path)
    assert again.returncode == 2 and "no service identity 'billing'" in again.stderr


async def _accepts(settings) -> bool:  # noqa: ANN001 - Settings of a service identity
    """True when the server lets these credentials connect (a probe connection, closed at once)."""
    try:
        client = await connect(settings.nats_url, name="probe", settings=settings, timeout_s=2)
    except NatsAuthError:
        return False
    await client.close()
    return True


# --- the Node clients from npm --------------------------------------------------------------------------------


@pytest.fixture
def node() -> str:
    """The ``node`` binary with tests/node's packages installed; else skip with the reason, or fail under CI
    (``CI`` set, as .ci/run does, which installs them): CI must not pass by skipping the Node client."""
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not on PATH (Node 20 or newer runs the @nats-io/jetstream client test)"
    elif not (NODE_DIR / "node_modules" / "@nats-io" / "jetstream" / "package.json").exists():
        missing = "tests/node/node_modules is missing: run `npm ci` in tests/node (.ci/run does)"
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI=true, so this test may not be skipped")
        pytest.skip(missing)
    return node


@pytest.mark.timeout(20)
async def test_service_identity_with_the_node_jetstream_client(node, settings, nc, billing):
    event_id = await EventPublisher(settings, nc).publish_event("agent-1", "agent.run.completed", RUN, strict=True)
    c = billing.credentials
    args = {"url": settings.nats_url, "user": c.user, "password": c.password, "inbox_prefix": c.inbox_prefix,
            "stream": "LETTA_EVENTS", "subject": "letta.agent.step.completed", "durable": "billing",
            "others": [LEGACY, FANOUT, "search"], "timeout_ms": 2000}
    done = subprocess.run([node, str(NODE_DIR / "service_identity.mjs"), json.dumps(args)], capture_output=True,
                          text=True, timeout=15, cwd=NODE_DIR)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    allowed = ["connect", "jsm", "account_info", "stream_info", "stream_find", "create_own", "update_own",
               "consumer_info_own", "fetch_ack", "acked_state", "delete_own"]
    assert {k: r[k] for k in allowed if not r[k]["ok"]} == {}
    assert r["stream_find"]["value"] == "LETTA_EVENTS" and r["create_own"]["value"] == "billing"
    assert r["update_own"]["value"] == "billing, updated"
    assert r["fetch_ack"]["value"] == {"event_id": event_id, "subject": "letta.agent.run.completed", "acked": True}
    assert r["acked_state"]["value"] == {"ack_floor": 1, "num_ack_pending": 0, "num_pending": 0}
    api = "$JS.API"
    refused = {  # operation -> the subject the server names in its Permissions Violation
        "default_inbox_jsm": "Subscription to \"_INBOX.",  # nats.js without inboxPrefix
        "ephemeral": f'Publish to "{api}.CONSUMER.CREATE.LETTA_EVENTS"',
        "update_stream": f'Publish to "{api}.STREAM.UPDATE.LETTA_EVENTS"',
        "delete_stream": f'Publish to "{api}.STREAM.DELETE.LETTA_EVENTS"',
        "purge_stream": f'Publish to "{api}.STREAM.PURGE.LETTA_EVENTS"',
        "publish": 'Publish to "letta.agent.step.completed"',
        **{f"create_other:{o}": f'Publish to "{api}.CONSUMER.CREATE.LETTA_EVENTS.{o}"' for o in args["others"]},
        **{f"delete_other:{o}": f'Publish to "{api}.CONSUMER.DELETE.LETTA_EVENTS.{o}"' for o in args["others"]},
        **{f"fetch_other:{o}": f'Publish to "{api}.CONSUMER.INFO.LETTA_EVENTS.{o}"' for o in args["others"]},
        **{f"pull_other:{o}": f'Publish to "{api}.CONSUMER.MSG.NEXT.LETTA_EVENTS.{o}"' for o in args["others"]},
    }
    for op, subject in refused.items():
        assert not r[op]["ok"], (op, r[op])
        assert f"Permissions Violation for {subject}".lower() in r[op]["error"].lower(), (op, r[op])
    admin = nc.jetstream()
    assert sorted(c.name for c in await admin.consumers_info("LETTA_EVENTS")) == [LEGACY, FANOUT]
    assert (await admin.stream_info("LETTA_EVENTS")).state.messages == 1
