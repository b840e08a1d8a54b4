"""Local stand-ins for the clouds, behind ``serve --emulate`` and ``demo``.

Each provider has one starter, ``start(state_dir) -> EmulatedCloud``, named in
:data:`EMULATORS`: it starts whatever stands in for that cloud on loopback and
says which settings and environment variables point the broker's real SDK
clients at it. For AWS that is moto's threaded server, which speaks the real
AWS wire protocols, so the AWS provider runs unchanged through botocore.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kidp.errors import ValidationFailed


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class EmulatedCloud:
    """A running local stand-in for one provider's cloud.

    ``settings`` are :class:`~kidp.settings.Settings` fields that point the
    broker at it (endpoints, store and queue URLs); ``environ`` holds the
    variables the cloud's SDK reads (throwaway credentials, emulator hosts),
    which the caller puts in ``os.environ`` before building the broker;
    ``stop`` stops every process and server it started.
    """

    provider: str
    settings: dict[str, Any] = field(default_factory=dict)
    environ: dict[str, str] = field(default_factory=dict)
    stop: Callable[[], None] = lambda: None


#: The starter of each provider's stand-in, ``"module:function"``, imported on use
#: so an emulated AWS never imports another cloud's SDK.
EMULATORS: dict[str, str] = {
    "aws": "kidp.emulator:start_aws",
    "onprem": "kidp.kube_emulator:start_onprem",
}


def start_emulated(provider: str, state_dir: Path) -> EmulatedCloud:
    """Start the stand-in for ``provider``'s cloud, keeping its files under ``state_dir``."""
    target = EMULATORS.get(provider)
    if target is None:
        raise ValidationFailed(
            f"no emulator for provider '{provider}'; emulated: {', '.join(sorted(EMULATORS))}"
        )
    module, _, function = target.partition(":")
    starter: Callable[[Path], EmulatedCloud] = getattr(importlib.import_module(module), function)
    return starter(state_dir)


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


def start_aws(state_dir: Path) -> EmulatedCloud:
    """:data:`EMULATORS` starter for AWS: moto's server (its state lives in memory)."""
    aws = start_aws_emulator()
    return EmulatedCloud(
        provider="aws",
        settings={"aws_endpoint_url": aws.endpoint_url},
        stop=aws.stop,
    )
