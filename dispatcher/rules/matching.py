"""``webhook_events`` patterns: event types with NATS-style wildcards.

Event types are dot-separated tokens, like NATS subjects, so patterns use NATS rules (docs.nats.io, "Subject-Based
Messaging"): ``*`` matches exactly one token, ``>`` matches one or more tokens and only as the last token.
An empty pattern list matches every event.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_TOKEN_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def check_pattern(pattern: str) -> None:
    """Raise ``ValueError`` naming the pattern and the fix unless it is a valid ``webhook_events`` entry,
    e.g. ``agent.step.completed``, ``agent.step.*`` or ``agent.>``."""
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if token == ">" and i == len(tokens) - 1:
            continue
        if token == "*" or _TOKEN_RE.fullmatch(token):
            continue
        raise ValueError(
            f"webhook_events pattern {pattern!r} is not valid: use dot-separated lowercase event tokens, '*' for "
            "one token and '>' as the last token for the rest (e.g. 'agent.step.*', 'agent.>')"
        )


def check_patterns(patterns: Iterable[str]) -> list[str]:
    """Validate every pattern (see :func:`check_pattern`) and return them as a list without duplicates."""
    out: list[str] = []
    for pattern in patterns:
        check_pattern(pattern)
        if pattern not in out:
            out.append(pattern)
    return out


def pattern_matches(pattern: str, event_type: str) -> bool:
    """True when ``event_type`` matches ``pattern`` under NATS wildcard rules."""
    if pattern == event_type:
        return True
    p_tokens = pattern.split(".")
    e_tokens = event_type.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return len(e_tokens) > i
        if i >= len(e_tokens) or (p != "*" and p != e_tokens[i]):
            return False
    return len(p_tokens) == len(e_tokens)


def wants(patterns: Sequence[str], event_type: str) -> bool:
    """True when an endpoint with these ``webhook_events`` should receive ``event_type`` (empty = all)."""
    return not patterns or any(pattern_matches(p, event_type) for p in patterns)
