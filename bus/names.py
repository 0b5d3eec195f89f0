"""The grammar of the ids that travel with every event: agent, organization, event and endpoint ids.

One rule for all of them, checked where they enter and again where events are decoded:

    id      = alnum *( alnum / "_" / "." / ":" / "-" )      ; ASCII only
    alnum   = "A"-"Z" / "a"-"z" / "0"-"9"

with a length limit per kind, matching the database columns that store them (dispatcher/store/models.py):

=================  ==========  ==============================================================================
kind               max chars   column / examples
=================  ==========  ==============================================================================
agent_id           128         ``endpoints.agent_id``, ``deliveries.agent_id`` (``String(128)``): ``agent-<uuid4>``
organization_id    128         ``endpoints.organization_id`` (``String(128)``): ``org-<uuid4>``
event_id           64          ``deliveries.event_id`` (``String(64)``): ``evt_<32 hex>`` (:mod:`bus.ids`)
endpoint_id        64          ``endpoints.id`` (``String(64)``): ``ep_<32 hex>``
=================  ==========  ==============================================================================

Why this set: every such id is copied into NATS headers (``Nats-Msg-Id``, ``Letta-Agent-Id``, ``ce-source``), HTTP
headers of each webhook (``webhook-id``), URL paths of the API (``/v1/agents/{agent_id}/webhook``) and database
columns. ASCII letters, digits and ``_ . : -`` pass through all of them unchanged and unescaped (they are RFC 3986
``unreserved`` characters plus ``:``, a valid ``pchar``), need no quoting in logs, and cannot be a control
character, a space, a bidirectional override (U+202E), a ``/`` or ``%`` that changes a path, or a ``..`` segment
(the first character is a letter or digit). Letta's own ids (``agent-<uuid4>``, ``org-<uuid4>``, ``step-...``,
``run-...``) and letta-bus's (``evt_<hex>``, ``ep_<hex>``) all fit.

The invariant (issue 10, finding 8): :class:`bus.publisher.EventPublisher` (and through it the CLI, the bridge,
``bus.letta`` and the outbox), the management API and :func:`bus.envelope.check_head` (the fan-out's and every
subscriber's decode) all call :func:`id_problem` with the same limits, so an event accepted at entry is never
refused later as undecodable, and an event refused at decode could not have been published through letta-bus.

Speed: one precompiled regular expression ``fullmatch`` per id, about 0.13 microseconds for a 42-character id
(``agent-<uuid4>``; CPython 3.11, best of 7 runs on a loaded 2-core machine).
"""

from __future__ import annotations

import re
import unicodedata

AGENT_ID_MAX = 128
ORGANIZATION_ID_MAX = 128
EVENT_ID_MAX = 64
ENDPOINT_ID_MAX = 64
#: Event types (``deliveries.event_type`` is ``String(128)``); their shape is :data:`bus.catalog.EVENT_TYPE_RE`.
EVENT_TYPE_MAX = 128

#: The characters an id may hold (the first one must be a letter or digit).
ID_CHARS = "A-Z a-z 0-9 _ . : -"

_patterns: dict[int, re.Pattern[str]] = {}


def id_pattern(max_len: int) -> re.Pattern[str]:
    """The compiled grammar for ids of at most ``max_len`` (>= 1) characters; use with ``fullmatch``."""
    pattern = _patterns.get(max_len)
    if pattern is None:
        pattern = _patterns[max_len] = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.:-]{{0,{max_len - 1}}}")
    return pattern


def id_regex(max_len: int) -> str:
    """The grammar as an anchored regular-expression string (for JSON Schema / OpenAPI ``pattern``)."""
    return rf"^[A-Za-z0-9][A-Za-z0-9_.:-]{{0,{max_len - 1}}}$"


_AGENT = id_pattern(AGENT_ID_MAX).fullmatch
_ORGANIZATION = id_pattern(ORGANIZATION_ID_MAX).fullmatch
_EVENT = id_pattern(EVENT_ID_MAX).fullmatch
_ENDPOINT = id_pattern(ENDPOINT_ID_MAX).fullmatch

#: field name -> (fullmatch, max length, example)
_KINDS = {
    "agent_id": (_AGENT, AGENT_ID_MAX, "agent-<uuid4>"),
    "organization_id": (_ORGANIZATION, ORGANIZATION_ID_MAX, "org-<uuid4>"),
    "event_id": (_EVENT, EVENT_ID_MAX, "evt_<32 hex>"),
    "endpoint_id": (_ENDPOINT, ENDPOINT_ID_MAX, "ep_<32 hex>"),
}


_CONTROL_NAMES = {" ": "space", "\t": "tab", "\r": "CR", "\n": "LF", "\0": "NUL", "\x7f": "DEL"}


def describe_char(ch: str) -> str:
    """One character for an error message: ``'x'`` when printable ASCII, else ``U+000A (LF)``,
    ``U+202E (RIGHT-TO-LEFT OVERRIDE)``, ``U+0020 (space)``."""
    if ch.isascii() and ch.isprintable() and ch != " ":
        return repr(ch)
    name = (_CONTROL_NAMES.get(ch) or unicodedata.name(ch, "")
            or ("control" if unicodedata.category(ch) == "Cc" else f"category {unicodedata.category(ch)}"))
    return f"U+{ord(ch):04X} ({name})"


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:80] + "...")


def id_problem(field: str, value: object) -> str | None:
    """``None`` when ``value`` is a valid ``field`` (``agent_id``, ``organization_id``, ``event_id`` or
    ``endpoint_id``), else a message naming the field, what is wrong and the rule. ``None`` (no id) is not
    handled here: callers decide whether the field is optional. Raises ``KeyError`` for an unknown field."""
    match, max_len, example = _KINDS[field]
    if isinstance(value, str) and match(value):
        return None
    rule = (f"{field} must be 1-{max_len} ASCII characters of {ID_CHARS}, starting with a letter or digit "
            f"(e.g. {example!r})")
    if not isinstance(value, str):
        return f"{rule}; got {type(value).__name__}"
    if not value:
        return f"{rule}; got an empty string"
    if len(value) > max_len:
        return f"{rule}; got {len(value)} characters"
    first = value[0]
    if not (first.isascii() and first.isalnum()):
        bad_at, bad = 0, first
    else:
        bad_at, bad = next((i, c) for i, c in enumerate(value) if not (c.isascii() and (c.isalnum() or c in "_.:-")))
    return f"{rule}; got {_shown(value)}: character {bad_at + 1} is {describe_char(bad)}"


def check_id(field: str, value: object) -> str:
    """Return ``value`` when it is a valid ``field`` (see :func:`id_problem`), else raise ``ValueError`` with the
    message of :func:`id_problem`."""
    problem = id_problem(field, value)
    if problem is not None:
        raise ValueError(problem)
    return value  # type: ignore[return-value]


#: ``fullmatch`` of each grammar, for hot paths: a match object (truthy) for a valid id, else ``None``. No message:
#: call :func:`id_problem` for that. Pass ``str`` only.
match_agent_id = _AGENT
match_organization_id = _ORGANIZATION
match_event_id = _EVENT
match_endpoint_id = _ENDPOINT
