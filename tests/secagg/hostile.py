"""Hostile secure-aggregation clients: the real client with one step overridden to send what
an honest client never would (used in process and in real client processes)."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
from cryptography import x509

from fedforge.core.records import Record, Task
from fedforge.secagg import crypto, shamir
from fedforge.secagg.client import SecAggClient
from fedforge.secagg.session import Session, pack_identity


def _with(record: Record, **arrays: np.ndarray) -> Record:
    return replace(record, arrays={**record.arrays, **arrays})


class BadSignature(SecAggClient):
    """Advertises other keys than the ones it signed."""

    def advertise(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        record, s = super().advertise(task, session)
        fresh = crypto.KeyPair.generate().public + crypto.KeyPair.generate().public
        return _with(record, keys=np.frombuffer(fresh, np.uint8).copy()), s


class ZeroKey(SecAggClient):
    """Advertises an all-zero (low-order) key, correctly signed: only the key check stops it."""

    def advertise(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        record, s = super().advertise(task, session)
        keys = bytes(32) + record.arrays["keys"].tobytes()[32:]
        arrays = {"keys": np.frombuffer(keys, np.uint8).copy()}
        if self.identity is not None:
            cert = x509.load_der_x509_certificate(self.identity.certificate_der)
            context = task.shared["context"].tobytes()
            name = crypto.certificate_name(cert)
            statement = crypto.key_statement(context, task.round, task.client_id, name, keys)
            signature = crypto.sign(self.identity.private_key_pem, statement)
            arrays["identity"] = pack_identity(signature, self.identity.certificate_der)
        return _with(record, **arrays), s


class GarbageShares(SecAggClient):
    """Sends random bytes of the right size as every encrypted share."""

    def share(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        record, s = super().share(task, session)
        shape = record.arrays["ciphertexts"].shape
        garbage = np.frombuffer(os.urandom(int(np.prod(shape))), np.uint8).reshape(shape)
        return _with(record, ciphertexts=garbage.copy()), s


class CraftedUnmask(SecAggClient):
    """Reveals made-up field elements instead of its shares of the survivors' seeds."""

    def unmask(self, task: Task, session: Session | None) -> Record:
        record = super().unmask(task, session)
        shares = record.arrays["seed_shares"].copy()
        shares[:, 1:] = np.frombuffer(os.urandom(shares[:, 1:].size), np.uint8).reshape(
            shares[:, 1:].shape
        )
        shares[:, 0] = 0  # below the prime: a well-formed share, just not the one dealt
        return _with(record, seed_shares=shares)


class CraftedInput(SecAggClient):
    """Masks a crafted input: every ring word shifted by a quarter of the ring."""

    def mask(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        record, s = super().mask(task, session)
        masked = record.arrays["masked"]
        shift = masked.dtype.type(1 << (8 * masked.itemsize - 2))
        return _with(record, masked=masked + shift), s


class FalseAccuser(SecAggClient):
    """Claims every share it was sent failed to authenticate."""

    def mask(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        record, s = super().mask(task, session)
        return _with(record, refused=task.shared["senders"].copy()), s


class InconsistentDealer(SecAggClient):
    """Deals its shares off one polynomial (committing to what it dealt): the share of the
    lowest holder, which every recovery uses, is moved by one."""

    def share(self, task: Task, session: Session | None) -> tuple[Record, Session]:
        real_split = shamir.split

        def bent(secret: bytes, threshold: int, holders: list[int]) -> dict[int, bytes]:
            shares = real_split(secret, threshold, holders)
            first = min(holders)
            value = (int.from_bytes(shares[first], "big") + 1) % shamir.PRIME
            return {**shares, first: value.to_bytes(shamir.SHARE_BYTES, "big")}

        shamir.split = bent  # type: ignore[assignment]
        try:
            return super().share(task, session)
        finally:
            shamir.split = real_split
