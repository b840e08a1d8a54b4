"""Refuse callback URLs that point inside the broker's network (SSRF).

A caller chooses ``callbackUrl``, and the broker later POSTs to it from inside
its own network: without a check, anyone allowed to provision could make the
broker call the cloud metadata service, a database admin port or another
tenant's internal service. Two checks use the same rules:

* :func:`check_callback_url` when the request arrives, so a bad URL is a
  ``400 validation_failed`` before anything is stored;
* :func:`pin` when the callback is sent, because DNS may answer differently by
  then (DNS rebinding). It returns the checked address so the sender connects
  to exactly that address and never resolves the name a second time.

Operators open holes deliberately with an :class:`Allowlist` (the platform's
manager usually lives at a private address, e.g. ``http://manager:9090``).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from kidp.errors import ValidationFailed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_HOST_LENGTH = 253
# Underscores are not legal in DNS host names but appear in real service
# names (and are harmless here: the name only goes to the resolver).
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
# A last label that a URL parser or inet_aton would read as a number makes the
# whole host an IPv4 address in some parser (WHATWG's "ends in a number" rule).
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")
# Parsers disagree on how they strip or keep these, so refuse them outright.
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")

_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)


def _networks(*pairs: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), why) for net, why in pairs)


# Spelled out rather than taken from ``is_private``/``is_global`` alone: those
# flags changed between Python releases, and the reason makes a better message.
_BLOCKED_V4 = _networks(
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared address space"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "reserved"),
    ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "reserved"),
    ("198.51.100.0/24", "reserved"),
    ("203.0.113.0/24", "reserved"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
_BLOCKED_V6 = _networks(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("100::/64", "reserved"),
    # Local-use NAT64 translates to IPv4 addresses chosen by the local network.
    ("64:ff9b:1::/48", "reserved"),
    # Teredo tunnels to an obfuscated IPv4 address; nobody legitimate needs it here.
    ("2001::/32", "reserved"),
    ("2001:db8::/32", "reserved"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    # Site-local is deprecated, but some stacks still route it internally.
    ("fec0::/10", "reserved"),
    ("ff00::/8", "multicast"),
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _refuse(message: str) -> ValidationFailed:
    return ValidationFailed(message, details={"field": "callbackUrl"})


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a packet to ``ip`` actually reaches, for the IPv6 forms
    that carry one (mapped, translated, 6to4, NAT64, the old compatible form)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    value = int(ip)
    if ip in _NAT64 or value >> 32 in (0, 0xFFFF0000):
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def _refusal(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be called, or None for a public address."""
    if ip in _METADATA:
        return "cloud metadata"
    if isinstance(ip, ipaddress.IPv4Address):
        for net, why in _BLOCKED_V4:
            if ip in net:
                return why
    else:
        for net, why in _BLOCKED_V6:
            if ip in net:
                return why
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            inner = _refusal(embedded)
            # A public IPv4 behind NAT64 is how IPv6-only clusters reach the
            # internet, so the embedded address alone decides.
            return None if inner is None else f"{inner}, embedded in IPv6"
    if not ip.is_global:
        return "not a public address"
    return None


def _normalize_host(host: str) -> str:
    return host.strip().lower().removesuffix(".")


def _is_numeric_looking(host: str) -> bool:
    return bool(_NUMERIC_LABEL.match(host.removesuffix(".").rsplit(".", 1)[-1]))


def _valid_hostname(host: str) -> bool:
    name = host.removesuffix(".")
    return 0 < len(name) <= _MAX_HOST_LENGTH and all(_LABEL.match(x) for x in name.split("."))


@dataclass(frozen=True)
class Allowlist:
    """Hosts and networks that callbacks may reach even though they are internal.

    A host entry matches the URL's host name exactly (case-insensitive) and
    then accepts whatever it resolves to, except a cloud metadata address; a
    network entry accepts the addresses in it (metadata included, if listed).
    """

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        """Build an allow-list from host names, IP addresses and CIDRs.

        Raises ``ValueError`` for an entry that is none of these, so a typo in
        the configuration fails at start-up instead of silently allowing less
        (or, for ``10.1.2.3/8``, more) than intended.
        """
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            candidate = entry.removeprefix("[").replace("]", "", 1)
            try:
                networks.append(ipaddress.ip_network(candidate, strict=True))
                continue
            except ValueError as exc:
                if "/" in entry:
                    raise ValueError(f"allow-list entry {entry!r} is not a valid CIDR") from exc
            host = _normalize_host(entry)
            if _is_numeric_looking(host) or not _valid_hostname(host):
                raise ValueError(
                    f"allow-list entry {entry!r} is not a host name, an IP address or a CIDR "
                    "(ports and wildcards are not supported)"
                )
            hosts.add(host)
        return cls(hosts=frozenset(hosts), networks=tuple(networks))

    def allows_host(self, host: str) -> bool:
        """True when ``host`` is one of the allow-listed names."""
        return _normalize_host(host) in self.hosts

    def allows_address(self, ip: str | IPAddress) -> bool:
        """True when ``ip`` (or the IPv4 inside an IPv4-mapped IPv6) is allow-listed."""
        if isinstance(ip, str):
            try:
                ip = ipaddress.ip_address(ip)
            except ValueError:
                return False
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(c in net for c in candidates for net in self.networks)


@dataclass(frozen=True)
class PinnedTarget:
    """Where to send a callback: the checked address, plus the names to present.

    ``url`` is the callback URL with the host replaced by ``ip`` (IPv6 in
    brackets); ``host_header`` is the original ``Host``; ``sni_hostname`` is the
    name TLS must verify (None for http, and for a literal IP host).
    """

    url: str
    host_header: str
    sni_hostname: str | None
    ip: str


@dataclass(frozen=True)
class _Parsed:
    scheme: str
    host: str
    port: int
    path: str
    query: str
    literal: IPAddress | None


def default_resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (``socket.getaddrinfo``), without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _literal_address(host: str, *, bracketed: bool) -> IPAddress | None:
    if bracketed or ":" in host:
        if "%" in host:
            raise _refuse("callbackUrl must not use an IPv6 zone id")
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise _refuse("callbackUrl host is not a valid IPv6 address") from None
    if _is_numeric_looking(host):
        # Decimal, octal, hex and short forms (2130706433, 0177.0.0.1,
        # 0x7f.1, 127.1) all mean 127.0.0.1 to some parser; only the one
        # spelling every parser agrees on is accepted.
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            ip = None
        if ip is None or str(ip) != host:
            raise _refuse(
                "callbackUrl host looks like an IP address but is not a canonical "
                "dotted-decimal IPv4 address"
            )
        return ip
    if not host.isascii():
        raise _refuse("callbackUrl host must be ASCII (use the xn-- form of the name)")
    if not _valid_hostname(host):
        raise _refuse("callbackUrl host is not a valid host name")
    return None


def _parse(url: str) -> _Parsed:
    if _CONTROL_OR_SPACE.search(url):
        raise _refuse("callbackUrl must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _refuse("callbackUrl is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise _refuse("callbackUrl scheme must be http or https")
    # Checked on the raw authority: parsers disagree on which '@' (or '\@')
    # ends the user info, which is the whole point of the trick.
    if "@" in parts.netloc:
        raise _refuse("callbackUrl must not contain user info (user@host)")
    host = parts.hostname
    if not host:
        raise _refuse("callbackUrl has no host")
    if port == 0:
        raise _refuse("callbackUrl port must be between 1 and 65535")
    literal = _literal_address(host, bracketed=parts.netloc.startswith("["))
    return _Parsed(
        scheme=scheme,
        host=host,
        port=port or _DEFAULT_PORTS[scheme],
        path=parts.path or "/",
        query=parts.query,
        literal=literal,
    )


def _addresses(parsed: _Parsed, resolve: Resolver) -> list[IPAddress]:
    if parsed.literal is not None:
        return [parsed.literal]
    try:
        raw = resolve(parsed.host, parsed.port)
    except (OSError, UnicodeError):
        raw = []
    if not raw:
        raise _refuse("callbackUrl host does not resolve")
    addresses: list[IPAddress] = []
    for item in raw:
        try:
            ip = ipaddress.ip_address(item)
        except ValueError:
            raise _refuse("callbackUrl host resolves to an invalid address") from None
        if ip not in addresses:
            addresses.append(ip)
    return addresses


def _check(parsed: _Parsed, addresses: list[IPAddress], allowlist: Allowlist) -> None:
    host_allowed = allowlist.allows_host(parsed.host)
    for ip in addresses:
        if allowlist.allows_address(ip):
            continue
        why = _refusal(ip)
        if why is None:
            continue
        # An allow-listed name trusts its DNS with private addresses, but not
        # with the metadata service: no receiver lives there, and it is what a
        # hijacked record would point at. Only an explicit address entry opens it.
        if host_allowed and not why.startswith("cloud metadata"):
            continue
        if parsed.literal is not None:
            raise _refuse(f"callbackUrl address {ip} is not allowed ({why})")
        # The resolved address stays out of the message: echoing it would turn
        # the API into a lookup service for internal DNS names.
        raise _refuse(f"callbackUrl host resolves to an address that is not allowed ({why})")


def check_callback_url(
    url: str, allowlist: Allowlist, *, resolve: Resolver = default_resolve
) -> None:
    """Raise ``ValidationFailed`` unless ``url`` is a callback URL the broker may call.

    The URL must be http(s), without user info, with a host name or a canonical
    IP address; the host (or every address its name resolves to) must be public
    unless the host or the address is allow-listed (a cloud metadata address
    needs an address entry). Resolves the name, so it blocks for as long as the
    resolver does.
    """
    parsed = _parse(url)
    _check(parsed, _addresses(parsed, resolve), allowlist)


def pin(url: str, allowlist: Allowlist, *, resolve: Resolver = default_resolve) -> PinnedTarget:
    """Resolve and check ``url`` again at send time and return the address to connect to.

    Raises ``ValidationFailed`` with the same rules as :func:`check_callback_url`.
    The sender must connect to ``PinnedTarget.url`` (never re-resolving the
    name), so what was checked is what is called.
    """
    parsed = _parse(url)
    addresses = _addresses(parsed, resolve)
    _check(parsed, addresses, allowlist)
    ip = addresses[0]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # Same destination, but reachable even where IPv6 sockets are v6-only.
        ip = ip.ipv4_mapped
    ip_text = f"[{ip}]" if ip.version == 6 else str(ip)
    query = f"?{parsed.query}" if parsed.query else ""
    host_text = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    default = parsed.port == _DEFAULT_PORTS[parsed.scheme]
    host_header = host_text if default else f"{host_text}:{parsed.port}"
    sni = None
    if parsed.scheme == "https" and parsed.literal is None:
        # SNI and certificate names never carry the root's trailing dot.
        sni = parsed.host.removesuffix(".")
    return PinnedTarget(
        url=f"{parsed.scheme}://{ip_text}:{parsed.port}{parsed.path}{query}",
        host_header=host_header,
        sni_hostname=sni,
        ip=str(ip),
    )
