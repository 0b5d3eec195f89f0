"""The transactional outbox against a real nats-server, SQLite and PostgreSQL: rows follow the caller's
transaction, the relay marks rows only after the PubAck, a relay SIGKILLed between the PubAck and the mark loses
and duplicates nothing, and concurrent relays on PostgreSQL publish each event once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from datetime import timedelta

import asyncpg

import msgspec
import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from bus import envelope as env
from bus.catalog import EventValidationError
from bus.embedded import EmbeddedServer
from bus.letta import LettaEventBus
from bus.outbox import (OutboxEvent, OutboxRelay, add_event, create_schema, outbox_table, pending_count,
                        purge_published, utcnow)
from bus.publisher import EventPublisher
from config.settings import PROJECT_ROOT
from tests.helpers import CATALOG_SAMPLES, wait_until

STEP = CATALOG_SAMPLES["agent.step.completed"]
POSTGRES_URL = os.environ.get("LETTA_BUS_TEST_POSTGRES_URL")
pytestmark = pytest.mark.timeout(30)


@contextlib.asynccontextmanager
async def fresh_postgres_database():
    """A new PostgreSQL database on LETTA_BUS_TEST_POSTGRES_URL's server (dropped after); yields its URL."""
    base = make_url(POSTGRES_URL)
    name = f"letta_bus_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(base.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def engine(request, tmp_path):
    """An async engine on a fresh database with the outbox table: a SQLite file, or a PostgreSQL database when
    LETTA_BUS_TEST_POSTGRES_URL is set (skipped otherwise)."""
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path}/outbox.db"
        elif POSTGRES_URL:
            url = await stack.enter_async_context(fresh_postgres_database())
        else:
            pytest.skip("set LETTA_BUS_TEST_POSTGRES_URL (e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test)")
        eng = create_async_engine(url)
        stack.push_async_callback(eng.dispose)
        await create_schema(eng)
        yield eng


async def add_events(engine, settings, count: int, *, per_tx: int = 100, agent_id: str = "agent-ob") -> list[str]:
    """Add ``count`` step-completed events through add_event, committing every ``per_tx``; returns their ids."""
    sessions = async_sessionmaker(engine)
    publisher = EventPublisher(settings)
    ids: list[str] = []
    for start in range(0, count, per_tx):
        async with sessions() as session, session.begin():
            for i in range(start, min(count, start + per_tx)):
                ids.append(add_event(session, publisher, agent_id, "agent.step.completed",
                                     {**STEP, "step_id": f"step-{i}"}, organization_id="org-ob"))
    return ids


async def stream_events(js, settings) -> list[tuple[str, str, env.Envelope]]:
    """Every message of the events stream as (subject, Nats-Msg-Id header, decoded envelope), by sequence."""
    state = (await js.stream_info(settings.events_stream)).state
    out = []
    for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
        msg = await js.get_msg(settings.events_stream, seq)
        out.append((msg.subject, msg.headers[env.H_MSG_ID], env.decode(msg.data)))
    return out


async def outbox_rows(engine) -> list[OutboxEvent]:
    async with async_sessionmaker(engine, expire_on_commit=False)() as session:
        return list((await session.execute(select(OutboxEvent).order_by(OutboxEvent.id))).scalars())


async def assert_each_once(js, settings, engine, ids: list[str]) -> None:
    """The stream holds exactly the outbox's events, each once, on its subject; every row is published."""
    stored = await stream_events(js, settings)
    assert len(stored) == len(ids), f"{len(stored)} messages in the stream for {len(ids)} events"
    assert sorted(msg_id for _, msg_id, _ in stored) == sorted(ids)
    assert all(e.event_id == msg_id and subject == settings.event_subject(e.event_type)
               for subject, msg_id, e in stored)
    rows = await outbox_rows(engine)
    assert sorted(r.event_id for r in rows) == sorted(ids)
    assert all(r.published_at is not None and r.attempts >= 1 for r in rows)


async def test_rows_follow_the_callers_transaction(settings, nc, provisioned, engine):
    sessions = async_sessionmaker(engine)
    async with sessions() as session, session.begin():
        kept = add_event(session, LettaEventBus(settings), "agent-ob", "agent.tool.attached",
                         CATALOG_SAMPLES["agent.tool.attached"])
    async with sessions() as session:
        rolled_back = add_event(session, settings, "agent-ob", "agent.step.cancelled", {"step_id": "s-1"})
        await session.rollback()
    assert kept and rolled_back
    rows = await outbox_rows(engine)
    assert [r.event_id for r in rows] == [kept]
    row = rows[0]
    assert row.subject == "letta.agent.tool.attached" and row.published_at is None and row.attempts == 0
    assert row.headers[env.H_MSG_ID] == kept and row.headers[env.H_AGENT_ID] == "agent-ob"
    assert msgspec.json.decode(row.body)["data"] == CATALOG_SAMPLES["agent.tool.attached"]

    relay = OutboxRelay(settings, engine, nc, poll_interval_s=0.05)
    assert await relay.relay_once() == (1, 0)
    assert await relay.relay_once() == (0, 0)
    await assert_each_once(provisioned, settings, engine, [kept])


async def test_invalid_events_never_break_the_transaction_unless_strict(settings, engine):
    sessions = async_sessionmaker(engine)
    async with sessions() as session, session.begin():
        assert add_event(session, settings, "agent-ob", "agent.step.completed", {"status": "ok"}) is None
        assert add_event(session, settings, "", "agent.step.completed", STEP) is None
        assert add_event(session, settings, "agent-ob", "Not A Type", STEP) is None
        assert add_event(session, settings, "agent-ob", "agent.step.completed", {**STEP, "x": object()}) is None
        too_big = {**STEP, "blob": "x" * settings.max_event_bytes}
        assert add_event(session, settings, "agent-ob", "agent.step.completed", too_big) is None
        ok = add_event(session, settings, "agent-ob", "agent.step.completed", STEP)
        with pytest.raises(EventValidationError, match="step_id"):
            add_event(session, settings, "agent-ob", "agent.step.completed", {"status": "ok"}, strict=True)
    assert [r.event_id for r in await outbox_rows(engine)] == [ok]


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
async def test_broker_outage_keeps_rows_pending_then_publishes(settings, nc, provisioned, engine, nats_server):
    ids = await add_events(engine, settings, 30)
    port = nats_server.client_port
    nats_server.kill()
    await wait_until(lambda: not nc.is_connected, 5, what="client noticed the outage")
    relay = OutboxRelay(settings, engine, nc, batch_size=10, poll_interval_s=0.05, max_backoff_s=0.2)
    assert await relay.relay_once() == (0, 10)
    rows = await outbox_rows(engine)
    assert [r.attempts for r in rows[:10]] == [1] * 10 and all(r.published_at is None for r in rows)
    assert "not connected" in rows[0].last_error
    restarted = EmbeddedServer(workdir=nats_server.workdir, conf=nats_server.conf, port=port, monitor_port=-1)
    restarted.start()
    try:
        await wait_until(lambda: nc.is_connected, 8, what="client reconnected")
        await relay.start()
        await wait_until(_no_pending(engine), 8, what="outbox drained")
        await relay.stop()
        await assert_each_once(nc.jetstream(), settings, engine, ids)
        assert relay.stats.published == 30 and relay.stats.failed >= 10
        assert all(r.last_error is None for r in await outbox_rows(engine))
    finally:
        await relay.stop()
        restarted.stop()


def _relay_env(settings) -> dict[str, str]:
    """The relay process's environment: it finds the publisher role's credentials of the test's server."""
    return {**os.environ, "LETTA_BUS_NATS_AUTH_DIR": str(settings.nats_auth_dir)}


def _no_pending(engine):
    async def check():
        return await pending_count(engine) == 0
    return check


async def test_relay_sigkilled_between_puback_and_mark_publishes_each_event_once(settings, nc, provisioned, engine):
    """The relay process publishes a batch, pauses before the UPDATE and is SIGKILLed; a new relay re-publishes
    those rows with the same Nats-Msg-Id (JetStream reports duplicates) and the rest: each event once."""
    ids = await add_events(engine, settings, 60, per_tx=20)
    url = engine.url.render_as_string(hide_password=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.outbox_relay_proc", settings.nats_url, url, "--batch", "25",
         "--pause-after-publish"], env=_relay_env(settings),
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        loop = asyncio.get_running_loop()
        lines = []
        while not lines or not lines[-1].startswith(b"PUBLISHED"):
            line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 8)
            assert line, f"relay process ended early: {proc.stderr.read().decode()[-2000:]}"
            lines.append(line)
        assert lines[-1].strip() == b"PUBLISHED 25"
        # the batch is stored but not marked: the crash window
        assert len(await stream_events(provisioned, settings)) == 25
        assert await pending_count(engine) == 60
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert await pending_count(engine) == 60  # the killed relay's transaction never committed

    relay = OutboxRelay(settings, engine, nc, batch_size=25, poll_interval_s=0.05)
    await relay.start()
    try:
        await wait_until(_no_pending(engine), 8, what="outbox drained by the restarted relay")
    finally:
        await relay.stop()
    assert relay.stats.published == 60
    assert relay.stats.duplicates == 25  # the killed relay's batch, dropped by JetStream's duplicate window
    await assert_each_once(provisioned, settings, engine, ids)


async def test_restarted_relay_process_completes_the_outbox(settings, nc, provisioned, engine):
    """Same crash, restarted as a process too (what a supervisor does)."""
    ids = await add_events(engine, settings, 40, per_tx=40)
    url = engine.url.render_as_string(hide_password=False)
    base = [sys.executable, "-m", "tests.integration.outbox_relay_proc", settings.nats_url, url, "--batch", "15"]
    crashed = subprocess.Popen(base + ["--pause-after-publish"], cwd=PROJECT_ROOT, env=_relay_env(settings),
                               stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        loop = asyncio.get_running_loop()
        line = b""
        while not line.startswith(b"PUBLISHED"):
            line = await asyncio.wait_for(loop.run_in_executor(None, crashed.stdout.readline), 8)
            assert line, "relay process ended early"
    finally:
        os.kill(crashed.pid, signal.SIGKILL)
        crashed.wait(5)
        crashed.stdout.close()
    restarted = await asyncio.create_subprocess_exec(*base, cwd=PROJECT_ROOT, env=_relay_env(settings),
                                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(restarted.communicate(), 9)
    finally:
        if restarted.returncode is None:
            os.kill(restarted.pid, signal.SIGKILL)
            await restarted.wait()
    assert restarted.returncode == 0, err.decode()[-2000:]
    assert out.split()[-3:] == [b"DONE", b"40", b"15"]
    await assert_each_once(provisioned, settings, engine, ids)


async def test_concurrent_relays_on_postgres_publish_each_event_once(settings, nc, provisioned, postgres_url):
    """Four relays on one PostgreSQL table (FOR UPDATE SKIP LOCKED): 500 events, none published twice (no
    duplicate PubAck: JetStream's dedup is not what keeps the stream exact here)."""
    eng = create_async_engine(postgres_url, pool_size=8)
    await create_schema(eng)
    relays = []
    try:
        ids = await add_events(eng, settings, 500, per_tx=50)
        relays = [OutboxRelay(settings, eng, nc, batch_size=20, poll_interval_s=0.02) for _ in range(4)]
        await asyncio.gather(*(r.start() for r in relays))
        await wait_until(_no_pending(eng), 9, what="500 events relayed")
        for r in relays:
            await r.stop()
        assert sum(r.stats.published for r in relays) == 500
        assert sum(r.stats.duplicates for r in relays) == 0
        assert sum(1 for r in relays if r.stats.published) >= 2, [r.stats for r in relays]
        await assert_each_once(provisioned, settings, eng, ids)
    finally:
        for r in relays:
            await r.stop()
        await eng.dispose()


async def test_purge_published_deletes_only_old_published_rows(settings, nc, provisioned, engine):
    await add_events(engine, settings, 5)
    relay = OutboxRelay(settings, engine, nc)
    assert await relay.relay_once() == (5, 0)
    await add_events(engine, settings, 2)  # pending: never purged
    async with engine.begin() as conn:
        old = select(outbox_table.c.id).order_by(outbox_table.c.id).limit(3).scalar_subquery()
        await conn.execute(update(outbox_table).where(outbox_table.c.id.in_(old))
                           .values(published_at=utcnow() - timedelta(hours=2)))
    assert await purge_published(engine, older_than_s=3600) == 3
    rows = await outbox_rows(engine)
    assert len(rows) == 4 and sum(r.published_at is None for r in rows) == 2
    assert await purge_published(engine, older_than_s=0) == 2
    assert await pending_count(engine) == 2
