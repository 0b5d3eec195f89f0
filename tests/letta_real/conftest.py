"""The real-Letta tier (``pytest -m letta_real``): the unmodified ``letta==0.16.8`` server, run offline on
127.0.0.1 with its own PostgreSQL + pgvector and a fake LLM (tests/letta_real/harness.py), next to letta-bus as a
user runs it (tests/letta_real/stack.py: ``letta-bus up`` and ``letta-bus bridge`` as processes).

Session fixtures, each started once and stopped by PID at the end:

* ``letta_env``: the cached environment (tests/letta_real/build_env.sh);
* ``fake_llm``, ``receiver``: the LLM and the webhook receiver, threads of this process;
* ``bus``: ``letta-bus up`` with a global endpoint to ``<receiver>/global`` (``bus.endpoints["global"]``, its
  secret included) and an organization endpoint of Letta's default organization to ``<receiver>/org``;
* ``stock_letta``: a stock Letta whose step webhook points at ``letta-bus bridge`` (``.api``: a
  :class:`~tests.letta_real.harness.LettaAPI`; ``.server``; ``.bridge_url``).

Without the environment (no network to PyPI) the tier is skipped, except under ``CI=true`` where it fails.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from tests.letta_real.fake_llm import FakeLLM
from tests.letta_real.harness import LettaEnv, RunningLetta, free_port, letta_env as build, start_letta, stop_letta
from tests.letta_real.stack import BRIDGE_KEY, BusStack, Receiver

#: Letta 0.16.8's default organization (every request without a user header acts in it).
LETTA_ORG = "org-00000000-0000-4000-8000-000000000000"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.letta_real)
            item.add_marker(pytest.mark.timeout(300))


@pytest.fixture(scope="session")
def letta_env() -> LettaEnv:
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - reported as a skip or, under CI, a failure
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"the real Letta environment could not be built: {exc}")


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeLLM]:
    llm = FakeLLM().start()
    yield llm
    llm.stop()


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    rcv = Receiver().start()
    yield rcv
    rcv.stop()


@pytest.fixture(scope="session")
def bus(receiver: Receiver) -> Iterator[BusStack]:
    stack = BusStack().start()
    try:
        stack.endpoints = {
            "global": stack.add_endpoint(f"{receiver.url}/global", scope="global"),
            "org": stack.add_endpoint(f"{receiver.url}/org", scope="organization", organization_id=LETTA_ORG),
        }
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def stock_letta(letta_env: LettaEnv, fake_llm: FakeLLM, bus: BusStack) -> Iterator[RunningLetta]:
    """Stock Letta + ``letta-bus bridge``: ``STEP_COMPLETE_WEBHOOK``/``STEP_COMPLETE_KEY`` point at the bridge,
    which reads this Letta back."""
    bridge_port, letta_port = free_port(), free_port()
    letta = start_letta(letta_env, fake_llm.url, port=letta_port, env={
        "STEP_COMPLETE_WEBHOOK": f"http://127.0.0.1:{bridge_port}/letta/step-complete",
        "STEP_COMPLETE_KEY": BRIDGE_KEY,
    })
    try:
        bus.start_bridge(letta.server.url, port=bridge_port)
        letta.bridge_url = bus.bridge_url
        yield letta
    finally:
        stop_letta(letta)
