"""The request handler every local stand-in's HTTP server builds on.

The ARM, Key Vault and Google API stand-ins are standard library HTTP servers
that read a JSON body and answer one: what they share is here, what each
cloud adds (its error shape, its request ids) stays in its module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any

__all__ = ["JsonHandler"]


class JsonHandler(BaseHTTPRequestHandler):
    """An HTTP/1.1 handler (connections kept alive, as the cloud SDKs expect)
    that reads request bodies and answers JSON."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet: tests and the broker log their own way

    def read_body(self) -> bytes:
        """The request's body: ``Content-Length`` bytes, none without it."""
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_json(
        self, status: int, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer ``status`` with ``body`` as JSON (no body for None) and ``headers``."""
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)
