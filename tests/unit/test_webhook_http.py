"""The sender's HTTP client (dispatcher/delivery/webhook_http.py) against real servers on 127.0.0.1: aiohttp's for
ordinary responses, raw asyncio servers for the framings and failures aiohttp will not produce, and the SSRF guard's
connect-time checks (names resolved by a stub, connections refused without network I/O unless to 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ssl
from collections.abc import Awaitable, Callable

import pytest
import yarl
from aiohttp import web

from dispatcher.delivery.webhook_http import LocalRequestError, WebhookHTTPClient, WebhookHTTPError
from dispatcher.rules.ssrf import BlockedAddressError, GuardedResolver
from tests.helpers import wait_until
from tests.unit.test_ssrf import LOOPBACK_ALLOW, CountingServer, SilentResolver, StubResolver, _self_signed

pytestmark = pytest.mark.timeout(30)


class LoopbackOnlyClient(WebhookHTTPClient):
    """Records every address it is asked to connect to and refuses, without network I/O, any but 127.0.0.1."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attempts: list[str] = []

    async def _open(self, target, key, context, host):  # noqa: ANN001
        self.attempts.append(target["host"])
        if target["host"] != "127.0.0.1":
            raise OSError(errno.ENETUNREACH, f"test client: not leaving 127.0.0.1 ({target['host']})")
        return await super()._open(target, key, context, host)


@contextlib.asynccontextmanager
async def aiohttp_server(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_server(script: Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]):
    """A TCP server whose connection handler is ``script(reader, writer, n)`` (``n``: 0 for the first
    connection, 1 for the second...). Yields (port, accepted connections counter list)."""
    accepted: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = len(accepted)
        accepted.append(n)
        try:
            await script(reader, writer, n)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return head, await reader.readexactly(length)


def client(**kwargs) -> WebhookHTTPClient:
    return WebhookHTTPClient(None, timeout_s=kwargs.pop("timeout_s", 3.0), **kwargs)


async def test_post_sends_the_body_and_headers_and_reuses_the_connection():
    seen = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.method, request.raw_path, request.headers.get("Host"), dict(request.headers),
                     await request.read()))
        return web.Response(text="thanks", headers={"Retry-After": "7"})

    async with aiohttp_server(handler) as port:
        c = client()
        url = yarl.URL(f"http://127.0.0.1:{port}/hooks/a%20b?x=1&y=%2F")
        for _ in range(20):
            result = await c.post(url, b'{"event": "x"}', {"Content-Type": "application/json", "webhook-id": "evt_1"})
            assert result == (200, b"thanks", "7", False, None)
        await c.close()
    assert c.connections_opened == 1, "keep-alive: one connection for 20 sequential POSTs"
    method, path_qs, host, headers, body = seen[0]
    assert (method, path_qs, host, body) == ("POST", url.raw_path_qs, f"127.0.0.1:{port}", b'{"event": "x"}')
    assert path_qs.startswith("/hooks/a%20b?x=1&y=")  # as yarl normalized it, like aiohttp would send it
    assert headers["Content-Type"] == "application/json" and headers["webhook-id"] == "evt_1"
    assert headers["Content-Length"] == "14"


async def test_concurrent_posts_open_one_connection_each_and_keep_them():
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return web.Response(status=204)

    async with aiohttp_server(handler) as port:
        c = client()
        url = yarl.URL(f"http://127.0.0.1:{port}/")
        for _ in range(3):
            results = await asyncio.gather(*(c.post(url, b"{}", {}) for _ in range(8)))
            assert {r.status for r in results} == {204} and {r.excerpt for r in results} == {b""}
        await c.close()
    assert c.connections_opened == 8


async def test_excerpt_is_cut_and_an_oversized_body_closes_the_connection():
    big = b"x" * (200 * 1024)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=big if request.path == "/big" else b"y" * 5000)

    async with aiohttp_server(handler) as port:
        c = client(excerpt_bytes=1024)
        small = await c.post(yarl.URL(f"http://127.0.0.1:{port}/small"), b"{}", {})
        assert small.excerpt == b"y" * 1024  # within excerpt + 64 KiB: read whole, connection kept
        assert (await c.post(yarl.URL(f"http://127.0.0.1:{port}/big"), b"{}", {})).excerpt == b"x" * 1024
        await c.post(yarl.URL(f"http://127.0.0.1:{port}/small"), b"{}", {})
        await c.close()
    assert c.connections_opened == 2  # the oversized body's connection was closed, not drained


async def test_chunked_response_is_decoded_and_the_connection_kept():
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=503)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"busy, ", b"try ", b"later"):
            await response.write(part)
        await response.write_eof()
        return response

    async with aiohttp_server(handler) as port:
        c = client()
        for _ in range(3):
            result = await c.post(yarl.URL(f"http://127.0.0.1:{port}/"), b"{}", {})
            assert result[:3] == (503, b"busy, try later", None)
        await c.close()
    assert c.connections_opened == 1


async def test_informational_responses_are_skipped_and_close_delimited_bodies_read():
    async def script(reader, writer, n):  # noqa: ANN001
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                     b"HTTP/1.0 202 Accepted\r\nRetry-After: 3\r\n\r\nno length, ends at close")
        await writer.drain()

    async with raw_server(script) as (port, accepted):
        c = client()
        for _ in range(2):
            assert await c.post(yarl.URL(f"http://127.0.0.1:{port}/"), b"{}", {}) == (
                202, b"no length, ends at close", "3", False, None)
        await c.close()
    assert len(accepted) == 2  # a close-delimited body cannot be followed by another response


async def test_a_keep_alive_connection_closed_by_the_server_is_retried_once_on_a_new_one():
    async def script(reader, writer, n):  # noqa: ANN001
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            if n == 0:
                await read_request(reader)  # the next request on the first connection: closed without an answer
                return

    async with raw_server(script) as (port, accepted):
        c = client()
        c.stale_window_s = 5.0  # the close comes within milliseconds; margin for a loaded machine
        url = yarl.URL(f"http://127.0.0.1:{port}/")
        assert (await c.post(url, b"{}", {})).status == 200
        result = await c.post(url, b"{}", {})  # stale connection, re-sent on a new one
        assert result.status == 200 and result.resent is True, "the re-send is marked for the sender to log"
        assert (await c.post(url, b"{}", {})).resent is False
        await c.close()
    assert c.retried_stale == 1 and len(accepted) == 2


async def test_a_fresh_connection_closed_without_an_answer_is_an_error_not_retried():
    async def script(reader, writer, n):  # noqa: ANN001
        await read_request(reader)

    async with raw_server(script) as (port, accepted):
        c = client()
        with pytest.raises(WebhookHTTPError, match="without answering"):
            await c.post(yarl.URL(f"http://127.0.0.1:{port}/"), b"{}", {})
    assert len(accepted) == 1


async def test_timeout_bounds_the_whole_request_and_drops_the_connection():
    async def script(reader, writer, n):  # noqa: ANN001
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-")  # the head never ends
        await writer.drain()
        await asyncio.sleep(5)

    async with raw_server(script) as (port, _):
        c = client(timeout_s=0.3)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TimeoutError):
            await c.post(yarl.URL(f"http://127.0.0.1:{port}/"), b"{}", {})
        assert loop.time() - start < 1.5
        assert c._idle == {}
        await c.close()


@pytest.mark.parametrize("answer, words", [
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "invalid response from the receiver: Expected HTTP/"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "middle of the response head"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", "switched protocols"),
])
async def test_malformed_responses_are_errors(answer, words):
    async def script(reader, writer, n):  # noqa: ANN001
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    async with raw_server(script) as (port, _):
        c = client()
        with pytest.raises(WebhookHTTPError, match=words):
            await c.post(yarl.URL(f"http://127.0.0.1:{port}/"), b"{}", {})


async def test_header_values_with_line_breaks_are_refused_before_sending():
    c = client()
    with pytest.raises(LocalRequestError, match="line break"):
        await c.post(yarl.URL("http://127.0.0.1:9/"), b"{}", {"traceparent": "00-x\r\nX-Injected: 1"})
    assert c.connections_opened == 0


async def test_connection_refused_is_an_error_naming_the_address():
    async with raw_server(read_request) as (port, _):
        pass  # closed: nothing listens there any more
    with pytest.raises(WebhookHTTPError, match=f"127.0.0.1:{port}"):
        await client().post(yarl.URL(f"http://127.0.0.1:{port}/"), b"{}", {})


# --- hostile receivers (issue 10): strict parsing, bounds, idle bytes, re-sends, local errors ----------------------

async def answer_once(answer: bytes, *, url_path: str = "/", **kwargs):
    """POST once to a raw server that answers ``answer`` and closes; returns (result or exception, accepted)."""
    async def script(reader, writer, n):  # noqa: ANN001
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async with raw_server(script) as (port, accepted):
        c = client(**kwargs)
        try:
            return await c.post(yarl.URL(f"http://127.0.0.1:{port}{url_path}"), b"{}", {}), accepted
        except Exception as exc:  # noqa: BLE001 - returned for the test to check
            return exc, accepted
        finally:
            await c.close()


@pytest.mark.parametrize("answer, words", [
    # obs-fold (RFC 9112, 5.2: a server must not send it; a client must not take it as a header of its own)
    (b"HTTP/1.1 200 OK\r\n Content-Length: 5\r\n\r\nhello", "Unexpected space"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello", "Invalid character in Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\nhelloworld", "Invalid character in Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello", "Invalid header field char"),  # RFC 9112, 5.1
    (b"HTTP/1.1 099 Odd\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "status 099"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nx\r\n", "Chunk size overflow"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", "Duplicate Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "Duplicate Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
     "Transfer-Encoding can't be present with Content-Length"),
    (b"HTTP/1.9 200 OK\r\nContent-Length: 0\r\n\r\n", "Invalid HTTP version"),  # garbage status lines
    (b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", "HTTP/2.0 on an HTTP/1.1 connection"),
    (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", "Missing expected CR"),
    (b"\0" * 4096, "Expected HTTP/"),
    (b"HTTP/1.1 200 OK\r\nX: a\0b\r\nContent-Length: 0\r\n\r\n", "Invalid header value char"),
])
async def test_responses_outside_rfc_9112_are_refused_with_a_readable_error(answer, words):
    outcome, _ = await answer_once(answer)
    assert isinstance(outcome, WebhookHTTPError), f"accepted: {outcome!r}"
    assert str(outcome).startswith("invalid response from the receiver: ") and words in str(outcome)


async def test_an_unknown_transfer_coding_is_not_chunked_the_body_runs_until_close():
    body = b"5\r\nhello\r\n0\r\n\r\n"
    outcome, _ = await answer_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: notchunked\r\n\r\n" + body)
    assert outcome == (200, body, None, False, None)  # RFC 9112, 6.3: not chunked, so read until the close


async def test_informational_responses_are_bounded_in_count_and_in_head_bytes():
    storm = b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    outcome, _ = await answer_once(storm)
    assert isinstance(outcome, WebhookHTTPError) and "more than 16 informational" in str(outcome)
    fat = (b"HTTP/1.1 103 Early Hints\r\nLink: <" + b"a" * 20_000 + b">\r\n\r\n") * 4
    outcome, _ = await answer_once(fat + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(outcome, WebhookHTTPError) and "head is over 65536 bytes" in str(outcome)
    outcome, _ = await answer_once(b"HTTP/1.1 103 Early Hints\r\n\r\n" * 16 + b"HTTP/1.1 204 No Content\r\n\r\n")
    assert outcome.status == 204


async def test_an_endless_header_block_is_cut_at_64_kib():
    async def script(reader, writer, n):  # noqa: ANN001
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Long: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(1000):  # 64 MB at most, stops when the client closes
                writer.write(b"a" * 65536)
                await writer.drain()

    async with raw_server(script) as (port, _):
        c = client()
        with pytest.raises(WebhookHTTPError, match="head is over 65536 bytes"):
            await c.post(yarl.URL(f"http://127.0.0.1:{port}/"), b"{}", {})
        assert c.open_connections == 0


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
async def test_an_endless_or_huge_body_returns_the_status_and_the_excerpt_and_closes(framing):
    head = {"chunked": b"Transfer-Encoding: chunked\r\n", "length": b"Content-Length: 10000000000\r\n",
            "close": b""}[framing]
    sent = []

    async def script(reader, writer, n):  # noqa: ANN001
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n")
        chunk = b"x" * 65536
        if framing == "chunked":
            chunk = b"10000\r\n" + chunk + b"\r\n"
        with contextlib.suppress(ConnectionError):
            for _ in range(2000):  # 128 MB at most: stops when the client closes
                writer.write(chunk)
                sent.append(len(chunk))
                await writer.drain()

    async with raw_server(script) as (port, accepted):
        c = client(excerpt_bytes=1024, timeout_s=10)
        result = await c.post(yarl.URL(f"http://127.0.0.1:{port}/"), b"{}", {})
        assert result == (200, b"x" * 1024, None, False, None)
        assert c.open_connections == 0 and c._idle == {}, "not reusable: closed"
    assert sum(sent) < 64 * 1024 * 1024, "the client stopped reading long before the server stopped writing"


async def test_bytes_arriving_on_an_idle_connection_close_it_and_are_never_read_as_a_response():
    injected = asyncio.Event()

    async def script(reader, writer, n):  # noqa: ANN001
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if n == 0:
            await asyncio.sleep(0.2)  # the connection is idle in the pool by now
            writer.write(b"HTTP/1.1 500 Injected\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            injected.set()
            await reader.read()  # until the client closes
        else:
            await read_request(reader)

    async with raw_server(script) as (port, accepted):
        c = client()
        url = yarl.URL(f"http://127.0.0.1:{port}/")
        assert (await c.post(url, b"{}", {})).status == 200
        await asyncio.wait_for(injected.wait(), 5)
        await wait_until(lambda: c.open_connections == 0, timeout_s=5, what="idle connection closed")
        assert (await c.post(url, b"{}", {})).status == 200, "the injected 500 was read as this POST's response"
        await c.close()
    assert len(accepted) == 2


async def test_a_reused_connection_closed_long_after_the_request_is_not_re_sent():
    async def script(reader, writer, n):  # noqa: ANN001
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # took the second POST, processed it for a second, then closed
        await asyncio.sleep(WebhookHTTPClient.stale_window_s + 0.5)

    async with raw_server(script) as (port, accepted):
        c = client()
        url = yarl.URL(f"http://127.0.0.1:{port}/")
        assert (await c.post(url, b"{}", {})).status == 200
        with pytest.raises(WebhookHTTPError, match="reused connection .* without answering \\(not re-sent\\)"):
            await c.post(url, b"{}", {})
        await c.close()
    assert c.retried_stale == 0 and len(accepted) == 1


async def test_a_trickled_body_after_a_known_status_returns_the_status_not_a_timeout():
    async def script(reader, writer, n):  # noqa: ANN001
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            writer.write(b"z")
            await writer.drain()
            await asyncio.sleep(0.1)

    async with raw_server(script) as (port, _):
        c = client(timeout_s=0.5)
        result = await c.post(yarl.URL(f"http://127.0.0.1:{port}/"), b"{}", {})
        assert result.status == 200 and 1 <= len(result.excerpt) < 100 and set(result.excerpt) == {ord("z")}
        assert result.incomplete == "the response body did not finish within 0.5 s"
        assert c.open_connections == 0


async def test_a_body_cut_by_the_server_keeps_the_status():
    outcome, _ = await answer_once(b"HTTP/1.1 503 Busy\r\nContent-Length: 10\r\nRetry-After: 9\r\n\r\nshort")
    assert outcome == (503, b"short", "9", False, "the server closed the connection in the middle of the response body")


async def test_headers_this_process_cannot_send_are_local_errors():
    c = client()
    with pytest.raises(LocalRequestError, match="'X-Agent' is not ISO-8859-1"):
        await c.post(yarl.URL("http://127.0.0.1:9/"), b"{}", {"X-Agent": "agent-\u202e"})
    with pytest.raises(LocalRequestError, match="NUL"):
        await c.post(yarl.URL("http://127.0.0.1:9/"), b"{}", {"X-Agent": "a\0b"})
    assert c.connections_opened == 0 and issubclass(LocalRequestError, ValueError)


async def test_out_of_file_descriptors_is_a_local_error_not_the_endpoints():
    class NoFds(WebhookHTTPClient):
        async def _open(self, target, key, context, host):  # noqa: ANN001
            raise OSError(errno.EMFILE, "Too many open files")

    c = NoFds(None, timeout_s=2)
    with pytest.raises(LocalRequestError, match="Too many open files"):
        await c.post(yarl.URL("http://127.0.0.1:9/"), b"{}", {})
    assert c.open_connections == 0


async def test_max_connections_caps_open_connections_and_a_waiter_fails_locally_within_its_timeout():
    release = asyncio.Event()

    async def script(reader, writer, n):  # noqa: ANN001
        while True:
            await read_request(reader)
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with raw_server(script) as (port_a, _), raw_server(script) as (port_b, _):
        c = client(max_connections=1, timeout_s=10.0)
        a, b = yarl.URL(f"http://127.0.0.1:{port_a}/"), yarl.URL(f"http://127.0.0.1:{port_b}/")
        first = asyncio.create_task(c.post(a, b"{}", {}))
        await wait_until(lambda: c.connections_opened == 1)
        c.timeout_s = 0.5  # read per POST: the first keeps its 10 s
        with pytest.raises(LocalRequestError, match="no connection slot free within 0.5 s"):
            await c.post(b, b"{}", {})
        c.timeout_s = 10.0
        waiting = asyncio.create_task(c.post(b, b"{}", {}))  # waits for the slot ...
        await asyncio.sleep(0.1)
        release.set()
        assert (await first).status == 200
        assert (await waiting).status == 200  # ... which the idle connection to a gave up
        assert c.connections_opened == 2 and c.open_connections == 1
        await c.close()
    assert c.open_connections == 0


# --- SSRF guard at connect time ----------------------------------------------------------------------------------

@pytest.fixture
async def counting():
    s = await CountingServer().start()
    yield s
    await s.stop()


async def test_names_resolving_to_non_public_addresses_are_refused_before_connecting(counting):
    stub = StubResolver({"hooks.example.test": [["127.0.0.1"]], "mixed.example.test": [["93.184.215.14", "10.0.0.7"]]})
    c = LoopbackOnlyClient(GuardedResolver(stub), timeout_s=3)
    for host, words in (("hooks.example.test", "loopback"), ("mixed.example.test", "private")):
        with pytest.raises(BlockedAddressError, match=words):
            await c.post(yarl.URL(f"http://{host}:{counting.port}/hook"), b"{}", {})
    assert c.attempts == [] and counting.accepts == 0


async def test_allowed_name_connects_to_the_vetted_address_with_its_host_header(counting):
    stub = StubResolver({"hooks.example.test": [["127.0.0.1"]]})
    c = LoopbackOnlyClient(GuardedResolver(stub, allow_cidrs=LOOPBACK_ALLOW), timeout_s=3)
    for _ in range(3):
        assert (await c.post(yarl.URL(f"http://hooks.example.test:{counting.port}/hook"), b"{}", {})).status == 200
    await c.close()
    assert c.attempts == ["127.0.0.1"] and counting.accepts == 1
    assert counting.requests == [(f"hooks.example.test:{counting.port}", "/hook")] * 3


async def test_dns_rebinding_within_the_cache_reuses_only_the_vetted_answer(counting):
    """The first lookup answers a public address (the test client refuses it without network I/O); within the DNS
    cache's lifetime the rebound 127.0.0.1 is never looked up, and after it the guard refuses it."""
    stub = StubResolver({"rebind.example.test": [["93.184.215.14"], ["127.0.0.1"]]})
    c = LoopbackOnlyClient(GuardedResolver(stub), timeout_s=3, dns_ttl_s=60)
    url = yarl.URL(f"http://rebind.example.test:{counting.port}/hook")
    for _ in range(2):
        with pytest.raises(WebhookHTTPError, match="not leaving"):
            await c.post(url, b"{}", {})
    assert stub.calls == {"rebind.example.test": 1} and c.attempts == ["93.184.215.14"] * 2
    c._dns.clear()  # the cache expired
    with pytest.raises(BlockedAddressError, match="loopback"):
        await c.post(url, b"{}", {})
    assert counting.accepts == 0


async def test_a_silent_name_server_is_the_endpoints_failure_and_a_full_lookup_pool_a_local_one():
    stub = SilentResolver({}, silent={"silent.example.test", "other.example.test"})
    c = LoopbackOnlyClient(GuardedResolver(stub, max_lookups=1, lookup_timeout_s=0.3), timeout_s=3)
    with pytest.raises(WebhookHTTPError, match="cannot resolve silent.example.test: .*timed out after 0.3 s"):
        await c.post(yarl.URL("http://silent.example.test/hook"), b"{}", {})
    with pytest.raises(LocalRequestError, match="no DNS lookup slot free"):  # the silent lookup still holds it
        await c.post(yarl.URL("http://other.example.test/hook"), b"{}", {})
    stub.answer.set()
    assert c.attempts == []


async def test_tls_uses_the_name_for_sni_and_certificate_checks(tmp_path):
    cert_pem, key_pem = _self_signed("hooks.example.test")
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    trusting = ssl.create_default_context(cadata=cert_pem.decode())
    server = await CountingServer().start(server_ctx)
    try:
        stub = StubResolver({"hooks.example.test": [["127.0.0.1"]], "other.example.test": [["127.0.0.1"]]})
        guard = GuardedResolver(stub, allow_cidrs=LOOPBACK_ALLOW)
        c = LoopbackOnlyClient(guard, timeout_s=3, ssl_context=trusting)
        assert (await c.post(yarl.URL(f"https://hooks.example.test:{server.port}/h"), b"{}", {})).status == 200
        with pytest.raises(WebhookHTTPError, match="certificate"):  # the certificate names another host
            await c.post(yarl.URL(f"https://other.example.test:{server.port}/h"), b"{}", {})
        with pytest.raises(WebhookHTTPError, match="certificate"):  # default trust store: self-signed refused
            await LoopbackOnlyClient(guard, timeout_s=3).post(
                yarl.URL(f"https://hooks.example.test:{server.port}/h"), b"{}", {})
        await c.close()
    finally:
        await server.stop()
    assert server.sni[0] == "hooks.example.test"
    assert server.requests == [(f"hooks.example.test:{server.port}", "/h")]
