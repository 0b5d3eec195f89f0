"""``webhook_events`` patterns (dispatcher.rules.matching): NATS subject rules over event types."""

from __future__ import annotations

import pytest

from bus.catalog import CATALOG
from dispatcher.rules.matching import check_pattern, check_patterns, pattern_matches, wants


@pytest.mark.parametrize(
    ("pattern", "event_type", "expected"),
    [
        # exact
        ("agent.step.completed", "agent.step.completed", True),
        ("agent.step.completed", "agent.step.failed", False),
        ("agent.step.completed", "agent.step", False),
        ("agent.step", "agent.step.completed", False),
        # * = exactly one token
        ("agent.step.*", "agent.step.completed", True),
        ("agent.step.*", "agent.step.cancelled", True),
        ("agent.step.*", "agent.step", False),
        ("agent.step.*", "agent.step.completed.extra", False),
        ("agent.step.*", "agent.run.completed", False),
        ("agent.*.completed", "agent.run.completed", True),
        ("agent.*.completed", "agent.step.completed", True),
        ("agent.*.completed", "agent.step.failed", False),
        ("*.execution.completed", "tool.execution.completed", True),
        ("*.*.*", "agent.step.completed", True),
        ("*.*.*", "agent.step", False),
        # > = one or more tokens, last only
        ("agent.>", "agent.step.completed", True),
        ("agent.>", "agent.run.completed", True),
        ("agent.>", "agent.step", True),
        ("agent.>", "agent", False),
        ("agent.>", "tool.execution.completed", False),
        ("agent.step.>", "agent.step.completed", True),
        ("agent.step.>", "agent.step", False),
        (">", "tool.execution.completed", True),
        (">", "agent.step.completed", True),
        ("agent.*.>", "agent.step.completed", True),
        ("agent.*.>", "agent.step", False),
    ],
)
def test_pattern_matches(pattern, event_type, expected):
    check_pattern(pattern)  # every pattern above is valid
    assert pattern_matches(pattern, event_type) is expected


def test_empty_list_wants_every_event():
    for event_type in [*CATALOG, "agent.memory.updated"]:
        assert wants([], event_type)
        assert wants((), event_type)


def test_list_wants_any_matching_pattern():
    patterns = ["agent.step.*", "agent.run.completed"]
    wanted = {t for t in CATALOG if wants(patterns, t)}
    assert wanted == {"agent.step.completed", "agent.step.failed", "agent.step.cancelled", "agent.run.completed"}
    assert {t for t in CATALOG if wants(["agent.>"], t)} == set(CATALOG) - {"tool.execution.completed"}


@pytest.mark.parametrize(
    "pattern",
    ["", "agent..step", "agent.>.step", ">.agent", "agent.step.", ".agent", "Agent.step", "agent.STEP",
     "agent.st*p", "agent.step*", "agent.**", "agent.>>", "agent step", "agent-step.completed", "1agent.step",
     "agent.step.completed ", "agent.step.completed\n", "agent.>\n"],
)
def test_invalid_patterns_raise_naming_the_pattern(pattern):
    with pytest.raises(ValueError) as exc:
        check_pattern(pattern)
    assert repr(pattern) in str(exc.value)
    with pytest.raises(ValueError) as exc:
        check_patterns(["agent.step.completed", pattern])
    assert repr(pattern) in str(exc.value)


def test_check_patterns_keeps_order_and_drops_duplicates():
    assert check_patterns(["agent.>", "agent.step.*", "agent.>", "tool.execution.completed"]) == [
        "agent.>", "agent.step.*", "tool.execution.completed"]
    assert check_patterns([]) == []
