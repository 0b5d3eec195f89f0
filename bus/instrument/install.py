"""Which Letta module gets which installer, and :func:`install`, called by our ``sitecustomize``.

:data:`HOOKS` maps a module name to the functions that wrap its points (each takes the executed module). They
run right after that module's body (:mod:`bus.instrument.hooks`), so every later ``from ... import`` and every
instance sees the wrapped methods. :func:`install` does nothing (one log line at most) when Letta is missing or
not a supported version (:mod:`bus.instrument.compat`).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable

from bus.instrument import hooks
from bus.instrument.compat import letta_version, version_problem
from bus.instrument.logs import ensure_handler, log

#: Letta module -> installers as ``"module:function"`` (imported when the Letta module loads, so a process that
#: never imports Letta never imports the bus, nats-py or msgspec)
HOOKS: dict[str, list[str]] = {
    "letta.services.step_manager": ["bus.instrument.steps:install_step_manager"],
    "letta.services.message_manager": ["bus.instrument.steps:install_message_manager"],
    "letta.agents.letta_agent_v2": ["bus.instrument.steps:install_agent_loop"],
    "letta.services.agent_manager": ["bus.instrument.points:install_agent_manager"],
    "letta.services.tool_executor.tool_execution_manager": ["bus.instrument.points:install_tool_execution"],
    "letta.services.run_manager": ["bus.instrument.points:install_run_manager"],
    "letta.services.job_manager": ["bus.instrument.points:install_job_manager"],
    "letta.server.rest_api.routers.v1.agents": ["bus.instrument.routes:install_agents_router"],
    "letta.server.rest_api.app": ["bus.instrument.lifecycle:install_app"],
}


def installer(ref: str) -> Callable[[ModuleType], None]:
    """The hook for ``"module:function"``: imports ``module`` when called and runs ``function(letta_module)``."""
    module_name, function = ref.split(":")

    def run(letta_module: ModuleType) -> None:
        getattr(importlib.import_module(module_name), function)(letta_module)

    run.__qualname__ = ref
    return run

_installed = False


def install() -> bool:
    """Register the post-import hooks of :data:`HOOKS`. Returns False (having logged why, unless Letta is simply
    not installed) when nothing was registered. Idempotent."""
    global _installed
    if _installed:
        return True
    ensure_handler()
    version = letta_version()
    problem = version_problem(version)
    if problem is not None:
        if version is not None:
            log.warning("%s: nothing instrumented, the server runs stock", problem)
        return False
    for name, installers in HOOKS.items():
        for ref in installers:
            hooks.register(name, installer(ref))
    _installed = True
    log.info("instrumenting letta %s (%d modules)", version, len(HOOKS))
    return True
