"""Deliver callback events to ``callbackUrl`` as Standard Webhooks.

Every POST carries ``webhook-id`` (the event id, identical on every attempt so
a receiver can drop duplicates), ``webhook-timestamp`` and
``webhook-signature`` (``v1,`` + base64 HMAC-SHA256 over
``"{id}.{timestamp}." + body``), as specified at standardwebhooks.com; any
Standard Webhooks library verifies them.

This module makes one attempt and reports how it went. *When* to try again is
the service's decision (delayed jobs after :data:`RETRY_DELAYS`, then a dead
letter), because a serverless worker must never sleep waiting for a retry.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final

from kidp.errors import ValidationFailed
from kidp.models import CallbackEvent
from kidp.ssrf import Allowlist, Resolver, default_resolve, pin

if TYPE_CHECKING:
    import httpx

#: Seconds between attempts of one event; after the last one it is dead-lettered.
#: Documentation for the service, which schedules the retries as delayed jobs.
RETRY_DELAYS: Final[tuple[float, ...]] = (1.0, 2.0, 4.0, 8.0, 16.0)

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 (a format prefix, not a secret)
_MAX_ERROR_LENGTH = 200


def _decode_secret(secret: str) -> bytes:
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        # Standard Webhooks libraries accept unpadded base64; so do we.
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        # No exception chaining: nothing about the secret may reach a log.
        raise ValueError("webhook secret must be 'whsec_' followed by base64") from None
    if not key:
        raise ValueError("webhook secret must not be empty")
    return key


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks ``webhook-signature`` value (``v1,<base64>``).

    ``secret`` is ``whsec_`` + base64 key; the MAC is HMAC-SHA256 over
    ``f"{msg_id}.{timestamp}."`` followed by the exact body bytes.
    """
    return _signature(_decode_secret(secret), msg_id, timestamp, body)


def generate_secret() -> str:
    """A fresh signing secret (32 random bytes) in the ``whsec_`` format."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


@dataclass(frozen=True)
class DeliveryResult:
    """The outcome of one attempt; ``error`` is short and never holds a secret."""

    ok: bool
    status_code: int | None
    error: str | None


class CallbackSender:
    """Signs and POSTs callback events; one instance is shared by all threads."""

    def __init__(
        self,
        *,
        secret: str,
        allowlist: Allowlist,
        timeout_seconds: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        resolve: Resolver = default_resolve,
        clock: Callable[[], float] = time.time,
        user_agent: str = "kidp-broker",
    ) -> None:
        # Decoded now so a bad secret stops the broker at start-up, not at
        # the first callback.
        self._key = _decode_secret(secret)
        self._secret = secret
        self._allowlist = allowlist
        self._resolve = resolve
        self._clock = clock
        self._user_agent = user_agent
        self._timeout_seconds = timeout_seconds
        self._transport = transport
        self._http: httpx.Client | None = None
        # Worker threads share one sender: the first callbacks may race to
        # create the client, and close() may run while another thread sends.
        self._http_lock = threading.Lock()

    @property
    def _client(self) -> httpx.Client:
        # Built at the first callback: most functions (the API, scans) never
        # send one, and importing the HTTP client is a fifth of a cold start.
        with self._http_lock:
            if self._http is not None:
                return self._http
            import httpx

            self._http = httpx.Client(
                transport=self._transport,
                timeout=httpx.Timeout(self._timeout_seconds),
                # A redirect would send the signed body to a URL nobody checked.
                follow_redirects=False,
                # A proxy from the environment would resolve the name itself and
                # undo the pinning.
                trust_env=False,
                # The pool is keyed by IP and port, not by host name: a kept-alive
                # TLS connection verified for one name could carry a callback meant
                # for another name on the same address. Callbacks are rare enough
                # that a fresh connection each time costs nothing that matters.
                limits=httpx.Limits(max_keepalive_connections=0),
            )
            return self._http

    def warm_up(self) -> None:
        """Build the HTTP client now: a long-running worker should not pay for
        the import at its first callback (a function invoked once should)."""
        self._client  # noqa: B018 - the property builds and keeps the client

    def send(self, event: CallbackEvent) -> DeliveryResult:
        """POST ``event.payload`` to ``event.url`` once; never raises for a failed delivery.

        ``ok`` is True only for a 2xx answer. A 3xx is not followed and counts
        as a failure, as do other statuses, timeouts, connection errors and a
        URL that the SSRF rules refuse at send time.
        """
        try:
            target = pin(event.url, self._allowlist, resolve=self._resolve)
        except ValidationFailed as exc:
            return DeliveryResult(ok=False, status_code=None, error=f"refused: {exc.message}")
        try:
            body = json.dumps(event.payload, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError):
            return DeliveryResult(ok=False, status_code=None, error="payload is not valid JSON")

        timestamp = int(self._clock())
        signature = _signature(self._key, event.id, timestamp, body)
        headers = {
            # Set explicitly: the URL names the pinned IP, the receiver expects its name.
            "host": target.host_header,
            "content-type": "application/json",
            "user-agent": self._user_agent,
            "webhook-id": event.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
        extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else None
        client = self._client
        import httpx  # imported by the client above

        try:
            request = client.build_request(
                "POST", target.url, content=body, headers=headers, extensions=extensions
            )
            # Streamed and closed unread: only the status matters, and a
            # receiver must not be able to make the broker download a large body.
            response = client.send(request, stream=True)
            response.close()
        except httpx.TimeoutException:
            return DeliveryResult(ok=False, status_code=None, error="timeout")
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            detail = self._redact(f"{type(exc).__name__}: {exc}")
            return DeliveryResult(ok=False, status_code=None, error=f"connection error: {detail}")

        status = response.status_code
        if 200 <= status < 300:
            return DeliveryResult(ok=True, status_code=status, error=None)
        if 300 <= status < 400:
            return DeliveryResult(
                ok=False, status_code=status, error=f"redirect not followed (HTTP {status})"
            )
        return DeliveryResult(ok=False, status_code=status, error=f"HTTP {status}")

    def _redact(self, text: str) -> str:
        # Transport errors should never quote headers, but the error string is
        # stored and shown to operators, so make sure of it.
        key_text = self._secret.removeprefix(SECRET_PREFIX)
        for secret_text in (self._secret, key_text):
            if secret_text:
                text = text.replace(secret_text, "[redacted]")
        return text[:_MAX_ERROR_LENGTH]

    def close(self) -> None:
        """Release the HTTP client's connections."""
        with self._http_lock:
            if self._http is not None:
                self._http.close()
                self._http = None

    def __enter__(self) -> CallbackSender:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
