"""``letta-bus instrument -- CMD ...``: run any command with letta-bus loaded into its Python process, publishing
the 9 catalog events from an unmodified Letta (the pattern of ``opentelemetry-instrument`` / ``ddtrace-run``).

How it gets in: the command (:mod:`bus.instrument.launcher`) prepends :data:`SITE_DIR` to ``PYTHONPATH``, so
Python's ``site`` imports our ``sitecustomize`` (bus/instrument/site/sitecustomize.py) at interpreter start. That
chains to any other ``sitecustomize`` on the path, checks Letta's version (:mod:`bus.instrument.compat`) and
registers post-import hooks (:mod:`bus.instrument.hooks`) for the Letta modules named in
:data:`bus.instrument.install.HOOKS`; each hook wraps a few manager methods right after their module executed.

Modules, one concept each:

* :mod:`~bus.instrument.logs`: the ``letta_bus.instrument`` logger and the "point disabled" log line;
* :mod:`~bus.instrument.hooks`: the ``sys.meta_path`` finder that runs a callback after a module executes;
* :mod:`~bus.instrument.compat`: supported Letta versions and the per-point attribute/signature check;
* :mod:`~bus.instrument.wrap`: the generic async-method wrapper (Letta's result and errors pass unchanged);
* :mod:`~bus.instrument.runtime`: the lazily started ``LettaEventBus(mode="fire_and_forget")`` and background work;
* :mod:`~bus.instrument.shapes`: Letta objects -> catalog ``data`` (pure);
* :mod:`~bus.instrument.steps`: step completed/failed/cancelled (joined with the step's persisted messages);
* :mod:`~bus.instrument.points`: tools attached/detached, tool executions, runs, jobs;
* :mod:`~bus.instrument.routes`: ``agent.message.sent`` from the messages routes;
* :mod:`~bus.instrument.lifecycle`: start the bus with Letta's app, flush it at shutdown;
* :mod:`~bus.instrument.install`: module name -> installers;
* :mod:`~bus.instrument.launcher`: the environment and ``execvpe`` of the command.
"""

from __future__ import annotations

from pathlib import Path

#: The directory prepended to PYTHONPATH: it holds only ``sitecustomize.py``.
SITE_DIR = str(Path(__file__).resolve().parent / "site")
