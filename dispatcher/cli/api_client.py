"""The CLI's client of the management API (httpx): base URL and key from the settings.

Base URL: ``LETTA_BUS_API_URL``, else ``http://<LETTA_BUS_API_HOST>:<LETTA_BUS_API_PORT>``. Key: the first of
``LETTA_BUS_API_KEYS``, else the development key file (``LETTA_BUS_API_KEY_FILE``, ``./var/api.key``).
"""

from __future__ import annotations

from typing import Any

import httpx

from config.settings import Settings


class ApiUnreachable(ConnectionError):
    """Nothing answers at the API's address (connection refused or timed out)."""


class ApiError(Exception):
    """The API answered with an error status. ``status`` is the HTTP status; ``detail`` FastAPI's detail (a
    message, or for 422 a list of ``{"loc": [...], "msg": ...}``)."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """One line per problem; 422 errors name their field (``url: ...``, ``events[0]: ...``)."""
        if isinstance(self.detail, list):
            lines = []
            for e in self.detail:
                loc = [str(p) for p in e.get("loc", []) if p not in ("body", "query", "path")]
                field = loc[0] + "".join(f"[{p}]" for p in loc[1:]) if loc else "request"
                lines.append(f"{field}: {e.get('msg')}")
            return "; ".join(lines)
        return str(self.detail)


def api_key(settings: Settings) -> str | None:
    """The key the CLI sends, or None when none is configured nor in the key file."""
    if settings.api_keys:
        return settings.api_keys[0].get_secret_value()
    try:
        return settings.api_key_file.read_text().strip() or None
    except OSError:
        return None


class ApiClient:
    """Synchronous calls to the API. ``call`` returns the decoded JSON body (None for 204). Raises
    :class:`ApiUnreachable` or :class:`ApiError`."""

    def __init__(self, settings: Settings, timeout_s: float = 30.0) -> None:
        self.base_url = settings.api_base_url
        key = api_key(settings)
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s, trust_env=False,
                                    headers={"Authorization": f"Bearer {key}"} if key else {})

    def __enter__(self) -> "ApiClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def call(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        """One request; ``params`` with None values are left out."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            resp = self._client.request(method, path, json=json, params=query)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ApiUnreachable(f"no letta-bus API at {self.base_url} ({exc}): start `letta-bus up`, or set "
                                 "LETTA_BUS_API_URL") from None
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise ApiError(resp.status_code, detail)
        return None if resp.status_code == 204 or not resp.content else resp.json()
