"""Local stand-ins for the clouds, behind ``serve --emulate`` and ``demo``.

Each provider has one starter, ``start(state_dir) -> EmulatedCloud``, named in
:data:`EMULATORS`: it starts whatever stands in for that cloud on loopback and
says which settings and environment variables point the broker's real SDK
clients at it. For AWS that is moto's threaded server, which speaks the real
AWS wire protocols, so the AWS provider runs unchanged through botocore.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping
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
    #: Variables to set; None means "unset it" (a profile that would win).
    environ: dict[str, str | None] = field(default_factory=dict)
    stop: Callable[[], None] = lambda: None

    def announcement(self) -> str:
        """What ``kidp-broker emulate`` prints once the stand-in is up: one JSON line."""
        return json.dumps(
            {"provider": self.provider, "settings": self.settings, "environ": self.environ},
            default=str,
        )


#: The starter of each provider's stand-in, ``"module:function"``, imported on use
#: so an emulated AWS never imports another cloud's SDK.
EMULATORS: dict[str, str] = {
    "aws": "kidp.emulator:start_aws",
    "onprem": "kidp.kube_emulator:start_onprem",
    "azure": "kidp.arm_emulator:start_azure",
    "gcp": "kidp.gcp_emulator:start_gcp",
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
        # Throwaway credentials, so nothing can reach a real account by accident.
        environ={
            "AWS_ACCESS_KEY_ID": "emulated",
            "AWS_SECRET_ACCESS_KEY": "emulated",
            "AWS_SESSION_TOKEN": None,
            "AWS_PROFILE": None,
        },
        stop=aws.stop,
    )


def apply_environ(environ: Mapping[str, str | None]) -> None:
    """Set (or, for None, unset) ``environ`` in this process's environment."""
    for name, value in environ.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def emulated_dir(state_dir: Path, provider: str) -> Path:
    """Where an emulated broker of ``provider`` keeps its store and its record."""
    return state_dir / "emulated" / provider


@dataclass(frozen=True)
class EmulationRecord:
    """What a running ``serve --emulate`` tells other commands (``scan``, ``dlq``)
    so they reach the same emulated cloud and store."""

    pid: int
    provider: str
    url: str
    settings: dict[str, Any]
    environ: dict[str, str | None]

    def write(self, state_dir: Path) -> Path:
        """Write the record (mode 0600: the environment may hold credentials)."""
        path = emulated_dir(state_dir, self.provider) / "broker.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(
                {
                    "pid": self.pid,
                    "provider": self.provider,
                    "url": self.url,
                    "settings": self.settings,
                    "environ": self.environ,
                },
                handle,
                default=str,
            )
        return path

    @classmethod
    def read(cls, state_dir: Path, provider: str) -> EmulationRecord:
        """The record of the running emulated broker of ``provider``; raises
        ``ValidationFailed`` saying what to start when there is none."""
        path = emulated_dir(state_dir, provider) / "broker.json"
        hint = f"start one with: kidp-broker serve --emulate --provider {provider}"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValidationFailed(
                f"no emulated {provider} broker has run from {state_dir} ({path} is missing); "
                + hint
            ) from None
        record = cls(
            pid=int(raw["pid"]),
            provider=str(raw["provider"]),
            url=str(raw["url"]),
            settings=dict(raw["settings"]),
            environ=dict(raw["environ"]),
        )
        if not EmulationClaim.held(state_dir, provider):
            raise ValidationFailed(
                f"the emulated {provider} broker (pid {record.pid}, {record.url}) has stopped, "
                "and its emulated cloud with it; " + hint
            )
        return record


class EmulationClaim:
    """The right to run the emulated broker of one provider from one state
    directory: an exclusive lock on ``emulated/<provider>/broker.lock``, held
    by ``serve --emulate`` for its life. The kernel drops it when the process
    ends, however it ends, so a stale record can never block a start and a
    second ``serve --emulate`` can never empty the store the first one uses."""

    def __init__(self, state_dir: Path, provider: str) -> None:
        directory = emulated_dir(state_dir, provider)
        directory.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.provider = provider
        self._fd = os.open(directory / "broker.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            where = _describe_running(directory / "broker.json")
            raise ValidationFailed(
                f"an emulated {provider} broker is already running from {state_dir}{where}; "
                "stop it first or use another KIDP_STATE_DIR"
            ) from None

    @staticmethod
    def held(state_dir: Path, provider: str) -> bool:
        """Whether a running ``serve --emulate`` holds the claim."""
        path = emulated_dir(state_dir, provider) / "broker.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock taken just now
        return False

    def release(self) -> None:
        """Forget the record of the running broker and drop the claim."""
        with contextlib.suppress(FileNotFoundError):
            (emulated_dir(self.state_dir, self.provider) / "broker.json").unlink()
        os.close(self._fd)


def _describe_running(record: Path) -> str:
    try:
        raw = json.loads(record.read_text())
    except (OSError, ValueError):
        return ""
    return f" (pid {raw.get('pid')}, {raw.get('url')})"
