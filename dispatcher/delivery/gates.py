"""Isolation between endpoints and agents: per-endpoint concurrency cap and circuit breaker, per-agent rate limit.

Source: DESIGN.md, "Isolation". All state is in memory, per dispatcher process; times are ``time.monotonic()``
seconds. The gates decide; the sender acts (POST now, wait briefly, or defer the task without using an attempt).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable


class EndpointGate:
    """Concurrency cap and circuit breaker of one endpoint.

    Concurrency: at most ``max_concurrency`` requests are in flight. More deliveries wait in the process for a
    slot while their expected wait (queue / max_concurrency x the endpoint's recent latency) stays within
    ``max_wait_s`` and the endpoint is not failing; beyond that the sender defers them by :meth:`busy_delay`, which
    grows with the number already deferred, so a slow endpoint's backlog comes back at the pace the endpoint can
    take instead of churning through the dispatcher.

    Circuit: closed (requests flow); open after ``failure_threshold`` consecutive failed attempts, for a cool-down
    during which deliveries are deferred without a request, spread over the cool-down; then half-open: one probe
    goes out. Its success closes the circuit and resets the cool-down to ``cooldown_s``; its failure doubles the
    cool-down, up to ``max_cooldown_s`` (seconds throughout).
    """

    def __init__(self, max_concurrency: int, failure_threshold: int, cooldown_s: float, *,
                 max_cooldown_s: float | None = None, max_wait_s: float = 2.0, initial_latency_s: float = 1.0) -> None:
        self.max_concurrency = max_concurrency
        self.max_wait_s = max_wait_s
        self.latency_s = initial_latency_s  # EWMA of request durations, seconds
        self.failure_threshold = failure_threshold
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max(cooldown_s, max_cooldown_s or cooldown_s)
        self.cooldown_s = cooldown_s  # the current cool-down
        self.inflight = 0
        self.waiting = 0
        self.deferred = 0  # deliveries deferred because the endpoint was busy, not back yet
        self.consecutive_failures = 0
        self.open_until = 0.0
        self.probing = False
        self.last_used = time.monotonic()  # last acquire or release, for idle eviction
        self._slots = asyncio.Semaphore(max_concurrency)

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``."""
        if self.consecutive_failures < self.failure_threshold:
            return "closed"
        return "open" if time.monotonic() < self.open_until or self.probing else "half-open"

    def blocked_for(self) -> float | None:
        """Seconds until the circuit lets this delivery try (the rest of the cool-down plus a random share of the
        next one, so deferred deliveries come back spread out), or None when it may go now."""
        if self.state != "open":
            return None
        return max(self.open_until - time.monotonic(), 0.0) + random.uniform(0.0, self.cooldown_s)

    def can_wait(self) -> bool:
        """True when a slot is free, or the endpoint is healthy and the expected wait for a slot is within
        ``max_wait_s`` seconds."""
        queued = self.inflight + self.waiting + 1 - self.max_concurrency
        if queued <= 0:
            return True
        return self.consecutive_failures == 0 and queued * self.latency_s / self.max_concurrency <= self.max_wait_s

    def busy_delay(self) -> float:
        """Seconds to defer a delivery that cannot wait: time for the endpoint to work through what is deferred
        already at its recent pace (at least 3 s), with up to 50 % jitter. Counts it as deferred."""
        self.deferred += 1
        return max(3.0, self.deferred * self.latency_s / self.max_concurrency) * random.uniform(1.0, 1.5)

    def returned(self) -> None:
        """A delivery deferred by :meth:`busy_delay` is back."""
        self.deferred = max(0, self.deferred - 1)

    def has_slot(self) -> bool:
        """True when :meth:`acquire` would not wait."""
        return not self._slots.locked()

    async def acquire(self, timeout_s: float | None = None) -> bool:
        """Wait for a slot, at most ``timeout_s`` seconds (None: no limit; ``TimeoutError`` past it, holding no
        slot). Returns False (and holds no slot) when the circuit opened meanwhile, or is half-open with its probe
        already out; else counts the request as in flight, as the probe when half-open."""
        self.waiting += 1
        try:
            if timeout_s is None:
                await self._slots.acquire()
            else:
                async with asyncio.timeout(timeout_s):
                    await self._slots.acquire()
        finally:
            self.waiting -= 1
        state = self.state
        if state == "open":
            self._slots.release()
            return False
        if state == "half-open":
            self.probing = True
        self.inflight += 1
        self.last_used = time.monotonic()
        return True

    def open_circuit(self) -> None:
        """Open the circuit now for the current cool-down, as if ``failure_threshold`` attempts had failed (a
        parked endpoint's probe failed in a process whose gate had not seen the outage)."""
        self.consecutive_failures = max(self.consecutive_failures, self.failure_threshold)
        self.open_until = time.monotonic() + self.cooldown_s

    def idle_for(self, now: float) -> float | None:
        """Seconds since the gate was last used when it holds nothing worth keeping (circuit closed, nothing in
        flight, waiting or deferred), else None. ``now``: ``time.monotonic()``."""
        if self.inflight or self.waiting or self.deferred or self.probing or self.state != "closed":
            return None
        return now - self.last_used

    def release(self, success: bool | None, duration_s: float = 0.0) -> None:
        """Record the outcome of a request: True success, False failure, None no verdict (e.g. 4xx other than
        408/429, which says nothing about the endpoint's health); ``duration_s`` feeds the latency estimate."""
        self.latency_s += 0.2 * (duration_s - self.latency_s)
        self.last_used = time.monotonic()
        self.inflight -= 1
        self._slots.release()
        was_probe, self.probing = self.probing, False
        if success:
            self.consecutive_failures = 0
            self.cooldown_s = self.base_cooldown_s
        elif success is False:
            self.consecutive_failures += 1
            if was_probe:
                self.cooldown_s = min(2 * self.cooldown_s, self.max_cooldown_s)
            if self.consecutive_failures >= self.failure_threshold:
                self.open_until = time.monotonic() + self.cooldown_s


class RateLimiter:
    """Token bucket with reservations, as GCRA (ITU-T I.371 generic cell rate algorithm): ``rate`` per second,
    ``burst`` at once. Each call reserves the next free slot, so deliveries over the limit get distinct, evenly
    spaced times instead of all coming back at once.

    ``share()`` (default: always 1) is the number of processes the limit is split between: each reservation then
    takes ``share()`` / ``rate`` seconds and the burst is ``burst // share()`` (at least 1), so N dispatchers
    together stay within ``rate`` (:class:`dispatcher.delivery.peers.Peers`). Raises ``ValueError`` for a rate <= 0."""

    def __init__(self, rate: float, burst: int, share: Callable[[], int] | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0 events per second (LETTA_BUS_AGENT_RATE_LIMIT_PER_S)")
        self.rate = rate
        self.burst = max(1, burst)
        self.share = share or (lambda: 1)
        self._tat = 0.0  # theoretical arrival time of the next request

    def reserve(self) -> float:
        """Reserve one slot; returns the seconds to wait before using it (0.0 when it may go now)."""
        n = max(1, self.share())
        interval = n / self.rate
        tolerance = (max(1, self.burst // n) - 1) * interval
        now = time.monotonic()
        tat = max(self._tat, now)
        self._tat = tat + interval
        return max(0.0, tat - tolerance - now)

    def is_full(self) -> bool:
        """True when the bucket is full again (no reservation outstanding): the limiter can be dropped and made
        again without changing what it allows."""
        return self._tat <= time.monotonic()
