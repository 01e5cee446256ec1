import datetime as dt
import logging
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedforge.net.keys import (
    ClientCredentials,
    ServerCredentials,
    add_client,
    init_keys,
    renew_client,
    request_certificate,
    revoke_client,
    sign_request,
)
from fedforge.net.registry import CredentialsError, certificate_identity, check_client_name


def test_keys_layout_permissions_and_revocation(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys, ["localhost", "127.0.0.1"])
    add_client(keys, "alice", keys / "alice")
    for private in [keys / "ca.key", keys / "server.key", keys / "alice" / "client.key"]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    name, serial = certificate_identity((keys / "alice" / "client.crt").read_bytes())
    assert name == "alice"
    creds = ServerCredentials.load(keys)
    assert creds.clients == {"alice": serial} and serial not in creds.revoked
    assert revoke_client(keys, "alice") == serial
    assert serial in ServerCredentials.load(keys).revoked
    with pytest.raises(CredentialsError, match="already exists"):
        add_client(keys, "alice", keys / "alice2")
    with pytest.raises(CredentialsError, match="already holds a CA"):
        init_keys(keys, ["localhost"])
    with pytest.raises(CredentialsError, match=r"client name '\.\./evil' is not allowed"):
        add_client(keys, "../evil", keys / "evil")


LOOK_ALIKES = [
    ".",
    "..",
    "127.0.0.1",
    "Alice",
    "\u0430lice",
    "al\u200bice",
    "a" * 65,
    "-x",
    "a/b",
    "",
]


def _request(name: str, out: Path) -> Path:
    """A signing request for ``name`` made without fedforge's own checks (a crafted one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "client.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return out / "client.csr"


@pytest.mark.parametrize("name", LOOK_ALIKES)
def test_names_outside_the_safe_alphabet_are_refused_everywhere(tmp_path: Path, name: str) -> None:
    keys = tmp_path / "keys"
    init_keys(keys, ["localhost"])
    for attempt in (
        lambda: add_client(keys, name, tmp_path / "out"),
        lambda: request_certificate(name, tmp_path / "site"),
        lambda: revoke_client(keys, name),
        lambda: renew_client(keys, name, tmp_path / "out"),
        lambda: check_client_name(name),
    ):
        with pytest.raises(CredentialsError, match="is not allowed"):
            attempt()
    if 0 < len(name) <= 64:  # (what a certificate request can hold)
        with pytest.raises(CredentialsError, match="is not allowed"):
            sign_request(keys, _request(name, tmp_path / "crafted"), tmp_path / "out")
    assert not list((keys / "clients").iterdir())


def test_expiry_is_refused_or_warned_and_a_renewal_keeps_the_sites_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys"
    init_keys(keys, ["localhost"])
    add_client(keys, "alice", keys / "alice", validity=dt.timedelta(days=10))
    add_client(keys, "old", keys / "old", validity=dt.timedelta(minutes=-1))
    with caplog.at_level(logging.WARNING, "fedforge"):
        ClientCredentials.load(keys / "alice")
        server = ServerCredentials.load(keys)  # a running server, from here on
    assert "client.crt expires on" in caplog.text and "(in 9 days)" in caplog.text
    assert "fedforge keys renew alice" in caplog.text
    assert "the certificate of client old expired on" in caplog.text
    with pytest.raises(CredentialsError, match=r"old/client\.crt expired on .* keys renew old"):
        ClientCredentials.load(keys / "old")
    old_serial = server.registry.serial("alice")
    key_before = (keys / "alice" / "client.key").read_bytes()
    expires = renew_client(keys, "alice", keys / "alice")
    assert expires - dt.datetime.now(dt.UTC) > dt.timedelta(days=820)
    caplog.clear()
    with caplog.at_level(logging.WARNING, "fedforge"):
        ClientCredentials.load(keys / "alice")  # the new certificate matches the kept key
    assert not caplog.text and (keys / "alice" / "client.key").read_bytes() == key_before
    # The running server reads the renewed registration without a restart.
    renewed = certificate_identity((keys / "alice" / "client.crt").read_bytes())[1]
    assert server.registry.serial("alice") == renewed != old_serial
