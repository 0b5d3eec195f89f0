"""Webhook URLs: one parse, one normal form, refused when they cannot be sent as written.

Source: issue 10, finding 8 (a URL with CR/LF or spaces was stored as written and sent as something else);
RFC 3986, sections 6.2.2 and 6.2.3 (normalisation). The store normalises every URL it writes with
:func:`normalize_webhook_url`, so the API, the CLI and any other writer store the form the sender requests.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import urlsplit

import yarl

from bus.names import describe_char

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
    rules (public hosts) are checked separately (:func:`dispatcher.rules.ssrf.check_webhook_url`); the store applies
    both to every URL it writes (:meth:`dispatcher.store.database.Store.check_url`)."""
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
