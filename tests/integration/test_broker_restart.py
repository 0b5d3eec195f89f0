"""Fault test: nats-server SIGKILLed and restarted (same port, same store) twice while publishers run.

Two publishing paths, each asserting that every event JetStream accepted is in the stream exactly once:

* :class:`bus.publisher.EventPublisher` with its own reconnecting connection: a publish caught by the kill times
  out, is retried with the same ``Nats-Msg-Id`` and, once the caller gets ``None``, published again by the caller
  with the same ``event_id``. nats-py keeps unsent requests buffered across the reconnect, so a request the caller
  gave up on may still be stored late: JetStream's duplicate window (rebuilt from the store after the restart)
  must drop the copies.
* the transactional outbox (:mod:`bus.outbox`): rows committed while the broker is down stay pending and are
  relayed after the restart; rows whose PubAck was lost are re-published and dropped as duplicates.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from bus.embedded import EmbeddedServer
from bus.outbox import OutboxRelay, add_event, create_schema, pending_count
from bus.publisher import EventPublisher
from tests.faults import STEP, PacedPublisher, stream_msg_ids
from tests.helpers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

OUTAGE_S = 1.5


async def kill_and_restart(server: EmbeddedServer, outage_s: float = OUTAGE_S) -> None:
    """SIGKILL the server, wait ``outage_s`` seconds, start it again on the port it had and the same store."""
    server.kill()
    await asyncio.sleep(outage_s)
    server.port = server.client_port  # EmbeddedServer picked a free port (-1) the first time: keep it
    await asyncio.to_thread(server.start)


async def test_publishers_across_broker_kills_store_each_accepted_event_once(settings, nats_server, nc, provisioned):
    fast = settings.model_copy(update={"publish_timeout_s": 0.5, "publish_attempts": 2})
    publishers = [await EventPublisher(fast).start(wait_s=5) for _ in range(3)]
    runs = [PacedPublisher(p, [f"agent-restart-{i}"], 300, rate_per_s=100, window=8, retry_pause_s=0.1,
                           give_up_s=60) for i, p in enumerate(publishers)]
    try:
        tasks = [asyncio.create_task(run.run()) for run in runs]
        for threshold in (150, 450):
            await wait_until(lambda: sum(len(r.accepted) for r in runs) >= threshold, 30,
                             what=f"{threshold} events accepted")
            await kill_and_restart(nats_server)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        for p in publishers:
            await p.close()
    accepted = [e for r in runs for e in r.accepted]
    assert len(accepted) == 900 and not any(r.abandoned for r in runs)
    assert sum(r.unacknowledged for r in runs) > 0, "the kills did not catch any publish in flight"
    # nats-py sent the buffered tries after the reconnect: stored late, so the caller's retry was a duplicate
    assert sum(r.duplicates for r in runs) > 0
    print(f"{sum(r.unacknowledged for r in runs)} publishes unacknowledged and retried with the same id, "
          f"{sum(r.duplicates for r in runs)} of them had been stored (PubAck.duplicate)")
    await wait_until(lambda: nc.is_connected, 10, what="the test's connection is back")
    stored = await stream_msg_ids(nc.jetstream(), settings.events_stream, f"{settings.subject_prefix}.>")
    assert len(stored) == len(set(stored)), "an event is stored twice"
    assert sorted(stored) == sorted(accepted)


async def test_outbox_relay_across_broker_kills_publishes_each_row_once(settings, nats_server, nc, provisioned,
                                                                         tmp_path):
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/outbox.db")
    await create_schema(engine)
    sessions = async_sessionmaker(engine)
    builder = EventPublisher(settings)
    ids: list[str] = []

    async def write(batches: int, per_tx: int = 10) -> None:
        """The application: commits events in its own transactions, whether or not the broker is up."""
        for b in range(batches):
            async with sessions() as session, session.begin():
                for i in range(per_tx):
                    ids.append(add_event(session, builder, "agent-outbox", "agent.step.completed",
                                         {**STEP, "step_id": f"step-{b}-{i}"}))
            relay.notify()
            await asyncio.sleep(0.02)

    relay = OutboxRelay(settings.model_copy(update={"publish_timeout_s": 0.5}), engine, batch_size=25,
                        poll_interval_s=0.05, max_backoff_s=0.3)
    await relay.start()
    try:
        writing = asyncio.create_task(write(80))
        for threshold in (150, 500):
            await wait_until(lambda: relay.stats.published >= threshold, 30, what=f"{threshold} rows relayed")
            await kill_and_restart(nats_server)
        await asyncio.wait_for(writing, 30)

        async def drained():
            return await pending_count(engine) == 0

        await wait_until(drained, 30, interval_s=0.1, what="outbox drained after the restarts")
    finally:
        await relay.stop()
        await engine.dispose()
    assert len(ids) == 800 and relay.stats.errors > 0, "the kills did not interrupt the relay"
    print(f"relay: {relay.stats}")
    await wait_until(lambda: nc.is_connected, 10, what="the test's connection is back")
    stored = await stream_msg_ids(nc.jetstream(), settings.events_stream, f"{settings.subject_prefix}.>")
    assert len(stored) == len(set(stored)), "an event is stored twice"
    assert sorted(stored) == sorted(ids)

