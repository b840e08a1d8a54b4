"""The request handler every local stand-in's HTTP server builds on, and its thread.

The ARM, Key Vault and Google API stand-ins are standard library HTTP servers
that read a JSON body and answer one: what they share is here, what each
cloud adds (its error shape, its request ids) stays in its module.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["JsonHandler", "serve_in_thread", "stop_serving"]


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


def serve_in_thread(server: ThreadingHTTPServer, name: str) -> threading.Thread:
    """Serve ``server`` from a daemon thread named ``name``, its request
    threads daemons too (a stand-in never keeps the process alive);
    :func:`stop_serving` ends it."""
    server.daemon_threads = True
    # A short poll interval: shutdown() waits for one, and tests stop a stand-in per test.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name=name, daemon=True)
    thread.start()
    return thread


def stop_serving(server: ThreadingHTTPServer) -> None:
    """Stop serving and release the port."""
    server.shutdown()
    server.server_close()
