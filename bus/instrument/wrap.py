"""The one wrapper every point uses: Letta's coroutine runs unchanged, our part runs around it, guarded.

``wrapper(*args, **kwargs)``:

1. ``before(call)`` (optional; sync, or async returning a value): ``call`` is the bound arguments of Letta's
   function as a dict (``{"self": ..., "step_id": ..., ...}``, defaults applied). Its value is passed to ``after``.
   An exception in it is logged and ``ctx`` is ``None``.
2. ``result = await original(*args, **kwargs)``: exactly Letta's call; whatever it raises propagates untouched and
   ``after`` does not run.
3. ``after(call, result, ctx)`` (sync, must be cheap: it enqueues or schedules background work). An exception in
   it is logged (:func:`report_failure`), never raised.
4. ``return result``: exactly what Letta returned.

The wrapper keeps the original's name, docstring and signature (``functools.wraps``; ``inspect.signature``
follows ``__wrapped__``, which FastAPI relies on for route endpoints).
"""

from __future__ import annotations

import functools
import inspect
import time
from typing import Any, Awaitable, Callable

from bus.instrument.compat import signature_problem
from bus.instrument.logs import disable_point, log

Call = dict[str, Any]
Before = Callable[[Call], Any]
After = Callable[[Call, Any, Any], None]

#: attribute set on every wrapper (its value: the original function)
ORIGINAL = "__letta_bus_original__"
#: seconds between two logged failures of the same point (the first is always logged)
FAILURE_REPORT_EVERY_S = 60.0
_last_failure: dict[str, float] = {}
_failures: dict[str, int] = {}


def report_failure(point: str, exc: BaseException) -> None:
    """Log a failure of our part at ``point``: the first at once, then at most every
    :data:`FAILURE_REPORT_EVERY_S` seconds with the count since."""
    _failures[point] = _failures.get(point, 0) + 1
    now = time.monotonic()
    if now - _last_failure.get(point, -FAILURE_REPORT_EVERY_S) >= FAILURE_REPORT_EVERY_S:
        _last_failure[point] = now
        log.warning("%s: publishing failed (%d failures so far; Letta's call was not affected): %r",
                    point, _failures[point], exc, exc_info=exc)


def _bind(sig: inspect.Signature, args: tuple, kwargs: dict) -> Call:
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def wrap_coroutine_function(original: Callable[..., Awaitable[Any]], point: str, *, after: After,
                            before: Before | None = None) -> Callable[..., Awaitable[Any]]:
    """The guarded async wrapper of ``original`` (see the module docstring). Raises ``ValueError`` (from
    ``inspect.signature``) when ``original`` has no readable signature."""
    sig = inspect.signature(original)

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        call: Call | None = None
        ctx = None
        if before is not None:
            try:
                call = _bind(sig, args, kwargs)
                ctx = before(call)
                if inspect.isawaitable(ctx):
                    ctx = await ctx
            except Exception as exc:  # noqa: BLE001 - never fail Letta's call
                report_failure(point, exc)
                ctx = None
        result = await original(*args, **kwargs)
        try:
            if call is None:
                call = _bind(sig, args, kwargs)
            after(call, result, ctx)
        except Exception as exc:  # noqa: BLE001 - never fail Letta's call
            report_failure(point, exc)
        return result

    setattr(wrapper, ORIGINAL, original)
    return wrapper


def wrap_method(owner: type, name: str, params: tuple[str, ...], *, after: After, before: Before | None = None,
                point: str | None = None) -> bool:
    """Replace ``owner.name`` (an async method) by its guarded wrapper. Checks first that it exists and accepts
    ``params`` (:func:`bus.instrument.compat.signature_problem`); otherwise disables this point with one log line
    and returns False. Idempotent (an already wrapped method is left alone). Returns True when wrapped."""
    point = point or f"{getattr(owner, '__name__', owner)}.{name}"
    problem = signature_problem(owner, name, params)
    if problem is not None:
        disable_point(point, problem)
        return False
    original = inspect.getattr_static(owner, name)
    if getattr(original, ORIGINAL, None) is not None:
        return True
    if isinstance(original, (staticmethod, classmethod)):
        disable_point(point, f"{point} is a {type(original).__name__}, expected a plain async method")
        return False
    setattr(owner, name, wrap_coroutine_function(original, point, after=after, before=before))
    return True


def unwrap_method(owner: type, name: str) -> None:
    """Put the original back (tests)."""
    current = inspect.getattr_static(owner, name, None)
    original = getattr(current, ORIGINAL, None)
    if original is not None:
        setattr(owner, name, original)
