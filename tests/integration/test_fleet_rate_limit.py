"""The per-agent rate limit holds for the fleet, not per process: two dispatchers on the same durables deliver one
agent's events at no more than the limit together (issue 11). Upper bounds only: a loaded machine can only make
deliveries slower."""

from __future__ import annotations

import pytest

from bus.connection import connect
from bus.publisher import EventPublisher
from dispatcher.delivery.peers import Peers
from dispatcher.delivery.service import Dispatcher
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

RUN = {"run_id": "run-1", "status": "completed"}
RATE = 40.0
BURST = 4


async def test_two_dispatchers_share_an_agents_rate_limit(settings, nc, store, receiver, provisioned):
    settings = settings.model_copy(update={"agent_rate_limit_per_s": RATE, "agent_rate_burst": BURST,
                                           "peer_heartbeat_s": 1.0})
    await store.set_agent_webhook("agent-busy", url=receiver.url("/busy"), secret="s" * 32)
    conns = [await connect(settings.nats_url, name=f"d{i}", settings=settings, role="dispatcher") for i in range(2)]
    dispatchers = [Dispatcher(settings, c, store) for c in conns]
    try:
        for d in dispatchers:
            await d.start()
        await wait_until(lambda: all(d.peers.count() == 2 for d in dispatchers), timeout_s=10,
                         what="each dispatcher counts two")
        publisher = EventPublisher(settings, nc)
        n = 120
        for _ in range(n):
            await publisher.publish_event("agent-busy", "agent.run.completed", RUN, strict=True)
        got = await receiver.wait_for(n, timeout_s=30, path="/busy")
        assert len({r.headers["webhook-id"] for r in got}) == n, "none dropped, none duplicated"
        stamps = sorted(r.at for r in got)
        # Before: each process allowed RATE, so two delivered about 2 x RATE. Now: at most RATE (+10 %) after the
        # fleet's burst (each process takes BURST / 2).
        rate = (n - BURST) / (stamps[-1] - stamps[0])
        assert rate <= 1.1 * RATE, f"{rate:.1f} deliveries/s for one agent; the fleet-wide limit is {RATE:g}/s"
        assert sum(d.sender.succeeded for d in dispatchers) == n
    finally:
        for d in dispatchers:
            await d.stop()
        for c in conns:
            await c.close()


async def test_peers_count_each_other_and_a_goodbye_at_once(settings, dispatcher_nc, nc):
    a = Peers(dispatcher_nc, settings.peers_subject, 0.1)
    b = Peers(nc, settings.peers_subject, 0.1)
    await a.start()
    await b.start()
    try:
        await wait_until(lambda: a.count() == 2 and b.count() == 2, timeout_s=5, what="two peers")
        await b.stop()
        await wait_until(lambda: a.count() == 1, timeout_s=5, what="the goodbye counted")
    finally:
        await a.stop()
