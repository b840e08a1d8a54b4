"""What every local stand-in for a Google REST API shares: a threaded HTTP
server on loopback, a route table, JSON bodies and Google's error shape.

The Cloud Tasks, Secret Manager and Cloud SQL Admin stand-ins
(:mod:`kidp.cloudtasks_emulator`, :mod:`kidp.secretmanager_emulator`,
:mod:`kidp.cloudsql_emulator`) are small servers that the real Google client
libraries talk to over REST (``client_options={"api_endpoint": url}``), so
the adapters run unchanged. Errors are answered as Google answers them,
``{"error": {"code", "message", "status"}}``, which ``google-api-core`` turns
into its typed exceptions (``NotFound``, ``AlreadyExists``...).

Each stand-in is started by its ``start_*`` function and returns an object
with its ``url`` and ``stop()``, so the emulated GCP broker can compose them.
Standard library only: no cloud SDK, nothing to install.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kidp.localhttp import JsonHandler, serve_in_thread, stop_serving

log = logging.getLogger(__name__)

#: Google's status names for the HTTP statuses the stand-ins answer with.
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    412: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


class ApiError(Exception):
    """An error answer: ``status`` is the HTTP status, ``message`` Google's text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.status,
                "message": self.message,
                "status": STATUS_NAMES.get(self.status, "UNKNOWN"),
            }
        }


@dataclass(frozen=True)
class Request:
    """One API request as a handler sees it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    match: re.Match[str]

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The first value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else default


Handler = Callable[[Request], tuple[int, Any]]


def timestamp(moment: datetime | None = None) -> str:
    """An RFC 3339 UTC timestamp as protobuf's JSON mapping writes it."""
    moment = moment or datetime.now(UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_timestamp(text: str) -> datetime:
    """The instant an RFC 3339 timestamp names (any fraction, ``Z`` or offset)."""
    match = re.fullmatch(r"(.+?T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text)
    if match is None:
        raise ApiError(400, f"invalid timestamp {text!r}")
    whole, fraction, zone = match.groups()
    micros = (fraction or ".0")[1:7].ljust(6, "0")
    parsed = datetime.fromisoformat(f"{whole}.{micros}{'+00:00' if zone == 'Z' else zone}")
    return parsed.astimezone(UTC)


class GoogleApiServer:
    """A Google-style JSON API on ``127.0.0.1``: subclasses call :meth:`route`
    in ``__init__`` and answer ``(status, body)`` or raise :class:`ApiError`."""

    #: The API's name in log lines.
    service = "api"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        #: HTTP statuses to answer the next calls with (fault injection), by
        #: the methods that call :meth:`_fault`.
        self.faults: list[int] = []
        server = self

        class _Handler(JsonHandler):
            def _dispatch(self) -> None:
                server._dispatch(self)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _dispatch  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s stand-in: " + format, server.service, *args)

        self._httpd = ThreadingHTTPServer((host, port), _Handler)

    @property
    def url(self) -> str:
        """The API's base URL, what ``api_endpoint`` should say."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """Answer ``method`` on paths matching ``pattern`` (a full-match regex)."""
        self._routes.append((method, re.compile(pattern), handler))

    def start(self) -> None:
        """Serve, from a thread of its own."""
        serve_in_thread(self._httpd, f"{self.service}-standin")

    def _fault(self) -> None:
        """Raise the next injected fault, if any (under :attr:`lock`)."""
        if self.faults:
            raise ApiError(self.faults.pop(0), "injected fault")

    def stop(self) -> None:
        """Stop serving and release the port."""
        stop_serving(self._httpd)

    def _dispatch(self, http: JsonHandler) -> None:
        parts = urlsplit(http.path)
        raw = http.read_body()
        status: int
        answer: Any
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            status, answer = 400, ApiError(400, "the body is not JSON").body()
        else:
            status, answer = self._answer(http, parts.path, parts.query, body)
        http.send_json(status, answer)

    def _answer(
        self, http: BaseHTTPRequestHandler, path: str, query: str, body: Any
    ) -> tuple[int, Any]:
        with self.lock:
            self.requests.append((http.command, path))
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match is None or method != http.command:
                continue
            request = Request(
                method=http.command,
                path=path,
                query=parse_qs(query),
                headers={k.lower(): v for k, v in http.headers.items()},
                body=body,
                match=match,
            )
            try:
                return handler(request)
            except ApiError as exc:
                return exc.status, exc.body()
            except Exception:  # a stand-in bug must answer, not hang the client
                log.exception("%s stand-in failed on %s %s", self.service, http.command, path)
                return 500, ApiError(500, "stand-in error").body()
        return 404, ApiError(404, f"no such method: {http.command} {path}").body()
