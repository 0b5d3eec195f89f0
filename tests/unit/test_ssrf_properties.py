"""Property-based tests (hypothesis) of the SSRF guard (dispatcher.rules.ssrf): no notation of a non-public address gets
through.

The reference for "what address does this host denote" is not our parser: it is the operating system's own
numeric-host parser (``getaddrinfo(..., AI_NUMERICHOST)``, glibc's ``inet_aton`` rules: ``127.1``, ``0x7f.1``,
``0177.0.0.1``, ``2130706433`` are all 127.0.0.1) applied to the host exactly as aiohttp will see it (yarl's
``raw_host``, IDNA-mapped, so full-width digits count too). The reference for "non-public" is Python's
``ipaddress`` (``is_global``, plus multicast, which Python 3.11 calls global) after unwrapping IPv4 embedded in
IPv6 (IPv4-mapped, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``).

Properties: whenever the reference says a URL's host is a non-public address, ``check_webhook_url`` (write time),
``vet_url_for_request`` (before every request) and ``GuardedResolver`` (connect time) all refuse it; the verdict
never depends on the notation; and a name whose DNS answers include a non-public address is refused at connect time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest
import yarl
from aiohttp.abc import AbstractResolver
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dispatcher.rules.ssrf import BlockedAddressError, GuardedResolver, check_webhook_url, vet_url_for_request

PROPS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Blocks worth sampling often (a uniformly random address is public about 86 % of the time).
V4_SPECIAL = ["0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
              "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
              "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32", "169.254.169.254/32"]
V6_SPECIAL = ["::1/128", "::/128", "fe80::/10", "fc00::/7", "fd00:ec2::254/128", "ff00::/8", "2001:db8::/32",
              "100::/64", "2001::/23", "64:ff9b:1::/48", "fec0::/10"]
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _in(cidr: str):
    net = ipaddress.ip_network(cidr)
    return st.integers(0, net.num_addresses - 1).map(lambda i: net[i])


v4_addresses = st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address), st.sampled_from(V4_SPECIAL).flatmap(_in))


@st.composite
def v6_addresses(draw):
    kind = draw(st.sampled_from(["special", "random", "mapped", "nat64", "6to4"]))
    if kind == "special":
        return draw(st.sampled_from(V6_SPECIAL).flatmap(_in))
    if kind == "random":
        return ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1)))
    v4 = int(draw(v4_addresses))
    if kind == "mapped":
        return ipaddress.IPv6Address((0xFFFF << 32) | v4)
    if kind == "nat64":
        return ipaddress.IPv6Address(int(NAT64.network_address) | v4)
    return ipaddress.IPv6Address((0x2002 << 112) | (v4 << 80) | draw(st.integers(0, 2**80 - 1)))


def non_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """The reference: Python's registry view, with IPv4 embedded in IPv6 judged as the IPv4 it reaches."""
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None)
        if embedded is not None:
            return non_public(embedded)
    return not ip.is_global or ip.is_multicast


@st.composite
def v4_notations(draw, ip: ipaddress.IPv4Address) -> str:
    """One of the spellings inet_aton accepts for ``ip``."""
    value, octets = int(ip), list(ip.packed)

    def part(n: int) -> str:
        base = draw(st.sampled_from(["dec", "oct", "hex", "HEX"]))
        if base == "oct":
            return "0" + format(n, "o") if n else "0"
        if base in ("hex", "HEX"):
            text = "0x" + format(n, "x")
            return text.upper().replace("0X", "0x" if base == "hex" else "0X") if base == "HEX" else text
        return str(n)

    form = draw(st.sampled_from(["dotted", "int", "a.bcd", "a.b.cd", "mixed", "padded", "fullwidth"]))
    if form == "dotted":
        return str(ip)
    if form == "int":
        return part(value)
    if form == "a.bcd":
        return f"{part(octets[0])}.{part(value & 0xFFFFFF)}"
    if form == "a.b.cd":
        return f"{part(octets[0])}.{part(octets[1])}.{part(value & 0xFFFF)}"
    if form == "mixed":
        return ".".join(part(o) for o in octets)
    if form == "padded":  # leading zeros make a part octal: pad only what stays the same number
        return ".".join("0" + format(o, "o") if o else "000" for o in octets)
    dot = draw(st.sampled_from(["\u3002", "\uff0e", "."]))
    return dot.join("".join(chr(0xFF10 + int(c)) for c in str(o)) for o in octets)


def v6_notations(ip: ipaddress.IPv6Address, style: int) -> str:
    if style == 0:
        return ip.compressed
    if style == 1:
        return ip.exploded.upper()
    if ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return ip.compressed.upper()


@st.composite
def urls(draw):
    """(url, address the host is meant to denote)."""
    if draw(st.booleans()):
        ip = draw(v4_addresses)
        host = draw(v4_notations(ip))
    else:
        ip = draw(v6_addresses())
        host = "[" + v6_notations(ip, draw(st.integers(0, 2))) + "]"
    scheme = draw(st.sampled_from(["http", "https", "HTTP", "Https"]))
    port = draw(st.sampled_from(["", ":80", ":8443", ":65535"]))
    path = draw(st.sampled_from(["/", "/hooks/letta", "/a?b=c#d", ""]))
    return f"{scheme}://{host}{port}{path}", ip


def os_address(url: str):
    """What the OS makes of the URL's host as aiohttp passes it on: an address, or None if not numeric."""
    host = yarl.URL(url).raw_host or ""
    try:
        info = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return None
    return ipaddress.ip_address(info[0][4][0].split("%")[0])


def _accepted(url: str) -> bool:
    try:
        check_webhook_url(url, production=False)
        return True
    except ValueError:
        return False


class _Answers(AbstractResolver):
    """An inner resolver that answers what the test says (no DNS)."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers

    async def resolve(self, host, port=0, family=socket.AF_INET):  # noqa: ANN001, ANN201
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for a in self.answers]

    async def close(self) -> None:
        pass


@PROPS
@given(urls())
def test_no_notation_of_a_non_public_address_is_accepted(case):
    url, meant = case
    denoted = os_address(url)
    assume(denoted is not None)
    assert denoted == meant, f"test generator: {url} denotes {denoted}, meant {meant}"
    if not non_public(denoted):
        return
    with pytest.raises(ValueError, match="not a public address|not a valid"):
        check_webhook_url(url, production=False)
    with pytest.raises(BlockedAddressError):
        vet_url_for_request(url)
    host = yarl.URL(url).raw_host

    async def connect_time():
        guard = GuardedResolver(_Answers([str(denoted)]))
        with pytest.raises(BlockedAddressError):
            await guard.resolve(host, 80)

    asyncio.run(connect_time())


@PROPS
@given(v4_addresses, st.data())
def test_the_verdict_does_not_depend_on_the_notation(ip, data):
    canonical = _accepted(f"http://{ip}/")
    spelled = data.draw(v4_notations(ip))
    url = f"http://{spelled}/"
    assume(os_address(url) == ip)
    assert _accepted(url) is canonical, f"{spelled} ({ip}): accepted={not canonical} but {ip} accepted={canonical}"


@PROPS
@given(st.lists(st.one_of(v4_addresses, v6_addresses()), min_size=1, max_size=4))
def test_a_name_with_any_non_public_answer_is_refused_at_connect_time(answers):
    texts = [str(a) for a in answers]

    async def resolve():
        guard = GuardedResolver(_Answers(texts))
        try:
            return await guard.resolve("hooks.example.com", 443)
        except BlockedAddressError as exc:
            return exc

    result = asyncio.run(resolve())
    if any(non_public(a) for a in answers):
        assert isinstance(result, BlockedAddressError)
    if not isinstance(result, BlockedAddressError):
        assert [r["host"] for r in result] == texts  # exactly the vetted answers, nothing else to connect to
        assert all(r["hostname"] == "hooks.example.com" for r in result)


@PROPS
@given(_in("127.0.0.0/8"), st.data())
def test_the_allowlist_opens_only_its_own_range(ip, data):
    url = f"http://{data.draw(v4_notations(ip))}:8080/"
    assume(os_address(url) == ip)
    check_webhook_url(url, production=False, allow_cidrs=["127.0.0.0/8"])
    vet_url_for_request(url, ["127.0.0.0/8"])
    with pytest.raises(ValueError):
        check_webhook_url(url, production=False, allow_cidrs=["10.0.0.0/8"])
