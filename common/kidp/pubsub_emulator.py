"""The Google Cloud CLI's Pub/Sub emulator, started on loopback.

The GCP job queue's tests, the GCP provider's topic tests and
``serve --provider gcp --emulate`` all run Pub/Sub here: the real
``google-cloud-pubsub`` client finds it through ``PUBSUB_EMULATOR_HOST``.
The emulator is a Java program that ships with the CLI (component
``pubsub-emulator``; Java 17 runs it); it is started directly rather than
through ``gcloud beta emulators pubsub start``, which adds a second process
and a Python start-up for nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kidp.childprocess import start_process_group, stop_process_group
from kidp.errors import ValidationFailed

#: Where the emulator lives inside a Cloud SDK installation.
_LAUNCHER = Path("platform/pubsub-emulator/bin/cloud-pubsub-emulator")


def find_launcher() -> Path | None:
    """The emulator's launcher in the Cloud SDK that ``gcloud`` on PATH belongs
    to (or ``CLOUDSDK_ROOT_DIR``), None when it is not installed."""
    roots: list[Path] = []
    if os.environ.get("CLOUDSDK_ROOT_DIR"):
        roots.append(Path(os.environ["CLOUDSDK_ROOT_DIR"]))
    gcloud = shutil.which("gcloud")
    if gcloud:
        roots.append(Path(gcloud).resolve().parent.parent)
    roots.append(Path("/usr/lib/google-cloud-sdk"))
    for root in roots:
        if (root / _LAUNCHER).is_file():
            return root / _LAUNCHER
    return None


@dataclass
class PubSubEmulator:
    """A running emulator; ``host`` is what ``PUBSUB_EMULATOR_HOST`` should say."""

    process: subprocess.Popen[bytes]
    host: str

    def stop(self) -> None:
        """Stop the emulator (the launcher's JVM too: it runs in its own group)."""
        stop_process_group(self.process)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_pubsub_emulator(
    *, port: int | None = None, log_file: Path | None = None, timeout: float = 60.0
) -> PubSubEmulator:
    """Start the emulator on ``127.0.0.1:port`` (a free port by default) and
    return once it accepts connections. Its state lives in memory."""
    launcher = find_launcher()
    if launcher is None:
        raise ValidationFailed(
            "the Pub/Sub emulator is not installed: install the Google Cloud CLI and "
            "run 'gcloud components install pubsub-emulator' (Java 17 runs it)"
        )
    port = port or _free_port()
    output = log_file.open("ab") if log_file is not None else subprocess.DEVNULL
    try:
        process = start_process_group(
            [str(launcher), "--host=127.0.0.1", f"--port={port}"],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        if log_file is not None and not isinstance(output, int):
            output.close()
    emulator = PubSubEmulator(process=process, host=f"127.0.0.1:{port}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ValidationFailed(
                f"the Pub/Sub emulator exited at start with status {process.returncode}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return emulator
        time.sleep(0.2)
    emulator.stop()
    raise ValidationFailed(f"the Pub/Sub emulator did not listen on port {port} in {timeout:g} s")
