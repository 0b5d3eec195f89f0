"""Input checks that need more than a schema (the settings' SSRF rules, the event catalog), reported as 422
errors in FastAPI's own shape: ``{"detail": [{"loc": ["body", "<field>"], "msg": "...", "type": "value_error"}]}``."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from urllib.parse import urlsplit

import yarl
from fastapi.exceptions import RequestValidationError

from bus.catalog import CATALOG
from bus.names import describe_char
from dispatcher.ops.ping import TEST_EVENT_TYPE
from dispatcher.rules.matching import check_pattern, pattern_matches
from dispatcher.store.database import Store, check_scope, check_secret

KNOWN_EVENT_TYPES = (*CATALOG, TEST_EVENT_TYPE)

#: Longest webhook URL accepted, as given and once normalised (percent-encoding can make it longer).
MAX_URL_CHARS = 2048
#: Characters refused anywhere in a URL: controls (CR/LF/NUL/tab...), format characters (U+202E, zero width...),
#: separators (space, NBSP, U+2028): they cannot be sent as written, only silently dropped or re-encoded.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: A host name as sent (lowercase, IDNA-encoded): DNS labels (underscores tolerated, as some internal names have).
_HOST_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*\.?")


def normalize_webhook_url(url: str) -> str:
    """Parse a webhook URL once and return the form to store, which is exactly what the sender requests (it
    parses the stored string with yarl again; the result is the same string: normalising is idempotent).

    Normal form (RFC 3986, section 6.2.2-6.2.3, as yarl applies it): scheme and host lowercased, a non-ASCII host
    IDNA-encoded (``bücher.de`` -> ``xn--bcher-kva.de``), the default port dropped (``:443`` for https, ``:80``
    for http), an empty path made ``/``, dot segments removed, percent-escapes of unreserved characters decoded
    (``%7e`` -> ``~``) and the others uppercased (``%2f`` -> ``%2F``), non-ASCII path and query characters
    percent-encoded as UTF-8.

    Refused (``ValueError`` whose message starts with ``url <value>:`` and says the fix): any control, format or
    space character (CR, LF, NUL, tab, space, U+202E, ...): percent-encode them; a backslash; a fragment
    (``#...``, never sent); a ``%`` not followed by two hex digits; a scheme other than http/https; no host;
    userinfo (``user:pass@host``; the URL is shown in API answers, CLI tables and logs, and ``a.com@b.com``
    reads as a.com while it goes to b.com: receivers authenticate letta-bus by the signing secret instead); a
    port outside 1-65535; more than :data:`MAX_URL_CHARS` characters, before or after normalising. The SSRF
    rules (public hosts) are checked separately (:meth:`dispatcher.store.database.Store.check_url`)."""
    shown = repr(url if len(url) <= 200 else url[:200] + "...")
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"url {shown}: longer than {MAX_URL_CHARS} characters")
    for i, ch in enumerate(url):
        if ch == "\\":
            raise ValueError(f"url {shown}: character {i + 1} is a backslash; use '/' (or %5C for a literal one)")
        if ord(ch) <= 0x20 or ord(ch) == 0x7F or (not ch.isascii()
                                                  and unicodedata.category(ch) in _REFUSED_CATEGORIES):
            escaped = "".join(f"%{b:02X}" for b in ch.encode())
            raise ValueError(f"url {shown}: character {i + 1} is {describe_char(ch)}, which cannot be sent as "
                             f"written; percent-encode it ({escaped}) or remove it")
    if "#" in url:
        raise ValueError(f"url {shown}: has a fragment ('#...'), which is never sent to the receiver; remove it")
    if (bad := _BAD_PERCENT.search(url)) is not None:
        raise ValueError(f"url {shown}: '%' at character {bad.start() + 1} is not followed by two hex digits; "
                         "write %25 for a literal '%'")
    try:
        parsed = yarl.URL(url)
        parsed.port  # noqa: B018 - yarl checks the port range when it is read
    except (ValueError, UnicodeError) as exc:
        raise ValueError(f"url {shown}: not a valid URL ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"url {shown}: scheme must be http or https, e.g. https://example.com/hooks/letta")
    if not parsed.raw_host:
        raise ValueError(f"url {shown}: a host is required, e.g. https://example.com/hooks/letta")
    if parsed.raw_user is not None or parsed.raw_password is not None or "@" in urlsplit(url).netloc:
        raise ValueError(f"url {shown}: credentials in the URL are not allowed; receivers verify the signing "
                         "secret instead (webhook-signature / X-Letta-Signature)")
    if parsed.explicit_port == 0:
        raise ValueError(f"url {shown}: port must be 1-65535")
    host = parsed.raw_host
    if ":" not in host and not _HOST_NAME.fullmatch(host):  # IPv6 literals hold ':'; yarl checked those
        raise ValueError(f"url {shown}: host {host!r} is not a valid host name (letters, digits, '-' and '.')")
    normal = str(parsed)
    if parsed.raw_path == "/" and not parsed.raw_query_string and not normal.endswith("/"):
        normal += "/"  # RFC 3986, section 6.2.3: http://example.com is http://example.com/
    if len(normal) > MAX_URL_CHARS:
        raise ValueError(f"url {shown}: {len(normal)} characters once percent-encoded, over {MAX_URL_CHARS}")
    return normal


def unknown_patterns(patterns: Sequence[str]) -> list[str]:
    """The patterns that match no event type of the catalog (nor ``webhook.test``)."""
    return [p for p in patterns if not any(pattern_matches(p, t) for t in KNOWN_EVENT_TYPES)]


def field_error(field: str, msg: str, where: str = "body") -> RequestValidationError:
    """A 422 naming ``field``."""
    return RequestValidationError([{"loc": (where, field), "msg": msg, "type": "value_error"}])


def check_endpoint_input(store: Store, *, url: str | None = None, events: Sequence[str] | None = None,
                         secret: str | None = None, allow_unknown_events: bool = False, scope: str | None = None,
                         agent_id: str | None = None, organization_id: str | None = None) -> str | None:
    """Validate every given field; returns ``url`` normalised (:func:`normalize_webhook_url`; store that, not the
    input) or ``None`` when no url was given. Raises one ``RequestValidationError`` listing each bad field:
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
            url = normalize_webhook_url(url)
            store.check_url(url)
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
