"""``webhook_events`` matching (dispatcher.rules.matching) against nats-server itself: for generated patterns and event
types, a core NATS subscription on the pattern receives a message published to the event type's subject exactly
when ``pattern_matches`` says so. The server is the reference implementation of the rules the patterns borrow.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.connection import connect
from bus.embedded import EmbeddedServer
from dispatcher.rules.matching import pattern_matches
from tests.unit.test_matching_properties import event_types, patterns

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One plain core-NATS server for every example (a function-scoped fixture would not be reset between
    hypothesis examples anyway); stopped by its PID."""
    s = EmbeddedServer(workdir=tmp_path_factory.mktemp("nats-matching"), conf=None, port=-1)
    s.start()
    yield s
    s.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(patterns, event_types), min_size=1, max_size=10))
def test_pattern_matches_agrees_with_nats_server(server, pairs):
    asyncio.run(_check(server.url, pairs))


async def _check(url: str, pairs: list[tuple[str, str]]) -> None:
    nc = await connect(url, name="test-matching")
    try:
        got: list[set[int]] = [set() for _ in pairs]
        subs = []
        for i, (pattern, _) in enumerate(pairs):
            async def on_msg(msg, i=i):
                got[i].add(int(msg.data))

            subs.append(await nc.subscribe(f"m.{pattern}", cb=on_msg))
        for j, (_, event_type) in enumerate(pairs):
            await nc.publish(f"m.{event_type}", str(j).encode())
        await nc.flush()
        expected = [{j for j, (_, event_type) in enumerate(pairs) if pattern_matches(pattern, event_type)}
                    for pattern, _ in pairs]
        # callbacks run on the client's tasks, later on a loaded machine: wait (bounded) for what we expect, then
        # a moment more for anything the server delivers beyond it (a fixed 10 ms sleep failed under CI load)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3.0
        while any(not want <= have for want, have in zip(expected, got)) and loop.time() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)
        for i, (pattern, _) in enumerate(pairs):
            assert got[i] == expected[i], \
                f"pattern {pattern!r}: server delivered {sorted(got[i])}, ours {sorted(expected[i])}"
    finally:
        await nc.close()
