"""A local stand-in for Cloud SQL as the Cloud SQL Python Connector sees it.

The connector (``cloud-sql-python-connector``) reaches an instance in two
steps, and this module stands in for both:

1. **The SQL Admin API** (``sqladmin_api_endpoint``): ``connectSettings``
   answers the instance's IP address, region, database version and the CA
   that signed the server's certificate; ``generateEphemeralCert`` signs the
   client's public key into a short-lived client certificate (with the
   caller's OAuth token in the request when IAM database authentication is
   on).
2. **The instance's server-side proxy** on port 3307 of that IP: a TLS 1.3
   server whose certificate the CA signed, which requires a client
   certificate the same CA signed (the ephemeral one) and then forwards the
   database protocol to a real PostgreSQL (this machine's, trust auth).

The connector always dials port 3307 (a constant in it, no option), so the
proxy listens on 3307 of a loopback address of its own: ``127.0.0.1`` when
free, else a random ``127.x.y.z`` (Linux routes all of 127/8 to loopback), so
several test runs on one machine never fight over the port. The address is
what ``connectSettings`` answers.

Simplified: one proxy serves every instance; the IAM identity in the token
is not matched against the database user (PostgreSQL's own roles decide);
no private IP, PSC or DNS names; certificates never rotate.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import random
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from kidp.gcp_standin import ApiError, GoogleApiServer, Request
from kidp.localtls import LocalAuthority, server_context

log = logging.getLogger(__name__)

#: The port the connector dials on every instance.
SERVER_PROXY_PORT = 3307
_INSTANCE = r"projects/([^/]+)/instances/([^/:]+)"


@dataclass(frozen=True)
class Instance:
    """An instance the Admin API knows: ``project:region:name``."""

    project: str
    region: str
    name: str
    database_version: str = "POSTGRES_15"

    @property
    def connection_name(self) -> str:
        return f"{self.project}:{self.region}:{self.name}"


class CloudSqlAdminApi(GoogleApiServer):
    """The two SQL Admin API methods the connector calls."""

    service = "sqladmin"

    def __init__(self, authority: LocalAuthority, address: str) -> None:
        super().__init__()
        self._authority = authority
        self._address = address
        self.instances: dict[tuple[str, str], Instance] = {}
        #: (connection name, whether an OAuth token for IAM login came along).
        self.ephemeral_certs: list[tuple[str, bool]] = []
        #: While set, the status every call is answered with (an outage).
        self.outage: int | None = None
        self.route("GET", rf"/sql/v1beta4/{_INSTANCE}/connectSettings", self._connect_settings)
        self.route("POST", rf"/sql/v1beta4/{_INSTANCE}:generateEphemeralCert", self._ephemeral)

    def _instance(self, request: Request) -> Instance:
        if not request.headers.get("authorization", "").startswith("Bearer "):
            raise ApiError(401, "request is missing a valid OAuth 2.0 access token")
        with self.lock:
            if self.outage is not None:
                raise ApiError(self.outage, "injected outage")
            self._fault()
            instance = self.instances.get((request.match.group(1), request.match.group(2)))
        if instance is None:
            raise ApiError(404, "The Cloud SQL instance does not exist.")
        return instance

    def _connect_settings(self, request: Request) -> tuple[int, Any]:
        instance = self._instance(request)
        return 200, {
            "kind": "sql#connectSettings",
            "serverCaCert": {"kind": "sql#sslCert", "cert": self._authority.pem()},
            "ipAddresses": [{"type": "PRIMARY", "ipAddress": self._address}],
            "region": instance.region,
            "databaseVersion": instance.database_version,
            "backendType": "SECOND_GEN",
            "pscEnabled": False,
            "serverCaMode": "GOOGLE_MANAGED_INTERNAL_CA",
        }

    def _ephemeral(self, request: Request) -> tuple[int, Any]:
        instance = self._instance(request)
        try:
            # The connector sends an RSA key; a key type no certificate can
            # hold fails the signing below (a stand-in error, 500).
            public_key = cast(
                "CertificatePublicKeyTypes",
                serialization.load_pem_public_key(str(request.body.get("public_key", "")).encode()),
            )
        except ValueError:
            raise ApiError(400, "public_key is not a PEM public key") from None
        token = bool(request.body.get("access_token"))
        with self.lock:
            self.ephemeral_certs.append((instance.connection_name, token))
        cert = self._authority.issue(
            public_key, "cloudsql-ephemeral", valid_for=datetime.timedelta(hours=1), client=True
        )
        return 200, {"ephemeralCert": {"kind": "sql#sslCert", "cert": self._authority.pem(cert)}}


class ServerProxy:
    """The instance side of the connection: TLS with client certificates on
    ``address:3307``, then bytes both ways to ``upstream``."""

    def __init__(
        self, authority: LocalAuthority, upstream: tuple[str, int], *, tries: int = 20
    ) -> None:
        self.upstream = upstream
        self.connections = 0
        self.refused = 0
        self._directory = tempfile.TemporaryDirectory(prefix="kidp-cloudsql-")
        files = authority.server_files(Path(self._directory.name), common_name="cloudsql-standin")
        # TLS 1.3 and a client certificate the instance CA signed, as the
        # instance's proxy requires.
        self._context = server_context(
            files, minimum=ssl.TLSVersion.TLSv1_3, client_certificates=True
        )
        self._listener = _bind_loopback(tries)
        self.address = str(self._listener.getsockname()[0])
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="cloudsql-proxy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            # Unblocks the accept() in progress, which close() alone does not.
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=5)
        self._directory.cleanup()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(10)
        try:
            tls = self._context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.refused += 1
            log.info("cloud sql stand-in refused a TLS handshake: %s", exc)
            client.close()
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            tls.close()
            return
        self.connections += 1
        tls.settimeout(None)
        upstream.settimeout(None)
        threading.Thread(target=_pump, args=(upstream, tls), daemon=True).start()
        _pump(tls, upstream)


def _pump(source: socket.socket, target: socket.socket) -> None:
    """Copy ``source`` to ``target`` until either side closes; then close both."""
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


def _bind_loopback(tries: int) -> socket.socket:
    """A listening socket on port 3307 of a free loopback address."""
    candidates = ["127.0.0.1"] + [
        f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"  # noqa: S311 - not security
        for _ in range(tries)
    ]
    for address in candidates:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((address, SERVER_PROXY_PORT))
        except OSError as exc:
            listener.close()
            if exc.errno == errno.EADDRINUSE:
                continue
            raise
        listener.listen(32)
        return listener
    raise OSError(
        errno.EADDRINUSE,
        f"port {SERVER_PROXY_PORT} is taken on every loopback address tried "
        "(a server on 0.0.0.0:3307 takes it on all of them)",
    )


class CloudSqlEmulator:
    """The running stand-in: ``url`` is the SQL Admin API endpoint,
    ``address`` the instances' IP; ``stop()`` ends both."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        # The instance CA: it signs the proxy's certificate and the ephemeral ones.
        authority = LocalAuthority("Google Cloud SQL Server CA (stand-in)")
        self.proxy = ServerProxy(authority, upstream)
        self.admin = CloudSqlAdminApi(authority, self.proxy.address)
        self.admin.start()

    @property
    def url(self) -> str:
        return self.admin.url

    @property
    def address(self) -> str:
        return self.proxy.address

    def add_instance(
        self, connection_name: str, *, database_version: str = "POSTGRES_15"
    ) -> Instance:
        """Make ``project:region:instance`` known to the Admin API."""
        project, region, name = connection_name.split(":")
        instance = Instance(project, region, name, database_version)
        with self.admin.lock:
            self.admin.instances[(project, name)] = instance
        return instance

    def stop(self) -> None:
        self.admin.stop()
        self.proxy.stop()


def start_cloudsql_emulator(
    *, upstream: tuple[str, int] = ("127.0.0.1", 5432), instances: tuple[str, ...] = ()
) -> CloudSqlEmulator:
    """Start the Admin API stand-in and the server-side proxy in front of the
    PostgreSQL at ``upstream``, knowing ``instances`` (connection names)."""
    emulator = CloudSqlEmulator(upstream)
    for name in instances:
        emulator.add_instance(name)
    return emulator
