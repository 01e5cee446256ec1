"""The cryptography of secure aggregation, all from ``cryptography``.

- Key agreement: X25519. Each client holds two key pairs per session: one whose agreed
  secrets encrypt the shares it sends (``c``), one whose agreed secrets seed pairwise masks
  (``s``).
- Key derivation: HKDF-SHA256 over the full 32-byte agreed secret, with the purpose and the
  session context in ``info``: a share key and a mask key never coincide.
- Shares travel under AES-256-GCM; the associated data binds the session, the round, the
  sender and the receiver, so a share replayed into another session, re-addressed, or
  claimed by another sender fails authentication.
- Masks: the AES-256-CTR keystream of a derived 256-bit key, as ring words.
- In deployment each client signs its advertised public keys with its certificate's ECDSA
  key; peers verify the certificate against the run's CA, so the server cannot substitute
  keys.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedforge.core.errors import FedforgeError
from fedforge.core.keystream import keystream_words

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
DIGEST_BYTES = 32
X25519_PRIME = 2**255 - 19


class SecAggError(FedforgeError):
    """A secure-aggregation message that must be refused (bad key, tag, signature, step)."""


@dataclass(frozen=True)
class KeyPair:
    private: bytes  # raw X25519 private key
    public: bytes  # raw X25519 public key

    @classmethod
    def generate(cls) -> KeyPair:
        key = X25519PrivateKey.generate()
        return cls(private_bytes(key), public_bytes(key.public_key()))


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_of(private: bytes) -> bytes:
    return public_bytes(X25519PrivateKey.from_private_bytes(private).public_key())


def private_key(raw: bytes) -> X25519PrivateKey:
    """A raw private key, loaded once for the many agreements of one step."""
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: bytes | X25519PrivateKey, peer_public: bytes) -> bytes:
    """The 32-byte X25519 shared secret; refuses a low-order (all-zero) result."""
    key = private if isinstance(private, X25519PrivateKey) else private_key(private)
    try:
        return key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggError(f"bad public key: {exc}") from None


# The canonical u-coordinates of the points of order dividing 8 on Curve25519 and its twist
# (0; 1 and -1 of order 4; two of order 8): exactly the public keys whose agreement with
# every (clamped, hence multiple of 8) private key is all zero. A test checks each against
# a real agreement.
LOW_ORDER = frozenset(
    {
        0,
        1,
        X25519_PRIME - 1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
    }
)


def check_public_key(raw: bytes) -> None:
    """Refuse an X25519 public key that no honest client advertises: not 32 bytes, not a
    canonical field element (``u >= 2^255 - 19``), or of low order (:data:`LOW_ORDER`: its
    agreement with every key is all zero)."""
    if len(raw) != KEY_BYTES:
        raise SecAggError(f"a public key is {KEY_BYTES} bytes, got {len(raw)}")
    u = int.from_bytes(raw, "little")
    if u >= X25519_PRIME:
        raise SecAggError("a public key is not a canonical X25519 point")
    if u in LOW_ORDER:
        raise SecAggError("a public key of low order (its agreement with every key is all zero)")


def share_digest(
    context: bytes, round_number: int, dealer: int, holder: int, kind: str, share: bytes
) -> bytes:
    """The dealer's commitment to one share it dealt (``kind``: ``seed`` or ``key``): the
    holder checks what it decrypts against it, and the server what the holder reveals, so a
    wrong share is pinned on whoever sent it. (A share is a uniformly random field element:
    its hash tells nothing about the secret.)"""
    label = b"fedforge-secagg/share/" + kind.encode() + b"/"
    return hashlib.sha256(
        label + associated_data(context, round_number, dealer, holder) + share
    ).digest()


def derive_key(shared_secret: bytes, purpose: str, context: bytes) -> bytes:
    """A 256-bit key from the *whole* agreed secret: HKDF-SHA256, ``info`` = purpose and
    session context."""
    if len(shared_secret) != KEY_BYTES:
        raise ValueError(f"an agreed secret is {KEY_BYTES} bytes, got {len(shared_secret)}")
    info = b"fedforge-secagg/" + purpose.encode() + b"/" + context
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(
        shared_secret
    )


def associated_data(context: bytes, round_number: int, sender: int, receiver: int) -> bytes:
    return context + struct.pack("<qqq", round_number, sender, receiver)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``nonce | ciphertext | tag`` under AES-256-GCM with a fresh random nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, message: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(message[:NONCE_BYTES], message[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SecAggError(
            "a share failed authentication (tampered, replayed or misaddressed)"
        ) from None


def mask(key: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """``length`` uniform ring words expanded from ``key`` (AES-256-CTR)."""
    return keystream_words(key, length, dtype)


def pair_mask_key(
    own_private: bytes | X25519PrivateKey, peer_public: bytes, context: bytes
) -> bytes:
    """The pairwise mask key of two clients (the same from either side)."""
    return derive_key(agree(own_private, peer_public), "mask", context)


def self_mask_key(seed: bytes, context: bytes) -> bytes:
    """The self-mask key from the client's secret seed ``b``."""
    return derive_key(seed, "self-mask", context)


# Deployment: keys signed with the client's certificate key --------------------------------
def key_statement(
    context: bytes, round_number: int, client_id: int, name: str, keys: bytes
) -> bytes:
    """What a client signs: its advertised keys, bound to its id *and* its certificate's
    name, the round and the session."""
    label = name.encode()
    return (
        b"fedforge-secagg/keys/"
        + associated_data(context, round_number, client_id, -1)
        + struct.pack("<H", len(label))
        + label
        + keys
    )


def certificate_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise SecAggError("a peer certificate must have exactly one common name")
    return str(names[0].value)


def sign(private_key_pem: bytes, statement: bytes) -> bytes:
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecAggError("signing needs an ECDSA certificate key")
    return key.sign(statement, ec.ECDSA(hashes.SHA256()))


def verify(
    ca_pem: bytes,
    certificate_der: bytes,
    signature: bytes,
    statement: Callable[[str], bytes],
) -> str:
    """The certificate's name, once checked: issued by the run's CA, a client certificate
    (not a CA, client-auth usage), valid now, and its key signed ``statement(name)``."""
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_der_x509_certificate(certificate_der)
        ca_key = ca.public_key()
        if not isinstance(ca_key, ec.EllipticCurvePublicKey) or cert.issuer != ca.subject:
            raise SecAggError("a peer certificate was not issued by the run's CA")
        assert cert.signature_hash_algorithm is not None
        ca_key.verify(
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
        )
        _check_client_certificate(cert)
        peer_key = cert.public_key()
        if not isinstance(peer_key, ec.EllipticCurvePublicKey):
            raise SecAggError("a peer certificate does not hold an ECDSA key")
        name = certificate_name(cert)
        peer_key.verify(signature, statement(name), ec.ECDSA(hashes.SHA256()))
        return name
    except InvalidSignature:
        raise SecAggError(
            "a peer's advertised keys are not signed by its certificate (substituted keys?)"
        ) from None
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise SecAggError(f"a peer's certificate or signature is malformed: {exc}") from None


def _check_client_certificate(cert: x509.Certificate) -> None:
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise SecAggError("a peer certificate is expired or not yet valid")
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    if constraints.ca or ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise SecAggError("a peer certificate is not a client certificate")
