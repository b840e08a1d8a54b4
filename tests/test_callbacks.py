"""Callback delivery against a real HTTP(S) receiver on 127.0.0.1.

The receiver is allow-listed explicitly (loopback is refused by default); names
are resolved by fake resolvers, so nothing leaves this machine.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from kidp.callbacks import (
    RETRY_DELAYS,
    CallbackSender,
    DeliveryResult,
    generate_secret,
    sign,
)
from kidp.localtls import issue_tls_files
from kidp.models import CallbackEvent
from kidp.ssrf import Allowlist

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
LOOPBACK = Allowlist.parse(["127.0.0.1"])
PAYLOAD: dict[str, Any] = {
    "deploymentId": "deploy-abc123",
    "resourceType": "database",
    "resourceName": "postgres-app-db",
    "namespace": "team-platform",
    "phase": "Ready",
    "message": "Database provisioned and healthy \u2713",
    "time": "2025-10-03T09:30:00Z",
    "endpoint": "postgres-app-db.team-platform.svc.cluster.local",
    "port": 5432,
    "connectionSecret": "postgres-app-db-credentials",
    "additionalMetadata": {"version": "15.2", "engine": "postgresql"},
    "estimatedMonthlyCost": 45.5,
}


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    base: str
    port: int
    hits: list[Hit] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    sni: list[str | None] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [hit.path for hit in self.hits]


def _start(receiver_factory: Any, context: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            receiver = state["r"]
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            receiver.hits.append(
                Hit(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            if self.path == "/fail":
                self._answer(500)
            elif self.path == "/slow":
                receiver.release.wait(5)
                self._answer(200)
            elif self.path == "/redirect":
                self._answer(302, location="/other")
            else:
                self._answer(204 if self.path == "/empty" else 200)

        def _answer(self, status: int, location: str | None = None) -> None:
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", "2")
            self.end_headers()
            if status != 204:
                self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    receiver = receiver_factory(port)
    state["r"] = receiver
    if context is not None:

        def remember_sni(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
            receiver.sni.append(name)

        context.sni_callback = remember_sni
        server.socket = context.wrap_socket(server.socket, server_side=True)
    # A short poll interval keeps shutdown (and so each test) fast.
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from _start(lambda port: Receiver(base=f"http://127.0.0.1:{port}", port=port))


def event(url: str, event_id: str = "msg_2Kx9") -> CallbackEvent:
    return CallbackEvent(id=event_id, deployment_id="deploy-abc123", url=url, payload=PAYLOAD)


def assert_no_secret(result: DeliveryResult) -> None:
    text = repr(result)
    assert SECRET not in text
    assert SECRET.removeprefix("whsec_") not in text
    assert "v1," not in text


@pytest.fixture
def sender() -> Iterator[CallbackSender]:
    with CallbackSender(secret=SECRET, allowlist=LOOPBACK, timeout_seconds=5) as s:
        yield s


def test_delivers_signed_payload(receiver: Receiver, sender: CallbackSender) -> None:
    result = sender.send(event(f"{receiver.base}/hook"))

    assert result == DeliveryResult(ok=True, status_code=200, error=None)
    (hit,) = receiver.hits
    assert json.loads(hit.body) == PAYLOAD
    assert hit.body == json.dumps(PAYLOAD, separators=(",", ":")).encode()
    headers = hit.headers
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "kidp-broker"
    assert headers["webhook-id"] == "msg_2Kx9"
    assert headers["webhook-signature"].startswith("v1,")
    # The reference library accepts it (and checks the timestamp is recent).
    assert Webhook(SECRET).verify(hit.body, hit.headers) == PAYLOAD


def test_any_2xx_is_ok(receiver: Receiver, sender: CallbackSender) -> None:
    assert sender.send(event(f"{receiver.base}/empty")) == DeliveryResult(True, 204, None)


def test_webhook_id_is_stable_across_attempts(receiver: Receiver) -> None:
    ticks = iter([1_700_000_000.9, 1_700_000_004.2])
    with CallbackSender(secret=SECRET, allowlist=LOOPBACK, clock=lambda: next(ticks)) as s:
        first = s.send(event(f"{receiver.base}/hook", "evt-1"))
        second = s.send(event(f"{receiver.base}/hook", "evt-1"))
    assert first.ok and second.ok
    ids = [hit.headers["webhook-id"] for hit in receiver.hits]
    stamps = [hit.headers["webhook-timestamp"] for hit in receiver.hits]
    assert ids == ["evt-1", "evt-1"]
    assert stamps == ["1700000000", "1700000004"]
    for hit in receiver.hits:
        ts = int(hit.headers["webhook-timestamp"])
        assert hit.headers["webhook-signature"] == sign(SECRET, "evt-1", ts, hit.body)


def test_connects_to_pinned_address_with_original_host(receiver: Receiver) -> None:
    lookups: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[str]:
        lookups.append((host, port))
        return ["127.0.0.1"]

    allow = Allowlist.parse(["receiver.test"])
    with CallbackSender(secret=SECRET, allowlist=allow, resolve=resolve) as s:
        result = s.send(event(f"http://receiver.test:{receiver.port}/hook"))
    assert result.ok, result
    assert lookups == [("receiver.test", receiver.port)]
    assert receiver.hits[0].headers["host"] == f"receiver.test:{receiver.port}"


def test_server_error_is_a_failed_delivery(receiver: Receiver, sender: CallbackSender) -> None:
    result = sender.send(event(f"{receiver.base}/fail"))
    assert result == DeliveryResult(ok=False, status_code=500, error="HTTP 500")
    assert_no_secret(result)


def test_timeout(receiver: Receiver) -> None:
    with CallbackSender(secret=SECRET, allowlist=LOOPBACK, timeout_seconds=0.3) as s:
        result = s.send(event(f"{receiver.base}/slow"))
    assert result == DeliveryResult(ok=False, status_code=None, error="timeout")


def test_redirect_is_not_followed(receiver: Receiver, sender: CallbackSender) -> None:
    result = sender.send(event(f"{receiver.base}/redirect"))
    assert not result.ok
    assert result.status_code == 302
    assert result.error is not None and "redirect not followed" in result.error
    assert receiver.paths() == ["/redirect"]
    assert_no_secret(result)


def test_connection_refused(sender: CallbackSender) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = sender.send(event(f"http://127.0.0.1:{port}/hook"))
    assert not result.ok
    assert result.status_code is None
    assert result.error is not None and result.error.startswith("connection error")
    assert_no_secret(result)


def test_not_allowlisted_loopback_is_refused_without_connecting(receiver: Receiver) -> None:
    calls: list[httpx.Request] = []

    def must_not_be_called(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200)

    transport = httpx.MockTransport(must_not_be_called)
    with CallbackSender(secret=SECRET, allowlist=Allowlist(), transport=transport) as s:
        result = s.send(event(f"{receiver.base}/hook"))
    assert not result.ok
    assert result.status_code is None
    assert result.error is not None and "callbackUrl" in result.error
    assert calls == []
    assert receiver.hits == []
    assert_no_secret(result)


def test_dns_rebinding_is_refused_at_send_time(receiver: Receiver) -> None:
    with CallbackSender(
        secret=SECRET, allowlist=Allowlist(), resolve=lambda host, port: ["127.0.0.1"]
    ) as s:
        result = s.send(event(f"http://rebind.test:{receiver.port}/hook"))
    assert not result.ok
    assert result.error is not None and "callbackUrl host resolves to" in result.error
    assert receiver.hits == []


def test_unserializable_payload_is_a_failed_delivery(sender: CallbackSender) -> None:
    bad = CallbackEvent(id="e", deployment_id="d", url="http://127.0.0.1:9/", payload={"x": {1j}})
    assert sender.send(bad) == DeliveryResult(False, None, "payload is not valid JSON")


def test_sign_matches_reference_library() -> None:
    body = b'{"a":1}'
    when = dt.datetime.fromtimestamp(1_700_000_000, tz=dt.UTC)
    expected = Webhook(SECRET).sign("msg_1", when, body.decode())
    assert sign(SECRET, "msg_1", 1_700_000_000, body) == expected


def test_generated_secret_round_trips() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_")
    sig = sign(secret, "m", 1, b"{}")
    when = dt.datetime.fromtimestamp(1, tz=dt.UTC)
    assert sig == Webhook(secret).sign("m", when, "{}")


@pytest.mark.parametrize("secret", ["whsec_", "whsec_not base64!", ""])
def test_bad_secret_is_refused_at_construction(secret: str) -> None:
    with pytest.raises(ValueError, match="webhook secret") as info:
        CallbackSender(secret=secret, allowlist=LOOPBACK)
    if secret.removeprefix("whsec_"):
        assert secret.removeprefix("whsec_") not in str(info.value)


def test_retry_delays_documented() -> None:
    assert RETRY_DELAYS == (1.0, 2.0, 4.0, 8.0, 16.0)


# --- HTTPS: the certificate names receiver.test only, so the delivery works
# only if TLS verifies (and sends SNI for) the original host, not the pinned IP.


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[tuple[Receiver, Path]]:
    tls = issue_tls_files(tmp_path, "receiver.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert, tls.key)
    yield from (
        (r, tls.ca)
        for r in _start(
            lambda port: Receiver(base=f"https://receiver.test:{port}", port=port), context
        )
    )


def test_https_verifies_the_original_host_name(tls_receiver: tuple[Receiver, Path]) -> None:
    receiver, ca_path = tls_receiver
    trust = ssl.create_default_context(cafile=str(ca_path))
    allow = Allowlist.parse(["receiver.test"])
    with CallbackSender(
        secret=SECRET,
        allowlist=allow,
        resolve=lambda host, port: ["127.0.0.1"],
        transport=httpx.HTTPTransport(verify=trust),
    ) as s:
        result = s.send(event(f"{receiver.base}/hook"))
    assert result == DeliveryResult(ok=True, status_code=200, error=None)
    assert receiver.sni == ["receiver.test"]
    assert receiver.hits[0].headers["host"] == f"receiver.test:{receiver.port}"


def test_https_to_a_name_the_certificate_does_not_cover_fails(
    tls_receiver: tuple[Receiver, Path],
) -> None:
    receiver, ca_path = tls_receiver
    trust = ssl.create_default_context(cafile=str(ca_path))
    with CallbackSender(
        secret=SECRET,
        allowlist=Allowlist.parse(["other.test"]),
        resolve=lambda host, port: ["127.0.0.1"],
        transport=httpx.HTTPTransport(verify=trust),
    ) as s:
        result = s.send(event(f"https://other.test:{receiver.port}/hook"))
    assert not result.ok
    assert result.error is not None and result.error.startswith("connection error")
    assert receiver.hits == []
    assert_no_secret(result)
