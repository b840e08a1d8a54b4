"""Azurite, Microsoft's Azure Storage emulator, started on loopback.

The Table Storage store's and the Storage Queue's tests, the Azure Functions
edge's tests and ``serve --provider azure --emulate`` run Azure Storage here:
the real ``azure-data-tables`` and ``azure-storage-queue`` clients reach it
through an ordinary connection string (:attr:`Azurite.connection_string`).

Azurite is an npm package pinned in ``package.json`` (3.35.x: the last line
that runs on Node 20), installed by ``npm ci`` into ``node_modules``. It is
started with every service on a port the kernel picks (``--*Port 0``); the
ports are read from the lines Azurite prints once each service listens, so
two test sessions on one machine never race for a port.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

from kidp.childprocess import start_process_group, stop_process_group
from kidp.errors import ValidationFailed

__all__ = [
    "ACCOUNT_KEY",
    "ACCOUNT_NAME",
    "SERVICES",
    "Azurite",
    "find_azurite",
    "start_azurite",
]

#: Azurite's account and its key: published by Microsoft for the emulator,
#: the same on every machine, and no credential of any real account.
ACCOUNT_NAME: Final = "devstoreaccount1"
ACCOUNT_KEY: Final = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
#: The services one Azurite process serves.
SERVICES: Final = ("blob", "queue", "table")

_LISTENING = re.compile(
    r"Azurite (?P<service>Blob|Queue|Table) service is successfully listening at "
    r"(?P<url>https?://\S+?)/?$"
)
#: Where ``npm ci`` puts the launcher, relative to the repository root.
_NODE_BIN = Path("node_modules/.bin/azurite")


def _repository_root() -> Path:
    # common/kidp/azurite.py -> the repository (an editable install runs from it).
    return Path(__file__).resolve().parents[2]


def find_azurite() -> Path | None:
    """The ``azurite`` launcher: the repository's ``node_modules`` (``npm ci``),
    else one on ``PATH``; None when neither exists or Node is missing."""
    if shutil.which("node") is None:
        return None
    local = _repository_root() / _NODE_BIN
    if local.exists():
        return local
    found = shutil.which("azurite")
    return Path(found) if found else None


@dataclass
class Azurite:
    """A running Azurite: its endpoints and the connection string that reaches
    them with the emulator's well-known account."""

    process: subprocess.Popen[bytes]
    endpoints: dict[str, str]
    account_name: str = ACCOUNT_NAME
    account_key: str = field(default=ACCOUNT_KEY, repr=False)

    @property
    def blob_endpoint(self) -> str:
        """``http://127.0.0.1:<port>/devstoreaccount1`` (path-style, as Azurite wants)."""
        return self.endpoints["blob"]

    @property
    def queue_endpoint(self) -> str:
        """The Queue service endpoint."""
        return self.endpoints["queue"]

    @property
    def table_endpoint(self) -> str:
        """The Table service endpoint."""
        return self.endpoints["table"]

    @property
    def connection_string(self) -> str:
        """A storage connection string for every running service (it holds the
        account key: treat it as a secret, even if this one is public)."""
        parts = [
            "DefaultEndpointsProtocol=http",
            f"AccountName={self.account_name}",
            f"AccountKey={self.account_key}",
        ]
        parts += [f"{s.capitalize()}Endpoint={url}" for s, url in sorted(self.endpoints.items())]
        return ";".join(parts) + ";"

    def broker_settings(self, *, table: str = "kidp", queue: str = "kidp-jobs") -> dict[str, str]:
        """:class:`~kidp.settings.Settings` fields that put a broker's store and
        job queue here (what an emulated Azure broker runs on), after creating
        the table, the queue and its poison queue through the broker's own
        adapters."""
        from kidp.queues.azurequeue import AzureStorageJobQueue
        from kidp.stores.azuretable import TableDeploymentStore

        values = {
            "store_url": f"azuretable://{self.account_name}/{table}",
            "queue_url": f"azurequeue://{self.account_name}/{queue}",
            "azure_storage_connection_string": self.connection_string,
        }
        store = TableDeploymentStore.from_url(
            values["store_url"], connection_string=self.connection_string
        )
        jobs = AzureStorageJobQueue.from_url(
            values["queue_url"], connection_string=self.connection_string
        )
        try:
            store.create_table()
            jobs.create_queues()
        finally:
            store.close()
            jobs.close()
        return values

    def stop(self) -> None:
        """Stop Azurite and every process it started (it runs in a group of its own)."""
        stop_process_group(self.process)


def start_azurite(
    *,
    location: Path | None = None,
    log_file: Path | None = None,
    timeout: float = 60.0,
) -> Azurite:
    """Start Azurite (blob, queue and table) on free loopback ports and return
    once every service listens.

    State lives in memory, or in ``location`` when given (kept across
    restarts: what ``serve --emulate`` uses). Azurite's output goes to
    ``log_file`` (discarded without one).
    """
    launcher = find_azurite()
    if launcher is None:
        raise ValidationFailed(
            "Azurite is not installed: run 'npm ci' in the repository (it is pinned in "
            "package.json; Node 20 runs it)"
        )
    command = [str(launcher)]
    for service in SERVICES:
        command += [f"--{service}Host", "127.0.0.1", f"--{service}Port", "0"]
    command += [
        # Accept the API version of whatever SDK release is installed, and
        # headers Azurite does not model, as the cloud would.
        "--skipApiVersionCheck",
        "--loose",
        "--disableTelemetry",
    ]
    if location is None:
        command += ["--inMemoryPersistence", "--extentMemoryLimit", "256"]
    else:
        location.mkdir(parents=True, exist_ok=True)
        command += ["--location", str(location)]
    if log_file is None:
        command.append("--silent")
    process = start_process_group(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=location or None,
    )
    assert process.stdout is not None
    endpoints: dict[str, str] = {}
    ready = threading.Event()
    reader = threading.Thread(
        target=_read_output,
        args=(process.stdout, endpoints, ready, log_file),
        name="azurite-output",
        daemon=True,
    )
    reader.start()
    azurite = Azurite(process=process, endpoints=endpoints)
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if process.poll() is not None:
            raise ValidationFailed(f"Azurite exited at start with status {process.returncode}")
        if time.monotonic() > deadline:
            azurite.stop()
            raise ValidationFailed(f"Azurite did not listen within {timeout:g} s")
    return azurite


def _read_output(
    stream: IO[bytes],
    endpoints: dict[str, str],
    ready: threading.Event,
    log_file: Path | None,
) -> None:
    """Collect the endpoints from Azurite's start-up lines, then keep draining
    its output (a full pipe would stop it) into ``log_file``."""
    log = log_file.open("ab") if log_file is not None else None
    try:
        for raw in iter(stream.readline, b""):
            if log is not None:
                log.write(raw)
                log.flush()
            if ready.is_set():
                continue
            match = _LISTENING.search(raw.decode(errors="replace").strip())
            if match:
                service = match["service"].lower()
                endpoints[service] = f"{match['url'].rstrip('/')}/{ACCOUNT_NAME}"
                if all(s in endpoints for s in SERVICES):
                    ready.set()
    finally:
        if log is not None:
            log.close()
        stream.close()
