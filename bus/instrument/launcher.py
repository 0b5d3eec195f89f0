"""``letta-bus instrument -- CMD [ARGS...]``: the environment of the instrumented command, and its ``execvpe``.

The command replaces the ``letta-bus`` process (same PID, same signals); its environment is ours with
:data:`bus.instrument.SITE_DIR` first on ``PYTHONPATH`` (once) and every ``LETTA_BUS_*`` variable kept (the bus
reads ``LETTA_BUS_NATS_URL``, ``LETTA_BUS_NATS_AUTH_DIR``... from them).
"""

from __future__ import annotations

import os
import shutil
from typing import Mapping, NoReturn, Sequence

from bus.instrument import SITE_DIR


class LaunchError(ValueError):
    """The command is missing or not found; the message says which and how to call."""


def instrumented_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with :data:`SITE_DIR` prepended to ``PYTHONPATH`` (not repeated when already there)."""
    env = dict(environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != SITE_DIR]
    env["PYTHONPATH"] = os.pathsep.join([SITE_DIR, *parts])
    return env


def resolve(command: Sequence[str], env: Mapping[str, str]) -> str:
    """The executable of ``command[0]`` on ``env["PATH"]``. Raises :class:`LaunchError` when ``command`` is empty
    or its program is not found."""
    if not command:
        raise LaunchError("no command given: use letta-bus instrument -- CMD [ARGS...] (e.g. -- letta server)")
    found = shutil.which(command[0], path=env.get("PATH", os.defpath))
    if found is None:
        raise LaunchError(f"command not found: {command[0]!r} (not an executable file, nor on PATH)")
    return found


def exec_instrumented(command: Sequence[str], environ: Mapping[str, str] | None = None) -> NoReturn:
    """Replace this process by ``command`` with letta-bus loaded. Raises :class:`LaunchError` (see
    :func:`resolve`) or ``OSError`` from ``execvpe``."""
    env = instrumented_env(os.environ if environ is None else environ)
    resolve(command, env)
    os.execvpe(command[0], list(command), env)
