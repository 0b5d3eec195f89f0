"""Helpers of the fault and cluster tests: a paced publisher that keeps every event's id until JetStream accepts
it, reading every message id a stream holds, counting what a receiver got, and ``letta-bus up`` as a child
process with the test's settings. Everything reads real state."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import SecretStr

from bus.envelope import H_MSG_ID
from bus.ids import new_event_id
from bus.publisher import EventPublisher, PublishError
from config.settings import Settings
from dispatcher.cli.receiver import Receiver
from tests.helpers import CATALOG_SAMPLES

STEP = CATALOG_SAMPLES["agent.step.completed"]


@dataclass
class PacedPublisher:
    """Publishes ``total`` step-completed events at about ``rate_per_s``, round-robin over ``agents``, with at most
    ``window`` publishes in flight. An event that was not acknowledged (``publish_event`` returned ``None``) is
    published again with the same ``event_id`` after ``retry_pause_s`` seconds, as an application with an outbox
    would, until ``give_up_s`` seconds after the run started. ``accepted``: event ids JetStream acknowledged, in
    order of acknowledgement; ``unacknowledged``: publishes that were not acknowledged (retried); ``duplicates``:
    acknowledgements with ``PubAck.duplicate`` (an earlier, unacknowledged try had been stored)."""

    publisher: EventPublisher
    agents: list[str]
    total: int
    rate_per_s: float = 200.0
    window: int = 16
    retry_pause_s: float = 0.2
    give_up_s: float = 60.0
    accepted: list[str] = field(default_factory=list)
    unacknowledged: int = 0
    duplicates: int = 0
    abandoned: list[str] = field(default_factory=list)

    async def run(self) -> list[str]:
        """Publish everything; returns ``accepted``."""
        slots = asyncio.Semaphore(self.window)
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for i in range(self.total):
            delay = start + i / self.rate_per_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            task = asyncio.create_task(self._one(i, start + self.give_up_s))
            task.add_done_callback(lambda _t: slots.release())
            tasks.append(task)
        await asyncio.gather(*tasks)
        return self.accepted

    async def _one(self, i: int, give_up_at: float) -> None:
        event_id = new_event_id()
        agent = self.agents[i % len(self.agents)]
        loop = asyncio.get_running_loop()
        while True:
            # what publish_event does, keeping the PubAck to count duplicates
            envelope = self.publisher.build(agent, "agent.step.completed", {**STEP, "step_id": f"step-{i}"},
                                            event_id=event_id)
            try:
                ack = await self.publisher.publish_envelope(envelope)
            except PublishError:
                ack = None
            if ack is not None:
                self.accepted.append(event_id)
                self.duplicates += bool(ack.duplicate)
                return
            self.unacknowledged += 1
            if loop.time() > give_up_at:
                self.abandoned.append(event_id)
                return
            await asyncio.sleep(self.retry_pause_s)


async def stream_msg_ids(js: JetStreamContext, stream: str, subjects: str, timeout_s: float = 20.0) -> list[str]:
    """The ``Nats-Msg-Id`` of every message ``stream`` holds on ``subjects`` (e.g. ``letta.>``), in stream order,
    read with an ephemeral pull consumer (no acks). Raises ``TimeoutError`` when they do not all arrive in time."""
    info = await js.stream_info(stream)
    expected = info.state.messages
    sub = await js.pull_subscribe(subjects, stream=stream, config=ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0))
    ids: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(ids) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {len(ids)} of {expected} messages of {stream}")
            try:
                msgs = await sub.fetch(min(500, expected - len(ids)), timeout=1.0)
            except asyncio.TimeoutError:
                continue
            ids.extend((m.headers or {}).get(H_MSG_ID, "") for m in msgs)
    finally:
        await sub.unsubscribe()
    return ids


def received_counts(receiver: Receiver, status: int = 200) -> collections.Counter[str]:
    """How many POSTs answered ``status`` the receiver got per ``webhook-id`` (= event id)."""
    return collections.Counter(r.headers.get("webhook-id", "") for r in receiver.received if r.status == status)


def duplicates(counts: collections.Counter[str]) -> int:
    """Deliveries beyond the first of each event."""
    return sum(n - 1 for n in counts.values() if n > 1)


def settings_env(settings: Settings, **overrides: object) -> dict[str, str]:
    """Environment for a letta-bus child process with the same settings: every field set explicitly on
    ``settings`` (and each of ``overrides``) as ``LETTA_BUS_<FIELD>``; lists as JSON, secrets revealed. Inherited
    ``LETTA_BUS_*`` and Letta's ``STEP_COMPLETE_*`` variables are dropped so the child sees only these."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LETTA_BUS_", "STEP_COMPLETE_"))}
    values = {name: getattr(settings, name) for name in settings.model_fields_set}
    values.update(overrides)
    for name, value in values.items():
        env[f"LETTA_BUS_{name.upper()}"] = _env_value(value)
    return env


def _env_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, (list, tuple)):
        return json.dumps([_env_value(v) if isinstance(v, (SecretStr, Path)) else v for v in value])
    return str(value)


class DispatcherProcess:
    """``letta-bus up`` as a child process in ``workdir`` (its own session; output in ``workdir/up-<n>.log``).
    Only the process it started is ever signalled, by its PID."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.log: Path | None = None

    def start(self) -> "DispatcherProcess":
        """Start a new run (the previous one must have ended)."""
        self.runs += 1
        self.log = self.workdir / f"up-{self.runs}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "letta-bus"), "up", "--log-level", "warning"],
                cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def output(self) -> str:
        """What the current run printed so far."""
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the run prints that the dispatcher is running. Raises ``AssertionError`` with its output
        when it exits first, ``TimeoutError`` after ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while "dispatcher running" not in self.output():
            assert self.proc is not None and self.proc.poll() is None, f"letta-bus up exited:\n{self.output()[-3000:]}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"letta-bus up not ready in {timeout_s} s:\n{self.output()[-3000:]}")
            await asyncio.sleep(0.05)

    def sigkill(self) -> None:
        """SIGKILL the current run by its PID and reap it."""
        if self.pid is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the current run (a graceful drain), SIGKILL after ``timeout_s`` seconds; returns its exit code."""
        if self.pid is not None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.sigkill()
        return self.proc.returncode if self.proc is not None else None
