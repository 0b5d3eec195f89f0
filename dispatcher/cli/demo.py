"""``letta-bus demo``: a realistic Letta agent session through the real pipeline, checked end to end.

Self-contained: its own nats-server on free ports and its own SQLite file, both in a temporary directory, so it runs
beside anything already listening (e.g. a system nats-server on 4222). Three agents with different webhook
settings point at a local receiver that verifies both signatures of every POST. The research agent's receiver
answers 503 to its first POST, so one delivery shows a retry. Exit status 0 only when every expected delivery
arrived verified and nothing unexpected arrived.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from bus.publisher import EventPublisher
from config.settings import Settings
from dispatcher.cli.receiver import Receiver
from dispatcher.cli.runtime import running_stack
from dispatcher.store.models import Delivery


def _id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4()}"


@dataclass
class DemoAgent:
    """An agent of the demo, its webhook settings and which event types it must receive."""

    name: str
    path: str
    events: list[str]
    enabled: bool
    agent_id: str = ""

    def expects(self, event_type: str) -> bool:
        """The demo's own statement of what this agent subscribed to (independent of dispatcher.rules.matching)."""
        if not self.enabled:
            return False
        if not self.events:
            return True
        return event_type.startswith("agent.step.") or event_type == "agent.run.completed"


AGENTS = [
    DemoAgent("support-bot", "/hooks/support", [], True),
    DemoAgent("research-bot", "/hooks/research", ["agent.step.*", "agent.run.completed"], True),
    DemoAgent("batch-bot", "/hooks/batch", [], False),
]


def usage(completion: int, prompt: int, steps: int, run_id: str) -> dict[str, Any]:
    """Letta's LettaUsageStatistics."""
    return {"message_type": "usage_statistics", "completion_tokens": completion, "prompt_tokens": prompt,
            "total_tokens": completion + prompt, "step_count": steps, "run_ids": [run_id]}


def session(agent_id: str) -> list[tuple[str, dict[str, Any]]]:
    """One agent's session: every catalog event type, in the order Letta emits them."""
    run_id, job_id, tool_id = _id("run"), _id("job"), _id("tool")
    s1, s2, s3, s4 = (_id("step") for _ in range(4))
    query = {"query": "NATS JetStream consumer ack_wait", "num_results": 3}
    call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": "web_search", "arguments": json.dumps(query)}}
    reply = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": "send_message", "arguments": json.dumps({"message": "Here is what I found."})}}
    return [
        ("agent.tool.attached", {"tool_id": tool_id, "tool_name": "web_search"}),
        ("agent.step.completed", {"step_id": s1, "status": "success", "run_id": run_id,
                                  "usage": usage(38, 2104, 1, run_id), "tool_calls": [call],
                                  "model": "gpt-4o-mini", "agent_id": agent_id}),
        ("tool.execution.completed", {"tool_name": "web_search", "tool_args": query, "status": "success",
                                      "execution_time_ms": 231.4, "step_id": s1}),
        ("agent.step.completed", {"step_id": s2, "status": "success", "run_id": run_id,
                                  "usage": usage(61, 2440, 1, run_id), "tool_calls": [reply]}),
        ("agent.message.sent", {"run_id": run_id, "message_count": 4, "usage": usage(99, 4544, 2, run_id)}),
        ("agent.run.completed", {"run_id": run_id, "status": "completed", "completed_at": _now(),
                                 "usage": usage(99, 4544, 2, run_id)}),
        ("agent.step.failed", {"step_id": s3, "error": "Rate limit reached for gpt-4o-mini",
                               "error_type": "RateLimitError", "run_id": _id("run")}),
        ("agent.step.cancelled", {"step_id": s4, "run_id": _id("run")}),
        ("agent.job.completed", {"job_id": job_id, "status": "completed", "completed_at": _now()}),
        ("agent.tool.detached", {"tool_id": tool_id, "tool_name": "web_search"}),
    ]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def run_demo(console: Console | None = None, timeout_s: float = 60.0) -> int:
    """Run the demo; returns the process exit status (0 = every expected delivery arrived verified)."""
    console = console or Console()
    if not console.is_terminal:  # CI logs and pipes: wide enough for the table
        console = Console(width=120)
    with tempfile.TemporaryDirectory(prefix="letta-bus-demo-") as tmp:
        settings = Settings(
            _env_file=None, nats_url=None, embedded_port=-1, embedded_monitor_port=-1,
            database_url=f"sqlite+aiosqlite:///{tmp}/letta-bus.db", retry_schedule_s=[1, 2, 5],
            ssrf_allow_cidrs=["127.0.0.0/8"], secret_key_file=Path(tmp) / "secret.key",
            api_port=0,  # the demo drives the store directly; no management API
        )
        receiver = await Receiver().start()
        try:
            return await _run(console, settings, receiver, Path(tmp), timeout_s)
        finally:
            await receiver.stop()


async def _run(console: Console, settings: Settings, receiver: Receiver, tmp: Path, timeout_s: float) -> int:
    async with running_stack(settings, workdir=tmp) as stack:
        console.print(f"[bold]letta-bus demo[/]: embedded nats-server {stack.server.url} (monitor "
                      f"http://127.0.0.1:{stack.server.http_port}), receiver http://127.0.0.1:{receiver.port}")
        console.print("  SSRF guard: private addresses are refused; this demo allowlists 127.0.0.0/8 "
                      "(LETTA_BUS_SSRF_ALLOW_CIDRS) for its local receiver")
        for agent in AGENTS:
            agent.agent_id = _id("agent")
            endpoint, secret = await stack.store.set_agent_webhook(
                agent.agent_id, url=receiver.url(agent.path), events=agent.events, enabled=agent.enabled)
            receiver.secrets[agent.path] = secret
            console.print(f"  {agent.name:<13} {agent.agent_id}  webhook_events={json.dumps(agent.events)}"
                          f"{'' if agent.enabled else '  (disabled)'}")
        receiver.respond("/hooks/research", 503)  # one failed first attempt: the retry shows in the history
        await stack.dispatcher.endpoints.refresh()

        # Letta's side: its own connection with the publisher role's generated credentials (it may publish
        # letta.> and read its PubAcks, nothing else)
        publisher = await EventPublisher(stack.settings).start()
        org_id = _id("org")
        published: dict[str, list[tuple[str, str]]] = {a.name: [] for a in AGENTS}
        try:
            for agent in AGENTS:
                for event_type, data in session(agent.agent_id):
                    event_id = await publisher.publish_event(agent.agent_id, event_type, data,
                                                             organization_id=org_id, strict=True)
                    published[agent.name].append((event_id, event_type))
        finally:
            await publisher.close()

        expected = {a.name: {eid for eid, et in published[a.name] if a.expects(et)} for a in AGENTS}
        total = sum(len(v) for v in expected.values())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and len(_ok_ids(receiver)) < total:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # grace period: anything unexpected would arrive now
        await asyncio.sleep(stack.settings.history_flush_s * 2)
        attempts = await _attempts_by_agent(stack)

    return _report(console, published, expected, receiver, attempts)


def _ok_ids(receiver: Receiver) -> set[str]:
    return {r.headers.get("webhook-id") for r in receiver.received if r.status < 300}


async def _attempts_by_agent(stack) -> dict[str, int]:  # noqa: ANN001
    async with stack.store.session() as s:
        rows = await s.execute(select(Delivery.agent_id, func.sum(Delivery.attempts)).group_by(Delivery.agent_id))
        return {agent_id: int(n or 0) for agent_id, n in rows}


def _report(console: Console, published, expected, receiver: Receiver, attempts: dict[str, int]) -> int:  # noqa: ANN001
    table = Table(title="letta-bus demo: deliveries per agent")
    for col in ("agent", "webhook_events", "published", "expected", "received", "verified", "unexpected",
                "attempts"):
        table.add_column(col, justify="left" if col in ("agent", "webhook_events") else "right")
    ok = True
    for agent in AGENTS:
        posts = [r for r in receiver.received if r.path == agent.path and r.status < 300]
        ids = Counter(r.headers.get("webhook-id") for r in posts)
        received = set(ids) & expected[agent.name]
        verified = {r.headers.get("webhook-id") for r in posts if r.letta_verified and r.standard_verified}
        unexpected = (set(ids) - expected[agent.name]) | {i for i, n in ids.items() if n > 1}
        good = received == expected[agent.name] and verified >= expected[agent.name] and not unexpected
        ok &= good
        table.add_row(
            agent.name + ("" if agent.enabled else " (disabled)"), ", ".join(agent.events) or "all",
            str(len(published[agent.name])), str(len(expected[agent.name])), str(len(received)),
            str(len(verified & expected[agent.name])), str(len(unexpected)), str(attempts.get(agent.agent_id, 0)),
            style=None if good else "red",
        )
    console.print(table)
    console.print("[green]OK[/]: every expected delivery arrived with valid X-Letta-Signature and webhook-signature"
                  if ok else "[red]FAILED[/]: deliveries differ from what the webhook settings ask for")
    return 0 if ok else 1
