"""A local stand-in for the Secret Manager API (v1, REST, global secrets).

``google-cloud-secret-manager`` talks to it over REST
(``client_options={"api_endpoint": url}``, ``AnonymousCredentials``). It keeps
secrets and their versions in memory and answers the methods the broker's
:class:`~kidp.secrets.gcpsecretmanager.SecretManagerStore` calls: create, get,
list and delete secrets; add, list and access versions (``latest`` too). It
checks what Secret Manager checks on those calls: secret ids, label keys and
values, a replication policy, the payload's size and CRC32C, and it refuses a
second secret of the same id with ``ALREADY_EXISTS``.

Simplified: no IAM, no regional secrets, no version states besides
ENABLED, no rotation or expiry, no etags on writes.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

from kidp.gcp_standin import ApiError, GoogleApiServer, Request, timestamp

_SECRET_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
_MAX_PAYLOAD = 64 * 1024
#: SecretVersion.State.ENABLED, as the REST client expects enums (as integers).
_ENABLED = 1


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        value = n
        for _ in range(8):
            value = (value >> 1) ^ 0x82F63B78 if value & 1 else value >> 1
        table.append(value)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli), the checksum Secret Manager keeps per payload."""
    value = 0xFFFFFFFF
    for byte in data:
        value = _TABLE[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ 0xFFFFFFFF


@dataclass
class _Secret:
    name: str
    labels: dict[str, str]
    replication: dict[str, Any]
    created: str = field(default_factory=timestamp)
    versions: list[tuple[str, bytes]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "labels": self.labels,
            "replication": self.replication,
            "createTime": self.created,
        }

    def version_view(self, number: int) -> dict[str, Any]:
        created, _ = self.versions[number - 1]
        return {"name": f"{self.name}/versions/{number}", "createTime": created, "state": _ENABLED}


class SecretManagerEmulator(GoogleApiServer):
    """The running stand-in: ``url`` for ``client_options``, ``stop()`` to end it."""

    service = "secretmanager"

    def __init__(self) -> None:
        super().__init__()
        self.secrets: dict[str, _Secret] = {}
        project = r"projects/[^/]+"
        secret = rf"{project}/secrets/[^/:]+"
        self.route("POST", rf"/v1/({project})/secrets", self._create)
        self.route("GET", rf"/v1/({project})/secrets", self._list)
        self.route("GET", rf"/v1/({secret})", self._get)
        self.route("DELETE", rf"/v1/({secret})", self._delete)
        self.route("POST", rf"/v1/({secret}):addVersion", self._add_version)
        self.route("GET", rf"/v1/({secret})/versions", self._list_versions)
        self.route("GET", rf"/v1/({secret})/versions/([^/:]+):access", self._access)

    def value(self, name: str, version: int | None = None) -> bytes:
        """The payload of ``name`` (full resource name), its latest version by default."""
        with self.lock:
            versions = self.secrets[name].versions
            return versions[(version or len(versions)) - 1][1]

    def _secret(self, name: str) -> _Secret:
        secret = self.secrets.get(name)
        if secret is None:
            raise ApiError(404, f"Secret [{name}] not found or has no versions.")
        return secret

    def _create(self, request: Request) -> tuple[int, Any]:
        parent = request.match.group(1)
        secret_id = request.arg("secretId") or ""
        if not _SECRET_ID.fullmatch(secret_id):
            raise ApiError(400, f"invalid secret id {secret_id!r}")
        replication = request.body.get("replication") or {}
        if not ({"automatic", "userManaged"} & set(replication)):
            raise ApiError(400, "a secret needs a replication policy")
        labels = request.body.get("labels") or {}
        if len(labels) > 64:
            raise ApiError(400, "at most 64 labels")
        for key, value in labels.items():
            if not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(str(value)):
                raise ApiError(400, f"invalid label {key!r}")
        name = f"{parent}/secrets/{secret_id}"
        with self.lock:
            self._fault()
            if name in self.secrets:
                raise ApiError(409, f"Secret [{name}] already exists.")
            self.secrets[name] = _Secret(name, dict(labels), dict(replication))
            return 200, self.secrets[name].view()

    def _list(self, request: Request) -> tuple[int, Any]:
        parent = request.match.group(1) + "/"
        size = int(request.arg("pageSize") or 25000)
        with self.lock:
            self._fault()
            found = [s.view() for n, s in sorted(self.secrets.items()) if n.startswith(parent)]
            return 200, {"secrets": found[:size], "totalSize": len(found)}

    def _get(self, request: Request) -> tuple[int, Any]:
        with self.lock:
            self._fault()
            return 200, self._secret(request.match.group(1)).view()

    def _delete(self, request: Request) -> tuple[int, Any]:
        name = request.match.group(1)
        with self.lock:
            self._fault()
            self._secret(name)
            del self.secrets[name]
            return 200, {}

    def _add_version(self, request: Request) -> tuple[int, Any]:
        payload = request.body.get("payload") or {}
        data = base64.b64decode(payload.get("data") or "")
        if len(data) > _MAX_PAYLOAD:
            raise ApiError(400, "the payload exceeds 64 KiB")
        checksum = payload.get("dataCrc32c")
        if checksum is not None and int(checksum) != crc32c(data):
            raise ApiError(400, "data corruption detected: the checksum does not match")
        with self.lock:
            self._fault()
            secret = self._secret(request.match.group(1))
            secret.versions.append((timestamp(), data))
            return 200, secret.version_view(len(secret.versions))

    def _list_versions(self, request: Request) -> tuple[int, Any]:
        with self.lock:
            self._fault()
            secret = self._secret(request.match.group(1))
            numbers = range(len(secret.versions), 0, -1)  # newest first
            return 200, {
                "versions": [secret.version_view(n) for n in numbers],
                "totalSize": len(secret.versions),
            }

    def _access(self, request: Request) -> tuple[int, Any]:
        name, version = request.match.group(1), request.match.group(2)
        with self.lock:
            self._fault()
            secret = self._secret(name)
            number = len(secret.versions) if version == "latest" else _number(version)
            if not 1 <= number <= len(secret.versions):
                raise ApiError(404, f"Secret Version [{name}/versions/{version}] not found.")
            data = secret.versions[number - 1][1]
            return 200, {
                "name": f"{name}/versions/{number}",
                "payload": {
                    "data": base64.b64encode(data).decode(),
                    "dataCrc32c": str(crc32c(data)),
                },
            }


def _number(version: str) -> int:
    if not version.isdigit():
        raise ApiError(400, f"invalid version {version!r}")
    return int(version)


def start_secretmanager_emulator() -> SecretManagerEmulator:
    """Start the stand-in on a free loopback port."""
    emulator = SecretManagerEmulator()
    emulator.start()
    return emulator
