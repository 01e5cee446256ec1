"""The client side of SecAgg+: one step per exchange, on an explicit session
(``session.py``), for one client or a chunk of clients answered in one process.

Every step is written for a chunk (:meth:`SecAggClient.handle_chunk`); one client's step
(:meth:`SecAggClient.handle`, what a deployed client runs) is a chunk of one, so simulation
and deployment run the same code and the same cryptography. What a chunk shares is only what
is provably equal at both ends of a pair: an X25519 agreement of two of its clients is
computed once (``masking.PairKeys``), and a pairwise mask is expanded once and added at one
end, subtracted at the other. Each client's reply is exactly the one it computes alone.
After ``unmask`` the session is gone, so a replayed unmask request finds nothing to answer
with. In deployment a client signs its advertised keys with its certificate key and refuses
neighbours whose keys are not signed by a certificate of the run's CA.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fedforge.core.params import Params
from fedforge.core.records import Record, Task
from fedforge.secagg import crypto, ring, shamir
from fedforge.secagg.graph import neighbours_of
from fedforge.secagg.masking import MaskParams, Masks, PairKeys, add_masks, encode_input
from fedforge.secagg.protocol import (
    ADVERTISE,
    CIPHERTEXT_BYTES,
    DIGEST_ROW,
    IDENTITY_BYTES,
    MASK,
    PUBLIC_KEYS_BYTES,
    SHARE,
    SHARE_KINDS,
    UNMASK,
    least_threshold,
)
from fedforge.secagg.session import (
    Identity,
    Session,
    advance,
    blob,
    forget_record,
    ids,
    kept_record,
    pack_identity,
    u8,
    unpack_identity,
)

# One client's answer in a chunk: its reply and new session (None after unmask), or why it
# failed (its failure alone: the chunk's other clients answer).
Answer = tuple[Record, Session | None] | Exception
T = TypeVar("T")
_STEP_METHODS = {ADVERTISE: "advertise", SHARE: "share", MASK: "mask", UNMASK: "unmask"}


def digest_rows(
    context: bytes, round_number: int, dealer: int, holder: int, shares: bytes
) -> bytes:
    """The digest row of one holder's pair of shares (seed share, key share), 64 bytes."""
    half = shamir.SHARE_BYTES
    pieces = (shares[:half], shares[half:])
    return b"".join(
        crypto.share_digest(context, round_number, dealer, holder, kind, piece)
        for kind, piece in zip(SHARE_KINDS, pieces, strict=True)
    )


def _open_share(
    share_key: bytes, message: bytes, context: bytes, round_number: int, sender: int, me: int
) -> bytes:
    """The (seed share, key share) ``sender`` encrypted for this client; SecAggError when
    it does not authenticate, names other clients, or holds no field elements."""
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


def _per_client(
    step: Callable[[Task, Session | None], T],
    tasks: Sequence[Task],
    sessions: Sequence[Session | None],
) -> list[T | Exception]:
    """One client's part of a chunk's step for each client: its result, or the exception
    that failed it (that client alone fails; the others answer)."""
    out: list[T | Exception] = []
    for task, session in zip(tasks, sessions, strict=True):
        try:
            out.append(step(task, session))
        except Exception as exc:
            out.append(exc)
    return out


def _only(answers: list[T | Exception]) -> T:
    """A chunk of one's answer, raising its failure."""
    (answer,) = answers
    if isinstance(answer, Exception):
        raise answer
    return answer


@dataclass
class _Masking:
    """One client's mask step before its masks: the encoded input and the masks it adds."""

    session: Session
    total: np.ndarray
    masks: list[tuple[bytes, int]]  # (mask key, +1 or -1)
    refused: list[int]


class SecAggClient:
    """Answers the four secure-aggregation steps, for one client or a chunk of them."""

    def __init__(self, identity: Identity | None = None, *, withhold_metrics: bool = False) -> None:
        self.identity = identity
        self.withhold_metrics = withhold_metrics

    def handle(self, task: Task, session: Session | None) -> tuple[Record, Session | None]:
        step = {ADVERTISE: self.advertise, SHARE: self.share, MASK: self.mask}
        if task.stage == UNMASK:
            return self.unmask(task, session), None
        return step[task.stage](task, session)

    def handle_chunk(
        self, tasks: Sequence[Task], sessions: Sequence[Session | None]
    ) -> list[Answer]:
        """One step's tasks for many clients (each with its session), in task order. A
        subclass that changes a step (a hostile client in tests) answers it per client."""
        if not tasks:
            return []
        stages = {t.stage for t in tasks}
        if len(stages) != 1 or not stages <= set(_STEP_METHODS):
            raise crypto.SecAggError(f"a chunk holds one secure-aggregation step, got {stages}")
        (step,) = stages
        name = _STEP_METHODS[step]
        if any(getattr(type(self), n) is not getattr(SecAggClient, n) for n in (name, "handle")):
            return list(_per_client(self.handle, tasks, sessions))
        chunk = {
            ADVERTISE: self._advertise_chunk,
            SHARE: self._share_chunk,
            MASK: self._mask_chunk,
            UNMASK: self._unmask_chunk,
        }[step]
        return chunk(tasks, sessions)

    # One client: a chunk of one ------------------------------------------------------------
    def advertise(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        record, s = _only(self._advertise_chunk([task], [session]))
        assert s is not None
        return record, s

    def share(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        record, s = _only(self._share_chunk([task], [session]))
        assert s is not None
        return record, s

    def mask(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        record, s = _only(self._mask_chunk([task], [session]))
        assert s is not None
        return record, s

    def unmask(self, task: Task, session: Session | None) -> Record:
        return _only(self._unmask_chunk([task], [session]))[0]

    # 1. Advertise keys ---------------------------------------------------------------------
    def _advertise_chunk(
        self, tasks: Sequence[Task], sessions: Sequence[Session | None]
    ) -> list[Answer]:
        return _per_client(self._advertise_one, tasks, sessions)

    def _advertise_one(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        s = advance(session, task)
        participants = ids(task.shared.get("participants"), "participants")
        seed = blob(task.shared.get("graph_seed"), "graph seed", (32,))
        context = blob(task.shared.get("context"), "context", (32,))
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
            c_sk=u8(c.private),
            c_pk=u8(c.public),  # its own public keys: what PairKeys pairs agreements by
            s_sk=u8(m.private),
            s_pk=u8(m.public),
        )
        keys = c.public + m.public
        arrays = {"keys": u8(keys)}
        if self.identity is not None:
            statement = crypto.key_statement(
                context.tobytes(), task.round, me, self.identity.name, keys
            )
            signature = crypto.sign(self.identity.private_key_pem, statement)
            arrays["identity"] = pack_identity(signature, self.identity.certificate_der)
        return Record(me, 1, arrays), s

    # 2. Share keys -------------------------------------------------------------------------
    def _share_chunk(
        self, tasks: Sequence[Task], sessions: Sequence[Session | None]
    ) -> list[Answer]:
        keys = PairKeys()
        return _per_client(lambda t, s: self._share_one(t, s, keys), tasks, sessions)

    def _check_identities(self, task: Task, context: bytes, neighbours: np.ndarray) -> None:
        """Deployment: every neighbour's keys signed by a distinct certificate of the CA."""
        assert self.identity is not None
        keys = task.shared["neighbour_keys"]
        identities = blob(
            task.shared.get("neighbour_identities"),
            "identities",
            (len(neighbours), IDENTITY_BYTES),
        )
        names = {self.identity.name}
        for cid, key, packed in zip(neighbours.tolist(), keys, identities, strict=True):
            signature, certificate = unpack_identity(packed)

            def statement(name: str, cid: int = cid, key: np.ndarray = key) -> bytes:
                return crypto.key_statement(context, task.round, cid, name, key.tobytes())

            name = crypto.verify(self.identity.ca_pem, certificate, signature, statement)
            if name in names:  # one site, one slot: a second id for a name is refused
                raise crypto.SecAggError(f"two neighbours claim the certificate of {name!r}")
            names.add(name)

    def _share_one(
        self, task: Task, session: Session | None, pairs: PairKeys
    ) -> tuple[Record, Session]:
        s = advance(session, task)
        me, context = task.client_id, s["context"].tobytes()
        neighbours = ids(task.shared.get("neighbours"), "neighbours")
        keys = blob(task.shared.get("neighbour_keys"), "keys", (len(neighbours), PUBLIC_KEYS_BYTES))
        allowed = set(s["neighbourhood"].tolist())
        named = neighbours.tolist()
        if len(set(named)) != len(named) or not set(named) <= allowed:
            raise crypto.SecAggError("the server named clients outside this client's graph")
        threshold = int(s["threshold"][0])
        if len(named) + 1 < threshold:
            raise crypto.SecAggError(
                f"only {len(named)} neighbours advertised keys; {threshold - 1} needed"
            )
        if self.identity is not None:
            self._check_identities(task, context, neighbours)
        seed = os.urandom(32)
        holders = [me, *named]
        seed_shares = shamir.split(seed, threshold, holders)
        key_shares = shamir.split(s["s_sk"].tobytes(), threshold, holders)
        c_sk, c_pk = crypto.private_key(s.pop("c_sk").tobytes()), s["c_pk"].tobytes()
        ciphertexts = np.empty((len(named), CIPHERTEXT_BYTES), np.uint8)
        share_keys = np.empty((len(named), crypto.KEY_BYTES), np.uint8)
        for row, (cid, key) in enumerate(zip(named, keys, strict=True)):
            plaintext = struct.pack("<qq", me, cid) + seed_shares[cid] + key_shares[cid]
            share_key = pairs.derive(c_sk, c_pk, key[:32].tobytes(), "share", context)
            aad = crypto.associated_data(context, task.round, me, cid)
            ciphertexts[row] = u8(crypto.encrypt(share_key, plaintext, aad))
            share_keys[row] = u8(share_key)  # the same key opens what ``cid`` sends back
        digests = b"".join(
            digest_rows(context, task.round, me, h, seed_shares[h] + key_shares[h]) for h in holders
        )
        s.update(
            seed=u8(seed),
            neighbours=neighbours.copy(),
            neighbour_keys=keys.copy(),
            share_keys=share_keys,
            own_shares=u8(seed_shares[me] + key_shares[me]),
        )
        arrays = {
            "receivers": neighbours.copy(),
            "ciphertexts": ciphertexts,
            "share_digests": u8(digests).reshape(len(holders), *DIGEST_ROW),
        }
        return Record(me, 1, arrays), s

    # 3. Masked input -----------------------------------------------------------------------
    def _mask_chunk(
        self, tasks: Sequence[Task], sessions: Sequence[Session | None]
    ) -> list[Answer]:
        pairs, rounding = PairKeys(), ring.Rounding()  # shared by the chunk's clients
        prepared = _per_client(
            lambda t, s: self._prepare_mask(t, s, pairs, rounding), tasks, sessions
        )
        ready = [m for m in prepared if isinstance(m, _Masking)]
        masks: Masks = {}
        for row, masking in enumerate(ready):
            for key, sign in masking.masks:
                masks.setdefault(key, []).append((row, sign))
        add_masks([m.total for m in ready], masks)
        answers: list[Answer] = []
        for task, done in zip(tasks, prepared, strict=True):
            if isinstance(done, Exception):
                answers.append(done)
                continue
            arrays = {"masked": done.total, "refused": np.array(done.refused, np.int64)}
            answers.append((Record(task.client_id, 1, arrays), done.session))
        return answers

    @staticmethod
    def _open_shares(task: Task, s: Session) -> tuple[list[int], list[int], np.ndarray]:
        """The senders whose shares check out, those whose do not, and the shares."""
        me, context = task.client_id, s["context"].tobytes()
        senders = ids(task.shared.get("senders"), "senders")
        ciphertexts = blob(
            task.shared.get("ciphertexts"), "ciphertexts", (len(senders), CIPHERTEXT_BYTES)
        )
        known = {int(c): row for row, c in enumerate(s["neighbours"].tolist())}
        if len(set(senders.tolist())) != len(senders) or not set(senders.tolist()) <= set(known):
            raise crypto.SecAggError("shares forwarded from clients that are not neighbours")
        if len(senders) + 1 < int(s["threshold"][0]):
            raise crypto.SecAggError("too few neighbours shared keys to continue securely")
        digests = blob(
            task.shared.get("share_digests"), "share digests", (len(senders), *DIGEST_ROW)
        )
        accepted: list[int] = []
        refused: list[int] = []
        received = np.empty((len(senders), 2 * shamir.SHARE_BYTES), np.uint8)
        for cid, message, digest in zip(senders.tolist(), ciphertexts, digests, strict=True):
            share_key = s["share_keys"][known[cid]].tobytes()
            try:
                share = _open_share(share_key, message.tobytes(), context, task.round, cid, me)
                if digest_rows(context, task.round, cid, me, share) != digest.tobytes():
                    raise crypto.SecAggError("a share differs from the digest its dealer sent")
            except crypto.SecAggError:  # the sender's fault: reported, never masked with
                refused.append(cid)
                continue
            received[len(accepted)] = u8(share)
            accepted.append(cid)
        if len(accepted) + 1 < int(s["threshold"][0]):
            raise crypto.SecAggError(
                f"only {len(accepted)} neighbours' shares checked out (refused: {refused}): "
                "too few to continue securely"
            )
        return accepted, refused, received[: len(accepted)]

    def _prepare_mask(
        self, task: Task, session: Session | None, pairs: PairKeys, rounding: ring.Rounding
    ) -> _Masking:
        s = advance(session, task)
        me, context = task.client_id, s["context"].tobytes()
        accepted, refused, received = self._open_shares(task, s)
        params = MaskParams.from_scalars(task.scalars)
        arrays, scalars = kept_record(s)
        total = encode_input(arrays, scalars, params, context, task.seed, rounding)
        masks = [(crypto.self_mask_key(s["seed"].tobytes(), context), 1)]
        s_sk, s_pk = crypto.private_key(s["s_sk"].tobytes()), s["s_pk"].tobytes()
        known = {int(c): row for row, c in enumerate(s["neighbours"].tolist())}
        for cid in accepted:
            peer_s_pk = s["neighbour_keys"][known[cid], 32:].tobytes()
            key = pairs.derive(s_sk, s_pk, peer_s_pk, "mask", context)
            masks.append((key, 1 if me < cid else -1))
        s.update(senders=np.array(accepted, np.int64), received=received)
        forget_record(s)
        return _Masking(s, total, masks, refused)

    # 4. Unmask -----------------------------------------------------------------------------
    def _unmask_chunk(
        self, tasks: Sequence[Task], sessions: Sequence[Session | None]
    ) -> list[Answer]:
        return _per_client(lambda t, s: (self._unmask_one(t, s), None), tasks, sessions)

    @staticmethod
    def _unmask_one(task: Task, session: Session | None) -> Record:
        s = advance(session, task)
        me = task.client_id
        survivors = set(ids(task.shared.get("survivors"), "survivors").tolist())
        dropouts = set(ids(task.shared.get("dropouts"), "dropouts").tolist())
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
