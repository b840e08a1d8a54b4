"""Throwaway certificates for the local stand-ins and the tests.

A stand-in that serves HTTPS (the ARM and Key Vault stand-ins: their clients
refuse plain HTTP with a token), or TLS with client certificates (the Cloud
SQL instance proxy), needs a CA the client is told to trust and a certificate
that CA signed. Each makes its own at start, valid for a short while and
trusted nowhere else, so nothing here is a secret worth keeping: the keys
live in memory or in a folder the stand-in owns.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["LOOPBACK", "LocalAuthority", "TlsFiles", "issue_tls_files", "server_context"]

#: The names a loopback server is reached by.
LOOPBACK: Final = ("127.0.0.1", "localhost")
#: Certificates start a little in the past: a client whose clock lags this
#: machine's by a few seconds still finds them valid.
_BACKDATE: Final = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA to trust, and the server's certificate and key."""

    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class LocalAuthority:
    """A throwaway CA, kept in memory, that signs server and client certificates.

    ``name`` is its common name (what a TLS error names); it is valid for
    ``valid_for`` and may sign leaf certificates only.
    """

    def __init__(self, name: str, *, valid_for: dt.timedelta = dt.timedelta(days=1)) -> None:
        self.key = _new_key()
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + valid_for)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), False)
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self,
        public_key: CertificatePublicKeyTypes,
        common_name: str,
        *,
        hosts: tuple[str, ...] = (),
        valid_for: dt.timedelta = dt.timedelta(days=1),
        client: bool = False,
    ) -> x509.Certificate:
        """A certificate for ``public_key``: a server's for ``hosts`` (DNS names
        or IP addresses), or with ``client`` a client's, for mutual TLS."""
        now = dt.datetime.now(dt.UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + valid_for)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if hosts:
            names = [_general_name(host) for host in hosts]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        return builder.sign(self.key, hashes.SHA256())

    def pem(self, cert: x509.Certificate | None = None) -> str:
        """``cert`` in PEM, the CA's own by default."""
        return (cert or self.cert).public_bytes(serialization.Encoding.PEM).decode()

    def server_files(
        self,
        directory: Path,
        *hosts: str,
        common_name: str | None = None,
        valid_for: dt.timedelta = dt.timedelta(days=1),
    ) -> TlsFiles:
        """A new key and a server certificate for ``hosts`` (its common name the
        first one unless ``common_name``), written to ``directory`` with the CA
        as ``ca.pem``, ``cert.pem`` and ``key.pem`` (the key readable by its
        owner only)."""
        subject = common_name or (hosts[0] if hosts else None)
        if subject is None:
            raise ValueError("a server certificate needs a host or a common name")
        key = _new_key()
        cert = self.issue(key.public_key(), subject, hosts=hosts, valid_for=valid_for)
        directory.mkdir(parents=True, exist_ok=True)
        files = TlsFiles(*(directory / name for name in ("ca.pem", "cert.pem", "key.pem")))
        files.ca.write_text(self.pem())
        files.cert.write_text(self.pem(cert))
        files.key.touch(mode=0o600)
        files.key.chmod(0o600)  # touch keeps the mode of a file already there
        files.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return files


def issue_tls_files(
    directory: Path,
    *hosts: str,
    authority: str = "kidp local CA",
    valid_for: dt.timedelta = dt.timedelta(days=1),
) -> TlsFiles:
    """A throwaway CA named ``authority`` and a server certificate it signed
    for ``hosts`` (DNS names or IP addresses; :data:`LOOPBACK` by default),
    written to ``directory``."""
    ca = LocalAuthority(authority, valid_for=valid_for)
    return ca.server_files(directory, *(hosts or LOOPBACK), valid_for=valid_for)


def server_context(
    files: TlsFiles,
    *,
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    client_certificates: bool = False,
) -> ssl.SSLContext:
    """A server's TLS context serving ``files``' certificate; with
    ``client_certificates``, one that admits only clients with a certificate
    ``files.ca`` signed (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = minimum
    context.load_cert_chain(files.cert, files.key)
    if client_certificates:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(files.ca)
    return context
