"""SSRF rules for callback URLs. No test here touches the network: every name
is resolved by a fake resolver, and literal addresses must not be resolved."""

from __future__ import annotations

import pytest

from kidp.errors import ValidationFailed
from kidp.ssrf import Allowlist, PinnedTarget, check_callback_url, pin

PUBLIC = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"

DNS: dict[str, list[str]] = {
    "example.com": [PUBLIC],
    "dual.example.com": [PUBLIC, PUBLIC_V6],
    "v6.example.com": [PUBLIC_V6],
    "internal.example.com": ["10.1.2.3"],
    "mixed.example.com": [PUBLIC, "192.168.1.10"],
    "metadata.example.com": ["169.254.169.254"],
    "mapped.example.com": ["::ffff:127.0.0.1"],
    "manager": ["10.0.0.5"],
    "localhost": ["127.0.0.1", "::1"],
}


def fake_resolve(host: str, port: int) -> list[str]:
    assert not host.replace(".", "").isdigit(), f"literal {host} must not be resolved"
    # Like DNS: a trailing dot only marks the name as fully qualified.
    return list(DNS.get(host.removesuffix("."), []))


NOTHING = Allowlist()

REFUSED = [
    # scheme, host, user info
    ("ftp://example.com/cb", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("gopher://example.com/", "scheme"),
    ("javascript:alert(1)", "scheme"),
    ("example.com/cb", "scheme"),
    ("http:///cb", "no host"),
    ("http://:8080/cb", "no host"),
    ("http://user@example.com/cb", "user info"),
    ("http://user:pw@example.com/cb", "user info"),
    ("http://example.com@127.0.0.1/cb", "user info"),
    ("http://example.com\\@127.0.0.1/cb", "user info"),
    ("http://exa mple.com/cb", "spaces"),
    ("http://example.com/\r\nX-Injected: 1", "control"),
    ("http://example.com:0/cb", "port"),
    ("http://example.com:99999/cb", "not a valid URL"),
    ("http://bücher.example/cb", "ASCII"),
    ("http://-bad-.example.com/cb", "not a valid host"),
    # numeric tricks for 127.0.0.1
    ("http://2130706433/", "canonical"),
    ("http://0177.0.0.1/", "canonical"),
    ("http://0x7f000001/", "canonical"),
    ("http://0x7f.0.0.1/", "canonical"),
    ("http://0X7F.0.0.1/", "canonical"),
    ("http://127.1/", "canonical"),
    ("http://127.0.1/", "canonical"),
    ("http://127.000.000.001/", "canonical"),
    ("http://127.0.0.1./", "canonical"),
    ("http://1.2.3.4.5/", "canonical"),
    ("http://example.0x10/", "canonical"),
    ("http://0/", "canonical"),
    # literal addresses
    ("http://127.0.0.1/", "loopback"),
    ("http://127.255.0.9:8080/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://10.0.0.1/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://172.31.255.254/", "private"),
    ("http://192.168.0.1/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/", "cloud metadata"),
    ("http://100.100.100.200/", "cloud metadata"),
    ("http://169.254.1.1/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::1%25eth0]/", "zone"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "reserved"),
    ("http://192.0.2.1/", "reserved"),
    ("http://100.64.0.1/", "shared address space"),
    ("http://100.127.255.254/", "shared address space"),
    ("http://[fc00::1]/", "unique-local"),
    ("http://[fd12:3456::1]/", "unique-local"),
    # IPv6 forms that embed a disallowed IPv4
    ("http://[::ffff:127.0.0.1]/", "loopback, embedded"),
    ("http://[::ffff:7f00:1]/", "loopback, embedded"),
    ("http://[::ffff:169.254.169.254]/", "cloud metadata, embedded"),
    ("http://[::ffff:10.0.0.1]/", "private, embedded"),
    ("http://[::127.0.0.1]/", "loopback, embedded"),
    ("http://[::10.0.0.1]/", "private, embedded"),
    ("http://[2002:7f00:1::]/", "loopback, embedded"),
    ("http://[2002:a9fe:a9fe::1]/", "cloud metadata, embedded"),
    ("http://[64:ff9b::127.0.0.1]/", "loopback, embedded"),
    ("http://[64:ff9b::a00:1]/", "private, embedded"),
    ("http://[::ffff:0:127.0.0.1]/", "loopback, embedded"),
    ("http://[2001::1]/", "reserved"),
    ("http://[2001:db8::1]/", "reserved"),
    ("http://[not:an:ip]/", "not a valid"),
    # names
    ("http://internal.example.com/cb", "private"),
    ("http://metadata.example.com/cb", "cloud metadata"),
    ("http://mapped.example.com/cb", "loopback, embedded"),
    ("http://mixed.example.com/cb", "private"),
    ("http://localhost:8080/cb", "loopback"),
    ("http://does-not-exist.example.com/cb", "does not resolve"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_refused(url: str, reason: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        check_callback_url(url, NOTHING, resolve=fake_resolve)
    assert "callbackUrl" in info.value.message
    assert reason in info.value.message
    assert info.value.to_body()["code"] == 400
    # pin() applies the same rules at send time.
    with pytest.raises(ValidationFailed):
        pin(url, NOTHING, resolve=fake_resolve)


def test_resolved_private_address_is_not_echoed() -> None:
    """The message must not turn the API into an internal DNS lookup service."""
    with pytest.raises(ValidationFailed) as info:
        check_callback_url("http://internal.example.com/", NOTHING, resolve=fake_resolve)
    assert "10.1.2.3" not in info.value.message


ALLOWED = [
    f"http://{PUBLIC}/cb",
    f"https://{PUBLIC}:8443/cb?x=1",
    f"http://[{PUBLIC_V6}]/cb",
    f"http://[::ffff:{PUBLIC}]/cb",
    "http://[64:ff9b::5db8:d822]/cb",  # NAT64 of a public address (IPv6-only clusters)
    "http://example.com/cb",
    "https://EXAMPLE.com./cb",
    "http://dual.example.com:9090/v1/callback",
    "https://v6.example.com/cb",
    "http://cafe.face/",  # hex letters, but not a number to any parser
]


@pytest.mark.parametrize("url", ALLOWED)
def test_public_allowed(url: str) -> None:
    dns = {**DNS, "cafe.face": [PUBLIC]}

    def resolve(host: str, port: int) -> list[str]:
        return list(dns.get(host.removesuffix("."), []))

    check_callback_url(url, NOTHING, resolve=resolve)


def test_resolver_error_is_does_not_resolve() -> None:
    def broken(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(ValidationFailed, match="callbackUrl host does not resolve"):
        check_callback_url("http://example.com/", NOTHING, resolve=broken)


@pytest.mark.parametrize(
    ("entries", "url"),
    [
        (["localhost"], "http://localhost:8080/cb"),
        (["LOCALHOST."], "http://localhost:8080/cb"),
        (["127.0.0.1"], "http://127.0.0.1:8080/cb"),
        (["127.0.0.0/8"], "http://127.0.0.1:8080/cb"),
        (["127.0.0.0/8"], "http://[::ffff:127.0.0.1]:8080/cb"),
        (["::1"], "http://[::1]:8080/cb"),
        (["[::1]"], "http://[::1]:8080/cb"),
        (["manager"], "http://manager:9090/v1/callback"),
        (["10.0.0.0/8"], "http://manager:9090/v1/callback"),
        (["10.0.0.0/8", "192.168.0.0/16"], "http://mixed.example.com/cb"),
    ],
)
def test_allowlisted(entries: list[str], url: str) -> None:
    allowlist = Allowlist.parse(entries)
    check_callback_url(url, allowlist, resolve=fake_resolve)
    pin(url, allowlist, resolve=fake_resolve)


def test_allowlist_does_not_open_other_hosts() -> None:
    allowlist = Allowlist.parse(["manager", "10.0.0.5/32"])
    with pytest.raises(ValidationFailed, match="callbackUrl"):
        check_callback_url("http://internal.example.com/", allowlist, resolve=fake_resolve)
    with pytest.raises(ValidationFailed, match="callbackUrl"):
        check_callback_url("http://127.0.0.1/", allowlist, resolve=fake_resolve)


def test_allowlisted_name_does_not_open_the_metadata_service() -> None:
    allow_name = Allowlist.parse(["metadata.example.com"])
    with pytest.raises(ValidationFailed, match="cloud metadata"):
        check_callback_url("http://metadata.example.com/", allow_name, resolve=fake_resolve)
    allow_address = Allowlist.parse(["169.254.169.254"])
    check_callback_url("http://metadata.example.com/", allow_address, resolve=fake_resolve)


def test_allowlisted_host_must_still_resolve() -> None:
    with pytest.raises(ValidationFailed, match="does not resolve"):
        check_callback_url("http://ghost/", Allowlist.parse(["ghost"]), resolve=fake_resolve)


@pytest.mark.parametrize(
    "entry", ["10.0.0.1/8", "*.example.com", "manager:9090", "127.1", "2130706433", "a b"]
)
def test_allowlist_rejects_bad_entries(entry: str) -> None:
    with pytest.raises(ValueError, match="allow-list entry"):
        Allowlist.parse([entry])


def test_allowlist_queries() -> None:
    allowlist = Allowlist.parse(["Manager", " ", "10.0.0.0/8", "fd00::/8"])
    assert allowlist.allows_host("manager")
    assert allowlist.allows_host("MANAGER.")
    assert not allowlist.allows_host("manager.evil.com")
    assert allowlist.allows_address("10.9.8.7")
    assert allowlist.allows_address("fd00::1")
    assert allowlist.allows_address("::ffff:10.0.0.1")
    assert not allowlist.allows_address("11.0.0.1")
    assert not allowlist.allows_address("not-an-ip")


def test_pin_http_name() -> None:
    target = pin("http://example.com:9090/v1/callback?a=1#frag", NOTHING, resolve=fake_resolve)
    assert target == PinnedTarget(
        url=f"http://{PUBLIC}:9090/v1/callback?a=1",
        host_header="example.com:9090",
        sni_hostname=None,
        ip=PUBLIC,
    )


def test_pin_https_name_keeps_sni() -> None:
    target = pin("https://Example.com./cb", NOTHING, resolve=fake_resolve)
    assert target.url == f"https://{PUBLIC}:443/cb"
    assert target.host_header == "example.com."
    assert target.sni_hostname == "example.com"


def test_pin_ipv6() -> None:
    target = pin("https://v6.example.com:8443", NOTHING, resolve=fake_resolve)
    assert target.url == f"https://[{PUBLIC_V6}]:8443/"
    assert target.ip == PUBLIC_V6
    assert target.host_header == "v6.example.com:8443"
    literal = pin(f"https://[{PUBLIC_V6}]/x", NOTHING, resolve=fake_resolve)
    assert literal.host_header == f"[{PUBLIC_V6}]"
    assert literal.sni_hostname is None


def test_pin_ipv4_mapped_connects_to_ipv4() -> None:
    target = pin(f"http://[::ffff:{PUBLIC}]/cb", NOTHING, resolve=fake_resolve)
    assert target.ip == PUBLIC
    assert target.url == f"http://{PUBLIC}:80/cb"


def test_dns_rebinding_refused_at_send_time() -> None:
    """Public when the request arrived, loopback when the callback is sent."""
    answers = iter([[PUBLIC], ["127.0.0.1"]])

    def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    url = "http://rebind.example.com/cb"
    check_callback_url(url, NOTHING, resolve=rebinding)
    with pytest.raises(ValidationFailed, match="callbackUrl host resolves to"):
        pin(url, NOTHING, resolve=rebinding)


def test_pin_checks_every_address_not_only_the_chosen_one() -> None:
    with pytest.raises(ValidationFailed, match="private"):
        pin("http://mixed.example.com/", NOTHING, resolve=fake_resolve)
