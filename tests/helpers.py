"""Shared test helpers: realistic samples of every catalog event, polling with a deadline, consumer drain checks,
delivery-history queries and a closed TCP port. No fakes: everything here reads real state."""

from __future__ import annotations

import asyncio
import socket

from sqlalchemy import select

from dispatcher.store.models import Attempt, Delivery, Endpoint

USAGE = {"completion_tokens": 42, "prompt_tokens": 1200, "total_tokens": 1242, "step_count": 1,
         "run_ids": ["run-0b7e4c1a-2d3f-4e5a-8b9c-0d1e2f3a4b5c"]}

#: One realistic ``data`` per catalog event type (DESIGN.md, "Events"), each with a field unknown to the catalog.
CATALOG_SAMPLES: dict[str, dict] = {
    "agent.step.completed": {
        "step_id": "step-6f1c2a4e-1b7d-4c55-9f0e-2b1f3c4d5e6f", "status": "success",
        "usage": USAGE,
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "send_message", "arguments": "{\"message\": \"hi\"}"}}],
        "run_id": "run-0b7e4c1a-2d3f-4e5a-8b9c-0d1e2f3a4b5c", "model": "gpt-4o-mini",
    },
    "agent.step.failed": {
        "step_id": "step-7a2d", "error": "RateLimitError: 429 from provider", "error_type": "RateLimitError",
        "run_id": "run-0b7e", "provider": "openai",
    },
    "agent.step.cancelled": {"step_id": "step-8b3e", "run_id": "run-0b7e", "reason": "user"},
    "agent.message.sent": {"run_id": "run-0b7e", "message_count": 3, "usage": USAGE, "stream": False},
    "agent.tool.attached": {"tool_id": "tool-1d2c", "tool_name": "web_search", "source_type": "python"},
    "agent.tool.detached": {"tool_id": "tool-1d2c", "tool_name": "web_search", "source_type": "python"},
    "agent.run.completed": {
        "run_id": "run-0b7e", "status": "completed", "completed_at": "2026-01-01T12:00:03.120000Z", "usage": USAGE,
        "stop_reason": "end_turn",
    },
    "agent.job.completed": {"job_id": "job-5e6f", "status": "completed",
                            "completed_at": "2026-01-01T12:00:09.000000Z", "job_type": "batch"},
    "tool.execution.completed": {
        "tool_name": "web_search", "tool_args": {"query": "nats jetstream", "limit": 5}, "status": "success",
        "execution_time_ms": 412.5, "sandbox": "local",
    },
}


async def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` (sync or async) until truthy; returns its value. Raises TimeoutError naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise TimeoutError(f"{what} not met in {timeout_s} s")
        await asyncio.sleep(interval_s)


async def wait_drained(js, stream: str, durable: str, timeout_s: float = 10.0):
    """Wait until a durable has nothing pending and nothing unacknowledged; returns its ConsumerInfo."""

    async def drained():
        info = await js.consumer_info(stream, durable)
        return info if info.num_pending == 0 and info.num_ack_pending == 0 else None

    return await wait_until(drained, timeout_s, interval_s=0.05, what=f"{stream}/{durable} drained")


async def deliveries(store, **where) -> list[Delivery]:
    """Delivery rows, filtered by column equality (``agent_id="agent-1"``)."""
    stmt = select(Delivery)
    for column, value in where.items():
        stmt = stmt.where(getattr(Delivery, column) == value)
    async with store.session() as s:
        return list((await s.execute(stmt)).scalars())


async def attempts(store, delivery_id: str) -> list[Attempt]:
    """Attempt rows of one delivery, by attempt number."""
    async with store.session() as s:
        stmt = select(Attempt).where(Attempt.delivery_id == delivery_id).order_by(Attempt.number)
        return list((await s.execute(stmt)).scalars())


async def endpoint_row(store, endpoint_id: str) -> Endpoint:
    async with store.session() as s:
        return await s.get(Endpoint, endpoint_id)


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
