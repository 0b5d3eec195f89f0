"""Input checks that need more than a schema (the settings' SSRF rules, the event catalog), reported as 422
errors in FastAPI's own shape: ``{"detail": [{"loc": ["body", "<field>"], "msg": "...", "type": "value_error"}]}``."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi.exceptions import RequestValidationError

from bus.catalog import CATALOG
from dispatcher.ops.ping import TEST_EVENT_TYPE
from dispatcher.rules.matching import check_pattern, pattern_matches
from dispatcher.store.database import Store, check_scope, check_secret

KNOWN_EVENT_TYPES = (*CATALOG, TEST_EVENT_TYPE)


def unknown_patterns(patterns: Sequence[str]) -> list[str]:
    """The patterns that match no event type of the catalog (nor ``webhook.test``)."""
    return [p for p in patterns if not any(pattern_matches(p, t) for t in KNOWN_EVENT_TYPES)]


def field_error(field: str, msg: str, where: str = "body") -> RequestValidationError:
    """A 422 naming ``field``."""
    return RequestValidationError([{"loc": (where, field), "msg": msg, "type": "value_error"}])


def check_endpoint_input(store: Store, *, url: str | None = None, events: Sequence[str] | None = None,
                         secret: str | None = None, allow_unknown_events: bool = False, scope: str | None = None,
                         agent_id: str | None = None, organization_id: str | None = None) -> str | None:
    """Validate every given field; returns ``url`` normalised (:meth:`dispatcher.store.database.Store.check_url`;
    the store writes the same form) or ``None`` when no url was given. Raises one ``RequestValidationError``
    listing each bad field:
    ``url`` (characters, shape, scheme, userinfo, SSRF-blocked host), ``events`` (syntax, or no catalog type
    matches unless ``allow_unknown_events``), ``secret`` (shorter than 16), ``scope`` / ``agent_id`` /
    ``organization_id`` (owner ids that do not fit the scope; their grammar is checked by the schemas)."""
    errors: list[dict] = []

    def add(field: str, msg: str) -> None:
        errors.append({"loc": ("body", field), "msg": msg, "type": "value_error"})

    if scope is not None:
        try:
            check_scope(scope, agent_id, organization_id)
        except ValueError as exc:
            text = str(exc)
            add(text.split(" ", 1)[0] if text.startswith(("agent_id", "organization_id")) else "scope", text)
    if url is not None:
        try:
            url = store.check_url(url)
        except ValueError as exc:
            add("url", str(exc))
    if events is not None:
        for i, pattern in enumerate(events):
            try:
                check_pattern(pattern)
            except ValueError as exc:
                errors.append({"loc": ("body", "events", i), "msg": str(exc), "type": "value_error"})
                continue
            if not allow_unknown_events and unknown_patterns([pattern]):
                errors.append({"loc": ("body", "events", i), "type": "value_error", "msg": (
                    f"webhook_events pattern {pattern!r} matches no known event type ({', '.join(CATALOG)}); "
                    "fix it, or send allow_unknown_events: true for event types Letta will add")})
    if secret is not None:
        try:
            check_secret(secret)
        except ValueError as exc:
            add("secret", str(exc))
    if errors:
        raise RequestValidationError(errors)
    return url
