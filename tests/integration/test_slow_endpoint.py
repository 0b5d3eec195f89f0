"""An endpoint that slows down after a burst holds at most its own concurrency cap of the sender's slots, and its
queued tasks wait for it only within their ack_wait budget (issue 10, finding 5): the other endpoints keep flowing
and nothing is POSTed twice. (Throughput figures: bench/isolation.py.)"""

from __future__ import annotations

import asyncio
from collections import Counter

from bus.publisher import EventPublisher
from bus.streams import provision
from dispatcher.delivery.service import Dispatcher

RUN = {"run_id": "run-1", "status": "completed"}
HEALTHY = 10


async def test_a_slowing_endpoint_neither_starves_the_others_nor_gets_duplicates(settings, nc, dispatcher_nc, store,
                                                                                  receiver, provisioned):
    # Before the fix, 30 of the 32 slots waited on the slow endpoint's 2-slot gate for up to 15 s, past ack_wait (6 s):
    # JetStream redelivered them and both copies were POSTed.
    settings = settings.model_copy(update={
        "sender_concurrency": 32, "endpoint_max_concurrency": 2, "ack_wait_s": 6.0, "http_timeout_s": 3.0,
        "circuit_failure_threshold": 10_000,
    })
    await provision(nc.jetstream(), settings)  # the sender durable's ack_wait_s
    await store.set_agent_webhook("agent-slow", url=receiver.url("/slow"))
    for i in range(HEALTHY):
        await store.set_agent_webhook(f"agent-up-{i}", url=receiver.url(f"/up-{i}"))
    d = Dispatcher(settings, dispatcher_nc, store)
    await d.start()
    try:
        # The sender's acks and naks name the delivery count: past 1 + the naks before it, JetStream redelivered the
        # task because ack_wait ran out (a retry after a failed POST is a nak, and is not counted).
        redelivered: list[str] = []
        naks: Counter[str] = Counter()

        async def settled(msg):
            tokens = msg.subject.split(".")
            seq, delivered = tokens[5], int(tokens[4])
            if delivered > 1 + naks[seq]:
                redelivered.append(msg.subject)
            if msg.data.startswith(b"-NAK"):
                naks[seq] += 1

        await nc.subscribe(f"$JS.ACK.{settings.webhooks_stream}.{settings.sender_durable}.>", cb=settled)
        publisher = EventPublisher(settings, nc)
        # fast at first, so the gate's latency estimate is low when the burst comes
        await asyncio.gather(*(publisher.publish_event("agent-slow", "agent.run.completed", RUN, strict=True)
                               for _ in range(10)))
        await receiver.wait_for(10, timeout_s=20, path="/slow")
        receiver.delay_s["/slow"] = 1.0
        await asyncio.gather(*(publisher.publish_event("agent-slow", "agent.run.completed", RUN, strict=True)
                               for _ in range(80)))
        await asyncio.gather(*(publisher.publish_event(f"agent-up-{i}", "agent.run.completed", RUN, strict=True)
                               for i in range(HEALTHY) for _ in range(20)))

        await asyncio.sleep(2 * settings.ack_wait_s)  # a task held past ack_wait is redelivered meanwhile
        assert redelivered == [], "tasks waited past ack_wait behind the slow gate and were redelivered"
        for i in range(HEALTHY):
            await receiver.wait_for(20, timeout_s=30, path=f"/up-{i}")

        ids = Counter(r.headers["webhook-id"] for r in receiver.received)
        assert [i for i, n in ids.items() if n > 1] == [], "a task was POSTed twice"
        for i in range(HEALTHY):
            assert len([r for r in receiver.received if r.path == f"/up-{i}"]) == 20
        slow = [r for r in receiver.received if r.path == "/slow"]
        assert 10 < len(slow) <= 90
        assert d.sender.deferred > 0, "the tasks that could not wait within ack_wait were deferred"
    finally:
        receiver.delay_s.pop("/slow", None)
        await d.stop()
