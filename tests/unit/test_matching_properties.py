"""Property-based tests (hypothesis) of ``webhook_events`` matching (dispatcher.rules.matching) against a reference
implementation of NATS subject matching.

The reference follows nats-server's rules token by token (docs.nats.io, "Subject-Based Messaging"; nats-server
``server/sublist.go``, ``isSubsetMatchTokenized``): a literal token matches itself, ``*`` any one token, ``>`` one
or more remaining tokens and only as the last token. Small token alphabets make matches and near misses common.
tests/integration/test_matching_server.py checks the same property against a real nats-server.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.rules.matching import check_pattern, check_patterns, pattern_matches, wants

PROPS = settings(max_examples=250, deadline=None)

LITERALS = ["agent", "step", "completed", "a", "a_1"]
literal_tokens = st.sampled_from(LITERALS)
event_types = st.lists(literal_tokens, min_size=1, max_size=5).map(".".join)
patterns = st.builds(
    lambda head, tail: ".".join(head + tail),
    st.lists(st.one_of(literal_tokens, st.just("*")), min_size=0, max_size=5),
    st.sampled_from([[], [">"]]),
).filter(bool)


def reference_match(pattern: str, subject: str) -> bool:
    """NATS subject matching, written from the rules (not from dispatcher.rules.matching)."""
    p_tokens, s_tokens = pattern.split("."), subject.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return i < len(s_tokens)  # one or more tokens left
        if i >= len(s_tokens):
            return False
        if p != "*" and p != s_tokens[i]:
            return False
    return len(p_tokens) == len(s_tokens)


def reference_valid(pattern: str) -> bool:
    """A valid ``webhook_events`` entry: lowercase event tokens, ``*`` anywhere, ``>`` only last."""
    import re

    tokens = pattern.split(".")
    return all(
        t == "*" or (t == ">" and i == len(tokens) - 1) or re.fullmatch(r"[a-z][a-z0-9_]*", t)
        for i, t in enumerate(tokens)
    )


@PROPS
@given(patterns, event_types)
def test_pattern_matches_agrees_with_nats_rules(pattern, event_type):
    check_pattern(pattern)  # every generated pattern is valid
    assert pattern_matches(pattern, event_type) is reference_match(pattern, event_type)


@PROPS
@given(event_types)
def test_an_event_type_matches_itself_and_the_full_wildcards(event_type):
    tokens = event_type.split(".")
    assert pattern_matches(event_type, event_type)
    assert pattern_matches(".".join("*" * len(tokens)), event_type)
    assert pattern_matches(">", event_type)
    assert not pattern_matches(event_type + ".>", event_type)
    assert not pattern_matches(event_type + ".*", event_type)


@PROPS
@given(st.lists(patterns, max_size=4), event_types)
def test_wants_is_any_pattern_or_all_when_empty(pats, event_type):
    expected = not pats or any(reference_match(p, event_type) for p in pats)
    assert wants(pats, event_type) is expected
    assert wants(check_patterns(pats), event_type) is expected  # de-duplicating changes nothing


@PROPS
@given(st.lists(st.sampled_from(LITERALS + ["*", ">", "", "Agent", "a-b", "a*", "1a", " ", "a>"]), min_size=1,
                max_size=5).map(".".join))
def test_check_pattern_accepts_exactly_the_valid_patterns(pattern):
    if reference_valid(pattern):
        check_pattern(pattern)
    else:
        with pytest.raises(ValueError, match="webhook_events pattern"):
            check_pattern(pattern)
