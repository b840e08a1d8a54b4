"""A local stand-in for Azure Key Vault's secrets API and for the managed
identity endpoint that hands out its tokens.

Microsoft ships no Key Vault emulator, so the Key Vault store's tests and
``serve --provider azure --emulate`` run this one, and talk to it through the
real ``azure-keyvault-secrets`` and ``azure-identity`` clients:

* **The vault** serves HTTPS only (the SDK refuses plain HTTP), with a
  certificate from a throwaway CA that :attr:`KeyVaultEmulator.ca_file` holds.
  It answers as Key Vault does (REST API 7.x): ``PUT /secrets/{name}`` makes a
  new version, ``GET /secrets/{name}[/{version}]``, ``GET .../versions``,
  ``PATCH`` of a version's attributes and tags, ``DELETE`` to the soft-deleted
  state (``/deletedsecrets/{name}``: get, purge, ``POST .../recover``), paged
  listings with ``nextLink``, Key Vault's error shape and codes (a name in
  the deleted state is a 409 ``ObjectIsDeletedButRecoverable``; purge under
  purge protection a 403), case-insensitive names, creation times in whole
  seconds.
* **Challenge authentication**, as Key Vault does it: a request without a
  valid bearer token gets ``401`` with ``WWW-Authenticate: Bearer
  authorization="https://login.microsoftonline.com/<tenant>",
  resource="https://vault.azure.net"``; the client then asks its credential
  for a token for that resource and sends the request again.
* **The token** comes from an App Service style managed identity endpoint
  (plain HTTP on loopback, as on a function app): with ``IDENTITY_ENDPOINT``
  and ``IDENTITY_HEADER`` set (:meth:`KeyVaultEmulator.environ`), azure-identity's
  ``DefaultAzureCredential`` gets its tokens here, offline. The vault accepts
  only tokens this endpoint issued, for its resource, unexpired.

Simplified: one vault; no RBAC (any issued token may do anything); no
certificates, keys or backups; deletion and recovery finish at once; no
``nbf``/``exp`` enforcement. :meth:`KeyVaultEmulator.fail_next` makes the next
requests fail with a given status and code (throttling, outages), and
``requests`` records every request's method, path and whether it was
authorized (never bodies).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from kidp.localhttp import JsonHandler, serve_in_thread, stop_serving
from kidp.localtls import issue_tls_files, server_context

__all__ = ["AUDIENCE", "KeyVaultEmulator", "start_keyvault"]

#: The resource Key Vault tokens are for.
AUDIENCE: Final = "https://vault.azure.net"
_TENANT: Final = "00000000-0000-0000-0000-0000000000aa"
_NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
_TOKEN_SECONDS = 3600
_RETENTION_DAYS = 90
_PAGE = 25


@dataclass
class _Version:
    version: str
    value: str
    tags: dict[str, str] | None
    content_type: str | None
    enabled: bool
    created: int
    updated: int


@dataclass
class _Secret:
    name: str
    versions: list[_Version] = field(default_factory=list)

    @property
    def latest(self) -> _Version:
        return self.versions[-1]


@dataclass
class _Deleted:
    secret: _Secret
    deleted: int


class _Vault:
    """The vault's state; every method runs under the emulator's lock."""

    def __init__(self, url: str, *, purge_protection: bool) -> None:
        self.url = url.rstrip("/")
        self.purge_protection = purge_protection
        self.secrets: dict[str, _Secret] = {}
        self.deleted: dict[str, _Deleted] = {}

    @property
    def recovery_level(self) -> str:
        return "Recoverable" if self.purge_protection else "Recoverable+Purgeable"

    def attributes(self, version: _Version) -> dict[str, Any]:
        return {
            "enabled": version.enabled,
            "created": version.created,
            "updated": version.updated,
            "recoveryLevel": self.recovery_level,
            "recoverableDays": _RETENTION_DAYS,
        }

    def bundle(self, secret: _Secret, version: _Version, *, value: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": f"{self.url}/secrets/{secret.name}/{version.version}",
            "attributes": self.attributes(version),
        }
        if value:
            body["value"] = version.value
        if version.tags is not None:
            body["tags"] = version.tags
        if version.content_type is not None:
            body["contentType"] = version.content_type
        return body

    def item(self, secret: _Secret, version: _Version, *, versioned: bool) -> dict[str, Any]:
        body = self.bundle(secret, version, value=False)
        if not versioned:
            body["id"] = f"{self.url}/secrets/{secret.name}"
        return body

    def deleted_bundle(self, gone: _Deleted, *, value: bool = True) -> dict[str, Any]:
        body = self.bundle(gone.secret, gone.secret.latest, value=value)
        body.update(
            {
                "recoveryId": f"{self.url}/deletedsecrets/{gone.secret.name}",
                "deletedDate": gone.deleted,
                "scheduledPurgeDate": gone.deleted + _RETENTION_DAYS * 86400,
            }
        )
        return body


class _Failure(Exception):
    def __init__(self, status: int, code: str, message: str, inner: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.inner = inner

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner:
            error["innererror"] = {"code": self.inner}
        return {"error": error}


def _not_found(name: str, version: str = "") -> _Failure:
    what = f"({name}) with ({version}) version" if version else f"({name})"
    return _Failure(404, "SecretNotFound", f"A secret with {what} was not found in this key vault.")


@dataclass
class KeyVaultEmulator:
    """A running stand-in: the vault's URL, the identity endpoint, and the CA
    its certificate chains to."""

    vault_url: str
    identity_endpoint: str
    identity_header: str = field(repr=False)
    ca_file: Path
    _servers: list[ThreadingHTTPServer] = field(repr=False)
    _state: _Vault = field(repr=False)
    _lock: threading.Lock = field(repr=False)
    _tokens: dict[str, tuple[str, float]] = field(repr=False)
    _faults: list[tuple[int, str, str | None]] = field(repr=False)
    #: Every vault request: method, path, and whether it carried a valid token.
    requests: list[tuple[str, str, bool]] = field(default_factory=list, repr=False)
    _directory: Any = field(default=None, repr=False)

    def environ(self) -> dict[str, str]:
        """What ``DefaultAzureCredential`` and the SDK's transport need to find
        the identity endpoint and trust the vault's certificate."""
        return {
            "IDENTITY_ENDPOINT": self.identity_endpoint,
            "IDENTITY_HEADER": self.identity_header,
            "REQUESTS_CA_BUNDLE": str(self.ca_file),
        }

    def fail_next(
        self, status: int, code: str, *, times: int = 1, retry_after: str | None = None
    ) -> None:
        """Answer the next ``times`` vault requests with ``status`` and Key Vault's
        error body carrying ``code`` (after authentication)."""
        with self._lock:
            self._faults.extend([(status, code, retry_after)] * times)

    def versions(self, name: str) -> list[dict[str, Any]]:
        """A secret's versions as stored (for assertions), oldest first."""
        with self._lock:
            secret = self._state.secrets.get(name.lower())
            if secret is None:
                return []
            return [dict(vars(v)) for v in secret.versions]

    def deleted(self, name: str) -> bool:
        """True while ``name`` is in the soft-deleted state."""
        with self._lock:
            return name.lower() in self._state.deleted

    def stop(self) -> None:
        """Stop both servers and remove the certificate files."""
        for server in self._servers:
            stop_serving(server)
        if self._directory is not None:
            self._directory.cleanup()


def start_keyvault(
    *, purge_protection: bool = True, directory: Path | None = None
) -> KeyVaultEmulator:
    """Start the vault (HTTPS) and the identity endpoint (HTTP) on free
    loopback ports. The certificate files go to ``directory`` (a temporary
    one by default, removed by ``stop``). ``purge_protection`` is on by
    default, as the Bicep sets it."""
    holder = None
    if directory is None:
        holder = tempfile.TemporaryDirectory(prefix="kidp-keyvault-")
        directory = Path(holder.name)
    files = issue_tls_files(
        directory, authority="kidp Key Vault stand-in CA", valid_for=dt.timedelta(days=30)
    )
    lock = threading.Lock()
    tokens: dict[str, tuple[str, float]] = {}
    faults: list[tuple[int, str, str | None]] = []
    header = secrets.token_urlsafe(24)

    identity = ThreadingHTTPServer(("127.0.0.1", 0), _IdentityHandler)
    vault = ThreadingHTTPServer(("127.0.0.1", 0), _VaultHandler)
    vault.socket = server_context(files).wrap_socket(vault.socket, server_side=True)
    vault_url = f"https://127.0.0.1:{vault.server_address[1]}/"
    emulator = KeyVaultEmulator(
        vault_url=vault_url,
        identity_endpoint=f"http://127.0.0.1:{identity.server_address[1]}/msi/token",
        identity_header=header,
        ca_file=files.ca,
        _servers=[vault, identity],
        _state=_Vault(vault_url, purge_protection=purge_protection),
        _lock=lock,
        _tokens=tokens,
        _faults=faults,
        _directory=holder,
    )
    for server in (vault, identity):
        server.emulator = emulator  # type: ignore[attr-defined]
        serve_in_thread(server, "kidp-keyvault")
    return emulator


# --------------------------------------------------------------------------- servers


class _Handler(JsonHandler):
    @property
    def emulator(self) -> KeyVaultEmulator:
        emulator: KeyVaultEmulator = self.server.emulator  # type: ignore[attr-defined]
        return emulator

    def _reply(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        self.send_json(status, body, {**(headers or {}), "x-ms-request-id": secrets.token_hex(8)})


class _IdentityHandler(_Handler):
    """The App Service managed identity endpoint (api-version 2019-08-01)."""

    def do_GET(self) -> None:  # noqa: N802 - the method name http.server calls
        emulator = self.emulator
        query = parse_qs(urlsplit(self.path).query)
        resource = (query.get("resource") or [""])[0]
        if self.headers.get("X-IDENTITY-HEADER") != emulator.identity_header:
            self._reply(401, {"error": "unauthorized", "error_description": "bad identity header"})
            return
        if not resource:
            self._reply(400, {"error": "invalid_request", "error_description": "no resource"})
            return
        token = secrets.token_urlsafe(32)
        expires = time.time() + _TOKEN_SECONDS
        with emulator._lock:
            emulator._tokens[token] = (resource.rstrip("/"), expires)
        self._reply(
            200,
            {
                "access_token": token,
                "expires_on": str(int(expires)),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": (query.get("client_id") or ["00000000-0000-0000-0000-0000000000cc"])[
                    0
                ],
            },
        )


class _VaultHandler(_Handler):
    """Key Vault's secrets API (see the module docstring)."""

    def _serve(self) -> None:
        emulator = self.emulator
        method = self.command
        parts = urlsplit(self.path)
        body = self.read_body()
        authorized = self._authorized()
        with emulator._lock:
            emulator.requests.append((method, parts.path, authorized))
        if not authorized:
            challenge = (
                f'Bearer authorization="https://login.microsoftonline.com/{_TENANT}", '
                f'resource="{AUDIENCE}"'
            )
            self._reply(
                401,
                {
                    "error": {
                        "code": "Unauthorized",
                        "message": "AKV10000: Request is missing a Bearer or PoP token.",
                    }
                },
                {"WWW-Authenticate": challenge},
            )
            return
        query = parse_qs(parts.query)
        if not query.get("api-version"):
            self._reply(
                400, {"error": {"code": "BadParameter", "message": "api-version is required"}}
            )
            return
        with emulator._lock:
            fault = emulator._faults.pop(0) if emulator._faults else None
        if fault is not None:
            status, code, retry_after = fault
            headers = {"Retry-After": retry_after} if retry_after else {}
            self._reply(status, _Failure(status, code, "injected").body(), headers)
            return
        segments = [s for s in parts.path.split("/") if s]
        try:
            payload = json.loads(body) if body else {}
            with emulator._lock:
                status, answer = _route(emulator._state, method, segments, payload, query)
        except _Failure as failure:
            self._reply(failure.status, failure.body())
            return
        except ValueError:
            self._reply(400, {"error": {"code": "BadParameter", "message": "the body is not JSON"}})
            return
        self._reply(status, answer)

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return False
        with self.emulator._lock:
            found = self.emulator._tokens.get(header.removeprefix("Bearer ").strip())
        return found is not None and found[0] == AUDIENCE and found[1] > time.time()

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST = _serve  # noqa: N815


def _route(
    vault: _Vault,
    method: str,
    segments: list[str],
    payload: dict[str, Any],
    query: dict[str, list[str]],
) -> tuple[int, Any]:
    """The vault's answer to one authenticated request (raises ``_Failure``)."""
    if segments == ["secrets"] and method == "GET":
        secrets_ = [vault.item(s, s.latest, versioned=False) for s in _by_name(vault.secrets)]
        return 200, _page(vault, secrets_, query, "/secrets")
    if segments == ["deletedsecrets"] and method == "GET":
        gone = [vault.deleted_bundle(d, value=False) for d in _by_name(vault.deleted)]
        return 200, _page(vault, gone, query, "/deletedsecrets")
    if len(segments) >= 2 and segments[0] == "secrets":
        return _secret_route(vault, method, segments[1:], payload, query)
    if len(segments) >= 2 and segments[0] == "deletedsecrets":
        return _deleted_route(vault, method, segments[1:])
    raise _Failure(404, "NotFound", "no such operation")


def _secret_route(
    vault: _Vault,
    method: str,
    rest: list[str],
    payload: dict[str, Any],
    query: dict[str, list[str]],
) -> tuple[int, Any]:
    name = rest[0]
    key = name.lower()
    if not _NAME.match(name):
        raise _Failure(400, "BadParameter", "The request URI contains an invalid name: " + name)
    if method == "PUT" and len(rest) == 1:
        return _set_secret(vault, name, payload)
    found = vault.secrets.get(key)
    if found is None:
        raise _not_found(name)
    secret = found
    if method == "GET" and len(rest) == 2 and rest[1] == "versions":
        items = [vault.item(secret, v, versioned=True) for v in secret.versions]
        return 200, _page(vault, items, query, f"/secrets/{secret.name}/versions")
    if method == "DELETE" and len(rest) == 1:
        del vault.secrets[key]
        gone = _Deleted(secret=secret, deleted=int(time.time()))
        vault.deleted[key] = gone
        return 200, vault.deleted_bundle(gone)
    wanted = rest[1] if len(rest) == 2 else ""
    chosen = (
        secret.latest
        if not wanted
        else next((v for v in secret.versions if v.version == wanted), None)
    )
    if chosen is None:
        raise _not_found(name, wanted)
    version = chosen
    if method == "GET":
        if not version.enabled:
            raise _Failure(
                403,
                "Forbidden",
                "Operation get is not allowed on a disabled secret.",
                "SecretDisabled",
            )
        return 200, vault.bundle(secret, version)
    if method == "PATCH":
        attributes = payload.get("attributes") or {}
        if "enabled" in attributes:
            version.enabled = bool(attributes["enabled"])
        if "tags" in payload:
            version.tags = payload["tags"]
        if "contentType" in payload:
            version.content_type = payload["contentType"]
        version.updated = int(time.time())
        return 200, vault.bundle(secret, version, value=False)
    raise _Failure(405, "MethodNotAllowed", f"{method} is not allowed here")


def _set_secret(vault: _Vault, name: str, payload: dict[str, Any]) -> tuple[int, Any]:
    """``PUT /secrets/{name}``: a new version (refused while the name is soft-deleted)."""
    key = name.lower()
    if key in vault.deleted:
        raise _Failure(
            409,
            "Conflict",
            f"Secret {name} is currently in a deleted but recoverable state, and its name "
            "cannot be reused; in this state, the secret can only be recovered or purged.",
            "ObjectIsDeletedButRecoverable",
        )
    if not isinstance(payload.get("value"), str):
        raise _Failure(400, "BadParameter", "Property value is required")
    now = int(time.time())
    attributes = payload.get("attributes") or {}
    version = _Version(
        version=secrets.token_hex(16),
        value=payload["value"],
        tags=payload.get("tags"),
        content_type=payload.get("contentType"),
        enabled=bool(attributes.get("enabled", True)),
        created=now,
        updated=now,
    )
    secret = vault.secrets.setdefault(key, _Secret(name=name))
    secret.versions.append(version)
    return 200, vault.bundle(secret, version)


def _deleted_route(vault: _Vault, method: str, rest: list[str]) -> tuple[int, Any]:
    name = rest[0]
    key = name.lower()
    gone = vault.deleted.get(key)
    if gone is None:
        raise _Failure(404, "SecretNotFound", f"Deleted Secret not found: {name}")
    if method == "GET" and len(rest) == 1:
        return 200, vault.deleted_bundle(gone, value=False)
    if method == "DELETE" and len(rest) == 1:
        if vault.purge_protection:
            raise _Failure(
                403,
                "Forbidden",
                'Operation "purge" is not allowed because purge protection is enabled for this '
                "vault. Key Vault service will automatically purge it after the retention period "
                "has passed.",
            )
        del vault.deleted[key]
        return 204, None
    if method == "POST" and rest[1:] == ["recover"]:
        del vault.deleted[key]
        vault.secrets[key] = gone.secret
        return 200, vault.bundle(gone.secret, gone.secret.latest)
    raise _Failure(405, "MethodNotAllowed", f"{method} is not allowed here")


def _by_name(items: dict[str, Any]) -> Iterator[Any]:
    return (items[key] for key in sorted(items))


def _page(
    vault: _Vault, items: list[dict[str, Any]], query: dict[str, list[str]], path: str
) -> dict[str, Any]:
    """One page of a listing; ``nextLink`` continues it (``$skiptoken`` is the offset)."""
    size = min(int((query.get("maxresults") or [str(_PAGE)])[0]), _PAGE)
    start = int((query.get("$skiptoken") or ["0"])[0])
    page = items[start : start + size]
    more = start + size < len(items)
    api = (query.get("api-version") or ["7.5"])[0]
    next_link = (
        f"{vault.url}{path}?api-version={api}&maxresults={size}&$skiptoken={start + size}"
        if more
        else None
    )
    return {"value": page, "nextLink": next_link}
