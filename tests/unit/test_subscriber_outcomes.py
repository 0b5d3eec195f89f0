"""Handler result -> ack / nak with delay / term, decided in one place (subscribers.outcomes.decide)."""

from __future__ import annotations

import math

import pytest

from subscribers.outcomes import Action, Reject, Retry, backoff_s, decide


def test_return_acks():
    assert decide(None, 1, 10).action is Action.ACK


def test_retry_naks_with_its_delay():
    outcome = decide(Retry(2.5, "busy"), 1, 10)
    assert (outcome.action, outcome.delay_s, outcome.reason, outcome.gave_up) == (Action.NAK, 2.5, "busy", False)


def test_reject_terms():
    outcome = decide(Reject("unknown agent"), 1, 10)
    assert (outcome.action, outcome.reason) == (Action.TERM, "unknown agent")


def test_reject_on_last_delivery_is_a_plain_reject():
    outcome = decide(Reject("no"), 10, 10)
    assert outcome.action is Action.TERM and not outcome.gave_up


@pytest.mark.parametrize("n, delay", [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (50, 60), (10_000, 60)])
def test_other_errors_back_off_exponentially(n, delay):
    outcome = decide(ValueError("x"), n, 0)  # 0: unlimited deliveries
    assert outcome.action is Action.NAK and outcome.delay_s == delay
    assert outcome.reason == "ValueError: x"


def test_backoff_cap_and_first_delivery():
    assert backoff_s(1, max_s=0.2) == 0.2
    assert backoff_s(0) == 1.0 and backoff_s(3, max_s=3) == 3.0


@pytest.mark.parametrize("exc", [RuntimeError("down"), Retry(1)])
def test_last_delivery_gives_up_with_a_term(exc):
    outcome = decide(exc, 3, 3)
    assert outcome.action is Action.TERM and outcome.gave_up and "gave up after 3" in outcome.reason
    assert decide(exc, 2, 3).action is Action.NAK


@pytest.mark.parametrize("bad", [-1, math.inf, math.nan])
def test_retry_refuses_bad_delays(bad):
    with pytest.raises(ValueError, match="seconds >= 0"):
        Retry(bad)


def test_retry_and_reject_messages():
    assert str(Retry(3)) == "retry in 3 s" and Retry(0).delay_s == 0.0
    assert str(Reject()) == "rejected" and str(Reject("bad")) == "bad"
