"""The in-process AWS emulator behind ``serve --emulate`` and ``demo``.

moto's threaded server speaks the real AWS wire protocols on loopback, so the
AWS provider runs unchanged through boto3, pointed at it by endpoint URL.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from kidp.errors import ValidationFailed


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class AwsEmulator:
    """A running moto server; ``endpoint_url`` is what boto3 should talk to."""

    server: Any
    endpoint_url: str

    def stop(self) -> None:
        self.server.stop()


def start_aws_emulator(port: int | None = None) -> AwsEmulator:
    """Start moto's server on loopback and give boto3 throwaway credentials so
    nothing can reach a real account by accident."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise ValidationFailed(
            "--emulate needs the emulator extra: pip install 'kidp-broker[emulator]'"
        ) from None
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[key] = "emulated"
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    # The emulator logs a traceback for every operation it does not model (the
    # provider falls back on its own, e.g. for RDS account quotas): not news.
    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
    port = port or free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return AwsEmulator(server=server, endpoint_url=f"http://127.0.0.1:{port}")
