"""What a subscriber handler's result means for its message: ack, nak with a delay, or term.

Source: DESIGN.md, "Subscribers for internal services". Decided in one place (:func:`decide`) so the runner and the
tests agree:

=====================================  ===========================================================
handler result                         action
=====================================  ===========================================================
returns normally                       ack
raises ``Retry(delay_s)``              nak, redelivered after ``delay_s`` seconds
raises ``Reject(reason)``              term: never redelivered to this consumer
raises anything else                   nak after ``backoff_s(num_delivered)``, logged with traceback
``Retry`` or error on the last         term ("gave up"), logged as an error: ``max_deliver`` is spent
allowed delivery (``max_deliver``)
=====================================  ===========================================================
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Retry(Exception):
    """Raise from a handler to have the event delivered again after ``delay_s`` seconds (a nak with delay).

    ``delay_s`` is seconds >= 0 (0: as soon as possible); ``reason`` is logged. Raises ``ValueError`` for a
    negative or non-finite delay. The redelivery counts toward the subscriber's ``max_deliver``.
    """

    def __init__(self, delay_s: float = 0.0, reason: str = "") -> None:
        delay_s = float(delay_s)
        if not math.isfinite(delay_s) or delay_s < 0:
            raise ValueError(f"Retry delay_s is seconds >= 0, got {delay_s!r}")
        super().__init__(reason or f"retry in {delay_s:g} s")
        self.delay_s = delay_s
        self.reason = reason


class Reject(Exception):
    """Raise from a handler to drop the event for good (a term): this consumer never sees it again.

    Use it for events the handler can never process (bad content, unknown agent); ``reason`` is logged.
    """

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or "rejected")
        self.reason = reason


class Action(str, enum.Enum):
    """What is sent back to JetStream for one message."""

    ACK = "ack"
    NAK = "nak"
    TERM = "term"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision for one message: ``action``, ``delay_s`` (seconds, naks only) and a ``reason`` for the log.
    ``gave_up`` is True when a nak was turned into a term because ``max_deliver`` is spent."""

    action: Action
    delay_s: float = 0.0
    reason: str = ""
    gave_up: bool = False


ACK = Outcome(Action.ACK)


def backoff_s(num_delivered: int, max_s: float = 60.0) -> float:
    """Delay in seconds before redelivering a message whose handler failed on delivery ``num_delivered`` (1-based):
    ``min(2 ** (num_delivered - 1), max_s)``, i.e. 1, 2, 4, 8, ... capped at ``max_s``."""
    exponent = max(num_delivered - 1, 0)
    if exponent >= 63:
        return float(max_s)
    return float(min(2**exponent, max_s))


def decide(
    exc: BaseException | None, num_delivered: int, max_deliver: int, max_backoff_s: float = 60.0
) -> Outcome:
    """The outcome of a handler run that raised ``exc`` (``None``: it returned) on delivery ``num_delivered``
    (1-based) of a consumer allowing ``max_deliver`` deliveries (< 1: unlimited). See the module table."""
    if exc is None:
        return ACK
    if isinstance(exc, Reject):
        return Outcome(Action.TERM, reason=exc.reason or "rejected")
    last = max_deliver >= 1 and num_delivered >= max_deliver
    if isinstance(exc, Retry):
        reason = exc.reason or f"retry requested in {exc.delay_s:g} s"
        if last:
            return Outcome(Action.TERM, reason=f"{reason}; gave up after {num_delivered} deliveries", gave_up=True)
        return Outcome(Action.NAK, delay_s=exc.delay_s, reason=reason)
    reason = f"{type(exc).__name__}: {exc}"
    if last:
        return Outcome(Action.TERM, reason=f"{reason}; gave up after {num_delivered} deliveries", gave_up=True)
    return Outcome(Action.NAK, delay_s=backoff_s(num_delivered, max_backoff_s), reason=reason)


@dataclass
class SubscriberStats:
    """Counts of what a subscriber did with the messages it fetched (all since start).

    ``received``: messages fetched; ``acked``; ``retried``: naks after ``Retry``; ``failed``: naks after another
    exception; ``rejected``: terms after ``Reject``; ``gave_up``: terms because ``max_deliver`` was spent;
    ``undecodable``: terms of messages that are not a valid envelope; ``released``: naks without delay of messages
    fetched but not handled because the subscriber was stopping.
    """

    received: int = 0
    acked: int = 0
    retried: int = 0
    failed: int = 0
    rejected: int = 0
    gave_up: int = 0
    undecodable: int = 0
    released: int = 0
