"""Reads from a Letta server's REST API: the few calls the bridge needs (httpx; control-plane HTTP).

Source: Letta's published API (letta-ai/letta-python ``letta_client``, generated from the server's OpenAPI spec):

* ``GET /v1/steps/{step_id}`` -> ``Step``: ``id``, ``agent_id``, ``run_id`` (``job_id`` on older servers),
  ``status`` (``pending`` | ``success`` | ``failed`` | ``cancelled``; absent on older servers), ``completion_tokens``,
  ``prompt_tokens``, ``total_tokens``, ``stop_reason``, ``error_type``, ``error_data`` (``message``, ``traceback``,
  ``details``), ``model``, ``provider_name``, ``project_id``, ``trace_id``, ``organization_id`` (server schema),
  ``messages`` (deprecated; each may carry OpenAI-shaped ``tool_calls``).
* ``GET /v1/runs/{run_id}`` -> ``Run``: ``id``, ``agent_id``, ``status``, ``completed_at``, ``stop_reason``,
  ``metadata``.
* ``GET /v1/runs/{run_id}/usage`` -> ``completion_tokens``, ``prompt_tokens``, ``total_tokens`` (+ details).
* ``GET /v1/runs/{run_id}/steps`` -> ``[Step]``, oldest first (the run's ``organization_id`` is only there).
* ``GET /v1/steps/{step_id}/messages`` -> ``[LettaMessage]`` (``message_type`` ``tool_call_message`` carries
  ``tool_calls[]``); ``[]`` until Letta has saved the step's messages, a moment after its step webhook.
* ``GET /v1/admin/users/`` -> ``[User]`` with ``organization_id`` (a job names only its ``user_id``).
* ``GET /v1/jobs/{job_id}`` -> ``Job``: ``id``, ``status``, ``completed_at``, ``metadata``, ``job_type``,
  ``organization_id``.

Authentication: ``Authorization: Bearer <letta_token>`` when set; the acting user is chosen with the ``user_id``
header (Letta's routers read ``Header(alias="user_id")``; unset: the server's default user).
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from config.settings import Settings

#: Letta ids are ``<prefix>-<uuid4>``; anything that could change the request path is refused before the request.
LETTA_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class LettaError(Exception):
    """A Letta REST read failed. ``status``: Letta's HTTP status, or ``None`` for a transport error/timeout."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LettaNotFound(LettaError):
    """Letta does not know the id: 404 (no such step, run or job for this token and user), or 400/422 (Letta 0.16
    answers those for an id of the wrong kind or form, e.g. ``GET /v1/runs/<unknown>`` is 400)."""


class LettaClient:
    """Async reads from one Letta server (``settings.letta_base_url``), one keep-alive pool.

    Each method returns Letta's JSON object as a ``dict`` (lists: a ``list``). Raises :class:`LettaNotFound` for
    404, 400 and 422,
    :class:`LettaError` for any other non-2xx answer, a non-object body, a timeout (``letta_timeout_s`` seconds) or
    a connection error, and ``ValueError`` for an id that is not a Letta id (``LETTA_ID_RE``).
    """

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Accept": "application/json", "User-Agent": "letta-bus-bridge/1.0"}
        if settings.letta_token is not None and settings.letta_token.get_secret_value():
            headers["Authorization"] = f"Bearer {settings.letta_token.get_secret_value()}"
        if settings.letta_user_id:
            headers["user_id"] = settings.letta_user_id
        self.base_url = settings.letta_base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=settings.letta_timeout_s,
                                       follow_redirects=False, transport=transport)

    async def get_step(self, step_id: str) -> dict[str, Any]:
        """``GET /v1/steps/{step_id}``: Letta's ``Step``."""
        return await self._get("steps", step_id)

    async def get_run(self, run_id: str) -> dict[str, Any]:
        """``GET /v1/runs/{run_id}``: Letta's ``Run``."""
        return await self._get("runs", run_id)

    async def get_run_usage(self, run_id: str) -> dict[str, Any]:
        """``GET /v1/runs/{run_id}/usage``: ``completion_tokens``, ``prompt_tokens``, ``total_tokens``."""
        return await self._get("runs", run_id, "/usage")

    async def get_run_steps(self, run_id: str) -> list[Any]:
        """``GET /v1/runs/{run_id}/steps``: the run's ``Step`` list, oldest first."""
        return await self._get("runs", run_id, "/steps", expect=list)

    async def get_step_messages(self, step_id: str) -> list[Any]:
        """``GET /v1/steps/{step_id}/messages``: the step's messages (``[]`` while Letta has not saved them)."""
        return await self._get("steps", step_id, "/messages", expect=list)

    async def get_job(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{job_id}``: Letta's ``Job``."""
        return await self._get("jobs", job_id)

    async def get_users(self) -> list[Any]:
        """``GET /v1/admin/users/``: Letta's users (``id``, ``organization_id``)."""
        return await self._get("admin", "users", "/", expect=list)

    async def _get(self, collection: str, letta_id: str, suffix: str = "", *, expect: type = dict) -> Any:
        if not isinstance(letta_id, str) or not LETTA_ID_RE.fullmatch(letta_id):
            raise ValueError(f"{letta_id!r} is not a Letta id (letters, digits, '-', '_'; e.g. 'step-<uuid>')")
        path = f"/v1/{collection}/{letta_id}{suffix}"
        try:
            response = await self._http.get(path)
        except httpx.TimeoutException:
            raise LettaError(f"GET {self.base_url}{path}: no answer within the timeout (LETTA_BUS_LETTA_TIMEOUT_S)") \
                from None
        except httpx.HTTPError as exc:
            raise LettaError(f"GET {self.base_url}{path}: {type(exc).__name__}: {exc} "
                             "(is LETTA_BUS_LETTA_BASE_URL the Letta server?)") from None
        if response.status_code in (400, 404, 422):
            raise LettaNotFound(f"GET {self.base_url}{path}: {response.status_code}, Letta has no such "
                                f"{collection[:-1]}", response.status_code)
        if response.status_code in (401, 403):
            raise LettaError(f"GET {self.base_url}{path}: {response.status_code}: check LETTA_BUS_LETTA_TOKEN "
                             "(and LETTA_BUS_LETTA_USER_ID)", response.status_code)
        if not 200 <= response.status_code < 300:
            raise LettaError(f"GET {self.base_url}{path}: HTTP {response.status_code}: {response.text[:200]}",
                             response.status_code)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, expect):
            raise LettaError(f"GET {self.base_url}{path}: the answer is not a JSON {expect.__name__}",
                             response.status_code)
        return body

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()
