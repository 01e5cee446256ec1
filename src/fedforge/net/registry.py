"""Who may connect: client names, the registry of issued client certificates, revocations,
and certificates' validity dates.

Client names are identities, file names and log words: lowercase ASCII letters, digits, ``-``
and ``_``, starting with a letter, at most 64 characters (:data:`NAME_RULE`), so no name is a
path (``.``, ``..``), an address (``127.0.0.1``), a case variant or a Unicode look-alike of
another. The registry and the revocation list are re-read when their files change, so a
renewal or a revocation needs no restart.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from fedforge.core.errors import FedforgeError

RENEW_WARNING = dt.timedelta(days=30)  # warn this long before a certificate expires
NAME_RULE = "lowercase letters, digits, '-' and '_', starting with a letter, at most 64"
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
log = logging.getLogger("fedforge")


class CredentialsError(FedforgeError):
    """Credentials are missing, malformed or not allowed."""


def check_client_name(name: str) -> str:
    """``name`` if it is a valid client name (see :data:`NAME_RULE`); else CredentialsError."""
    if not _NAME.fullmatch(name):
        raise CredentialsError(f"client name {name!r} is not allowed: use {NAME_RULE} characters")
    return name


def expiry_problem(cert: x509.Certificate, what: str, now: dt.datetime | None = None) -> str | None:
    """Why ``cert`` cannot be used now (expired, or not valid yet), or None."""
    now = now or dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        return f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if now < cert.not_valid_before_utc:
        return f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    return None


def warn_if_expiring(cert: x509.Certificate, what: str, renew: str) -> None:
    """Log a warning when ``cert`` expires within :data:`RENEW_WARNING`."""
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    if left < RENEW_WARNING:
        log.warning(
            "%s expires on %s UTC (in %d days): %s",
            what,
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M}",
            max(left.days, 0),
            renew,
        )


class RevocationList:
    """The serials in ``revoked.txt``, re-read whenever the file changes (no restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        self.current()

    def current(self) -> frozenset[int]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return self._serials  # keep the last list rather than forgive everyone
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                text = self.path.read_text()
                self._serials = frozenset(int(s) for s in text.split() if s.isdigit())
                self._stamp = stamp
            return self._serials


class ClientRegistry:
    """Registered client name -> certificate serial, from ``clients/NAME.crt``; an entry is
    re-read when its file changes (``fedforge keys renew``: no restart)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[tuple[int, int], x509.Certificate]] = {}
        for path in sorted(directory.glob("*.crt")):
            try:
                check_client_name(path.stem)
            except CredentialsError as exc:
                raise CredentialsError(f"{path}: {exc}; rename or remove it") from None
            self._read(path.stem)

    def _read(self, name: str) -> x509.Certificate | None:
        path = self.directory / f"{name}.crt"
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry[0] != stamp:
                entry = (stamp, x509.load_pem_x509_certificate(path.read_bytes()))
                self._entries[name] = entry
            return entry[1]

    def names(self) -> list[str]:
        """The names registered when the server started, sorted."""
        return sorted(self._entries)

    def serial(self, name: str) -> int | None:
        """The serial of ``name``'s registered certificate now (None: not registered)."""
        cert = self._read(name) if name in self._entries else None
        return None if cert is None else cert.serial_number

    def certificates(self) -> dict[str, x509.Certificate]:
        with self._lock:
            return {name: entry[1] for name, entry in self._entries.items()}


def certificate_identity(pem: bytes) -> tuple[str, int]:
    """(common name, serial number) of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise CredentialsError("certificate has no common name")
    return str(names[0].value), cert.serial_number
