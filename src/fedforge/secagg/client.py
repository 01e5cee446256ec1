"""The client side of SecAgg+: one pure step per exchange, on an explicit session.

A session is a dict of numpy arrays (so it travels and persists like any client state): the
record kept after training, the session's private keys, the neighbours' public keys, and the
shares received. Each step checks that it follows the previous one; after ``unmask`` the
session is gone, so a replayed unmask request finds nothing to answer with.

In deployment a client signs its advertised keys with its certificate key (``Identity``) and
refuses neighbours whose keys are not signed by a certificate of the run's CA.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedforge.compress.rotation import rotate
from fedforge.core.params import Params
from fedforge.core.records import Record, Task
from fedforge.privacy import discrete_gaussian
from fedforge.secagg import crypto, ring, shamir
from fedforge.secagg.graph import neighbours_of
from fedforge.secagg.protocol import (
    ADVERTISE,
    CIPHERTEXT_BYTES,
    DIGEST_ROW,
    IDENTITY_BYTES,
    MASK,
    PUBLIC_KEYS_BYTES,
    ROTATION_BLOCK,
    SHARE,
    SHARE_KINDS,
    STEPS,
    UNMASK,
    least_threshold,
    rotation_seed,
)

Session = dict[str, np.ndarray]
KEPT = 0  # the record is kept; the next step is ADVERTISE


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


def keep(
    record: Record, round_number: int, *, withhold_metrics: bool = False
) -> tuple[Record, Session]:
    """After training: the reply the fit exchange gets (example count and metrics only;
    ``withhold_metrics``: not even those, as under distributed DP, whose server learns
    nothing it has not noised) and the session of round ``round_number`` that keeps the
    record on the client."""
    # Copies: a vectorized runtime reuses the storage of the batch the record came from.
    session: Session = {f"record/{k}": np.array(v, copy=True) for k, v in record.arrays.items()}
    for name, value in record.scalars.items():
        session[f"scalar/{name}"] = np.array([value], np.float64)
    session["step"] = np.array([KEPT], np.int64)
    session["round"] = np.array([round_number], np.int64)
    if withhold_metrics:
        return Record(record.client_id, 1, {}), session
    return Record(record.client_id, record.num_examples, {}, metrics=dict(record.metrics)), session


def _u8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8).copy()


def _ids(arr: object, what: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.int64 or arr.ndim != 1:
        raise crypto.SecAggError(f"{what} must be a 1-D int64 array")
    return arr


def _blob(arr: object, what: str, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.shape != shape:
        raise crypto.SecAggError(f"{what} must be a uint8 array of shape {shape}")
    return arr


def _advance(session: Session | None, task: Task) -> Session:
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
    return _u8(data)


def unpack_identity(blob: np.ndarray) -> tuple[bytes, bytes]:
    data = _blob(blob, "identity", (IDENTITY_BYTES,)).tobytes()
    (sig_len,) = struct.unpack_from("<H", data, 0)
    (cert_len,) = struct.unpack_from("<H", data, 74)
    if sig_len > 72 or cert_len > 4096:
        raise crypto.SecAggError("malformed identity")
    return data[2 : 2 + sig_len], data[76 : 76 + cert_len]


def _digests(
    context: bytes, round_number: int, dealer: int, holder: int, shares: bytes
) -> np.ndarray:
    """The digest row of one holder's pair of shares (seed share, key share)."""
    half = shamir.SHARE_BYTES
    pieces = (shares[:half], shares[half:])
    return np.stack(
        [
            _u8(crypto.share_digest(context, round_number, dealer, holder, kind, piece))
            for kind, piece in zip(SHARE_KINDS, pieces, strict=True)
        ]
    )


def _open_share(
    c_sk: X25519PrivateKey,
    peer_c_pk: bytes,
    message: bytes,
    context: bytes,
    round_number: int,
    sender: int,
    me: int,
) -> bytes:
    """The (seed share, key share) ``sender`` encrypted for this client; SecAggError when
    it does not authenticate, names other clients, or holds no field elements."""
    share_key = crypto.derive_key(crypto.agree(c_sk, peer_c_pk), "share", context)
    plaintext = crypto.decrypt(
        share_key, message, crypto.associated_data(context, round_number, sender, me)
    )
    if struct.unpack_from("<qq", plaintext) != (sender, me):
        raise crypto.SecAggError("a share names the wrong sender or receiver")
    shares = plaintext[16:]
    half = shamir.SHARE_BYTES
    if not (shamir.is_field_element(shares[:half]) and shamir.is_field_element(shares[half:])):
        raise crypto.SecAggError("a share is not a field element")
    return shares


class SecAggClient:
    """Answers the four secure-aggregation steps for one client."""

    def __init__(self, identity: Identity | None = None, *, withhold_metrics: bool = False) -> None:
        self.identity = identity
        self.withhold_metrics = withhold_metrics

    def handle(self, task: Task, session: Session | None) -> tuple[Record, Session | None]:
        step = {ADVERTISE: self.advertise, SHARE: self.share, MASK: self.mask}
        if task.stage == UNMASK:
            return self.unmask(task, session), None
        return step[task.stage](task, session)

    # 1. Advertise keys ---------------------------------------------------------------------
    def advertise(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        s = _advance(session, task)
        participants = _ids(task.shared.get("participants"), "participants")
        seed = _blob(task.shared.get("graph_seed"), "graph seed", (32,))
        context = _blob(task.shared.get("context"), "context", (32,))
        degree, threshold = int(task.scalars["secagg.degree"]), int(task.scalars["secagg.t"])
        me = task.client_id
        if me not in set(participants.tolist()):
            raise crypto.SecAggError("this client is not among the round's participants")
        try:
            mine = neighbours_of(me, participants.tolist(), degree, seed.tobytes())
        except ValueError as exc:
            raise crypto.SecAggError(f"bad participants or degree: {exc}") from None
        if threshold < least_threshold(len(mine) + 1) or threshold > len(mine) + 1:
            raise crypto.SecAggError(
                f"refusing threshold {threshold} for a neighbourhood of {len(mine) + 1}"
            )
        c, m = crypto.KeyPair.generate(), crypto.KeyPair.generate()
        s.update(
            context=context.copy(),
            neighbourhood=np.array(mine, np.int64),
            threshold=np.array([threshold], np.int64),
            c_sk=_u8(c.private),
            s_sk=_u8(m.private),
        )
        keys = c.public + m.public
        arrays = {"keys": _u8(keys)}
        if self.identity is not None:
            name = crypto.certificate_name(
                x509.load_der_x509_certificate(self.identity.certificate_der)
            )
            statement = crypto.key_statement(context.tobytes(), task.round, me, name, keys)
            signature = crypto.sign(self.identity.private_key_pem, statement)
            arrays["identity"] = pack_identity(signature, self.identity.certificate_der)
        return Record(me, 1, arrays), s

    # 2. Share keys -------------------------------------------------------------------------
    def share(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        s = _advance(session, task)
        me, context = task.client_id, s["context"].tobytes()
        ids = _ids(task.shared.get("neighbours"), "neighbours")
        keys = _blob(task.shared.get("neighbour_keys"), "keys", (len(ids), PUBLIC_KEYS_BYTES))
        allowed = set(s["neighbourhood"].tolist())
        if len(set(ids.tolist())) != len(ids) or not set(ids.tolist()) <= allowed:
            raise crypto.SecAggError("the server named clients outside this client's graph")
        threshold = int(s["threshold"][0])
        if len(ids) + 1 < threshold:
            raise crypto.SecAggError(
                f"only {len(ids)} neighbours advertised keys; {threshold - 1} needed"
            )
        if self.identity is not None:
            identities = task.shared.get("neighbour_identities")
            _blob(identities, "identities", (len(ids), IDENTITY_BYTES))
            assert identities is not None
            own = crypto.certificate_name(
                x509.load_der_x509_certificate(self.identity.certificate_der)
            )
            names = {own}
            for cid, key, blob in zip(ids.tolist(), keys, identities, strict=True):
                signature, certificate = unpack_identity(blob)

                def statement(name: str, cid: int = cid, key: np.ndarray = key) -> bytes:
                    return crypto.key_statement(context, task.round, cid, name, key.tobytes())

                name = crypto.verify(self.identity.ca_pem, certificate, signature, statement)
                if name in names:  # one site, one slot: a second id for a name is refused
                    raise crypto.SecAggError(f"two neighbours claim the certificate of {name!r}")
                names.add(name)
        seed = os.urandom(32)
        holders = [me, *ids.tolist()]
        seed_shares = shamir.split(seed, threshold, holders)
        key_shares = shamir.split(s["s_sk"].tobytes(), threshold, holders)
        c_sk = crypto.private_key(s["c_sk"].tobytes())
        ciphertexts = np.empty((len(ids), CIPHERTEXT_BYTES), np.uint8)
        for row, (cid, key) in enumerate(zip(ids.tolist(), keys, strict=True)):
            plaintext = struct.pack("<qq", me, cid) + seed_shares[cid] + key_shares[cid]
            share_key = crypto.derive_key(crypto.agree(c_sk, key[:32].tobytes()), "share", context)
            aad = crypto.associated_data(context, task.round, me, cid)
            ciphertexts[row] = _u8(crypto.encrypt(share_key, plaintext, aad))
        digests = np.stack(
            [_digests(context, task.round, me, h, seed_shares[h] + key_shares[h]) for h in holders]
        )
        s.update(
            seed=_u8(seed),
            neighbours=ids.copy(),
            neighbour_keys=keys.copy(),
            own_shares=_u8(seed_shares[me] + key_shares[me]),
        )
        arrays = {"receivers": ids.copy(), "ciphertexts": ciphertexts, "share_digests": digests}
        return Record(me, 1, arrays), s

    # 3. Masked input -----------------------------------------------------------------------
    def mask(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        s = _advance(session, task)
        me, context = task.client_id, s["context"].tobytes()
        senders = _ids(task.shared.get("senders"), "senders")
        ciphertexts = _blob(
            task.shared.get("ciphertexts"), "ciphertexts", (len(senders), CIPHERTEXT_BYTES)
        )
        known = {int(c): row for row, c in enumerate(s["neighbours"].tolist())}
        if len(set(senders.tolist())) != len(senders) or not set(senders.tolist()) <= set(known):
            raise crypto.SecAggError("shares forwarded from clients that are not neighbours")
        if len(senders) + 1 < int(s["threshold"][0]):
            raise crypto.SecAggError("too few neighbours shared keys to continue securely")
        digests = _blob(
            task.shared.get("share_digests"), "share digests", (len(senders), *DIGEST_ROW)
        )
        c_sk = crypto.private_key(s["c_sk"].tobytes())
        accepted: list[int] = []
        refused: list[int] = []
        received = np.empty((len(senders), 2 * shamir.SHARE_BYTES), np.uint8)
        for cid, message, digest in zip(senders.tolist(), ciphertexts, digests, strict=True):
            peer_c_pk = s["neighbour_keys"][known[cid], :32].tobytes()
            try:
                share = _open_share(
                    c_sk, peer_c_pk, message.tobytes(), context, task.round, cid, me
                )
                if _digests(context, task.round, cid, me, share).tobytes() != digest.tobytes():
                    raise crypto.SecAggError("a share differs from the digest its dealer sent")
            except crypto.SecAggError:  # the sender's fault: reported, never masked with
                refused.append(cid)
                continue
            received[len(accepted)] = _u8(share)
            accepted.append(cid)
        if len(accepted) + 1 < int(s["threshold"][0]):
            raise crypto.SecAggError(
                f"only {len(accepted)} neighbours' shares checked out (refused: {refused}): "
                "too few to continue securely"
            )
        senders = np.array(accepted, np.int64)
        received = received[: len(accepted)]
        params = MaskParams.from_scalars(task.scalars)
        total = self._encode_input(s, params, task.seed)
        total += crypto.mask(
            crypto.self_mask_key(s["seed"].tobytes(), context), len(total), total.dtype
        )
        s_sk = crypto.private_key(s["s_sk"].tobytes())
        for cid in senders.tolist():
            peer_s_pk = s["neighbour_keys"][known[cid], 32:].tobytes()
            pair = crypto.mask(
                crypto.pair_mask_key(s_sk, peer_s_pk, context), len(total), total.dtype
            )
            if me < cid:
                total += pair
            else:
                total -= pair
        s.update(senders=senders.copy(), received=received)
        for key in [k for k in s if k.startswith(("record/", "scalar/"))]:
            del s[key]  # the plaintext record is not needed any more
        return Record(me, 1, {"masked": total, "refused": np.array(refused, np.int64)}), s

    @staticmethod
    def _encode_input(s: Session, params: MaskParams, seed: int) -> np.ndarray:
        """The record clipped to the clip norm, times the weight, then its summed scalars
        and the clipped bit, as ring words (arrays and scalars in name order)."""
        names = sorted(k for k in s if k.startswith("record/"))
        flat = [s[k].astype(np.float64).ravel() for k in names]
        vector = np.concatenate(flat) if flat else np.zeros(0)
        norm = float(np.sqrt(np.einsum("i,i->", vector, vector)))  # no BLAS threads
        clipped = norm > params.clip_norm
        if clipped:
            vector *= params.clip_norm * (1 - 1e-9) / norm
        vector *= params.weight
        if params.rotation_block:
            shared_rotation = rotation_seed(s["context"].tobytes())  # the same for everyone
            vector = rotate(vector[None], [shared_rotation], params.rotation_block)[0].astype(
                np.float64
            )
        scalars = [float(s[k][0]) for k in sorted(k for k in s if k.startswith("scalar/"))]
        # The clipped bit only without noise: under distributed DP it would be released bare.
        tail = np.array([*scalars, *([float(clipped)] if params.noise_units == 0 else [])])
        if np.any(np.abs(tail) > params.scalar_bound) or not np.isfinite(vector).all():
            raise crypto.SecAggError("a summed scalar is outside the ring's bound, or NaN")
        rng = np.random.default_rng(seed)  # stochastic rounding from the client's stream
        words = ring.encode(vector, params.array_bits, params.ring_bits, rng)
        if params.noise_units > 0:  # distributed DP: integer noise, added before masking
            noise = discrete_gaussian.sample(params.noise_units, len(words), os.urandom(32))
            words += noise.view(np.uint64).astype(words.dtype)
        return np.concatenate([words, ring.encode(tail, params.scalar_bits, params.ring_bits, rng)])

    # 4. Unmask -----------------------------------------------------------------------------
    def unmask(self, task: Task, session: Session | None) -> Record:
        s = _advance(session, task)
        me = task.client_id
        survivors = set(_ids(task.shared.get("survivors"), "survivors").tolist())
        dropouts = set(_ids(task.shared.get("dropouts"), "dropouts").tolist())
        senders = s["senders"].tolist()
        if survivors & dropouts:
            raise crypto.SecAggError("the server asked for both shares of one client")
        if not survivors | dropouts <= set(senders) | {me} or me not in survivors:
            raise crypto.SecAggError("the server named clients this client holds no share of")
        if len(survivors) < int(s["threshold"][0]):
            raise crypto.SecAggError("too few survivors to reveal shares safely")
        shares = {int(c): s["received"][row] for row, c in enumerate(senders)}
        shares[me] = s["own_shares"]
        half = shamir.SHARE_BYTES
        seed_owners = sorted(survivors)
        key_owners = sorted(dropouts)
        arrays: Params = {
            "seed_owners": np.array(seed_owners, np.int64),
            "seed_shares": np.stack([shares[c][:half] for c in seed_owners]),
            "key_owners": np.array(key_owners, np.int64),
            "key_shares": (
                np.stack([shares[c][half:] for c in key_owners])
                if key_owners
                else np.zeros((0, half), np.uint8)
            ),
        }
        return Record(me, 1, arrays)


@dataclass(frozen=True)
class MaskParams:
    """What the server sends with the mask step: the client's weight and the encoding."""

    weight: float
    clip_norm: float
    ring_bits: int
    array_bits: int
    scalar_bits: int
    scalar_bound: float
    noise_units: float = 0.0  # distributed DP: discrete Gaussian stddev, in ring units
    rotation_block: int = 0  # > 0: records are rotated in blocks of this size first

    @classmethod
    def from_scalars(cls, scalars: Mapping[str, float]) -> MaskParams:
        try:
            p = cls(
                weight=float(scalars["secagg.weight"]),
                clip_norm=float(scalars["secagg.clip_norm"]),
                ring_bits=int(scalars["secagg.ring_bits"]),
                array_bits=int(scalars["secagg.array_bits"]),
                scalar_bits=int(scalars["secagg.scalar_bits"]),
                scalar_bound=float(scalars["secagg.scalar_bound"]),
                noise_units=float(scalars.get("secagg.noise_units", 0.0)),
                rotation_block=int(scalars.get("secagg.rotation_block", 0)),
            )
        except KeyError as exc:
            raise crypto.SecAggError(f"the mask step lacks {exc.args[0]!r}") from None
        if not 0 < p.weight <= 1 or not p.clip_norm > 0 or p.ring_bits not in (16, 32, 64):
            raise crypto.SecAggError("bad mask parameters (weight, clip norm or ring)")
        if not (p.noise_units == 0 or p.noise_units >= 0.5):  # Kairouz et al. need s >= 1/2
            raise crypto.SecAggError("bad noise level")
        if p.rotation_block not in (0, ROTATION_BLOCK):
            raise crypto.SecAggError("bad rotation block")
        if not -64 < p.array_bits <= 62 or not -64 < p.scalar_bits <= 62:
            raise crypto.SecAggError("bad fixed-point precision")
        return p

    def scalars(self) -> dict[str, float]:
        return {
            "secagg.weight": self.weight,
            "secagg.clip_norm": self.clip_norm,
            "secagg.ring_bits": float(self.ring_bits),
            "secagg.array_bits": float(self.array_bits),
            "secagg.scalar_bits": float(self.scalar_bits),
            "secagg.scalar_bound": self.scalar_bound,
            "secagg.noise_units": self.noise_units,
            "secagg.rotation_block": float(self.rotation_block),
        }
