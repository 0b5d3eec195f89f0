"""``letta-bus tail``: print live events readably, one line per event, from an ordered consumer.

An ordered consumer is ephemeral, in memory, unacknowledged and gap-free (nats-py recreates it from the last seen
stream sequence when it detects a gap), so tailing never disturbs the durables of the dispatcher or of services.
Line format::

    2026-01-01T12:00:00.123Z  agent.step.completed  agent-1  evt_0192...  {"step_id":"step-1","status":"success"}

Long string values are cut to 40 characters, lists to 5 items and the whole data to 200 characters.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from bus.connection import connect
from bus.envelope import decode
from config.settings import Settings
from subscribers.event import Start, start_config

MAX_STRING = 40
MAX_ITEMS = 5
MAX_DATA = 200


def _short(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING else value[: MAX_STRING - 1] + "…"
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_short(v) for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            items.append(f"…+{len(value) - MAX_ITEMS}")
        return items
    return value


def compact_data(data: Any) -> str:
    """``data`` as one line of compact JSON with long values truncated (see the module docstring)."""
    text = json.dumps(_short(data), separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text) <= MAX_DATA else text[: MAX_DATA - 1] + "…"


def _short_time(timestamp: str) -> str:
    """``2026-01-01T12:00:00.123456Z`` -> ``2026-01-01T12:00:00.123Z`` (other shapes unchanged)."""
    if len(timestamp) == 27 and timestamp.endswith("Z") and timestamp[19] == ".":
        return timestamp[:23] + "Z"
    return timestamp


def format_event(msg: Msg) -> str:
    """One readable line for an event message: time, event type, agent id, event id, compact data.

    A message that is not a valid envelope gives ``<stream time>  <subject>  undecodable (<n> bytes): <excerpt>``;
    never raises for bad content.
    """
    try:
        env = decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        try:
            when = msg.metadata.timestamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z"
        except Exception:  # noqa: BLE001 - not a JetStream message
            when = "-"
        excerpt = msg.data[:60].decode("utf-8", "replace")
        return f"{when}  {msg.subject}  undecodable ({len(msg.data)} bytes): {excerpt!r}"
    kind = env.event_type
    if not msg.subject.endswith("." + env.event_type):
        kind = f"{env.event_type} (on {msg.subject})"
    return f"{_short_time(env.timestamp)}  {kind}  {env.agent_id}  {env.event_id}  {compact_data(env.data)}"


async def tail(
    settings: Settings,
    subject: str | None = None,
    *,
    since: Start | None = None,
    out: Callable[[str], object] = print,
    nc: Client | None = None,
    max_events: int | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Print events on ``subject`` (default ``letta.>``; wildcards such as ``letta.agent.>``) as they arrive, one
    line each through ``out`` (default ``print``), and return how many were printed.

    ``since``: ``None`` for live events only, else a start position (``"all"``, a timezone-aware ``datetime``, a
    ``timedelta`` ago, or a stream sequence ``int``). Runs until ``max_events`` lines were printed, ``stop`` is set
    (noticed within 0.25 s) or the task is cancelled. ``nc``: an open connection (left open); otherwise it
    connects to ``settings.nats_url`` and closes it at the end.

    Raises ``ValueError`` for a bad ``since`` or when ``nats_url`` is unset and no ``nc`` was given;
    ``ConnectionError`` when no server answers within ``settings.connect_timeout_s`` seconds;
    ``nats.js.errors.NotFoundError`` when the events stream does not exist.
    """
    fields = start_config(since if since is not None else "new")
    subject = subject or f"{settings.subject_prefix}.>"
    owns = nc is None
    if nc is None:
        if not settings.nats_url:
            raise ValueError("set LETTA_BUS_NATS_URL (or pass nc=) so tail finds NATS")
        nc = await connect(settings.nats_url, name="letta-bus-tail", timeout_s=settings.connect_timeout_s,
                           settings=settings, role="subscriber")
    count = 0
    try:
        js = nc.jetstream()
        config = ConsumerConfig(description="letta-bus tail", **fields)
        sub = await js.subscribe(
            subject, stream=settings.events_stream, ordered_consumer=True, config=config,
            deliver_policy=fields["deliver_policy"],
        )
        try:
            while max_events is None or count < max_events:
                if stop is not None and stop.is_set():
                    break
                try:
                    msg = await sub.next_msg(timeout=0.25)
                except asyncio.TimeoutError:  # nats.errors.TimeoutError included
                    continue
                out(format_event(msg))
                count += 1
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the server drops the idle ordered consumer itself
                pass
    finally:
        if owns:
            await nc.close()
    return count
