"""The instrumentation's logger, ``letta_bus.instrument``, and its one-line-per-problem reports.

Letta configures its own loggers; so that our few lines are seen whatever it does, the logger gets its own
stderr handler (``letta-bus instrument: <LEVEL> <message>``, level INFO, not propagated) unless the host
configured handlers for it; so do the ``bus`` loggers (``bus.letta``: the facade's own reports) at WARNING.
:func:`disable_point` records why a wrapped point is off and logs it once.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("letta_bus.instrument")

#: point name (``StepManager.update_step_success_async``) -> why it is disabled
DISABLED: dict[str, str] = {}


def ensure_handler() -> None:
    """Give :data:`log` (INFO) and the ``bus`` loggers (WARNING: the bus's buffer-full, broker-unreachable and
    refused-event reports) a stderr handler unless they already have one (idempotent)."""
    for logger, level in ((log, logging.INFO), (logging.getLogger("bus"), logging.WARNING)):
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("letta-bus instrument: %(levelname)s %(message)s"))
            handler.setLevel(level)
            logger.addHandler(handler)
            logger.setLevel(level)
            logger.propagate = False


def disable_point(point: str, reason: str) -> None:
    """Mark ``point`` disabled and log ONE warning naming it and ``reason`` (later calls for it are silent)."""
    if point in DISABLED:
        return
    DISABLED[point] = reason
    log.warning("point %s disabled: %s; the server runs on, without this event", point, reason)
