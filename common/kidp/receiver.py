"""A local receiver for the broker's callbacks that checks every Standard
Webhooks signature. ``kidp-broker receiver``, the demo, the benchmarks and the
tests use it: only verified callbacks are kept, a bad signature gets 401.
"""

from __future__ import annotations

import hmac
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kidp.callbacks import sign


class CallbackReceiver:
    """A local receiver that checks the signature of every callback it gets."""

    def __init__(self, secret: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.secret = secret
        self.received: queue.Queue[dict[str, Any]] = queue.Queue()
        #: Every verified delivery as (webhook-id, payload), duplicates included.
        self.log: list[tuple[str, dict[str, Any]]] = []
        #: When set, answer with this status instead of accepting (a broken receiver).
        self.fail_with: int | None = None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                msg_id = self.headers.get("webhook-id", "")
                stamp = self.headers.get("webhook-timestamp", "0")
                expected = sign(receiver.secret, msg_id, int(stamp), body)
                offered = self.headers.get("webhook-signature", "").split(" ")
                valid = any(hmac.compare_digest(expected, s) for s in offered)
                failing = receiver.fail_with
                self.send_response(failing or (204 if valid else 401))
                self.end_headers()
                if valid and failing is None:
                    payload = json.loads(body)
                    receiver.log.append((msg_id, payload))
                    receiver.received.put(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}/v1/callback"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, phase: str, timeout: float) -> dict[str, Any] | None:
        """Print callbacks as they arrive until one in ``phase``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                payload = self.received.get(timeout=0.2)
            except queue.Empty:
                continue
            show_callback(payload)
            if payload["phase"] == phase:
                return payload
        return None

    def close(self) -> None:
        self.server.shutdown()


def show_callback(payload: dict[str, Any]) -> None:
    """Print one callback for a person: phase, message, endpoint, secret names."""
    meta = payload.get("additionalMetadata", {})
    line = f"  callback  {payload['phase']:<12} {payload['message']}"
    if payload.get("endpoint"):
        line += f"\n            endpoint={payload['endpoint']}:{payload.get('port')}"
    if payload.get("connectionSecret"):
        line += f" secret={payload['connectionSecret']}"
    if "secretRef" in meta:
        line += f"\n            secretRef={meta['secretRef']['id']}"
    print(line, flush=True)
