"""EndpointGate (concurrency, queueing, circuit breaker) and RateLimiter decisions."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher.delivery.gates import EndpointGate, RateLimiter


async def test_circuit_opens_probes_and_doubles_its_cooldown():
    gate = EndpointGate(4, failure_threshold=2, cooldown_s=0.05, max_cooldown_s=0.15)
    for _ in range(2):
        assert await gate.acquire()
        gate.release(False)
    assert gate.state == "open" and gate.blocked_for() > 0
    await asyncio.sleep(0.06)
    assert gate.state == "half-open" and gate.blocked_for() is None
    assert await gate.acquire()  # the probe
    assert gate.state == "open" and not await gate.acquire(), "one probe at a time"
    gate.release(False)  # the probe failed: twice the cool-down
    assert gate.cooldown_s == pytest.approx(0.10)
    await asyncio.sleep(0.11)
    assert await gate.acquire()
    gate.release(False)
    assert gate.cooldown_s == pytest.approx(0.15), "capped at max_cooldown_s"
    await asyncio.sleep(0.16)
    assert await gate.acquire()
    gate.release(True)
    assert gate.state == "closed" and gate.cooldown_s == pytest.approx(0.05)


async def test_open_circuit_defers_over_the_whole_cooldown():
    gate = EndpointGate(4, failure_threshold=1, cooldown_s=10.0)
    assert await gate.acquire()
    gate.release(False)
    waits = [gate.blocked_for() for _ in range(200)]
    assert min(waits) >= 9.9 and max(waits) <= 20.0 and max(waits) - min(waits) > 5.0


async def test_waiting_is_for_healthy_endpoints_with_a_short_queue():
    gate = EndpointGate(2, failure_threshold=5, cooldown_s=1.0, max_wait_s=1.0, initial_latency_s=0.1)
    assert await gate.acquire() and await gate.acquire()
    assert gate.can_wait(), "queue of 1 x 0.1 s / 2 slots is well within 1 s"
    gate.waiting = 20
    assert not gate.can_wait(), "21 x 0.1 s / 2 = 1.05 s is over max_wait_s"
    gate.waiting = 0
    gate.release(False)
    assert await gate.acquire()
    assert not gate.can_wait(), "nothing queues behind a failing endpoint"


def test_busy_delay_grows_with_the_deferred_backlog():
    gate = EndpointGate(16, failure_threshold=5, cooldown_s=1.0, initial_latency_s=4.0)
    first = gate.busy_delay()
    for _ in range(999):
        gate.busy_delay()
    last = gate.busy_delay()
    assert 3.0 <= first <= 4.5
    assert last >= 1001 * 4.0 / 16, "1,001 deferred at 4 s each over 16 slots"
    for _ in range(1001):
        gate.returned()
    assert gate.deferred == 0


def test_rate_limiter_spaces_reservations():
    limiter = RateLimiter(10.0, burst=3)
    waits = [limiter.reserve() for _ in range(6)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3:] == pytest.approx([0.1, 0.2, 0.3], abs=0.01)
    with pytest.raises(ValueError, match="LETTA_BUS_AGENT_RATE_LIMIT_PER_S"):
        RateLimiter(0, 1)
