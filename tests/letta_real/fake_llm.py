"""A fake OpenAI-compatible LLM for the real Letta server: ``GET /v1/models``, ``POST /v1/chat/completions``
(non-streaming), ``POST /v1/embeddings``, in a thread of its own on 127.0.0.1:0 (aiohttp).

What it answers is driven by directives in the conversation's last user message (Letta wraps the text, so they are
found anywhere in it):

* none: a plain text answer ``Echo: <text>`` (Letta's ``letta_v1_agent`` ends the turn: one step);
* ``[[tool:<name> <json args>]]``: a tool call to ``<name>`` (Letta executes it and asks again: the answer to a
  conversation ending in a tool result is plain text, so the turn has two steps);
* ``[[fail]]``: HTTP 500 (the OpenAI SDK retries twice: three requests, then Letta records a failed step);
* ``[[slow:<seconds>]]``: wait that long before answering (at most 30 s).

Every answer carries ``Connection: close``: Letta 0.16.8 creates an OpenAI client per call and never closes it
(see ../shared/letta-0.16.8/README.md). Token counts are deterministic: prompt = characters / 4, completion =
characters of the answer / 4 + 1. :attr:`FakeLLM.requests` records each chat request's body.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any

from aiohttp import web

MODEL = "fake-model"
_TOOL = re.compile(r"\[\[tool:([A-Za-z_][A-Za-z0-9_]*) (\{.*?\})\]\]")
_SLOW = re.compile(r"\[\[slow:([0-9.]+)\]\]")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _unescape(text: str) -> str:
    """Letta may JSON-wrap the user's text: undo one level of escaping so directives read as typed."""
    return text.replace('\\"', '"')


class FakeLLM:
    """The fake LLM server. ``start()`` returns once it listens (:attr:`url`); ``stop()`` stops it."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._calls = 0

    def start(self) -> "FakeLLM":
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="fake-llm", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake LLM did not start within 10 s")
        return self

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - aiohttp exposes no public getter
        self.url = f"http://127.0.0.1:{port}"
        ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = self._thread = None

    @staticmethod
    def _json(body: dict[str, Any], status: int = 200) -> web.Response:
        return web.json_response(body, status=status, headers={"Connection": "close"})

    async def _models(self, request: web.Request) -> web.Response:
        return self._json({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 1_700_000_000, "owned_by": "letta-bus-tests",
             "context_window": 30000},
        ]})

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [((i + j) % 7) / 7.0 for j in range(1536)]}
                for i, _ in enumerate(inputs)]
        return self._json({"object": "list", "data": data, "model": body.get("model", "text-embedding-3-small"),
                           "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        last_user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        said = _unescape(_text(last_user.get("content")))
        if (slow := _SLOW.search(said)) and last.get("role") != "tool":
            await asyncio.sleep(min(30.0, float(slow.group(1))))
        if "[[fail]]" in said:
            return self._json({"error": {"message": "fake LLM: failure on request", "type": "server_error"}}, 500)
        prompt_tokens = sum(len(json.dumps(m)) for m in messages) // 4
        self._calls += 1
        tool = _TOOL.search(said)
        if tool and last.get("role") != "tool":
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{self._calls:06d}", "type": "function",
                "function": {"name": tool.group(1), "arguments": tool.group(2)},
            }]}
            finish, answer = "tool_calls", tool.group(0)
        else:
            answer = "Done." if last.get("role") == "tool" else f"Echo: {said[:200]}"
            message = {"role": "assistant", "content": answer}
            finish = "stop"
        completion_tokens = len(answer) // 4 + 1
        return self._json({
            "id": f"chatcmpl-{self._calls}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", MODEL),
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })
