"""Fault test: the dispatcher (``letta-bus up`` as a child process) SIGKILLed 20 times at random moments while
2,000 events flow, restarted after each kill. Nothing is lost, duplicates stay within the in-flight window of
each kill, and no delivery row is left ``pending`` once a surviving dispatcher has caught up.

Why duplicates are bounded: a killed process's unacked messages are redelivered after ``ack_wait``. Fan-out
re-publishes tasks with the same ``Nats-Msg-Id`` (JetStream drops them), so only tasks whose POST succeeded but
whose ack did not happen can be POSTed again: at most the sender's ``max_ack_pending`` per kill.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from bus.publisher import EventPublisher
from dispatcher.store.models import DeliveryStatus
from tests.faults import DispatcherProcess, PacedPublisher, duplicates, received_counts, settings_env
from tests.helpers import deliveries, wait_until

AGENTS = [f"agent-kill-{i}" for i in range(4)]
SECRET = "whsec_dispatcher-kill-secret-0123"
EVENTS = 2000
KILLS = 20
#: The sender's max_ack_pending in the child: the most delivery tasks one process holds unacked.
IN_FLIGHT = 64


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_dispatcher_sigkilled_20_times_delivers_every_event(settings, nc, provisioned, store, receiver, tmp_path):
    seed = int(os.environ.get("LETTA_BUS_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"seed {seed} (LETTA_BUS_TEST_SEED reproduces the kill moments)")
    for agent in AGENTS:
        receiver.secrets[f"/{agent}"] = SECRET
        await store.set_agent_webhook(agent, url=receiver.url(f"/{agent}"), secret=SECRET)
    await store.upgrade_schema()  # migrated before the first run: a kill during start-up finds nothing to migrate

    env = settings_env(
        settings, api_port=0, metrics_port=0, ack_wait_s=3.0, http_timeout_s=2.0, max_ack_pending=IN_FLIGHT,
        sender_concurrency=32, retry_schedule_s=[0.2] * 30,  # kills use up deliveries: keep attempts to spare
        endpoint_refresh_s=0.5,
    )
    workdir = tmp_path / "dispatcher"
    workdir.mkdir()
    child = DispatcherProcess(env, workdir)
    paced = PacedPublisher(EventPublisher(settings, nc), AGENTS, EVENTS, rate_per_s=50, window=8, give_up_s=120)
    publishing = asyncio.create_task(paced.run())
    kills: list[tuple[int, str, int]] = []  # (pid, moment, deliveries received before the kill)
    try:
        for _ in range(KILLS):
            child.start()
            if rng.random() < 0.2:  # sometimes during start-up: connecting, provisioning, loading endpoints
                await asyncio.sleep(rng.uniform(0.1, 1.5))
                moment = "start-up"
            else:
                await child.wait_ready()
                await asyncio.sleep(rng.uniform(0.05, 0.7))
                moment = "running"
            pid = child.pid
            assert pid is not None, f"letta-bus up exited by itself:\n{child.output()[-3000:]}"
            kills.append((pid, moment, len(receiver.received)))
            child.sigkill()
            assert child.proc.returncode == -9
        child.start()  # the survivor
        await child.wait_ready()
        accepted = await asyncio.wait_for(publishing, 120)
        assert not paced.abandoned and len(accepted) == EVENTS

        async def all_delivered():
            return set(accepted) <= set(received_counts(receiver))

        await wait_until(all_delivered, 60, interval_s=0.2, what="every event delivered at least once")

        async def settled():
            rows = await deliveries(store)
            return len(rows) == EVENTS and all(r.status == DeliveryStatus.SUCCEEDED for r in rows)

        try:
            await wait_until(settled, 20, interval_s=0.2, what="every delivery row succeeded")
        except TimeoutError:
            rows = await deliveries(store)
            stuck = [(r.id, r.status, r.attempts) for r in rows if r.status != DeliveryStatus.SUCCEEDED]
            raise AssertionError(f"{len(rows)} delivery rows, not succeeded: {stuck[:10]}") from None
    finally:
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        child.stop()

    counts = received_counts(receiver)
    assert set(counts) == set(accepted)  # nothing delivered that was never published, nothing missing
    dup = duplicates(counts)
    assert dup < KILLS * IN_FLIGHT, f"{dup} duplicate deliveries for {KILLS} kills"
    assert all(r.letta_verified and r.standard_verified for r in receiver.received)
    running = sum(1 for _, moment, _ in kills if moment == "running")
    print(f"{len(kills)} kills ({running} while running), {dup} duplicate deliveries, "
          f"{paced.unacknowledged} publishes retried, deliveries before each kill {[k[2] for k in kills]}")
