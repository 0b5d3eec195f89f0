"""Which Letta this instrumentation knows, and the per-point check that it still looks like that.

Source: the wrapped points were read in letta==0.16.8's source (site-packages/letta/...). A patch release of the
same minor line keeps them; anything else may not, so :func:`version_problem` refuses other versions as a whole
(one log line, nothing wrapped). Within a supported version each point is still checked on its own
(:func:`signature_problem`): the attribute must exist, be callable and accept the parameters we read, or that
point alone is disabled.
"""

from __future__ import annotations

import fnmatch
import inspect
from importlib import metadata
from typing import Any, Iterable

#: Letta versions whose integration points are known (fnmatch pattern on ``importlib.metadata.version("letta")``).
SUPPORTED_LETTA = "0.16.*"


def letta_version() -> str | None:
    """The installed Letta's version, or ``None`` when the ``letta`` distribution is not installed."""
    try:
        return metadata.version("letta")
    except metadata.PackageNotFoundError:
        return None


def version_problem(version: str | None) -> str | None:
    """``None`` when ``version`` is supported, else why not (a sentence for the log)."""
    if version is None:
        return "letta is not installed"
    if not fnmatch.fnmatchcase(version, SUPPORTED_LETTA):
        return f"letta {version} is not supported (supported: {SUPPORTED_LETTA})"
    return None


def signature_problem(owner: Any, name: str, params: Iterable[str]) -> str | None:
    """``None`` when ``owner.name`` exists, is callable and its signature (decorators followed through
    ``__wrapped__``) has every parameter in ``params``; else what is wrong (a sentence for the log)."""
    label = getattr(owner, "__qualname__", None) or getattr(owner, "__name__", None) or type(owner).__name__
    where = f"{label}.{name}"
    func = inspect.getattr_static(owner, name, None) if owner is not None else None
    if func is None:
        return f"{where} does not exist"
    func = getattr(owner, name)
    if not callable(func):
        return f"{where} is not callable"
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        return f"{where} has no readable signature ({exc})"
    missing = [p for p in params if p not in sig.parameters]
    if missing:
        return f"{where}{sig} lacks the parameter(s) {', '.join(missing)}"
    return None
