"""The sender's HTTP client: webhook POSTs over HTTP/1.1 keep-alive connections, SSRF-guarded at connect time.

Why not aiohttp's ``ClientSession`` (DESIGN.md, "HTTP"): one dispatcher process is CPU-bound, and for the same
signed 1 KB POST at concurrency 64 to a local receiver a ``ClientSession`` request costs about 180 us of CPU on the
project's 2-core machine, this client about 70 us (``bench/http_client.py``). A webhook POST needs little of what a
general client does, and this module does only that:

* ``POST <path?query> HTTP/1.1`` with ``Host`` (the URL's host, so virtual hosts and TLS SNI keep the name) and
  ``Content-Length``, the caller's headers (values with CR, LF or NUL are refused) and the body as given.
* One pool of idle connections per origin (scheme, host, port), reused last-in first-out, at most
  ``max_idle_per_origin`` kept, each for at most ``keepalive_s`` seconds. A reused connection that the server
  closed before answering is retried once on a new connection (the usual race with a server's idle timeout); any
  other failure is the caller's to retry.
* Connect-time SSRF guard: a host name is resolved once through ``resolver`` (a :class:`dispatcher.rules.ssrf.
  GuardedResolver`, which refuses non-public answers with :class:`dispatcher.rules.ssrf.BlockedAddressError`) and the
  connection goes to the vetted address; answers are cached ``dns_ttl_s`` seconds (aiohttp's default is 10 s too).
  IP-literal hosts are connected to as they are: the caller vets them first (:func:`dispatcher.rules.ssrf.
  vet_url_for_request`, as with aiohttp, which skips its resolver for literals).
* https: the default SSL context (certificate and hostname verified against the URL's host name).
* The response: status, ``Retry-After``, and at most ``excerpt_bytes`` of the body (``Content-Length``, chunked, or
  until close); a longer body is cut and its connection closed instead of drained. 1xx responses are skipped.
  No redirects are followed, no cookies kept, no proxy used, no decompression done.
* ``timeout_s`` bounds everything from connecting to the last byte read; a connection in an unknown state (timeout,
  cancellation, protocol error) is closed, never reused.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time
from collections.abc import Mapping
from typing import NamedTuple

import yarl
from aiohttp.abc import AbstractResolver

from dispatcher.rules.ssrf import parse_ip_host

_MAX_HEAD = 64 * 1024  # bytes of status line + headers accepted
_DRAIN = 64 * 1024  # bytes of body past the excerpt read to keep a connection reusable


class HttpResult(NamedTuple):
    """One response: ``status``, up to ``excerpt_bytes`` of the body, and the ``Retry-After`` header (or None)."""

    status: int
    excerpt: bytes
    retry_after: str | None


class WebhookHTTPError(Exception):
    """No usable response: the connection failed, was closed early, or the server did not speak HTTP/1.x."""


class _Stale(Exception):
    """A reused connection was closed by the server before any byte of the response."""


class _Connection(asyncio.Protocol):
    __slots__ = ("key", "transport", "buf", "waiter", "closed", "idle_since")

    def __init__(self, key: tuple[str, str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        return False  # close the transport: a response is never followed by a half-open write

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until more data arrives or the connection is lost."""
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def read_exactly(self, n: int) -> bytes:
        buf = self.buf
        while len(buf) < n:
            if self.closed:
                raise WebhookHTTPError("the server closed the connection in the middle of the response body")
            await self.wait()
        data = bytes(buf[:n])
        del buf[:n]
        return data

    async def read_line(self) -> bytes:
        buf = self.buf
        while (end := buf.find(b"\r\n")) < 0:
            if len(buf) > _MAX_HEAD:
                raise WebhookHTTPError("a chunked response line is too long")
            if self.closed:
                raise WebhookHTTPError("the server closed the connection in the middle of the response body")
            await self.wait()
        line = bytes(buf[:end])
        del buf[:end + 2]
        return line


class WebhookHTTPClient:
    """POSTs with a keep-alive pool (see the module docstring). ``await close()`` closes every connection."""

    def __init__(self, resolver: AbstractResolver | None, *, timeout_s: float, excerpt_bytes: int = 16384,
                 max_idle_per_origin: int = 64, keepalive_s: float = 15.0, dns_ttl_s: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.resolver = resolver
        self.timeout_s = timeout_s
        self.excerpt_bytes = excerpt_bytes
        self.max_idle_per_origin = max_idle_per_origin
        self.keepalive_s = keepalive_s
        self.dns_ttl_s = dns_ttl_s
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._dns: dict[tuple[str, int], tuple[float, list[dict]]] = {}
        self._swept = time.monotonic()
        self.connections_opened = 0  # counters for tests and monitoring
        self.retried_stale = 0

    async def post(self, url: yarl.URL, body: bytes, headers: Mapping[str, str]) -> HttpResult:
        """POST ``body`` to ``url``. Raises ``TimeoutError`` after ``timeout_s``, :class:`WebhookHTTPError` when
        no response came, :class:`dispatcher.rules.ssrf.BlockedAddressError` when the guard refused the host's
        addresses, and ``ValueError`` for a URL or header this client cannot send."""
        async with asyncio.timeout(self.timeout_s):
            return await self._post(url, body, headers)

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    async def _post(self, url: yarl.URL, body: bytes, headers: Mapping[str, str]) -> HttpResult:
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"cannot POST to a {scheme or 'relative'} URL: {url}")
        host = url.raw_host
        if not host:
            raise ValueError(f"the URL has no host: {url}")
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        request = _request(url, body, headers)
        now = time.monotonic()
        if now - self._swept > self.keepalive_s:
            self._sweep(now)
        for attempt in range(2):
            conn = self._reuse(key, now)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(scheme, host, port, key)
            try:
                conn.transport.write(request)  # type: ignore[union-attr]
                result, reusable = await self._response(conn)
            except _Stale:
                conn.close()
                if reused and attempt == 0:
                    self.retried_stale += 1
                    continue
                raise WebhookHTTPError("the server closed the connection without answering") from None
            except BaseException:
                conn.close()  # a timeout, a cancellation or a protocol error: the connection's state is unknown
                raise
            if reusable and not conn.closed and not conn.buf:
                self._release(conn)
            else:
                conn.close()
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _reuse(self, key: tuple[str, str, int], now: float) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = collections.deque()
        if len(idle) >= self.max_idle_per_origin:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _sweep(self, now: float) -> None:
        """Close connections idle too long and forget origins without idle connections."""
        self._swept = now
        for key in list(self._idle):
            idle = self._idle[key]
            kept = collections.deque(c for c in idle if not c.closed and now - c.idle_since < self.keepalive_s)
            for conn in idle:
                if conn not in kept:
                    conn.close()
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        for name in [k for k, (expires, _) in self._dns.items() if expires < now]:
            del self._dns[name]

    async def _connect(self, scheme: str, host: str, port: int, key: tuple[str, str, int]) -> _Connection:
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        targets = await self._addresses(host, port)
        failure: BaseException | None = None
        for target in targets:
            try:
                conn = await self._open(target, key, context, host)
            except ssl.SSLCertVerificationError as exc:
                raise WebhookHTTPError(f"TLS certificate of {host} not accepted: {exc.verify_message}") from None
            except OSError as exc:  # try the next vetted address
                failure = exc
                continue
            self.connections_opened += 1
            return conn
        raise WebhookHTTPError(f"cannot connect to {host}:{port}: {failure}")

    async def _open(self, target: dict, key: tuple[str, str, int], context: ssl.SSLContext | None,
                    host: str) -> _Connection:
        """One TCP (and TLS) connection to a vetted ``target`` address; SNI and certificate checks use ``host``."""
        _, conn = await asyncio.get_running_loop().create_connection(
            lambda: _Connection(key), target["host"], target["port"], ssl=context,
            server_hostname=host if context is not None else None, family=target["family"],
            proto=target["proto"], flags=target["flags"])
        return conn  # type: ignore[return-value]

    async def _addresses(self, host: str, port: int) -> list[dict]:
        """Where to connect: an IP literal as it is (vetted by the caller), else the guard's vetted answers."""
        if parse_ip_host(host) is not None:
            return [{"host": host, "port": port, "family": socket.AF_UNSPEC, "proto": 0, "flags": 0}]
        cached = self._dns.get((host, port))
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        if self.resolver is None:
            raise ValueError("a host name needs a resolver (the SSRF guard)")
        answers = [dict(a, flags=socket.AI_NUMERICHOST) for a in
                   await self.resolver.resolve(host, port, socket.AF_UNSPEC)]
        self._dns[(host, port)] = (now + self.dns_ttl_s, answers)
        return answers

    async def _response(self, conn: _Connection) -> tuple[HttpResult, bool]:
        """Read one response; returns it and whether the connection may carry another request."""
        buf = conn.buf
        while True:  # 1xx responses (100 Continue, 103 Early Hints) come before the final one
            while (end := buf.find(b"\r\n\r\n")) < 0:
                if len(buf) > _MAX_HEAD:
                    raise WebhookHTTPError(f"the response head is over {_MAX_HEAD} bytes")
                if conn.closed:
                    if not buf:
                        raise _Stale()
                    raise WebhookHTTPError("the server closed the connection in the middle of the response head")
                await conn.wait()
            head = bytes(buf[:end])
            del buf[:end + 4]
            status, keep_alive, length, chunked, retry_after = _parse_head(head)
            if status == 101:
                raise WebhookHTTPError("the server switched protocols (101)")
            if status >= 200:
                break
        if status in (204, 304):
            return HttpResult(status, b"", retry_after), keep_alive
        limit = self.excerpt_bytes
        if chunked:
            excerpt, complete = await _read_chunked(conn, limit)
            return HttpResult(status, excerpt, retry_after), keep_alive and complete
        if length is not None:
            if length <= limit + _DRAIN:
                body = await conn.read_exactly(length) if length else b""
                return HttpResult(status, body[:limit], retry_after), keep_alive
            return HttpResult(status, await conn.read_exactly(limit) if limit else b"", retry_after), False
        # no framing: the body runs until the server closes the connection
        while not conn.closed and len(buf) < limit:
            await conn.wait()
        excerpt = bytes(buf[:limit])
        buf.clear()
        return HttpResult(status, excerpt, retry_after), False


def _request(url: yarl.URL, body: bytes, headers: Mapping[str, str]) -> bytes:
    parts = [f"POST {url.raw_path_qs or '/'} HTTP/1.1\r\nHost: {url.host_port_subcomponent}\r\n"
             f"Content-Length: {len(body)}\r\n"]
    for name, value in headers.items():
        if "\n" in value or "\r" in value or "\0" in value:
            raise ValueError(f"header {name!r} has a line break or NUL in its value")
        parts.append(f"{name}: {value}\r\n")
    parts.append("\r\n")
    try:
        return "".join(parts).encode("latin-1") + body
    except UnicodeEncodeError:
        raise ValueError("a request header is not ISO-8859-1 text") from None


def _parse_head(head: bytes) -> tuple[int, bool, int | None, bool, str | None]:
    """(status, keep-alive, content-length, chunked, Retry-After) of a response head (RFC 9112)."""
    lines = head.split(b"\r\n")
    line = lines[0]
    if not line.startswith(b"HTTP/1.") or len(line) < 12 or not line[9:12].isdigit() or line[12:13] not in (b"", b" "):
        raise WebhookHTTPError(f"not an HTTP/1.x response: {line[:80]!r}")
    status = int(line[9:12])
    keep_alive = line[7:8] != b"0"  # HTTP/1.0 closes unless it says keep-alive
    length = None
    chunked = False
    retry_after = None
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == b"content-length":
            try:
                n = int(value.strip())
            except ValueError:
                raise WebhookHTTPError(f"bad Content-Length {value.strip()[:40]!r}") from None
            if n < 0 or (length is not None and n != length):
                raise WebhookHTTPError("bad or conflicting Content-Length")
            length = n
        elif name == b"transfer-encoding":
            chunked = value.strip().lower().endswith(b"chunked")
            if not chunked:  # another final coding: the body runs until close
                keep_alive = False
        elif name == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
        elif name == b"retry-after":
            retry_after = value.strip().decode("latin-1")
    if chunked:
        length = None  # Transfer-Encoding overrides Content-Length (RFC 9112, 6.3)
    return status, keep_alive, length, chunked, retry_after


async def _read_chunked(conn: _Connection, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of a chunked body; True when the whole body (and trailers) was read, False when it was
    cut after ``limit`` + 64 KiB (the connection is then not reused)."""
    kept = bytearray()
    total = 0
    while True:
        line = await conn.read_line()
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise WebhookHTTPError(f"bad chunk size line {line[:40]!r}") from None
        if size == 0:
            while await conn.read_line():  # trailers, up to the empty line
                pass
            return bytes(kept), True
        if total + size > limit + _DRAIN:
            return bytes(kept), False
        data = await conn.read_exactly(size)
        total += size
        if len(kept) < limit:
            kept += data[:limit - len(kept)]
        if await conn.read_line():
            raise WebhookHTTPError("a chunk is not followed by CRLF")
