"""The outcome table (dispatcher.delivery.outcome): status -> verdict, retry delays with jitter, Retry-After
clamping."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from dispatcher.delivery.outcome import JITTER, Verdict, classify, parse_retry_after, retry_delay


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.SUCCEEDED), (201, Verdict.SUCCEEDED), (202, Verdict.SUCCEEDED), (204, Verdict.SUCCEEDED),
        (299, Verdict.SUCCEEDED),
        (None, Verdict.RETRY),  # connection error or timeout
        (408, Verdict.RETRY), (429, Verdict.RETRY),
        (500, Verdict.RETRY), (502, Verdict.RETRY), (503, Verdict.RETRY), (504, Verdict.RETRY), (599, Verdict.RETRY),
        (410, Verdict.GONE),
        # 3xx is a failure: redirects are never followed
        (300, Verdict.FAILED), (301, Verdict.FAILED), (302, Verdict.FAILED), (304, Verdict.FAILED),
        (307, Verdict.FAILED), (308, Verdict.FAILED),
        (400, Verdict.FAILED), (401, Verdict.FAILED), (403, Verdict.FAILED), (404, Verdict.FAILED),
        (405, Verdict.FAILED), (409, Verdict.FAILED), (413, Verdict.FAILED), (422, Verdict.FAILED),
        (100, Verdict.FAILED), (101, Verdict.FAILED),
    ],
)
def test_classify(status, verdict):
    assert classify(status) is verdict


def test_jitter_is_plus_minus_20_percent_and_seeded():
    assert JITTER == 0.2
    schedule = [5.0, 300.0, 1800.0]
    for attempt, base in enumerate(schedule, start=1):
        rng = random.Random(20260101)
        delays = [retry_delay(schedule, attempt, rng=rng) for _ in range(2000)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays), (base, min(delays), max(delays))
        # the jitter actually spreads over the range (not a constant, not one-sided)
        assert min(delays) < base * 0.85 and max(delays) > base * 1.15
        assert len(set(delays)) > 1000
    # the same seed gives the same delays
    rng_a, rng_b = random.Random(7), random.Random(7)
    assert [retry_delay(schedule, 1, rng=rng_a) for _ in range(10)] == [
        retry_delay(schedule, 1, rng=rng_b) for _ in range(10)]


def test_no_retry_after_the_last_scheduled_one():
    with pytest.raises(IndexError):
        retry_delay([5.0, 300.0], 3, rng=random.Random(1))


NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
        ("Thu, 01 Jan 2026 12:05:00 GMT", 300.0),
        (format_datetime(NOW - timedelta(seconds=30), usegmt=True), 0.0),  # a date in the past: now
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
    ],
)
def test_parse_retry_after(header, seconds):
    assert parse_retry_after(header, now=NOW) == seconds


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(0.0, 10.0), (3.0, 10.0), (10.0, 10.0), (15.0, 15.0), (20.0, 20.0), (21.0, 20.0), (86400.0, 20.0)],
)
def test_retry_after_seconds_clamped_to_delay_and_twice_delay(retry_after, expected):
    rng = random.Random(3)
    assert retry_delay([10.0, 60.0], 1, retry_after, rng=rng) == expected
    assert retry_delay([60.0, 10.0], 2, retry_after, rng=rng) == expected


@pytest.mark.parametrize(("offset_s", "expected"), [(5, 10.0), (14, 14.0), (3600, 20.0), (-60, 10.0)])
def test_retry_after_http_date_clamped(offset_s, expected):
    header = format_datetime(NOW + timedelta(seconds=offset_s), usegmt=True)
    assert retry_delay([10.0], 1, parse_retry_after(header, now=NOW), rng=random.Random(1)) == expected
