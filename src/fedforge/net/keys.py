"""Credentials for deployment: a private CA, the server certificate, one certificate per client.

Layout of a keys directory (``fedforge keys init DIR``)::

    ca.key  ca.crt            the run's certificate authority (ca.key never leaves the server)
    server.key  server.crt    the server's TLS identity
    clients/NAME.crt          every client certificate issued (the server's registry)
    revoked.txt               serial numbers of revoked client certificates, one per line

A site's private key should never leave the site: ``fedforge keys request NAME --out DIR``
(run at the site) writes ``DIR/client.key`` and a certificate signing request
``DIR/client.csr``; the coordinator signs the request with ``fedforge keys sign
client.csr`` and returns ``client.crt`` and ``ca.crt``, which complete ``DIR``. (``fedforge
keys add-client NAME`` makes the key at the coordinator, for demos on one machine.) Private
keys are ECDSA P-256, written with mode 0600. A revocation takes effect at once: the server
re-reads ``revoked.txt`` when it changes and closes the revoked client's session.

Client names follow :data:`fedforge.net.registry.NAME_RULE` wherever one is accepted.
Certificates last 825 days; ``fedforge keys renew NAME`` issues a site a new one for the same
key (the registry then holds the new one only).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedforge.net.registry import (
    ClientRegistry,
    CredentialsError,
    RevocationList,
    certificate_identity,
    check_client_name,
    expiry_problem,
    warn_if_expiring,
)

VALIDITY = dt.timedelta(days=825)
log = logging.getLogger("fedforge")


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
    key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey,
    issuer_cert: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server_names: list[str] | None = None,
    client: bool = False,
    validity: dt.timedelta = VALIDITY,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key if isinstance(key, ec.EllipticCurvePublicKey) else key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + validity)
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


def _new_registry_entry(directory: Path, name: str) -> Path:
    check_client_name(name)
    registry = directory / "clients" / f"{name}.crt"
    if registry.exists():
        raise CredentialsError(f"client {name!r} already exists; revoke it or pick another name")
    return registry


def add_client(directory: Path, name: str, out: Path, *, validity: dt.timedelta = VALIDITY) -> None:
    """Issue a client certificate for ``name``, valid for ``validity``, and write its
    credentials directory ``out`` (the key is made here: for demos; sites should use
    :func:`request_certificate`)."""
    registry = _new_registry_entry(directory, name)
    ca_cert, ca_key = _load_ca(directory)
    key = _new_key()
    cert = _issue(name, key, ca_cert, ca_key, client=True, validity=validity)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(out / "client.key", _pem_key(key))
    (out / "client.crt").write_bytes(_pem_cert(cert))
    (out / "ca.crt").write_bytes(_pem_cert(ca_cert))
    registry.write_bytes(_pem_cert(cert))


def request_certificate(name: str, out: Path) -> Path:
    """At a site: make the site's private key (``out/client.key``, mode 0600) and a
    certificate signing request for ``name`` (``out/client.csr``, returned) to send to the
    coordinator. The key never leaves ``out``."""
    check_client_name(name)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (out / "client.key").exists():
        raise CredentialsError(f"{out} already holds a client key; refusing to overwrite it")
    key = _new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    _write_private(out / "client.key", _pem_key(key))
    (out / "client.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return out / "client.csr"


def sign_request(directory: Path, request: Path, out: Path) -> str:
    """At the coordinator: check a site's signing request, register and issue its client
    certificate; write ``out/client.crt`` and ``out/ca.crt`` to send back. Returns the name."""
    try:
        csr = x509.load_pem_x509_csr(request.read_bytes())
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"{request} is not a certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise CredentialsError(f"{request}: the request's signature is invalid")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != (
        "secp256r1"
    ):
        raise CredentialsError(f"{request}: the key must be ECDSA P-256")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise CredentialsError(f"{request}: the request must name exactly one client")
    name = str(names[0].value)
    registry = _new_registry_entry(directory, name)
    ca_cert, ca_key = _load_ca(directory)
    cert = _issue(name, public_key, ca_cert, ca_key, client=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "client.crt").write_bytes(_pem_cert(cert))
    (out / "ca.crt").write_bytes(_pem_cert(ca_cert))
    registry.write_bytes(_pem_cert(cert))
    return name


def ca_fingerprint(directory: Path) -> str:
    """SHA-256 fingerprint of the CA certificate in ``directory`` (to confirm out of band)."""
    cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":")


def _registered(directory: Path, name: str) -> x509.Certificate:
    registry = directory / "clients" / f"{check_client_name(name)}.crt"
    if not registry.exists():
        raise CredentialsError(f"no client {name!r} in {directory}")
    return x509.load_pem_x509_certificate(registry.read_bytes())


def renew_client(directory: Path, name: str, out: Path) -> dt.datetime:
    """Issue ``name`` a new certificate for the key its registered one certifies (the site
    keeps its key), register it in place of the old one (which the server refuses from then
    on) and write ``out/client.crt`` and ``out/ca.crt``; return the new expiry."""
    old = _registered(directory, name)
    public_key = old.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CredentialsError(f"{name}'s registered certificate does not hold an ECDSA key")
    ca_cert, ca_key = _load_ca(directory)
    cert = _issue(name, public_key, ca_cert, ca_key, client=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "client.crt").write_bytes(_pem_cert(cert))
    (out / "ca.crt").write_bytes(_pem_cert(ca_cert))
    (directory / "clients" / f"{name}.crt").write_bytes(_pem_cert(cert))
    return cert.not_valid_after_utc


def revoke_client(directory: Path, name: str) -> int:
    """Revoke ``name``'s certificate; return its serial number."""
    serial = _registered(directory, name).serial_number
    with open(directory / "revoked.txt", "a") as f:
        f.write(f"{serial}\n")
    return serial


@dataclass(frozen=True)
class ServerCredentials:
    private_key: bytes
    certificate: bytes
    ca_certificate: bytes
    registry: ClientRegistry
    revocations: RevocationList

    @property
    def clients(self) -> dict[str, int]:
        """Registered client name -> certificate serial (as registered now)."""
        return {name: c.serial_number for name, c in self.registry.certificates().items()}

    @property
    def revoked(self) -> frozenset[int]:
        return self.revocations.current()

    def revoked_now(self) -> frozenset[int]:
        """The serials revoked now (re-read after ``fedforge keys revoke``)."""
        return self.revocations.current()

    def revoked_names(self) -> set[str]:
        revoked = self.revocations.current()
        return {name for name, serial in self.clients.items() if serial in revoked}

    @classmethod
    def load(cls, directory: Path) -> ServerCredentials:
        try:
            if not (directory / "revoked.txt").exists():
                raise FileNotFoundError(directory / "revoked.txt")
            creds = cls(
                (directory / "server.key").read_bytes(),
                (directory / "server.crt").read_bytes(),
                (directory / "ca.crt").read_bytes(),
                ClientRegistry(directory / "clients"),
                RevocationList(directory / "revoked.txt"),
            )
        except FileNotFoundError as exc:
            raise CredentialsError(f"incomplete keys directory {directory}: {exc}") from exc
        creds.check_expiry(directory)
        return creds

    def check_expiry(self, directory: Path) -> None:
        """Refuse an expired server or CA certificate; warn about one that expires soon, and
        name the registered clients whose certificates expired or expire soon."""
        for data, what in ((self.certificate, "server.crt"), (self.ca_certificate, "ca.crt")):
            cert = x509.load_pem_x509_certificate(data)
            problem = expiry_problem(cert, f"{directory / what}")
            if problem:
                raise CredentialsError(f"{problem}: no client can connect; make new keys")
            warn_if_expiring(cert, f"{directory / what}", "make new keys before then")
        revoked = self.revocations.current()
        for name, cert in self.registry.certificates().items():
            if cert.serial_number in revoked:
                continue
            problem = expiry_problem(cert, f"the certificate of client {name}")
            if problem:
                log.warning(
                    "%s: it cannot connect until renewed (`fedforge keys renew %s`)", problem, name
                )
            else:
                warn_if_expiring(
                    cert,
                    f"the certificate of client {name}",
                    f"renew it with `fedforge keys renew {name}`",
                )


@dataclass(frozen=True)
class ClientCredentials:
    private_key: bytes
    certificate: bytes
    ca_certificate: bytes

    @classmethod
    def load(cls, directory: Path) -> ClientCredentials:
        try:
            creds = cls(
                (directory / "client.key").read_bytes(),
                (directory / "client.crt").read_bytes(),
                (directory / "ca.crt").read_bytes(),
            )
        except FileNotFoundError as exc:
            raise CredentialsError(f"incomplete credentials directory {directory}: {exc}") from exc
        creds.check(directory)
        return creds

    def check(self, directory: Path) -> None:
        """Refuse credentials the server would refuse in its TLS handshake (a certificate
        from another CA, or not matching the key), with a message that says so."""
        try:
            cert = x509.load_pem_x509_certificate(self.certificate)
            ca = x509.load_pem_x509_certificate(self.ca_certificate)
            key = serialization.load_pem_private_key(self.private_key, None)
        except ValueError as exc:
            raise CredentialsError(f"unreadable credentials in {directory}: {exc}") from None
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise CredentialsError(
                f"{directory}/client.crt was not issued by {directory}/ca.crt: the server will "
                "not accept this certificate; ask the coordinator to sign your request"
            ) from None
        if cert.public_key() != key.public_key():
            raise CredentialsError(f"{directory}/client.crt does not match client.key")
        name = certificate_identity(self.certificate)[0]
        renew = (
            f"ask the coordinator to run `fedforge keys renew {name}` and put the client.crt "
            f"and ca.crt it returns into {directory}"
        )
        problem = expiry_problem(ca, f"{directory}/ca.crt")
        if problem:
            raise CredentialsError(
                f"{problem}: the run's CA is no longer valid; ask the coordinator"
            )
        problem = expiry_problem(cert, f"{directory}/client.crt")
        if problem:
            raise CredentialsError(f"{problem}: the server will refuse this client; {renew}")
        warn_if_expiring(cert, f"{directory}/client.crt", renew)
