"""The bus's lifetime inside Letta's server: start it when the app starts, flush it when the app stops.

Letta 0.16.8 builds its app at import (letta/server/rest_api/app.py: ``app = create_application()`` with
``FastAPI(lifespan=lifespan)``), so the hook, which runs after that module executed, wraps the built app's
``app.router.lifespan_context`` (Starlette enters it at start-up and leaves it at shutdown). Inside it: Letta's
own lifespan runs unchanged; once its start-up is done the bus is created and starts connecting (so the first
events do not wait for a connection); after Letta's shutdown the bus flushes its buffer for at most
``LETTA_BUS_PUBLISH_CLOSE_TIMEOUT_S`` seconds (:meth:`bus.letta.LettaEventBus.close`). Without this point (other
app layout) the bus still starts at its first event; events buffered at exit are then lost.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from bus.instrument import runtime
from bus.instrument.logs import disable_point
from bus.instrument.wrap import ORIGINAL, report_failure

POINT = "rest_api.app.app.router.lifespan_context"


def install_app(module: Any) -> None:
    """Wrap ``module.app.router.lifespan_context`` (letta.server.rest_api.app)."""
    router = getattr(getattr(module, "app", None), "router", None)
    original = getattr(router, "lifespan_context", None)
    if original is None or not callable(original):
        disable_point(POINT, "letta.server.rest_api.app has no app.router.lifespan_context")
        return
    if getattr(original, ORIGINAL, None) is not None:
        return

    @asynccontextmanager
    async def lifespan_context(app: Any):
        async with original(app) as state:
            try:
                runtime.get_bus()
            except Exception as exc:  # noqa: BLE001 - never fail Letta's start-up
                report_failure(POINT, exc)
            yield state
        await runtime.close()

    setattr(lifespan_context, ORIGINAL, original)
    router.lifespan_context = lifespan_context
