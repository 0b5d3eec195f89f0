"""A stand-in for the Letta REST endpoints the bridge reads, as a real aiohttp server on 127.0.0.1:0.

Its objects are the JSON the real ``letta==0.16.8`` server answered (tests/fixtures/letta-0.16.8/, captured from
it; tests/unit/test_letta_standin.py checks the stand-in against them key by key), with fresh ids. Jobs have no
captured sample (0.16.8 cannot run a batch with an OpenAI-compatible model): :func:`make_job` follows
``letta/schemas/job.py`` ``Job``. Auth: ``Authorization: Bearer <token>`` or 401, as a Letta with a password
answers.
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

SAMPLES = Path(__file__).parent / "fixtures" / "letta-0.16.8"


def sample(name: str) -> Any:
    """A captured answer of the real server: ``sample("step_get")`` is ``step_get.json``."""
    return json.loads((SAMPLES / f"{name}.json").read_text())


def letta_id(prefix: str) -> str:
    """``<prefix>-<uuid4>``, Letta's id format."""
    return f"{prefix}-{uuid.uuid4()}"


ORG_ID = "org-00000000-0000-4000-8000-000000000000"
USER_ID = "user-00000000-0000-4000-8000-000000000000"


def _override(obj: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` set keys of ``obj``; the value ``...`` removes one."""
    for key, value in fields.items():
        if value is ...:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


def make_step(**fields: Any) -> dict[str, Any]:
    """A Letta ``Step`` as 0.16.8 answers ``GET /v1/steps/{id}`` (status ``success``), fresh ids; ``fields``
    override or remove (value ``...``) any key."""
    step = copy.deepcopy(sample("step_get"))
    step.update(id=letta_id("step"), agent_id=letta_id("agent"), run_id=letta_id("run"))
    return _override(step, fields)


def make_failed_step(**fields: Any) -> dict[str, Any]:
    """A step Letta's ``update_step_error_async`` left (``step_get_failed.json``): status ``failed``,
    ``error_type``, ``error_data{message, traceback, details}``."""
    step = copy.deepcopy(sample("step_get_failed"))
    step.update(id=letta_id("step"), agent_id=letta_id("agent"), run_id=letta_id("run"))
    return _override(step, fields)


def make_messages(step: dict[str, Any], *, tool: str = "conversation_search") -> list[dict[str, Any]]:
    """``GET /v1/steps/{id}/messages`` of a step that called ``tool`` (user, tool call, tool return), ids of
    ``step``."""
    messages = copy.deepcopy(sample("step_messages_get"))
    for message in messages:
        message.update(id=letta_id("message"), step_id=step["id"], run_id=step.get("run_id"))
        for call in [message.get("tool_call"), *(message.get("tool_calls") or [])]:
            if call:
                call["name"] = tool
    return messages


def make_run(**fields: Any) -> dict[str, Any]:
    """A Letta ``Run`` as 0.16.8 answers ``GET /v1/runs/{id}`` (``run_get.json``: completed, async)."""
    run = copy.deepcopy(sample("run_get"))
    run.update(id=letta_id("run"), agent_id=letta_id("agent"))
    return _override(run, fields)


def make_usage(**fields: Any) -> dict[str, Any]:
    """``GET /v1/runs/{run_id}/usage`` (``run_usage_get.json``)."""
    return _override(copy.deepcopy(sample("run_usage_get")), fields)


def make_job(**fields: Any) -> dict[str, Any]:
    """A Letta ``Job`` (letta/schemas/job.py; no captured sample), a finished batch job of the default user."""
    job = {
        "id": letta_id("job"), "status": "completed", "created_at": "2026-01-01T12:00:00",
        "completed_at": "2026-01-01T12:00:09", "metadata": {"job_type": "batch_messages"}, "job_type": "batch",
        "callback_url": None, "callback_sent_at": None, "callback_status_code": None, "callback_error": None,
        "ttft_ns": None, "total_duration_ns": None, "agent_id": None, "background": None, "stop_reason": None,
        "user_id": USER_ID, "created_by_id": None, "last_updated_by_id": None, "updated_at": None,
    }
    return _override(job, fields)


class LettaStandIn:
    """``GET /v1/steps/{id}``, ``/v1/steps/{id}/messages``, ``/v1/runs/{id}``, ``/v1/runs/{id}/usage``,
    ``/v1/runs/{id}/steps``, ``/v1/jobs/{id}``, ``/v1/admin/users/`` from :attr:`steps`, :attr:`messages`,
    :attr:`runs`, :attr:`usages`, :attr:`run_steps`, :attr:`jobs`, :attr:`users`; 404 ``{"detail": ...}`` for
    unknown ids (as Letta's NoResultFound handler answers; a run it does not know is 400 there, as in 0.16.8).
    :attr:`fail` maps a path to a status to answer instead (e.g. 500);
    :attr:`requests` records ``(path, headers)`` of every request."""

    def __init__(self, token: str = "letta-secret-token") -> None:
        self.token = token
        self.steps: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.usages: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.messages: dict[str, list] = {}
        self.run_steps: dict[str, list] = {}
        self.users: list[dict] = sample("admin_users_get")
        self.fail: dict[str, int] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "LettaStandIn":
        app = web.Application()
        app.router.add_get("/v1/steps/{id}/messages", self._lookup(self.messages, "Step"))
        app.router.add_get("/v1/steps/{id}", self._lookup(self.steps, "Step"))
        app.router.add_get("/v1/runs/{id}/usage", self._lookup(self.usages, "Run"))
        app.router.add_get("/v1/runs/{id}/steps", self._lookup(self.run_steps, "Run"))
        app.router.add_get("/v1/runs/{id}", self._lookup(self.runs, "Run", missing=400))
        app.router.add_get("/v1/jobs/{id}", self._lookup(self.jobs, "Job"))
        app.router.add_get("/v1/admin/users/", self._lookup({"": self.users}, "User"))
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the bound port
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _lookup(self, table: dict[str, Any], kind: str, missing: int = 404):  # noqa: ANN202
        async def handle(request: web.Request) -> web.Response:
            self.requests.append((request.path, dict(request.headers)))
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                return web.json_response({"detail": "Unauthorized"}, status=401)
            if request.path in self.fail:
                return web.json_response({"detail": "Internal server error"}, status=self.fail[request.path])
            item = table.get(request.match_info.get("id", ""))
            if item is None:
                return web.json_response({"detail": f"{kind} with id {request.match_info['id']} not found"},
                                         status=missing)
            return web.json_response(item)

        return handle
