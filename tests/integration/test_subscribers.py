"""The subscriber runner and tail against a real nats-server: outcomes, concurrency, heartbeats, stop, sharing,
start positions, filters."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from datetime import datetime, timezone

import pytest

from bus.catalog import RunCompleted
from bus.publisher import EventPublisher
from subscribers import Event, Reject, Retry, Subscriber, tail
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(20)

RUN = {"run_id": "run-1", "status": "completed", "usage": {"total_tokens": 7}}
STEP = {"step_id": "step-1", "status": "success"}


@pytest.fixture
def publisher(settings, nc, provisioned):
    return EventPublisher(settings, nc)


async def publish_runs(publisher, n: int, event_type: str = "agent.run.completed", data=None) -> list[str]:
    ids = []
    for i in range(n):
        payload = dict(data) if data is not None else dict(RUN, i=i)
        ids.append(await publisher.publish_event(f"agent-{i % 3}", event_type, payload, strict=True))
    return ids


def make(settings, nc, durable="svc", **kw) -> Subscriber:
    kw.setdefault("fetch_timeout_s", 0.3)
    return Subscriber(durable, settings=settings, nc=nc, **kw)


async def consumer(provisioned, settings, name):
    return await provisioned.consumer_info(settings.events_stream, name)


async def settled(provisioned, settings, name, delivered_seq: int) -> bool:
    info = await consumer(provisioned, settings, name)
    return info.num_ack_pending == 0 and info.delivered.stream_seq >= delivered_seq


# --- outcomes -------------------------------------------------------------------------------------------------------


async def test_typed_event_is_acked(settings, nc, provisioned, publisher):
    seen: list[Event] = []
    sub = make(settings, nc, subjects=["letta.agent.run.completed"])

    @sub.handler
    async def on_run(event: Event) -> None:
        seen.append(event)

    async with sub:
        [event_id] = await publish_runs(publisher, 1)
        await wait_until(lambda: seen)
        await wait_until(lambda: settled(provisioned, settings, "svc", 1))
    event = seen[0]
    assert event.event_id == event_id and event.event_type == "agent.run.completed" and event.agent_id == "agent-0"
    assert event.data["run_id"] == "run-1" and event.data["i"] == 0  # unknown fields pass through
    assert isinstance(event.data_typed, RunCompleted) and event.data_typed.usage.total_tokens == 7
    assert event.num_delivered == 1 and event.stream_seq == 1 and event.subject == "letta.agent.run.completed"
    assert event.headers["Nats-Msg-Id"] == event_id
    assert sub.stats.acked == 1 and sub.stats.received == 1
    info = await consumer(provisioned, settings, "svc")
    assert info.num_ack_pending == 0 and info.num_redelivered == 0
    assert info.config.max_deliver == 10 and info.config.ack_wait == settings.ack_wait_s


async def test_retry_redelivers_after_delay(settings, nc, provisioned, publisher):
    calls: list[tuple[int, float]] = []
    loop = asyncio.get_running_loop()
    sub = make(settings, nc)

    @sub.handler
    async def on_event(event: Event) -> None:
        calls.append((event.num_delivered, loop.time()))
        if event.num_delivered == 1:
            raise Retry(0.4, "not yet")

    async with sub:
        await publish_runs(publisher, 1)
        await wait_until(lambda: len(calls) == 2)
        await wait_until(lambda: settled(provisioned, settings, "svc", 1))
    assert [n for n, _ in calls] == [1, 2]
    assert calls[1][1] - calls[0][1] >= 0.35
    assert sub.stats.retried == 1 and sub.stats.acked == 1


async def test_reject_terms_without_redelivery(settings, nc, provisioned, publisher):
    calls = []
    sub = make(settings, nc)

    @sub.handler
    async def on_event(event: Event) -> None:
        calls.append(event.num_delivered)
        raise Reject("unknown agent")

    async with sub:
        await publish_runs(publisher, 1)
        await wait_until(lambda: settled(provisioned, settings, "svc", 1))
        await asyncio.sleep(0.3)
    assert calls == [1] and sub.stats.rejected == 1
    info = await consumer(provisioned, settings, "svc")
    assert info.num_redelivered == 0 and info.num_ack_pending == 0


async def test_other_exception_naks_with_backoff_and_logs_traceback(settings, nc, provisioned, publisher, caplog):
    calls = []
    sub = make(settings, nc, max_backoff_s=0.2)

    @sub.handler
    async def on_event(event: Event) -> None:
        calls.append(event.num_delivered)
        if event.num_delivered == 1:
            raise KeyError("boom")

    with caplog.at_level(logging.ERROR, logger="subscribers.runner"):
        async with sub:
            await publish_runs(publisher, 1)
            await wait_until(lambda: calls == [1, 2])
            await wait_until(lambda: settled(provisioned, settings, "svc", 1))
    assert sub.stats.failed == 1 and sub.stats.acked == 1
    failures = [r for r in caplog.records if "handler failed" in r.getMessage()]
    assert failures and failures[0].exc_info and isinstance(failures[0].exc_info[1], KeyError)


async def test_max_deliver_gives_up(settings, nc, provisioned, publisher):
    calls = []
    sub = make(settings, nc, max_deliver=2, max_backoff_s=0.1)

    @sub.handler
    async def on_event(event: Event) -> None:
        calls.append(event.num_delivered)
        raise RuntimeError("always")

    async with sub:
        await publish_runs(publisher, 1)
        await wait_until(lambda: sub.stats.gave_up == 1)
        await wait_until(lambda: settled(provisioned, settings, "svc", 1))
        await asyncio.sleep(0.3)
    assert calls == [1, 2] and sub.stats.failed == 1


async def test_undecodable_is_termed_and_runner_continues(settings, nc, provisioned, publisher):
    seen = []
    sub = make(settings, nc)

    @sub.handler
    async def on_event(event: Event) -> None:
        seen.append(event.event_id)

    async with sub:
        await provisioned.publish("letta.agent.step.completed", b"\xff\x00 not json")
        await provisioned.publish("letta.agent.step.completed",  # an envelope whose data misses step_id
                                  b'{"event_id":"evt_x","event_type":"agent.step.completed","timestamp":"t",'
                                  b'"agent_id":"a","data":{"status":"success"}}')
        [good] = await publish_runs(publisher, 1, "agent.step.completed", STEP)
        await wait_until(lambda: seen)
        await wait_until(lambda: settled(provisioned, settings, "svc", 3))
    assert seen == [good] and sub.stats.undecodable == 2 and sub.stats.acked == 1
    info = await consumer(provisioned, settings, "svc")
    assert info.num_redelivered == 0


# --- concurrency, heartbeats, stop ------------------------------------------------------------------------------


async def test_concurrency_bound(settings, nc, provisioned, publisher):
    running = 0
    peak = 0
    pending_seen = []
    sub = make(settings, nc, max_in_flight=3)

    @sub.handler
    async def on_event(event: Event) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    async with sub:
        await publish_runs(publisher, 20)
        while sub.stats.acked < 20:
            info = await consumer(provisioned, settings, "svc")
            pending_seen.append(info.num_ack_pending)
            await asyncio.sleep(0.03)
            assert len(pending_seen) < 300
    assert peak == 3
    # Fetched only as many as free slots: a greedy fetch would show up to 20 unacked. The server may still count
    # an ack in transit (it processes acks asynchronously) when the next message is delivered, hence the slack.
    assert max(pending_seen) <= 2 * 3


async def test_slow_handler_kept_alive_by_in_progress(settings, nc, provisioned, publisher):
    calls = []
    sub = make(settings, nc, durable="slow", ack_wait_s=1.0)

    @sub.handler
    async def on_event(event: Event) -> None:
        calls.append(event.num_delivered)
        await asyncio.sleep(2.6)

    async with sub:
        await publish_runs(publisher, 1)
        await wait_until(lambda: sub.stats.acked == 1)
        await wait_until(lambda: settled(provisioned, settings, "slow", 1))
    assert calls == [1]
    info = await consumer(provisioned, settings, "slow")
    assert info.num_redelivered == 0


async def test_graceful_stop_finishes_in_flight_and_fetches_nothing_new(settings, nc, provisioned, publisher):
    started = asyncio.Event()
    finished = []
    sub = make(settings, nc)

    @sub.handler
    async def on_event(event: Event) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.append(event.event_id)

    await sub.start()
    [first] = await publish_runs(publisher, 1)
    await asyncio.wait_for(started.wait(), 5)
    stopping = asyncio.create_task(sub.stop())
    await asyncio.sleep(0.05)
    await publish_runs(publisher, 2)  # published during the stop: must stay for the next run
    await asyncio.wait_for(stopping, 5)
    assert finished == [first]
    info = await consumer(provisioned, settings, "svc")
    assert info.num_ack_pending == 0 and info.ack_floor.stream_seq == 1 and info.num_pending == 2
    assert sub.stats.acked == 1 and sub.stats.released == 0


async def test_run_forever_drains_on_sigterm(settings, provisioned, publisher):
    finished = []
    started = asyncio.Event()
    sub = Subscriber("svc", settings=settings, fetch_timeout_s=0.3)  # connects to settings.nats_url itself

    @sub.handler
    async def on_event(event: Event) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(event.event_id)

    previous = signal.getsignal(signal.SIGTERM)
    runner = asyncio.create_task(sub.run_forever())
    await wait_until(lambda: sub.running)
    [event_id] = await publish_runs(publisher, 1)
    await asyncio.wait_for(started.wait(), 5)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(runner, 5)
    assert finished == [event_id]
    assert signal.getsignal(signal.SIGTERM) == previous
    info = await consumer(provisioned, settings, "svc")
    assert info.num_ack_pending == 0 and info.ack_floor.stream_seq == 1


async def test_handler_may_stop_its_subscriber(settings, nc, provisioned, publisher):
    sub = make(settings, nc)

    @sub.handler
    async def on_event(event: Event) -> None:
        await sub.stop()  # returns at once: the stop waits for this handler, which is then acked

    await sub.start()
    await publish_runs(publisher, 1)
    await asyncio.wait_for(sub.wait_stopped(), 5)
    assert sub.stats.acked == 1
    info = await consumer(provisioned, settings, "svc")
    assert info.num_ack_pending == 0 and info.ack_floor.stream_seq == 1


# --- sharing ----------------------------------------------------------------------------------------------------


async def test_two_instances_on_one_durable_split_the_work(settings, nc, provisioned, publisher):
    got: dict[str, list[str]] = {"a": [], "b": []}

    def runner(name: str) -> Subscriber:
        sub = make(settings, nc, durable="shared", max_in_flight=4)

        @sub.handler
        async def on_event(event: Event) -> None:
            await asyncio.sleep(0.01)
            got[name].append(event.event_id)

        return sub

    async with runner("a"), runner("b"):
        ids = await publish_runs(publisher, 50)
        await wait_until(lambda: len(got["a"]) + len(got["b"]) >= 50)
        await wait_until(lambda: settled(provisioned, settings, "shared", 50))
        await asyncio.sleep(0.1)
    everything = got["a"] + got["b"]
    assert sorted(everything) == sorted(ids) and len(set(everything)) == 50
    assert got["a"] and got["b"]


async def test_different_durables_each_see_everything(settings, nc, provisioned, publisher):
    got: dict[str, list[str]] = {"billing": [], "audit": []}
    subs = []
    for name in got:
        sub = make(settings, nc, durable=name)
        sub.handler(_collector(got[name]))
        subs.append(sub)
    async with subs[0], subs[1]:
        ids = await publish_runs(publisher, 10)
        await wait_until(lambda: len(got["billing"]) == 10 and len(got["audit"]) == 10)
    assert sorted(got["billing"]) == sorted(ids) == sorted(got["audit"])


def _collector(target: list):
    async def on_event(event: Event) -> None:
        target.append(event.event_id)

    return on_event


# --- start positions and filters ------------------------------------------------------------------------------


async def _collect(settings, nc, publisher, start, name: str, expect: int) -> list[int]:
    data = []
    sub = make(settings, nc, durable=name, start=start)

    @sub.handler
    async def on_event(event: Event) -> None:
        data.append(event.data["i"])

    async with sub:
        [_] = await publish_runs(publisher, 1, data=dict(RUN, i=99))  # published after start
        await wait_until(lambda: len(data) >= expect)
        await asyncio.sleep(0.1)
    return sorted(data)


async def test_start_positions(settings, nc, provisioned, publisher):
    await publish_runs(publisher, 3)  # stream seqs 1..3, i = 0..2
    assert await _collect(settings, nc, publisher, "all", "from-all", 4) == [0, 1, 2, 99]  # seq 4
    assert await _collect(settings, nc, publisher, "new", "from-new", 1) == [99]  # seq 5
    assert await _collect(settings, nc, publisher, 2, "from-seq", 5) == [1, 2, 99, 99, 99]  # seqs 2..6


async def test_start_by_time(settings, nc, provisioned, publisher):
    await publish_runs(publisher, 2)
    await asyncio.sleep(0.02)
    since = datetime.now(timezone.utc)
    await asyncio.sleep(0.02)
    await publisher.publish_event("agent-1", "agent.run.completed", dict(RUN, i=7), strict=True)
    assert await _collect(settings, nc, publisher, since, "from-time", 2) == [7, 99]
    # the durable keeps its position: restarting it with the same (or another) start is accepted
    assert await _collect(settings, nc, publisher, since, "from-time", 1) == [99]


async def test_filter_subjects(settings, nc, provisioned, publisher):
    seen = []
    sub = make(settings, nc, subjects=["letta.agent.run.completed", "letta.agent.tool.attached"])

    @sub.handler
    async def on_event(event: Event) -> None:
        seen.append(event.event_type)

    async with sub:
        await publisher.publish_event("a", "agent.step.completed", STEP, strict=True)
        await publisher.publish_event("a", "agent.run.completed", RUN, strict=True)
        await publisher.publish_event("a", "agent.tool.attached", {"tool_id": "t", "tool_name": "n"}, strict=True)
        await publisher.publish_event("a", "agent.tool.detached", {"tool_id": "t", "tool_name": "n"}, strict=True)
        await wait_until(lambda: len(seen) == 2)
        await asyncio.sleep(0.2)
    assert seen == ["agent.run.completed", "agent.tool.attached"]
    info = await consumer(provisioned, settings, "svc")
    assert info.config.filter_subjects == ["letta.agent.run.completed", "letta.agent.tool.attached"]


async def test_ephemeral_consumer_is_removed_at_stop(settings, nc, provisioned, publisher):
    seen = []
    sub = make(settings, nc, durable=None, start="all")
    sub.handler(_collector(seen))
    ids = await publish_runs(publisher, 2)
    async with sub:
        await wait_until(lambda: len(seen) == 2)
        name = sub.consumer_name
        assert name and (await consumer(provisioned, settings, name)).config.durable_name is None
    assert seen == ids
    names = [c.name for c in await provisioned.consumers_info(settings.events_stream)]
    assert name not in names


async def test_missing_stream_is_a_clear_error(settings, nc):
    sub = make(settings, nc)
    sub.handler(_collector([]))
    with pytest.raises(RuntimeError, match="not found"):
        await sub.start()


# --- tail -------------------------------------------------------------------------------------------------------


async def test_tail_prints_live_events_and_stops_after_max(settings, nc, provisioned, publisher):
    await publish_runs(publisher, 1)  # before tail: not shown by default
    lines: list[str] = []
    task = asyncio.create_task(tail(settings, "letta.agent.>", out=lines.append, nc=nc, max_events=3))
    await asyncio.sleep(0.2)
    ids = await publish_runs(publisher, 2)
    await provisioned.publish("letta.agent.step.completed", b"garbage")
    await publisher.publish_event("x", "tool.execution.completed", {"tool_name": "t", "status": "ok"})  # filtered
    assert await asyncio.wait_for(task, 5) == 3
    assert ids[0] in lines[0] and "agent.run.completed" in lines[0] and "agent-0" in lines[0]
    assert '"run_id":"run-1"' in lines[0] and lines[0].startswith(str(datetime.now(timezone.utc).year))
    assert ids[1] in lines[1] and "agent-1" in lines[1]
    assert "undecodable" in lines[2] and "letta.agent.step.completed" in lines[2]


async def test_tail_since_and_stop_event(settings, nc, provisioned, publisher):
    ids = await publish_runs(publisher, 2)
    lines: list[str] = []
    stop = asyncio.Event()
    task = asyncio.create_task(tail(settings, since="all", out=lines.append, stop=stop))  # own connection
    await wait_until(lambda: len(lines) == 2)
    stop.set()
    assert await asyncio.wait_for(task, 2) == 2
    assert ids[0] in lines[0] and ids[1] in lines[1]


async def test_tail_cancel(settings, nc, provisioned):
    task = asyncio.create_task(tail(settings, nc=nc, out=lambda line: None))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
