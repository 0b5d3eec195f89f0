"""W3C trace headers (bus.tracing): well-formed ``traceparent``/``tracestate`` are copied onto delivery tasks and
webhook requests, malformed ones are dropped (the spec says to ignore them). Before this, a control character in
an event's ``traceparent`` made aiohttp refuse the webhook request and crashed the delivery (tests/integration/
test_poison.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bus.tracing import copy_trace_headers, valid_trace_header

VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
hexes = lambda n: st.text("0123456789abcdef", min_size=n, max_size=n)  # noqa: E731


def test_examples():
    assert valid_trace_header("traceparent", VALID)
    assert valid_trace_header("traceparent", "01-" + VALID[3:] + "-future-field")  # later versions may add fields
    for bad in ("", "00-ü-é", "x" * 9000, VALID + "-x", VALID.upper(), "ff" + VALID[2:], VALID.replace("01", "0\x01"),
                "00-" + "0" * 32 + VALID[35:], VALID[:36] + "0" * 16 + VALID[52:]):
        assert not valid_trace_header("traceparent", bad), bad
    assert valid_trace_header("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    for bad in ("", "a\x01", "a\r\nb", "x" * 513, "é=1"):
        assert not valid_trace_header("tracestate", bad), bad


@settings(max_examples=200, deadline=None)
@given(hexes(2), hexes(32), hexes(16), hexes(2))
def test_every_well_formed_version_00_traceparent_is_kept(version, trace_id, parent_id, flags):
    value = f"00-{trace_id}-{parent_id}-{flags}"
    expected = set(trace_id) != {"0"} and set(parent_id) != {"0"}
    assert valid_trace_header("traceparent", value) is expected
    copied = copy_trace_headers({"traceparent": value, "other": "x"}, {"a": "b"})
    assert copied == ({"a": "b", "traceparent": value} if expected else {"a": "b"})


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.text(max_size=80))
def test_nothing_with_a_control_or_non_ascii_character_is_copied(traceparent, tracestate):
    copied = copy_trace_headers({"traceparent": traceparent, "tracestate": tracestate}, {})
    for value in copied.values():
        assert value.isascii() and value.isprintable()
