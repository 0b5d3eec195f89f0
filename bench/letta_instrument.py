"""What letta-bus costs the real Letta: one-step message calls on letta==0.16.8, stock vs instrumented vs bridged.

    .venv/bin/python bench/letta_instrument.py [--calls 20] [--warmup 3]

Method: the real-Letta tier's harness (tests/letta_real/harness.py: the cached Letta environment, a private
PostgreSQL, the fake LLM answering at once) and one ``letta-bus up`` (tests/letta_real/stack.py) with a global
endpoint to a local receiver. Each mode starts its own Letta server (same machine, same template database),
creates an agent and gets ``--warmup`` untimed messages; then ``--calls`` rounds send one timed
``POST /v1/agents/{id}/messages`` (one user message, one step: the fake LLM answers with text) to each mode's
server in turn (order alternating per round), so drift of the machine hits both alike; then the servers stop.
Latency is the client's wall time per call (ms). ``events`` is the number of events the instrumented server's
agent delivered to the receiver for the timed calls (3 per call: agent.step.completed, agent.message.sent,
agent.run.completed). ``overhead_ms`` = instrumented median - stock median; ``per_event_ms`` = overhead_ms /
events per call. The two servers are separate processes, so differences under about a millisecond are noise.

Modes are functions (:data:`MODES`: name -> ``start_<mode>(ctx) -> Target``): ``stock``, ``instrumented`` and
``null_webhook`` (the stock server with ``STEP_COMPLETE_WEBHOOK`` pointing at a receiver that answers at once)
and ``bridge`` (pointing at ``letta-bus bridge``, which Letta awaits inside its agent loop; 1 event per call: the
bridge publishes the step, a sync message sends no run callback).
A last line measures our part in process (:func:`emit_cost_us`): the per-event CPU cost that the end-to-end
medians cannot resolve.

Last line: ``RESULT stock_ms=.. instrumented_ms=.. overhead_ms=.. events=..`` and, with the bridge mode,
``bridge_ms=.. bridge_overhead_ms=.. bridge_answer_p50_ms=.. bridge_answer_p99_ms=.. bridge_added_p50_ms=..
bridge_keepalive_p50_ms=..`` (medians; the answer times are :func:`bridge_answer_ms`: the part of the bridge's
cost that Letta waits for, which the end-to-end medians of separate servers cannot resolve).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout root: tests.letta_real

from tests.letta_real.fake_llm import FakeLLM  # noqa: E402
from tests.letta_real.harness import (LettaEnv, RunningLetta, free_port, letta_env, start_letta,  # noqa: E402
                                      stop_letta)
from tests.letta_real.stack import BRIDGE_KEY, BusStack, Receiver  # noqa: E402


@dataclass
class Context:
    """What every mode shares: the Letta environment, the fake LLM, the bus and its receiver."""

    env: LettaEnv
    llm: FakeLLM
    bus: BusStack
    receiver: Receiver


@dataclass
class ModeResult:
    """One mode's timed calls (ms each) and the events its agent delivered during them."""

    name: str
    latencies_ms: list[float] = field(default_factory=list)
    events: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.latencies_ms)

    @property
    def p90(self) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


@dataclass
class Target:
    """A started mode: ``send()`` makes one timed-call's request, ``events()`` counts its agent's deliveries,
    ``stop()`` stops its processes."""

    name: str
    letta: RunningLetta
    agent_id: str
    #: events its agent delivers per one-step message (0: publishes nothing)
    events_per_call: int

    def send(self, text: str) -> None:
        self.letta.api.send(self.agent_id, text)

    def stop(self) -> None:
        stop_letta(self.letta)


def _target(name: str, letta: RunningLetta, events_per_call: int) -> Target:
    try:
        agent = letta.api.create_agent(f"bench-{name}-{uuid.uuid4().hex[:6]}")
    except BaseException:
        stop_letta(letta)
        raise
    return Target(name, letta, agent["id"], events_per_call)


def start_stock(ctx: Context) -> Target:
    """The unmodified server, nothing published."""
    return _target("stock", start_letta(ctx.env, ctx.llm.url), 0)


def start_instrumented_mode(ctx: Context) -> Target:
    """``letta-bus instrument -- letta server`` publishing to ``ctx.bus``."""
    return _target("instrumented", start_letta(ctx.env, ctx.llm.url, ctx.bus.client_env(), instrument=True), 3)


def start_bridge(ctx: Context) -> Target:
    """The unmodified server whose step webhook is ``letta-bus bridge`` (key ``BRIDGE_KEY``), reading it back."""
    bridge_port, letta_port = free_port(), free_port()
    letta = start_letta(ctx.env, ctx.llm.url, {
        "STEP_COMPLETE_WEBHOOK": f"http://127.0.0.1:{bridge_port}/letta/step-complete",
        "STEP_COMPLETE_KEY": BRIDGE_KEY}, port=letta_port)
    try:
        ctx.bus.start_bridge(letta.server.url, port=bridge_port)
    except BaseException:
        stop_letta(letta)
        raise
    return _target("bridge", letta, 1)


def start_null_webhook(ctx: Context) -> Target:
    """The unmodified server whose step webhook is the bench's receiver, answering 204 at once: what any step
    webhook costs Letta, the floor of the bridge mode."""
    return _target("null_webhook", start_letta(ctx.env, ctx.llm.url, {
        "STEP_COMPLETE_WEBHOOK": f"{ctx.receiver.url}/null"}), 0)


MODES: dict[str, Callable[[Context], Target]] = {
    "stock": start_stock,
    "instrumented": start_instrumented_mode,
    "null_webhook": start_null_webhook,
    "bridge": start_bridge,
}


def _events_of(receiver: Receiver, agent_id: str, *, expected: int, timeout_s: float = 30) -> int:
    def count() -> int:
        return sum(1 for d in receiver.deliveries if d.path == "/global" and d.json.get("agent_id") == agent_id)

    deadline = time.monotonic() + timeout_s
    while count() < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return count()


def measure(ctx: Context, targets: list[Target], calls: int, warmup: int) -> dict[str, ModeResult]:
    """Warm up every target, then ``calls`` rounds, each sending one message to every target in turn (so a slow
    moment of the machine hits all modes alike)."""
    for target in targets:
        for i in range(warmup):
            target.send(f"warm-up {i}")
    warm = {t.name: _events_of(ctx.receiver, t.agent_id, expected=t.events_per_call * warmup)
            if t.events_per_call else 0 for t in targets}
    results = {t.name: ModeResult(t.name) for t in targets}
    for i in range(calls):
        for target in targets if i % 2 == 0 else reversed(targets):
            started = time.perf_counter()
            target.send(f"bench message {i}")
            results[target.name].latencies_ms.append((time.perf_counter() - started) * 1000)
    for target in targets:
        if target.events_per_call:
            total = _events_of(ctx.receiver, target.agent_id,
                               expected=warm[target.name] + target.events_per_call * calls)
            results[target.name].events = total - warm[target.name]
    return results


def _post_ms(url: str, n: int, headers: dict[str, str], expect: int, *, fresh: bool = True) -> tuple[float, float]:
    """(p50, p99) ms of ``n`` POSTs of a step webhook body to ``url``: each with a new httpx client (a new
    connection), as Letta's ``WebhookService.notify_step_complete`` sends them, or (``fresh=False``) on one
    keep-alive connection, which leaves only the server's answer time and the loopback round trip."""
    import httpx

    samples = []
    shared = None if fresh else httpx.Client(timeout=10)
    try:
        for _ in range(n):
            started = time.perf_counter()
            client = shared or httpx.Client(timeout=10)
            response = client.post(url, json={"step_id": f"step-{uuid.uuid4()}"}, headers=headers)
            if shared is None:
                client.close()
            samples.append((time.perf_counter() - started) * 1000)
            assert response.status_code == expect, response.text
    finally:
        if shared is not None:
            shared.close()
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * (len(samples) - 1))]


def bridge_answer_ms(ctx: Context, n: int = 200) -> dict[str, float]:
    """What Letta's agent loop waits per step for the bridge (ms): the step webhook POSTed to the running bridge,
    and to the bench's receiver (an aiohttp handler answering at once) as the floor any receiver costs Letta
    (httpx builds a client and a connection per notification). Unknown step ids: the bridge answers 202 once the
    notification is stored, before it reads Letta (the enricher then drops them: Letta does not know them)."""
    bridge = _post_ms(f"{ctx.bus.bridge_url}/letta/step-complete", n, {"Authorization": f"Bearer {BRIDGE_KEY}"},
                      202)
    floor = _post_ms(f"{ctx.receiver.url}/null", n, {}, 204)
    kept = _post_ms(f"{ctx.bus.bridge_url}/letta/step-complete", n, {"Authorization": f"Bearer {BRIDGE_KEY}"},
                    202, fresh=False)
    return {"p50": bridge[0], "p99": bridge[1], "floor_p50": floor[0], "added_p50": bridge[0] - floor[0],
            "keepalive_p50": kept[0], "keepalive_p99": kept[1]}


def emit_cost_us(n: int = 20_000) -> float:
    """In-process cost of our part per event (µs): the step wrappers' bookkeeping plus ``LettaEventBus.enqueue``
    (validate, encode, buffer) for one agent.step.completed, with a bus that is not connected."""
    import asyncio
    from types import SimpleNamespace

    from bus.instrument import runtime, steps
    from config.settings import Settings

    async def run() -> float:
        runtime.reset()
        from bus.letta import LettaEventBus

        runtime._bus = LettaEventBus(Settings(nats_url="nats://127.0.0.1:1"), mode="fire_and_forget",
                                     buffer_max=n + 10)
        runtime._loop = asyncio.get_running_loop()
        actor = SimpleNamespace(organization_id="org-1")
        started = time.perf_counter()
        for i in range(n):
            step = SimpleNamespace(id=f"step-{i}", agent_id="agent-1", run_id="run-1", organization_id="org-1",
                                   status="success", stop_reason=None, completion_tokens=2, prompt_tokens=5,
                                   total_tokens=7)
            steps.after_success({"actor": actor}, step, None)
            steps.after_messages({}, [SimpleNamespace(step_id=step.id, tool_calls=None)], None)
        elapsed = time.perf_counter() - started
        runtime.reset()
        return elapsed / n * 1e6

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from " + ", ".join(MODES))
    args = parser.parse_args()
    llm, receiver, bus = FakeLLM().start(), Receiver().start(), BusStack()
    try:
        bus.start()
        bus.add_endpoint(f"{receiver.url}/global", scope="global")
        ctx = Context(letta_env(), llm, bus, receiver)
        targets: list[Target] = []
        try:
            for name in args.modes.split(","):
                targets.append(MODES[name](ctx))
            results = measure(ctx, targets, args.calls, args.warmup)
            answer = bridge_answer_ms(ctx) if "bridge" in results else None
        finally:
            for target in targets:
                target.stop()
        for r in results.values():
            print(f"{r.name:13s} calls={len(r.latencies_ms)} median_ms={r.median:.1f} p90_ms={r.p90:.1f} "
                  f"events={r.events}", flush=True)
    finally:
        bus.stop()
        receiver.stop()
        llm.stop()
    stock, instr = results["stock"], results["instrumented"]
    overhead = instr.median - stock.median
    per_call = instr.events / args.calls if args.calls else 0
    print(f"overhead median {overhead:.2f} ms per call, {per_call:.1f} events per call, "
          f"{overhead / per_call if per_call else float('nan'):.3f} ms per event; "
          f"p90 stock {stock.p90:.1f} ms, instrumented {instr.p90:.1f} ms")
    print(f"in-process cost of our part: {emit_cost_us():.1f} us per agent.step.completed (bookkeeping + enqueue)")
    bridged = ""
    if "bridge" in results:
        bridge = results["bridge"]
        print(f"bridge: median {bridge.median - stock.median:.2f} ms per call over stock, "
              f"p90 {bridge.p90:.1f} ms, {bridge.events} events; the step webhook as Letta sends it (what its loop "
              f"awaits per step): bridge p50 {answer['p50']:.2f} ms, p99 {answer['p99']:.2f} ms; a receiver "
              f"answering at once p50 {answer['floor_p50']:.2f} ms; the bridge adds {answer['added_p50']:.2f} ms; "
              f"on a keep-alive connection the bridge answers in p50 {answer['keepalive_p50']:.2f} ms, "
              f"p99 {answer['keepalive_p99']:.2f} ms")
        if "null_webhook" in results:
            print(f"bridge over a step webhook answering at once: "
                  f"{bridge.median - results['null_webhook'].median:.2f} ms per call (medians)")
        bridged = (f" bridge_ms={bridge.median:.1f} bridge_overhead_ms={bridge.median - stock.median:.2f}"
                   f" bridge_answer_p50_ms={answer['p50']:.2f} bridge_answer_p99_ms={answer['p99']:.2f}"
                   f" bridge_added_p50_ms={answer['added_p50']:.2f}"
                   f" bridge_keepalive_p50_ms={answer['keepalive_p50']:.2f}")
    print(f"RESULT stock_ms={stock.median:.1f} instrumented_ms={instr.median:.1f} overhead_ms={overhead:.2f} "
          f"events={instr.events}{bridged}")


if __name__ == "__main__":
    main()
