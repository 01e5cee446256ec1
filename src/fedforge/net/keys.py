"""Credentials for deployment: a private CA, the server certificate, one certificate per client.

Layout of a keys directory (``fedforge keys init DIR``)::

    ca.key  ca.crt            the run's certificate authority (ca.key never leaves the server)
    server.key  server.crt    the server's TLS identity
    clients/NAME.crt          every client certificate issued (the server's registry)
    revoked.txt               serial numbers of revoked client certificates, one per line

``fedforge keys add-client NAME`` writes a credentials directory for that client
(``client.key``, ``client.crt``, ``ca.crt``) to hand over out of band. Private keys are
ECDSA P-256, written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedforge.core.errors import FedforgeError

VALIDITY = dt.timedelta(days=825)


class CredentialsError(FedforgeError):
    """Credentials are missing, malformed or not allowed."""


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_cert: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server_names: list[str] | None = None,
    client: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if server_names:
        alt: list[x509.GeneralName] = []
        for entry in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(entry)))
            except ValueError:
                alt.append(x509.DNSName(entry))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    if client:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def init_keys(directory: Path, server_names: list[str]) -> None:
    """Create a CA and a server certificate valid for ``server_names`` (DNS names or IPs)."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "ca.key").exists():
        raise CredentialsError(f"{directory} already holds a CA; refusing to overwrite it")
    ca_key = _new_key()
    ca_cert = _issue("fedforge CA", ca_key, None, ca_key, ca=True)
    server_key = _new_key()
    server_cert = _issue(server_names[0], server_key, ca_cert, ca_key, server_names=server_names)
    _write_private(directory / "ca.key", _pem_key(ca_key))
    (directory / "ca.crt").write_bytes(_pem_cert(ca_cert))
    _write_private(directory / "server.key", _pem_key(server_key))
    (directory / "server.crt").write_bytes(_pem_cert(server_cert))
    (directory / "clients").mkdir(exist_ok=True)
    (directory / "revoked.txt").touch()


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except FileNotFoundError as exc:
        raise CredentialsError(f"no CA in {directory}; run `fedforge keys init` first") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError("the CA key is not an ECDSA key")
    return cert, key


def add_client(directory: Path, name: str, out: Path) -> None:
    """Issue a client certificate for ``name`` and write its credentials directory ``out``."""
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise CredentialsError(f"client name {name!r}: use letters, digits, '-', '_' or '.'")
    registry = directory / "clients" / f"{name}.crt"
    if registry.exists():
        raise CredentialsError(f"client {name!r} already exists; revoke it or pick another name")
    ca_cert, ca_key = _load_ca(directory)
    key = _new_key()
    cert = _issue(name, key, ca_cert, ca_key, client=True)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(out / "client.key", _pem_key(key))
    (out / "client.crt").write_bytes(_pem_cert(cert))
    (out / "ca.crt").write_bytes(_pem_cert(ca_cert))
    registry.write_bytes(_pem_cert(cert))


def revoke_client(directory: Path, name: str) -> int:
    """Revoke ``name``'s certificate; return its serial number."""
    registry = directory / "clients" / f"{name}.crt"
    if not registry.exists():
        raise CredentialsError(f"no client {name!r} in {directory}")
    serial = x509.load_pem_x509_certificate(registry.read_bytes()).serial_number
    with open(directory / "revoked.txt", "a") as f:
        f.write(f"{serial}\n")
    return serial


@dataclass(frozen=True)
class ServerCredentials:
    private_key: bytes
    certificate: bytes
    ca_certificate: bytes
    clients: dict[str, int]  # registered client name -> certificate serial
    revoked: frozenset[int]

    @classmethod
    def load(cls, directory: Path) -> ServerCredentials:
        try:
            clients = {
                p.stem: x509.load_pem_x509_certificate(p.read_bytes()).serial_number
                for p in sorted((directory / "clients").glob("*.crt"))
            }
            revoked_text = (directory / "revoked.txt").read_text()
            return cls(
                (directory / "server.key").read_bytes(),
                (directory / "server.crt").read_bytes(),
                (directory / "ca.crt").read_bytes(),
                clients,
                frozenset(int(s) for s in revoked_text.split()),
            )
        except FileNotFoundError as exc:
            raise CredentialsError(f"incomplete keys directory {directory}: {exc}") from exc


@dataclass(frozen=True)
class ClientCredentials:
    private_key: bytes
    certificate: bytes
    ca_certificate: bytes

    @classmethod
    def load(cls, directory: Path) -> ClientCredentials:
        try:
            return cls(
                (directory / "client.key").read_bytes(),
                (directory / "client.crt").read_bytes(),
                (directory / "ca.crt").read_bytes(),
            )
        except FileNotFoundError as exc:
            raise CredentialsError(f"incomplete credentials directory {directory}: {exc}") from exc


def certificate_identity(pem: bytes) -> tuple[str, int]:
    """(common name, serial number) of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise CredentialsError("certificate has no common name")
    return str(names[0].value), cert.serial_number
