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

from dispatcher.delivery.webhook_http import WebhookHTTPClient, WebhookHTTPError
from dispatcher.rules.ssrf import BlockedAddressError, GuardedResolver
from tests.unit.test_ssrf import LOOPBACK_ALLOW, CountingServer, StubResolver, _self_signed

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
            assert result == (200, b"thanks", "7")
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
            assert await c.post(yarl.URL(f"http://127.0.0.1:{port}/"), b"{}", {}) == (503, b"busy, try later", None)
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
                202, b"no length, ends at close", "3")
        await c.close()
    assert len(accepted) == 2  # a close-delimited body cannot be followed by another response


async def test_a_keep_alive_connection_closed_by_the_server_is_retried_once_on_a_new_one():
    async def script(reader, writer, n):  # noqa: ANN001
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # the next request on this connection: closed without an answer

    async with raw_server(script) as (port, accepted):
        c = client()
        url = yarl.URL(f"http://127.0.0.1:{port}/")
        assert (await c.post(url, b"{}", {})).status == 200
        assert (await c.post(url, b"{}", {})).status == 200  # stale connection, retried on a new one
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
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nslow")  # 6 bytes never come
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
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x response"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "middle of the response body"),
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
    with pytest.raises(ValueError, match="line break"):
        await c.post(yarl.URL("http://127.0.0.1:9/"), b"{}", {"traceparent": "00-x\r\nX-Injected: 1"})
    assert c.connections_opened == 0


async def test_connection_refused_is_an_error_naming_the_address():
    async with raw_server(read_request) as (port, _):
        pass  # closed: nothing listens there any more
    with pytest.raises(WebhookHTTPError, match=f"127.0.0.1:{port}"):
        await client().post(yarl.URL(f"http://127.0.0.1:{port}/"), b"{}", {})


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
