"""A client's secure-aggregation session and what travels with it.

A session is a dict of numpy arrays (so it travels and persists like any client state): the
record kept after training, the session's keys, the neighbours' public keys, and the shares
received. Each step checks that it follows the previous one (:func:`advance`). In deployment
a client signs its advertised keys with its certificate key (:class:`Identity`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedforge.core.records import Record, Task
from fedforge.secagg import crypto
from fedforge.secagg.protocol import IDENTITY_BYTES, STEPS

Session = dict[str, np.ndarray]
KEPT = 0  # the record is kept; the next step is ADVERTISE
RECORD, SCALAR = "record/", "scalar/"  # prefixes of the kept record's arrays and scalars


@dataclass(frozen=True)
class Identity:
    """A deployed client's signing key (PEM) and certificate (DER), and the run's CA (PEM)."""

    private_key_pem: bytes
    certificate_der: bytes
    ca_pem: bytes

    @classmethod
    def from_pem(cls, private_key_pem: bytes, certificate_pem: bytes, ca_pem: bytes) -> Identity:
        """From a deployed client's credentials (``client.key``, ``client.crt``, ``ca.crt``)."""
        cert = x509.load_pem_x509_certificate(certificate_pem)
        return cls(private_key_pem, cert.public_bytes(serialization.Encoding.DER), ca_pem)

    @property
    def name(self) -> str:
        return crypto.certificate_name(x509.load_der_x509_certificate(self.certificate_der))


def keep(
    record: Record, round_number: int, *, withhold_metrics: bool = False
) -> tuple[Record, Session]:
    """After training: the reply the fit exchange gets (example count and metrics only;
    ``withhold_metrics``: not even those, as under distributed DP, whose server learns
    nothing it has not noised) and the session of round ``round_number`` that keeps the
    record on the client."""
    # Copies: a vectorized runtime reuses the storage of the batch the record came from.
    session: Session = {RECORD + k: np.array(v, copy=True) for k, v in record.arrays.items()}
    for name, value in record.scalars.items():
        session[SCALAR + name] = np.array([value], np.float64)
    session["step"] = np.array([KEPT], np.int64)
    session["round"] = np.array([round_number], np.int64)
    if withhold_metrics:
        return Record(record.client_id, 1, {}), session
    return Record(record.client_id, record.num_examples, {}, metrics=dict(record.metrics)), session


def kept_record(session: Session) -> tuple[list[np.ndarray], list[float]]:
    """The kept record's arrays and summed scalars, each in name order."""
    arrays = [session[k] for k in sorted(k for k in session if k.startswith(RECORD))]
    scalars = [float(session[k][0]) for k in sorted(k for k in session if k.startswith(SCALAR))]
    return arrays, scalars


def forget_record(session: Session) -> None:
    """Drop the plaintext record (once masked it is not needed any more)."""
    for key in [k for k in session if k.startswith((RECORD, SCALAR))]:
        del session[key]


def u8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8).copy()


def ids(arr: object, what: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.int64 or arr.ndim != 1:
        raise crypto.SecAggError(f"{what} must be a 1-D int64 array")
    return arr


def blob(arr: object, what: str, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.shape != shape:
        raise crypto.SecAggError(f"{what} must be a uint8 array of shape {shape}")
    return arr


def advance(session: Session | None, task: Task) -> Session:
    """The session, checked to belong to the task's round and be at the step before it."""
    step = task.stage
    if session is None or "step" not in session or int(session["round"][0]) != task.round:
        raise crypto.SecAggError(f"{step}: no secure-aggregation session for this round")
    index = STEPS.index(step)
    if int(session["step"][0]) != index:
        raise crypto.SecAggError(
            f"{step} out of order: the session is at step {int(session['step'][0])}"
        )
    out = dict(session)
    out["step"] = np.array([index + 1], np.int64)
    return out


def pack_identity(signature: bytes, certificate: bytes) -> np.ndarray:
    if len(signature) > 72 or len(certificate) > 4096:
        raise crypto.SecAggError("signature or certificate too long")
    data = struct.pack("<H", len(signature)) + signature.ljust(72, b"\0")
    data += struct.pack("<H", len(certificate)) + certificate.ljust(4096, b"\0")
    return u8(data)


def unpack_identity(identity: np.ndarray) -> tuple[bytes, bytes]:
    data = blob(identity, "identity", (IDENTITY_BYTES,)).tobytes()
    (sig_len,) = struct.unpack_from("<H", data, 0)
    (cert_len,) = struct.unpack_from("<H", data, 74)
    if sig_len > 72 or cert_len > 4096:
        raise crypto.SecAggError("malformed identity")
    return data[2 : 2 + sig_len], data[76 : 76 + cert_len]
