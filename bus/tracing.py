"""W3C Trace Context (https://www.w3.org/TR/trace-context/) on event messages: a Letta step and the webhook
delivery it causes share a trace.

The publisher adds ``traceparent`` (and ``tracestate``) from the caller's current OpenTelemetry span when
``opentelemetry-api`` is installed, or as given explicitly; the dispatcher copies them to the delivery task and
onto the webhook POST, each only when well-formed (a malformed value is dropped, as the spec says to ignore it).
"""

from __future__ import annotations

import re

TRACE_HEADERS = ("traceparent", "tracestate")


def current_trace_headers() -> dict[str, str]:
    """``traceparent``/``tracestate`` of the current OpenTelemetry context; empty without an active span or
    without ``opentelemetry-api``."""
    try:
        from opentelemetry.propagate import inject
    except ImportError:
        return {}
    carrier: dict[str, str] = {}
    inject(carrier)
    return {k: carrier[k] for k in TRACE_HEADERS if k in carrier}


#: W3C Trace Context, "traceparent Header Field Values": version (not ff), trace-id and parent-id (not all zeros),
#: flags, all lowercase hex; versions after 00 may append fields.
_TRACEPARENT_RE = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(?:-[\x21-\x7e]*)?")
#: "tracestate": printable ASCII list members; 512 characters is what every vendor must propagate.
_TRACESTATE_RE = re.compile(r"[\x20-\x7e]{1,512}")


def valid_trace_header(key: str, value: str) -> bool:
    """True when ``value`` is a well-formed ``traceparent`` (version 00: exactly 55 characters) or ``tracestate``.
    The spec says to ignore malformed values, and passing them on would put whatever an event's publisher sent (a
    control character, say) into webhook request headers."""
    if key == "traceparent":
        return bool(_TRACEPARENT_RE.fullmatch(value)) and (len(value) == 55 or not value.startswith("00"))
    return bool(_TRACESTATE_RE.fullmatch(value))


def copy_trace_headers(source: dict[str, str] | None, target: dict[str, str]) -> dict[str, str]:
    """Copy well-formed ``traceparent``/``tracestate`` from ``source`` into ``target`` (returned); malformed ones
    are dropped (:func:`valid_trace_header`)."""
    if source:
        for key in TRACE_HEADERS:
            value = source.get(key)
            if value and valid_trace_header(key, value):
                target[key] = value
    return target
