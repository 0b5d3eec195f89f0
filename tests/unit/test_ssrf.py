"""SSRF guard (dispatcher.rules.ssrf): the decision functions, the write-time URL check, and the connect-time guard
with a real aiohttp ClientSession against a real aiohttp server on 127.0.0.1.

"No connection" is proved twice: the server counts every accepted TCP connection (its protocol factory runs once
per accept), and the client's connector records every connection attempt and refuses, without touching the network,
any address other than 127.0.0.1 (so a broken guard could never reach 10.0.0.1 or a public address from a test).
Public addresses are only ever passed to the decision functions, never connected to.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import ipaddress
import pickle
import socket
import ssl
from collections.abc import Sequence

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from dispatcher.rules.ssrf import (
    ALLOW_SETTING,
    BlockedAddressError,
    GuardedResolver,
    ResolverBusyError,
    blocked_reason,
    check_webhook_url,
    check_webhook_url_resolved,
    embedded_ipv4,
    is_public_address,
    parse_allow_cidrs,
    parse_ip_host,
    vet_url_for_request,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(5)

LOOPBACK_ALLOW = ["127.0.0.0/8"]

# (address, words its refusal reason must contain). Every address of the brief, plus block edges.
BLOCKED_ADDRESSES = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this network"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("10.0.0.1", "private"),
    ("10.255.255.254", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.0.1", "private"),
    ("192.168.255.254", "private"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("169.254.169.254", "metadata"),
    ("168.63.129.16", "Azure WireServer"),  # a public address that every Azure VM reaches as its host's
    ("::ffff:168.63.129.16", "Azure WireServer"),
    ("169.254.1.1", "link-local"),
    ("fd00:ec2::254", "metadata"),
    ("fc00::1", "unique local"),
    ("fdff:ffff::1", "unique local"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fec0::1", "site-local"),
    ("::ffff:127.0.0.1", "IPv4-mapped"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "metadata"),
    ("64:ff9b::a9fe:a9fe", "NAT64"),  # NAT64 of 169.254.169.254 (RFC 6052)
    ("64:ff9b::7f00:1", "loopback"),
    ("64:ff9b:1::1", "NAT64"),
    ("2002:7f00:1::", "6to4"),  # 6to4 of 127.0.0.1 (RFC 3056)
    ("2002:a9fe:a9fe::1", "metadata"),
    ("2002:c0a8:101::", "private"),
    ("::127.0.0.1", "IPv4-compatible"),
    ("::8.8.8.8", "IPv4-compatible"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.254", "benchmarking"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
    ("192.0.0.1", "IETF"),
    ("192.0.2.1", "documentation"),
    ("198.51.100.1", "documentation"),
    ("203.0.113.1", "documentation"),
    ("2001:db8::1", "documentation"),
    ("2001::1", "Teredo"),
    ("100::1", "discard"),
    ("1::1", "reserved"),
]

PUBLIC_ADDRESSES = [
    "93.184.215.14",
    "2606:4700::1111",
    "8.8.8.8",
    "1.1.1.1",
    "172.32.0.1",  # just above 172.16/12
    "172.15.255.254",  # just below
    "100.128.0.1",  # just above 100.64/10
    "198.20.0.1",  # just above 198.18/15
    "::ffff:93.184.215.14",  # IPv4-mapped public
    "64:ff9b::5db8:d70e",  # NAT64 of 93.184.215.14
    "2002:5db8:d70e::1",  # 6to4 of 93.184.215.14
    "2a00:1450:4001:82b::200e",
]


# --- Decision functions ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("address", "words"), BLOCKED_ADDRESSES)
def test_blocked_addresses_are_refused_with_a_reason(address, words):
    reason = blocked_reason(address)
    assert reason is not None and words.lower() in reason.lower(), reason
    assert "RFC" in reason or "Microsoft Learn" in reason  # every reason cites its source
    assert not is_public_address(address)


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses_are_allowed(address):
    assert blocked_reason(address) is None
    assert is_public_address(address)
    assert is_public_address(ipaddress.ip_address(address))


def test_is_global_alone_would_let_embedded_ipv4_through():
    """Why the guard does not trust ``ipaddress.is_global``: it calls NAT64 / 6to4 forms of internal IPv4 global."""
    for address in ("64:ff9b::a9fe:a9fe", "2002:7f00:1::", "fec0::1"):
        assert ipaddress.ip_address(address).is_global, address
        assert blocked_reason(address) is not None


def test_embedded_ipv4_forms():
    def ip(text):
        return ipaddress.ip_address(text)

    assert embedded_ipv4(ip("::ffff:127.0.0.1"))[0] == ip("127.0.0.1")
    assert embedded_ipv4(ip("64:ff9b::a9fe:a9fe"))[0] == ip("169.254.169.254")
    assert embedded_ipv4(ip("2002:7f00:1::"))[0] == ip("127.0.0.1")
    assert embedded_ipv4(ip("2002:a9fe:a9fe:1234::1"))[0] == ip("169.254.169.254")
    assert embedded_ipv4(ip("::10.0.0.1"))[0] == ip("10.0.0.1")
    assert embedded_ipv4(ip("::1")) is None and embedded_ipv4(ip("::")) is None
    assert embedded_ipv4(ip("2606:4700::1111")) is None
    assert embedded_ipv4(ip("10.0.0.1")) is None


def test_allowlist_lets_listed_networks_through_only():
    assert blocked_reason("127.0.0.1", LOOPBACK_ALLOW) is None
    assert blocked_reason("127.9.9.9", LOOPBACK_ALLOW) is None
    assert blocked_reason("::ffff:127.0.0.1", LOOPBACK_ALLOW) is None  # the embedded IPv4 is allowed
    assert "loopback" in blocked_reason("::1", LOOPBACK_ALLOW)
    assert "private" in blocked_reason("10.0.0.1", LOOPBACK_ALLOW)
    assert blocked_reason("::1", ["::1/128"]) is None
    assert blocked_reason("10.1.2.3", ["10.1.2.3"]) is None  # a bare address is a /32
    assert parse_allow_cidrs(["10.1.2.3/8"]) == (ipaddress.ip_network("10.0.0.0/8"),)


def test_bad_allowlist_names_the_setting():
    with pytest.raises(ValueError, match=ALLOW_SETTING):
        parse_allow_cidrs(["localhost"])
    with pytest.raises(ValueError, match=ALLOW_SETTING):
        GuardedResolver(allow_cidrs=["10.0.0.0/33"])


def test_blocked_reason_rejects_non_addresses():
    with pytest.raises(ValueError):
        blocked_reason("example.com")


# --- IP literal parsing ----------------------------------------------------------------------------------------

LEGACY_IPV4 = ["2130706433", "0x7f.1", "0177.0.0.1", "127.1", "0x7f000001", "017700000001", "0x7F.0X0.0.1",
               "10.1", "0xa.0.0.1", "192.168.1", "0300.0250.1.1", "127.0.0.1", "0", "0x0", "0x7f.0.1"]


@pytest.mark.parametrize("host", LEGACY_IPV4)
def test_legacy_ipv4_forms_parse_like_inet_aton(host):
    assert parse_ip_host(host) == ipaddress.IPv4Address(socket.inet_aton(host))
    assert parse_ip_host(host) == ipaddress.ip_address(
        socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)[0][4][0])


INVALID_NUMERIC_HOSTS = ["1.2.3.4.5", "256.0.0.1", "08.0.0.1", "4294967296", "0x100.1", "1.2.3.0x", "0x", "1..2"]


@pytest.mark.parametrize("host", INVALID_NUMERIC_HOSTS)
def test_invalid_numeric_hosts_are_errors_not_names(host):
    with pytest.raises(OSError):
        socket.inet_aton(host)  # the C library refuses them too
    with pytest.raises(ValueError):
        parse_ip_host(host)


@pytest.mark.parametrize("host", ["example.com", "1.2.3.com", "0x7f.example", "hooks.example.test", "1e1", "localhost"])
def test_names_are_not_literals(host):
    assert parse_ip_host(host) is None


def test_ipv6_and_trailing_dot_literals():
    assert parse_ip_host("[::1]") == ipaddress.ip_address("::1")
    assert parse_ip_host("fe80::1%25eth0") == ipaddress.ip_address("fe80::1")
    assert parse_ip_host("127.0.0.1.") == ipaddress.ip_address("127.0.0.1")
    with pytest.raises(ValueError):
        parse_ip_host("::zz")


# --- Write time ------------------------------------------------------------------------------------------------

WRITE_TIME_BLOCKED = [
    ("http://127.0.0.1/hook", "loopback"),
    ("http://127.0.0.1:8080/hook", "loopback"),
    ("http://localhost/hook", "localhost"),
    ("http://LOCALHOST.:9000/hook", "localhost"),
    ("http://api.localhost/hook", "localhost"),
    ("http://0.0.0.0/hook", "unspecified"),
    ("http://[::]/hook", "unspecified"),
    ("http://[::1]/hook", "loopback"),
    ("http://10.0.0.1/hook", "private"),
    ("http://10.255.255.254/hook", "private"),
    ("http://172.16.0.1/hook", "private"),
    ("http://172.31.255.254/hook", "private"),
    ("http://192.168.1.1/hook", "private"),
    ("http://100.64.0.1/hook", "carrier-grade NAT"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "metadata"),
    ("http://[::ffff:127.0.0.1]/hook", "IPv4-mapped"),
    ("http://[64:ff9b::a9fe:a9fe]/hook", "NAT64"),
    ("http://[2002:7f00:1::]/hook", "6to4"),
    ("http://2130706433/hook", "loopback"),
    ("http://0x7f.1/hook", "loopback"),
    ("http://0177.0.0.1/hook", "loopback"),
    ("http://127.1/hook", "loopback"),
    ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/hook", "loopback"),  # full-width digits, IDNA-mapped
    ("http://[fe80::1%25eth0]/hook", "link-local"),
    ("http://1.2.3.4.5/hook", "not a valid IPv4"),
]


@pytest.mark.parametrize(("url", "words"), WRITE_TIME_BLOCKED)
def test_write_time_refuses_non_public_hosts(url, words):
    with pytest.raises(ValueError) as info:
        check_webhook_url(url, production=False)
    message = str(info.value)
    assert message.startswith("url "), message  # names the field
    assert words.lower() in message.lower(), message
    if words != "not a valid IPv4":
        assert ALLOW_SETTING in message  # says how to fix it for development


@pytest.mark.parametrize("url", ["https://93.184.215.14/hook", "https://[2606:4700::1111]:8443/hook",
                                 "https://hooks.example.com/letta", "http://hooks.example.com/letta",
                                 "https://[64:ff9b::5db8:d70e]/hook"])
def test_write_time_accepts_public_hosts(url):
    check_webhook_url(url, production=False)


@pytest.mark.parametrize(("url", "words"), [
    ("ftp://example.com/x", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("javascript:alert(1)", "scheme"),
    ("https://user:pass@example.com/x", "credentials"),
    ("https://user@example.com/x", "credentials"),
    ("https:///x", "host"),
    ("https://example.com:0/x", "port"),
    ("https://example.com:99999/x", "not a valid URL"),
    ("https://exa\\mple.com@evil/x", "not a valid URL"),
])
def test_write_time_shape(url, words):
    with pytest.raises(ValueError, match="^url ") as info:
        check_webhook_url(url, production=False)
    assert words in str(info.value)


def test_production_requires_https():
    with pytest.raises(ValueError, match="https"):
        check_webhook_url("http://hooks.example.com/x", production=True)
    check_webhook_url("https://hooks.example.com/x", production=True)
    with pytest.raises(ValueError, match="loopback"):
        check_webhook_url("https://127.0.0.1/x", production=True)


def test_write_time_allowlist():
    check_webhook_url("http://127.0.0.1:8080/hook", production=False, allow_cidrs=LOOPBACK_ALLOW)
    check_webhook_url("http://0x7f.1:8080/hook", production=False, allow_cidrs=LOOPBACK_ALLOW)
    check_webhook_url("http://localhost:8080/hook", production=False, allow_cidrs=LOOPBACK_ALLOW)
    with pytest.raises(ValueError, match="private"):
        check_webhook_url("http://10.0.0.1/hook", production=False, allow_cidrs=LOOPBACK_ALLOW)


# --- Stub resolver and a counting server ------------------------------------------------------------------------

class StubResolver(AbstractResolver):
    """Answers from a table: ``{host: [answers for call 1, answers for call 2, ...]}`` (the last list repeats).
    Counts calls per host. Unknown hosts fail like a DNS miss."""

    def __init__(self, table: dict[str, Sequence[Sequence[str]]]) -> None:
        self.table = table
        self.calls: dict[str, int] = {}
        self.closed = False

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET,
                      ) -> list[ResolveResult]:
        n = self.calls.get(host, 0)
        self.calls[host] = n + 1
        if host not in self.table:
            raise OSError(socket.EAI_NONAME, f"stub: unknown host {host}")
        rounds = self.table[host]
        answers = rounds[min(n, len(rounds) - 1)]
        return [ResolveResult(hostname=host, host=a, port=port,
                              family=socket.AF_INET6 if ":" in a else socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST) for a in answers]

    async def close(self) -> None:
        self.closed = True


class CountingServer:
    """A real aiohttp server (low-level ``web.Server``) on 127.0.0.1; ``accepts`` counts TCP connections accepted
    (the protocol factory runs once per accept, before any byte is read); ``requests`` holds (Host, path)."""

    def __init__(self) -> None:
        self.accepts = 0
        self.requests: list[tuple[str | None, str]] = []
        self.sni: list[str | None] = []

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> CountingServer:
        self._web = web.Server(self._handle)

        def factory():
            self.accepts += 1
            return self._web()

        if ssl_context is not None:
            ssl_context.sni_callback = lambda sock, name, ctx: self.sni.append(name)
        self._server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        await request.read()
        self.requests.append((request.headers.get("Host"), request.path))
        return web.Response(text="ok")

    async def stop(self) -> None:
        self._server.close()
        await self._web.shutdown(1.0)
        await self._server.wait_closed()


class RecordingConnector(aiohttp.TCPConnector):
    """Records the addresses of every connection attempt; refuses (without any network I/O) any but 127.0.0.1."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.attempts: list[list[str]] = []

    async def _wrap_create_connection(self, *args, addr_infos, req, timeout,
                                      client_error=aiohttp.ClientConnectorError, **kwargs):
        addresses = [info[4][0] for info in addr_infos]
        self.attempts.append(addresses)
        if any(a != "127.0.0.1" for a in addresses):
            raise client_error(req.connection_key,
                               OSError(errno.ENETUNREACH, f"test connector: not leaving 127.0.0.1 ({addresses})"))
        return await super()._wrap_create_connection(*args, addr_infos=addr_infos, req=req, timeout=timeout,
                                                     client_error=client_error, **kwargs)


@pytest.fixture
async def server():
    s = await CountingServer().start()
    yield s
    await s.stop()


@contextlib.asynccontextmanager
async def guarded_session(inner: AbstractResolver | None = None, allow: Sequence[str] = (), *,
                          use_dns_cache: bool = True, ssl_context: ssl.SSLContext | None = None):
    """A ClientSession wired as the dispatcher's should be: TCPConnector(resolver=GuardedResolver(inner))."""
    resolver = GuardedResolver(inner, allow_cidrs=allow)
    connector = RecordingConnector(resolver=resolver, use_dns_cache=use_dns_cache,
                                   ssl=ssl_context if ssl_context is not None else True)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3))
    try:
        yield session, connector, resolver
    finally:
        await session.close()
        await resolver.close()


async def sender_post(session: aiohttp.ClientSession, url: str, allow: Sequence[str] = ()) -> tuple[int, str]:
    """What the sender does per delivery: vet the URL (IP literals), then POST without following redirects."""
    vet_url_for_request(url, allow)
    async with session.post(url, data=b'{"event": "x"}', allow_redirects=False) as resp:
        return resp.status, await resp.text()


# --- Connect time: names resolved by the guarded resolver ------------------------------------------------------

CONNECT_TIME_NAMES = [
    (["127.0.0.1"], "loopback"),
    (["0.0.0.0"], "unspecified"),
    (["::"], "unspecified"),
    (["::1"], "loopback"),
    (["10.0.0.1"], "private"),
    (["172.16.0.1"], "private"),
    (["172.31.255.254"], "private"),
    (["192.168.1.1"], "private"),
    (["100.64.0.1"], "carrier-grade NAT"),
    (["169.254.169.254"], "metadata"),
    (["fd00:ec2::254"], "metadata"),
    (["::ffff:127.0.0.1"], "IPv4-mapped"),
    (["64:ff9b::a9fe:a9fe"], "NAT64"),
    (["2002:7f00:1::"], "6to4"),
    (["93.184.215.14", "10.0.0.7"], "private"),  # one public and one private answer: refused
    (["2606:4700::1111", "127.0.0.1"], "loopback"),
]


@pytest.mark.parametrize(("answers", "words"), CONNECT_TIME_NAMES)
async def test_connect_time_refuses_names_resolving_to_non_public_addresses(server, answers, words):
    stub = StubResolver({"hooks.example.test": [answers]})
    url = f"http://hooks.example.test:{server.port}/hook"
    async with guarded_session(stub) as (session, connector, resolver):
        with pytest.raises(aiohttp.ClientConnectorDNSError) as info:
            await sender_post(session, url)
    blocked = info.value.os_error
    assert isinstance(blocked, BlockedAddressError)
    assert blocked.host == "hooks.example.test" and blocked.address in answers
    assert words.lower() in str(info.value).lower()  # the reason reaches the sender's error text
    assert "hooks.example.test" in str(info.value)
    assert stub.calls == {"hooks.example.test": 1}  # resolved once
    assert resolver.refused == 1
    assert connector.attempts == [] and server.accepts == 0 and server.requests == []


async def test_connect_time_refuses_localhost_with_the_real_resolver(server):
    """Default inner resolver (aiohttp's, /etc/hosts): localhost resolves to loopback and is refused."""
    async with guarded_session() as (session, connector, _):
        with pytest.raises(aiohttp.ClientConnectorDNSError, match="loopback"):
            async with session.get(f"http://localhost:{server.port}/hook"):
                pass
        with pytest.raises(BlockedAddressError, match="localhost"):  # and the sender path refuses it earlier
            await sender_post(session, f"http://localhost:{server.port}/hook")
    assert connector.attempts == [] and server.accepts == 0


# --- Connect time: IP literals (aiohttp skips the resolver: vet_url_for_request must catch them) -----------------

CONNECT_TIME_LITERALS = [
    ("http://127.0.0.1:{port}/hook", "loopback"),
    ("http://localhost:{port}/hook", "localhost"),
    ("http://0.0.0.0:{port}/hook", "unspecified"),
    ("http://[::]:{port}/hook", "unspecified"),
    ("http://[::1]:{port}/hook", "loopback"),
    ("http://10.0.0.1:{port}/hook", "private"),
    ("http://172.16.0.1:{port}/hook", "private"),
    ("http://192.168.1.1:{port}/hook", "private"),
    ("http://100.64.0.1:{port}/hook", "carrier-grade NAT"),
    ("http://169.254.169.254:{port}/latest/meta-data/", "metadata"),
    ("http://[fd00:ec2::254]:{port}/hook", "metadata"),
    ("http://[::ffff:127.0.0.1]:{port}/hook", "IPv4-mapped"),
    ("http://[64:ff9b::a9fe:a9fe]:{port}/hook", "NAT64"),
    ("http://[2002:7f00:1::]:{port}/hook", "6to4"),
    ("http://2130706433:{port}/hook", "loopback"),
    ("http://0x7f.1:{port}/hook", "loopback"),
    ("http://0177.0.0.1:{port}/hook", "loopback"),
    ("http://127.1:{port}/hook", "loopback"),
    ("http://1.2.3.4.5:{port}/hook", "not a valid IPv4"),
]


@pytest.mark.parametrize(("template", "words"), CONNECT_TIME_LITERALS)
async def test_connect_time_refuses_ip_literals_before_any_connection(server, template, words):
    url = template.format(port=server.port)
    stub = StubResolver({})
    async with guarded_session(stub) as (session, connector, _):
        with pytest.raises(BlockedAddressError) as info:
            await sender_post(session, url)
    assert words.lower() in str(info.value).lower()
    assert isinstance(info.value, OSError) and info.value.errno == errno.EACCES
    assert connector.attempts == [] and server.accepts == 0 and stub.calls == {}


async def test_aiohttp_skips_the_resolver_for_ip_literals(server):
    """Canary for DESIGN.md's measurement: without vet_url_for_request a literal loopback URL is NOT stopped by
    the resolver (it is never called). If this starts failing, aiohttp changed; the guard stays safe either way."""
    stub = StubResolver({})
    async with guarded_session(stub) as (session, connector, _):
        async with session.post(f"http://127.0.0.1:{server.port}/hook", data=b"{}") as resp:
            assert resp.status == 200
    assert stub.calls == {} and connector.attempts == [["127.0.0.1"]] and server.accepts == 1


async def test_legacy_literals_are_refused_even_without_vetting(server):
    """Defense in depth: aiohttp hands ``0x7f.1`` to the resolver (the guard refuses it) and rejects
    ``2130706433`` itself (aiohttp 3.14 ``InvalidUrlClientError``)."""
    stub = StubResolver({"0x7f.1": [["127.0.0.1"]]})
    async with guarded_session(stub) as (session, connector, _):
        with pytest.raises(aiohttp.ClientConnectorDNSError, match="loopback"):
            async with session.post(f"http://0x7f.1:{server.port}/hook", data=b"{}"):
                pass
        with pytest.raises(aiohttp.ClientError):
            async with session.post(f"http://2130706433:{server.port}/hook", data=b"{}"):
                pass
    assert stub.calls == {} and connector.attempts == [] and server.accepts == 0


# --- DNS rebinding ---------------------------------------------------------------------------------------------

async def test_dns_rebinding_second_answer_is_refused_and_never_connected(server):
    """First lookup: a public address (the attempt is recorded and stopped by the test connector, no network);
    second lookup flips to 127.0.0.1, where the real server listens: refused, and the server sees no connection."""
    stub = StubResolver({"rebind.example.test": [["93.184.215.14"], ["127.0.0.1"]]})
    url = f"http://rebind.example.test:{server.port}/hook"
    async with guarded_session(stub, use_dns_cache=False) as (session, connector, resolver):
        with pytest.raises(aiohttp.ClientConnectorError) as first:
            await sender_post(session, url)
        assert not isinstance(first.value.os_error, BlockedAddressError)  # allowed, failed only in the test connector
        with pytest.raises(aiohttp.ClientConnectorDNSError) as second:
            await sender_post(session, url)
    assert isinstance(second.value.os_error, BlockedAddressError)
    assert "127.0.0.1" in str(second.value) and "loopback" in str(second.value)
    assert stub.calls == {"rebind.example.test": 2}
    assert connector.attempts == [["93.184.215.14"]]  # only the vetted public address was ever tried
    assert server.accepts == 0 and resolver.resolved == 1 and resolver.refused == 1


async def test_dns_rebinding_with_the_dns_cache_reuses_only_the_vetted_answer(server):
    """With aiohttp's default DNS cache the second request within the TTL does not resolve again: it goes to the
    cached, vetted public address, never to the rebound 127.0.0.1."""
    stub = StubResolver({"rebind.example.test": [["93.184.215.14"], ["127.0.0.1"]]})
    url = f"http://rebind.example.test:{server.port}/hook"
    async with guarded_session(stub) as (session, connector, _):
        for _ in range(2):
            with pytest.raises(aiohttp.ClientConnectorError):
                await sender_post(session, url)
    assert stub.calls == {"rebind.example.test": 1}
    assert connector.attempts == [["93.184.215.14"], ["93.184.215.14"]] and server.accepts == 0


async def test_dns_rebinding_at_write_time():
    stub = StubResolver({"rebind.example.test": [["93.184.215.14"], ["127.0.0.1"]]})
    url = "https://rebind.example.test/hook"
    await check_webhook_url_resolved(url, production=True, resolver=stub)
    with pytest.raises(ValueError, match="resolves to 127.0.0.1") as info:
        await check_webhook_url_resolved(url, production=True, resolver=stub)
    assert str(info.value).startswith("url ") and ALLOW_SETTING in str(info.value)


@pytest.mark.parametrize(("answers", "words"), CONNECT_TIME_NAMES)
async def test_write_time_lookup_refuses_names_resolving_to_non_public_addresses(answers, words):
    stub = StubResolver({"hooks.example.test": [answers]})
    with pytest.raises(ValueError, match="^url ") as info:
        await check_webhook_url_resolved("http://hooks.example.test/hook", production=False, resolver=stub)
    assert words.lower() in str(info.value).lower()


async def test_write_time_lookup_accepts_public_and_unresolvable_names():
    stub = StubResolver({"public.example.test": [["93.184.215.14", "2606:4700::1111"]]})
    await check_webhook_url_resolved("https://public.example.test/hook", production=True, resolver=stub)
    await check_webhook_url_resolved("https://not-yet.example.test/hook", production=True, resolver=stub)
    assert stub.calls == {"public.example.test": 1, "not-yet.example.test": 1}
    assert not stub.closed  # an injected resolver belongs to the caller


# --- Allowlist: the request goes through, to the vetted address, with the original Host -------------------------

async def test_allowlist_lets_a_name_through_with_its_host_header(server):
    stub = StubResolver({"hooks.example.test": [["127.0.0.1"]]})
    async with guarded_session(stub, LOOPBACK_ALLOW) as (session, connector, resolver):
        assert await sender_post(session, f"http://hooks.example.test:{server.port}/hook", LOOPBACK_ALLOW) == (
            200, "ok")
    assert server.requests == [(f"hooks.example.test:{server.port}", "/hook")]
    assert connector.attempts == [["127.0.0.1"]] and server.accepts == 1 and resolver.resolved == 1


async def test_allowlist_lets_a_literal_through(server):
    async with guarded_session(StubResolver({}), LOOPBACK_ALLOW) as (session, connector, _):
        assert await sender_post(session, f"http://127.0.0.1:{server.port}/hook", LOOPBACK_ALLOW) == (200, "ok")
    assert server.requests == [(f"127.0.0.1:{server.port}", "/hook")] and server.accepts == 1


async def test_allowlist_does_not_cover_other_answers(server):
    """Any answer outside the allowlist refuses the name (localhost often resolves to 127.0.0.1 and ::1)."""
    stub = StubResolver({"hooks.example.test": [["127.0.0.1", "::1"]]})
    async with guarded_session(stub, LOOPBACK_ALLOW) as (session, connector, _):
        with pytest.raises(aiohttp.ClientConnectorDNSError, match="::1"):
            await sender_post(session, f"http://hooks.example.test:{server.port}/hook", LOOPBACK_ALLOW)
    assert connector.attempts == [] and server.accepts == 0


# --- TLS: SNI and certificate verification keep the hostname --------------------------------------------------

def _self_signed(name: str) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@contextlib.asynccontextmanager
async def tls_server(tmp_path, cert_name: str):
    cert_pem, key_pem = _self_signed(cert_name)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_ctx = ssl.create_default_context(cadata=cert_pem.decode())
    s = await CountingServer().start(server_ctx)
    try:
        yield s, client_ctx
    finally:
        await s.stop()


async def test_tls_sni_and_certificate_use_the_hostname(tmp_path):
    """The connection goes to the vetted 127.0.0.1, but SNI, certificate verification and Host use the name."""
    async with tls_server(tmp_path, "hooks.example.test") as (server, client_ctx):
        stub = StubResolver({"hooks.example.test": [["127.0.0.1"]]})
        async with guarded_session(stub, LOOPBACK_ALLOW, ssl_context=client_ctx) as (session, connector, _):
            url = f"https://hooks.example.test:{server.port}/hook"
            assert await sender_post(session, url, LOOPBACK_ALLOW) == (200, "ok")
    assert server.sni == ["hooks.example.test"]
    assert server.requests == [(f"hooks.example.test:{server.port}", "/hook")]
    assert connector.attempts == [["127.0.0.1"]]


async def test_tls_certificate_for_another_name_is_rejected(tmp_path):
    async with tls_server(tmp_path, "other.example.test") as (server, client_ctx):
        stub = StubResolver({"hooks.example.test": [["127.0.0.1"]]})
        async with guarded_session(stub, LOOPBACK_ALLOW, ssl_context=client_ctx) as (session, _, _):
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await sender_post(session, f"https://hooks.example.test:{server.port}/hook", LOOPBACK_ALLOW)
    assert server.requests == []


# --- The resolver on its own ------------------------------------------------------------------------------------

async def test_resolver_returns_exactly_the_vetted_answers():
    stub = StubResolver({"public.example.test": [["93.184.215.14", "2606:4700::1111"]]})
    guard = GuardedResolver(stub)
    answers = await guard.resolve("public.example.test", 443, socket.AF_UNSPEC)
    assert [a["host"] for a in answers] == ["93.184.215.14", "2606:4700::1111"]
    assert all(a["hostname"] == "public.example.test" and a["port"] == 443 for a in answers)
    await guard.close()
    assert not stub.closed  # injected: closed by its owner


async def test_resolver_refuses_legacy_literal_hosts_without_asking_dns():
    stub = StubResolver({})
    guard = GuardedResolver(stub)
    for host in ("0x7f.1", "0177.0.0.1", "2130706433", "127.1", "1.2.3.4.5"):
        with pytest.raises(BlockedAddressError):
            await guard.resolve(host, 80)
    assert stub.calls == {}


async def test_resolver_propagates_dns_failures():
    guard = GuardedResolver(StubResolver({}))
    with pytest.raises(OSError) as info:
        await guard.resolve("missing.example.test", 80)
    assert not isinstance(info.value, BlockedAddressError)


class SilentResolver(StubResolver):
    """A name server that never answers the names in ``silent`` (until ``answer`` is set); counts concurrent
    lookups (``running``, peak ``most``)."""

    def __init__(self, table, silent: set[str]) -> None:
        super().__init__(table)
        self.silent = silent
        self.answer = asyncio.Event()
        self.running = self.most = 0
        self.asked: dict[str, int] = {}

    async def resolve(self, host, port=0, family=socket.AF_INET):  # noqa: ANN001
        self.asked[host] = self.asked.get(host, 0) + 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if host in self.silent:
                await self.answer.wait()
            return await super().resolve(host, port, family)
        finally:
            self.running -= 1


async def test_resolver_lookups_time_out_are_remembered_and_share_one_call():
    stub = SilentResolver({"public.example.test": [["93.184.215.14"]]}, silent={"silent.example.test"})
    guard = GuardedResolver(stub, lookup_timeout_s=0.3, negative_ttl_s=30)
    outcomes = await asyncio.gather(*(guard.resolve("silent.example.test", 443) for _ in range(5)),
                                    return_exceptions=True)
    assert all(isinstance(o, TimeoutError) and "timed out after 0.3 s" in str(o) for o in outcomes)
    assert stub.asked == {"silent.example.test": 1}, "concurrent lookups of one name share one call"
    with pytest.raises(OSError, match="remembered for 30 s"):  # at once, without asking the name server again
        await guard.resolve("silent.example.test", 443)
    assert stub.asked == {"silent.example.test": 1} and guard.negative_hits == 1
    assert [a["host"] for a in await guard.resolve("public.example.test", 443)] == ["93.184.215.14"]
    with pytest.raises(OSError, match="unknown host"):
        await guard.resolve("missing.example.test", 80)
    with pytest.raises(OSError, match="remembered"):  # NXDOMAIN is remembered too
        await guard.resolve("missing.example.test", 80)
    assert stub.asked["missing.example.test"] == 1
    stub.answer.set()


async def test_resolver_bounds_concurrent_lookups_and_says_when_it_is_busy():
    silent = {f"silent-{i}.example.test" for i in range(4)}
    stub = SilentResolver({"public.example.test": [["93.184.215.14"]]}, silent=silent)
    guard = GuardedResolver(stub, max_lookups=2, lookup_timeout_s=0.3)
    outcomes = await asyncio.gather(*(guard.resolve(h, 443) for h in sorted(silent)), return_exceptions=True)
    assert stub.most == 2, "at most max_lookups lookups run at once, even after their callers gave up"
    assert sum(isinstance(o, ResolverBusyError) for o in outcomes) == 2
    with pytest.raises(ResolverBusyError, match="no DNS lookup slot free within 0.3 s"):
        await guard.resolve("public.example.test", 443)  # both slots still held by the silent lookups
    stub.answer.set()  # the name server answers at last: the slots come back
    await wait_until(lambda: stub.running == 0)
    assert [a["host"] for a in await guard.resolve("public.example.test", 443)] == ["93.184.215.14"]


async def test_resolver_closes_the_inner_resolver_it_created():
    guard = GuardedResolver()
    with pytest.raises(BlockedAddressError, match="loopback"):
        await guard.resolve("localhost", 80, socket.AF_INET)
    assert guard._inner is not None
    await guard.close()
    assert guard._inner is None


def test_blocked_address_error_is_an_oserror_with_a_clear_message():
    exc = BlockedAddressError("hooks.example.test", "10.0.0.1", "private network (RFC 1918)")
    assert isinstance(exc, OSError) and exc.errno == errno.EACCES
    assert str(exc) == exc.strerror
    assert "hooks.example.test (10.0.0.1)" in str(exc) and "RFC 1918" in str(exc) and ALLOW_SETTING in str(exc)
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.host, copy.address, copy.reason) == (exc.host, exc.address, exc.reason)


def test_vet_url_for_request_passes_names_and_public_literals():
    vet_url_for_request("https://hooks.example.com/x")
    vet_url_for_request("https://93.184.215.14/x")
    vet_url_for_request("https://[2606:4700::1111]/x")
    vet_url_for_request("http://127.0.0.1:8080/x", parse_allow_cidrs(LOOPBACK_ALLOW))
    with pytest.raises(BlockedAddressError, match="no host"):
        vet_url_for_request("/relative/path")
