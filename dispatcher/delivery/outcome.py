"""What an HTTP result means for a delivery, decided in one place (DESIGN.md, "Delivery", outcome table).

==============================================  ==========================================
2xx                                             ack; delivery ``succeeded``
408, 429, 5xx, connection error, timeout        retry per schedule (``Retry-After`` honoured)
410 Gone                                        term; endpoint disabled
other 1xx/3xx/4xx                               term; delivery ``failed`` (redirects are not followed)
==============================================  ==========================================
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence

from bus.retry_after import parse_retry_after  # noqa: F401 - re-exported for the sender and tests

JITTER = 0.2  # +-20 % on every scheduled delay (DESIGN.md, "Retries")


class Verdict(enum.Enum):
    """The decision for one attempt's result."""

    SUCCEEDED = "succeeded"
    RETRY = "retry"
    FAILED = "failed"
    GONE = "gone"


def classify(status_code: int | None) -> Verdict:
    """Verdict for an HTTP status; ``None`` means no response (connection error or timeout) and is retried."""
    if status_code is None:
        return Verdict.RETRY
    if 200 <= status_code < 300:
        return Verdict.SUCCEEDED
    if status_code in (408, 429) or status_code >= 500:
        return Verdict.RETRY
    if status_code == 410:
        return Verdict.GONE
    return Verdict.FAILED


def retry_delay(
    schedule_s: Sequence[float], attempt: int, retry_after_s: float | None = None, rng: random.Random | None = None,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based) before the next one.

    The scheduled delay ``schedule_s[attempt - 1]`` gets +-20 % jitter; a ``Retry-After`` is honoured but clamped to
    [scheduled delay, 2 x scheduled delay] so a receiver can neither hurry nor stall the schedule. Raises
    ``IndexError`` when the schedule has no retry after ``attempt``.
    """
    base = schedule_s[attempt - 1]
    if retry_after_s is not None:
        return min(max(retry_after_s, base), 2 * base)
    return base * (1 + (rng or random).uniform(-JITTER, JITTER))
