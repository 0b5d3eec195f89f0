"""The process's one ``LettaEventBus(mode="fire_and_forget")``, started lazily on the loop of its first use, and
the background tasks the points schedule (Letta lookups that must not hold the request).

:func:`emit` is what a point calls: synchronous, tens of microseconds (validate, encode, append to the buffer),
never raises, never waits on the broker. The first call creates the bus from :class:`config.settings.Settings`
(``LETTA_BUS_NATS_URL``, ``LETTA_BUS_NATS_AUTH_DIR``: it connects with the ``publisher`` role's credentials) and
starts it in a task of the running loop (connecting in the background). Without ``LETTA_BUS_NATS_URL`` (or with
settings that do not load) it logs one line and publishes nothing. Called from another thread or loop than the
bus's, the event is handed to the bus's loop with ``call_soon_threadsafe``.

:func:`spawn` runs a coroutine as a task of the running loop, keeps a reference until it ends and logs its
exception (``point`` names it). :func:`close` flushes the buffer at the server's shutdown
(:mod:`bus.instrument.lifecycle`); events still buffered when a process exits otherwise are lost
(fire-and-forget).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine

from bus.instrument.logs import log
from bus.instrument.wrap import report_failure

_lock = threading.Lock()
_bus: Any = None  # bus.letta.LettaEventBus once created
_loop: asyncio.AbstractEventLoop | None = None
_off_reason: str | None = None
_tasks: set[asyncio.Task] = set()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _create(loop: asyncio.AbstractEventLoop) -> None:
    global _bus, _loop, _off_reason
    try:
        from bus.letta import LettaEventBus
        from config.settings import Settings

        settings = Settings()
        if not settings.nats_url:
            _off_reason = "LETTA_BUS_NATS_URL is not set"
            log.warning("LETTA_BUS_NATS_URL is not set: no events are published (set it to the broker that "
                        "letta-bus up runs or joins)")
            return
        bus = LettaEventBus(settings, mode="fire_and_forget")
    except Exception as exc:  # noqa: BLE001 - bad settings must not break Letta
        _off_reason = f"settings: {exc}"
        log.error("letta-bus settings did not load, no events are published: %s", exc)
        return
    _bus, _loop = bus, loop
    task = loop.create_task(_start(bus), name="letta-bus-instrument-start")
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    log.info("publishing to %s (fire-and-forget)", settings.nats_url)


async def _start(bus: Any) -> None:
    try:
        await bus.start(wait_s=0)
    except Exception as exc:  # noqa: BLE001
        log.error("letta-bus did not start, events stay buffered: %r", exc)


def get_bus() -> Any:
    """The bus (created and started on the running loop at the first call), or ``None`` when publishing is off
    or no loop runs and none was created yet."""
    if _bus is not None or _off_reason is not None:
        return _bus
    loop = _running_loop()
    if loop is None:
        return None
    with _lock:
        if _bus is None and _off_reason is None:
            _create(loop)
    return _bus


def emit(agent_id: str | None, event_type: str, data: dict[str, Any], organization_id: str | None = None) -> None:
    """Hand one event to the bus (fire-and-forget). Skips events without ``agent_id``. Never raises."""
    try:
        bus = get_bus()
        if bus is None or not agent_id:
            return
        loop = _running_loop()
        if loop is _loop:
            bus.enqueue(agent_id=agent_id, event_type=event_type, payload=data, organization_id=organization_id)
        elif _loop is not None and not _loop.is_closed():
            _loop.call_soon_threadsafe(lambda: bus.enqueue(agent_id=agent_id, event_type=event_type, payload=data,
                                                           organization_id=organization_id))
    except Exception as exc:  # noqa: BLE001 - never fail Letta
        report_failure(f"emit {event_type}", exc)


def spawn(coro: Coroutine[Any, Any, Any], point: str) -> None:
    """Run ``coro`` in the background on the running loop (closed unrun when there is none). Never raises."""
    loop = _running_loop()
    if loop is None:
        coro.close()
        return

    async def guarded() -> None:
        try:
            await coro
        except Exception as exc:  # noqa: BLE001
            report_failure(point, exc)

    task = loop.create_task(guarded(), name=f"letta-bus-instrument {point}")
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def later(delay_s: float, callback: Any, *args: Any) -> None:
    """``loop.call_later`` on the running loop (nothing without one); ``callback`` must not raise."""
    loop = _running_loop()
    if loop is not None:
        loop.call_later(delay_s, callback, *args)


async def close() -> None:
    """Flush and close the bus (bounded by its ``close_timeout_s``); logs its final counters. Never raises."""
    bus = _bus
    if bus is None:
        return
    try:
        await bus.close()
        log.info("closed: %s", bus.stats.as_dict())
    except Exception as exc:  # noqa: BLE001
        report_failure("close", exc)


def stats() -> dict[str, int] | None:
    """The bus's counters (``LettaEventBus.stats.as_dict()``), or ``None`` before it exists."""
    return _bus.stats.as_dict() if _bus is not None else None


def reset() -> None:
    """Forget the bus (tests; does not close it)."""
    global _bus, _loop, _off_reason
    _bus = _loop = _off_reason = None
