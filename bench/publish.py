"""Publish overhead of letta-bus against raw nats-py, measured in one run on one embedded nats-server.

    .venv/bin/python bench/publish.py [--quick]

Starts its own nats-server (bus.embedded.EmbeddedServer, store in a temporary directory, a free port), provisions
LETTA_EVENTS (bus.streams) and measures, interleaving raw and letta-bus rounds so both see the same machine load:

* raw nats-py ``js.publish`` awaited one at a time: p50/p99 (ms); raw pipelined ``js.publish_async`` in windows of
  256: events/s (the baseline);
* letta-bus ``LettaEventBus.publish_event`` in ``"awaited"`` mode: p50/p99 (ms), validation and encoding included;
* letta-bus ``publish_event`` in ``"fire_and_forget"`` mode: p99 of the call itself (microseconds), in bursts of
  10 calls with a flush between bursts (an agent step emits a few events, then awaits other work). The first call
  after such a wait runs on cold CPU caches and makes the tail; the back-to-back figure (bursts of 256) is printed
  too, for comparison;
* letta-bus pipelined: events/s from the first ``enqueue`` of 20,000 events until all are acknowledged.

Prints details, then as its last line
``RESULT awaited_p50_ms=.. awaited_p99_ms=.. fire_and_forget_p99_us=.. pipelined_per_s=.. raw_p99_ms=..
raw_pipelined_per_s=..``. Bounded (about 20 s; a watchdog stops it at 100 s); stops the nats-server it started by
its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bus import envelope as env  # noqa: E402
from bus.connection import connect  # noqa: E402
from bus.embedded import EmbeddedServer  # noqa: E402
from bus.letta import LettaEventBus  # noqa: E402
from bus.publisher import EventPublisher  # noqa: E402
from bus.streams import ensure_stream, events_stream_config  # noqa: E402
from config.settings import Settings  # noqa: E402

STEP = {
    "step_id": "step-6f1c2a4e-1b7d-4c55-9f0e-2b1f3c4d5e6f", "status": "success",
    "usage": {"completion_tokens": 42, "prompt_tokens": 1200, "total_tokens": 1242, "step_count": 1,
              "run_ids": ["run-0b7e4c1a-2d3f-4e5a-8b9c-0d1e2f3a4b5c"]},
    "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "send_message", "arguments": "{\"message\": \"hi\"}"}}],
    "run_id": "run-0b7e4c1a-2d3f-4e5a-8b9c-0d1e2f3a4b5c",
}
AGENT = "agent-7c1e2d3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
WINDOW = 256
WATCHDOG_S = 100.0


def pct(samples: list[float], q: float) -> float:
    """The q-quantile (0..1) of samples, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def raw_awaited(js, settings: Settings, builder: EventPublisher, n: int) -> list[float]:
    """Seconds per awaited js.publish of a prepared envelope (the envelope is built outside the timing)."""
    out = []
    subject = settings.event_subject("agent.step.completed")
    for _ in range(n):
        e = builder.build(AGENT, "agent.step.completed", STEP)
        body, headers = env.encode(e), env.headers_for(e)
        t0 = time.perf_counter()
        await js.publish(subject, body, headers=headers)
        out.append(time.perf_counter() - t0)
    return out


async def raw_pipelined(js, settings: Settings, builder: EventPublisher, n: int) -> float:
    """Events/s for js.publish_async in windows of 256 (envelopes prepared before the clock starts)."""
    subject = settings.event_subject("agent.step.completed")
    prepared = []
    for _ in range(n):
        e = builder.build(AGENT, "agent.step.completed", STEP)
        prepared.append((env.encode(e), env.headers_for(e)))
    t0 = time.perf_counter()
    for i in range(0, n, WINDOW):
        futures = [await js.publish_async(subject, body, headers=h) for body, h in prepared[i:i + WINDOW]]
        await asyncio.wait_for(asyncio.gather(*futures), 10)
    return n / (time.perf_counter() - t0)


async def bus_awaited(bus: LettaEventBus, n: int) -> list[float]:
    """Seconds per awaited LettaEventBus.publish_event (validation, encoding and the PubAck)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        event_id = await bus.publish_event(agent_id=AGENT, event_type="agent.step.completed", payload=STEP)
        out.append(time.perf_counter() - t0)
        assert event_id, "awaited publish failed"
    return out


async def bus_fire_and_forget(bus: LettaEventBus, n: int, burst: int = 10) -> list[float]:
    """Seconds per fire-and-forget publish_event call, in bursts with a flush between them."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        event_id = await bus.publish_event(agent_id=AGENT, event_type="agent.step.completed", payload=STEP)
        out.append(time.perf_counter() - t0)
        assert event_id, "enqueue refused"
        if i % burst == burst - 1:
            assert await bus.flush(10), "flush timed out"
    return out


async def bus_pipelined(bus: LettaEventBus, n: int) -> float:
    """Events/s from the first enqueue until the background publisher has every PubAck."""
    t0 = time.perf_counter()
    for i in range(n):
        bus.enqueue(agent_id=AGENT, event_type="agent.step.completed", payload=STEP)
        if i % WINDOW == WINDOW - 1:
            await asyncio.sleep(0)  # let the background publisher run, as an agent loop would
    assert await bus.flush(30), "flush timed out"
    return n / (time.perf_counter() - t0)


async def run(url: str, quick: bool) -> dict[str, float]:
    settings = Settings(_env_file=None, nats_url=url)
    nc = await connect(url, name="bench-raw")
    js = nc.jetstream()
    await ensure_stream(js, events_stream_config(settings))
    builder = EventPublisher(settings)
    awaited_bus = await LettaEventBus(settings, mode="awaited").start()
    ff_bus = await LettaEventBus(settings, mode="fire_and_forget", buffer_max=100_000).start()
    rounds, per_round, pipelined_n = (2, 300, 5_000) if quick else (5, 600, 20_000)
    raw_lat: list[float] = []
    bus_lat: list[float] = []
    ff_lat: list[float] = []
    ff_warm: list[float] = []
    raw_rate: list[float] = []
    bus_rate: list[float] = []
    try:
        await raw_awaited(js, settings, builder, 200)  # warm-up
        await bus_awaited(awaited_bus, 200)
        await bus_fire_and_forget(ff_bus, 200)
        for r in range(rounds):
            raw_lat += await raw_awaited(js, settings, builder, per_round)
            bus_lat += await bus_awaited(awaited_bus, per_round)
            ff_lat += await bus_fire_and_forget(ff_bus, 2 * per_round)
            ff_warm += await bus_fire_and_forget(ff_bus, 2 * per_round, burst=WINDOW)
            print(f"round {r + 1}/{rounds}: awaited p99 raw {pct(raw_lat, .99) * 1e3:.3f} ms, "
                  f"letta-bus {pct(bus_lat, .99) * 1e3:.3f} ms", flush=True)
        for r in range(rounds):
            raw_rate.append(await raw_pipelined(js, settings, builder, pipelined_n // rounds))
            bus_rate.append(await bus_pipelined(ff_bus, pipelined_n // rounds))
            print(f"round {r + 1}/{rounds}: pipelined raw {raw_rate[-1]:,.0f}/s, letta-bus {bus_rate[-1]:,.0f}/s",
                  flush=True)
        stored = (await js.stream_info(settings.events_stream)).state.messages
        expected = awaited_bus.stats.published + ff_bus.stats.published + len(raw_lat) + 200 + \
            (pipelined_n // rounds) * rounds
        assert stored == expected, f"stream holds {stored} events, expected {expected}"
        assert ff_bus.stats.dropped == 0 and awaited_bus.stats.dropped == 0
    finally:
        await awaited_bus.close()
        await ff_bus.close()
        await nc.close()
    print(f"raw js.publish awaited:          p50 {pct(raw_lat, .5) * 1e3:.3f} ms  p99 {pct(raw_lat, .99) * 1e3:.3f} ms"
          f"  (n={len(raw_lat)})")
    print(f"letta-bus awaited publish_event: p50 {pct(bus_lat, .5) * 1e3:.3f} ms  p99 {pct(bus_lat, .99) * 1e3:.3f} ms"
          f"  (n={len(bus_lat)})")
    print(f"letta-bus fire-and-forget call:  p50 {pct(ff_lat, .5) * 1e6:.1f} us  p90 {pct(ff_lat, .9) * 1e6:.1f} us  "
          f"p99 {pct(ff_lat, .99) * 1e6:.1f} us  (n={len(ff_lat)}, bursts of 10)")
    print(f"  same, back-to-back:            p50 {pct(ff_warm, .5) * 1e6:.1f} us  p90 {pct(ff_warm, .9) * 1e6:.1f} us  "
          f"p99 {pct(ff_warm, .99) * 1e6:.1f} us  (n={len(ff_warm)}, bursts of {WINDOW}; not in RESULT)")
    print(f"pipelined (windows of {WINDOW}):     raw {statistics.median(raw_rate):,.0f}/s  "
          f"letta-bus {statistics.median(bus_rate):,.0f}/s  (median of {rounds} rounds)")
    return {
        "awaited_p50_ms": pct(bus_lat, .5) * 1e3,
        "awaited_p99_ms": pct(bus_lat, .99) * 1e3,
        "fire_and_forget_p99_us": pct(ff_lat, .99) * 1e6,
        "pipelined_per_s": statistics.median(bus_rate),
        "raw_p99_ms": pct(raw_lat, .99) * 1e3,
        "raw_pipelined_per_s": statistics.median(raw_rate),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run, about 5 s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="letta-bus-bench-publish-") as tmp:
        server = EmbeddedServer(workdir=Path(tmp), port=-1)
        server.start()
        try:
            result = asyncio.run(asyncio.wait_for(run(server.url, args.quick), WATCHDOG_S))
        finally:
            server.stop()  # by its PID
    print("RESULT " + " ".join(
        f"{k}={v:.0f}" if k.endswith("per_s") else f"{k}={v:.1f}" if k.endswith("_us") else f"{k}={v:.3f}"
        for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
