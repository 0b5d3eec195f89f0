"""A stand-in for the Letta REST endpoints the bridge reads, as a real aiohttp server on 127.0.0.1:0.

Responses follow Letta's published API schemas (letta-ai/letta-python ``letta_client.types``: ``Step``,
``agents.Run``, ``runs.UsageRetrieveResponse``; letta-ai/letta ``letta/schemas/job.py``: ``Job``), with every field
present as a real server sends it (``null`` where unset). Auth: ``Authorization: Bearer <token>`` or 401, as a Letta
server with a password answers.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web


def letta_id(prefix: str) -> str:
    """``<prefix>-<uuid4>``, Letta's id format."""
    return f"{prefix}-{uuid.uuid4()}"


ORG_ID = "org-00000000-0000-4000-8000-000000000000"


def make_step(**fields: Any) -> dict[str, Any]:
    """A complete Letta ``Step`` (status ``success``) with one assistant message carrying a tool call; ``fields``
    override or remove (value ``...``) any key."""
    def given(key: str, default: Any) -> Any:
        value = fields.get(key, default)
        return None if value is ... else value

    step_id = given("id", letta_id("step"))
    agent_id = given("agent_id", letta_id("agent"))
    run_id = given("run_id", letta_id("run"))
    step: dict[str, Any] = {
        "id": step_id, "origin": None, "organization_id": ORG_ID,
        "provider_id": letta_id("provider"), "provider_name": "openai", "provider_category": "base",
        "model": "gpt-4o-mini", "model_endpoint": "https://api.openai.com/v1", "model_handle": "openai/gpt-4o-mini",
        "context_window_limit": 128000, "completion_tokens": 42, "prompt_tokens": 1200, "total_tokens": 1242,
        "completion_tokens_details": {"reasoning_tokens": 0},
        "prompt_tokens_details": {"cached_tokens": 0, "cache_read_tokens": 0, "cache_creation_tokens": 0},
        "cached_input_tokens": None, "cache_write_tokens": None, "reasoning_tokens": None,
        "stop_reason": "end_turn", "tags": [], "tid": None, "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "run_id": run_id, "agent_id": agent_id, "project_id": None, "request_id": None, "feedback": None,
        "status": "success", "error_type": None, "error_data": None,
        "messages": [{
            "id": letta_id("message"), "role": "assistant", "agent_id": agent_id, "model": "gpt-4o-mini",
            "content": [{"type": "reasoning", "reasoning": "User greeted me.", "is_native": True, "signature": None}],
            "tool_calls": [{"id": "call_9f2c", "type": "function",
                            "function": {"name": "send_message", "arguments": "{\"message\": \"Hello!\"}"}}],
            "tool_call_id": None, "step_id": step_id, "run_id": run_id, "otid": None, "tool_returns": [],
            "group_id": None, "sender_id": None, "batch_item_id": None, "is_err": None, "approval_request_id": None,
            "approve": None, "denial_reason": None, "approvals": None, "conversation_id": None, "name": None,
            "created_at": "2026-01-01T12:00:01.000000Z", "updated_at": None, "created_by_id": None,
            "last_updated_by_id": None,
        }],
    }
    for key, value in fields.items():
        if value is ...:
            step.pop(key, None)
        else:
            step[key] = value
    return step


def make_failed_step(**fields: Any) -> dict[str, Any]:
    """A step Letta's ``update_step_error_async`` left: status ``failed``, ``error_type``, ``error_data``."""
    return make_step(**{
        "status": "failed", "stop_reason": "llm_api_error", "completion_tokens": 0, "prompt_tokens": 1200,
        "total_tokens": 1200, "messages": [], "error_type": "RateLimitError",
        "error_data": {"message": "Rate limit reached for gpt-4o-mini", "traceback": "Traceback (most recent ...)",
                       "details": {"provider": "openai", "status_code": 429}},
        **fields,
    })


def make_run(**fields: Any) -> dict[str, Any]:
    """A complete Letta ``Run`` (``agents.Run``), status ``completed``."""
    run = {
        "id": letta_id("run"), "agent_id": letta_id("agent"), "background": False, "base_template_id": None,
        "callback_error": None, "callback_sent_at": None, "callback_status_code": None, "callback_url": None,
        "completed_at": "2026-01-01T12:00:03.120000", "conversation_id": None,
        "created_at": "2026-01-01T12:00:00.000000", "metadata": {}, "status": "completed",
        "stop_reason": "end_turn", "total_duration_ns": 3120000000, "ttft_ns": 410000000,
        "request_config": {"use_assistant_message": True, "assistant_message_tool_name": "send_message",
                           "assistant_message_tool_kwarg": "message", "include_return_message_types": None},
    }
    run.update(fields)
    return run


def make_usage(**fields: Any) -> dict[str, Any]:
    """``GET /v1/runs/{run_id}/usage``: ``UsageRetrieveResponse``."""
    usage = {"completion_tokens": 84, "prompt_tokens": 2400, "total_tokens": 2484,
             "completion_tokens_details": {"reasoning_tokens": 0},
             "prompt_tokens_details": {"cache_creation_tokens": 0, "cache_read_tokens": 0, "cached_tokens": 0}}
    usage.update(fields)
    return usage


def make_job(**fields: Any) -> dict[str, Any]:
    """A complete Letta ``Job`` (letta/schemas/job.py), a finished batch job."""
    job = {
        "id": letta_id("job"), "status": "completed", "created_at": "2026-01-01T12:00:00",
        "completed_at": "2026-01-01T12:00:09", "metadata": {}, "job_type": "batch", "callback_url": None,
        "callback_sent_at": None, "callback_status_code": None, "callback_error": None, "ttft_ns": None,
        "total_duration_ns": None, "user_id": letta_id("user"), "organization_id": ORG_ID,
        "created_by_id": None, "last_updated_by_id": None, "updated_at": None,
    }
    job.update(fields)
    return job


class LettaStandIn:
    """``GET /v1/steps/{id}``, ``/v1/runs/{id}``, ``/v1/runs/{id}/usage``, ``/v1/jobs/{id}`` from the dicts
    :attr:`steps`, :attr:`runs`, :attr:`usages`, :attr:`jobs`; 404 ``{"detail": ...}`` for unknown ids (as Letta's
    NoResultFound handler answers). :attr:`fail` maps a path to a status to answer instead (e.g. 500);
    :attr:`requests` records ``(path, headers)`` of every request."""

    def __init__(self, token: str = "letta-secret-token") -> None:
        self.token = token
        self.steps: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.usages: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.fail: dict[str, int] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "LettaStandIn":
        app = web.Application()
        app.router.add_get("/v1/steps/{id}", self._lookup(self.steps, "Step"))
        app.router.add_get("/v1/runs/{id}/usage", self._lookup(self.usages, "Run"))
        app.router.add_get("/v1/runs/{id}", self._lookup(self.runs, "Run"))
        app.router.add_get("/v1/jobs/{id}", self._lookup(self.jobs, "Job"))
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the bound port
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _lookup(self, table: dict[str, dict], kind: str):  # noqa: ANN202
        async def handle(request: web.Request) -> web.Response:
            self.requests.append((request.path, dict(request.headers)))
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                return web.json_response({"detail": "Unauthorized"}, status=401)
            if request.path in self.fail:
                return web.json_response({"detail": "Internal server error"}, status=self.fail[request.path])
            item = table.get(request.match_info["id"])
            if item is None:
                return web.json_response({"detail": f"{kind} with id {request.match_info['id']} not found"},
                                         status=404)
            return web.json_response(item)

        return handle
