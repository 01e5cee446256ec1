"""The server side of SecAgg+: builds each step's tasks, checks every reply, routes the
messages, and recovers the exact sum of the survivors' encoded records.

Every reply is checked against what this client must send at this step (array names,
dtypes, shapes, addressees); a reply that fails is rejected and its client becomes a
dropout, which the protocol tolerates. The transcript records which kind of share of which
client the server received: never both kinds for one client.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedforge.compress.rotation import rotation_shape, unrotate
from fedforge.core.errors import ConfigError
from fedforge.core.params import Params
from fedforge.core.records import Record, RecordSpec, Task
from fedforge.privacy import discrete_gaussian
from fedforge.secagg import crypto, ring, shamir
from fedforge.secagg.client import MaskParams, unpack_identity
from fedforge.secagg.graph import neighbours
from fedforge.secagg.protocol import (
    ADVERTISE,
    CIPHERTEXT_BYTES,
    IDENTITY_BYTES,
    MASK,
    MIN_CLIENTS,
    PUBLIC_KEYS_BYTES,
    ROTATION_BLOCK,
    SHARE,
    UNMASK,
    SecAggAbort,
    SecAggParams,
    rotation_seed,
    threshold_for,
)


@dataclass(frozen=True)
class Layout:
    """How a record flattens into the masked vector: arrays then summed scalars (each in
    name order), then the secure-aggregation clipped bit."""

    arrays: tuple[tuple[str, tuple[int, ...], np.dtype], ...]
    scalars: tuple[str, ...]

    @classmethod
    def of(cls, spec: RecordSpec) -> Layout:
        arrays = tuple((n, a.shape, np.dtype(a.dtype)) for n, a in sorted(spec.arrays.items()))
        return cls(arrays, tuple(sorted(spec.scalars)))

    @property
    def array_size(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in self.arrays)

    def unflatten(self, values: np.ndarray) -> tuple[Params, dict[str, float], float]:
        arrays, start = {}, 0
        for name, shape, _ in self.arrays:
            size = int(np.prod(shape, dtype=np.int64))
            arrays[name] = values[start : start + size].reshape(shape)
            start += size
        scalars = {n: float(values[start + i]) for i, n in enumerate(self.scalars)}
        return arrays, scalars, float(values[-1])


@dataclass
class Transcript:
    """What the server received, per step; ``shares[kind]`` names the clients whose share
    of that kind (``seed`` or ``key``) reached the server."""

    replied: dict[str, list[int]] = field(default_factory=dict)
    shares: dict[str, set[int]] = field(default_factory=lambda: {"seed": set(), "key": set()})

    def both_kinds(self) -> set[int]:
        """Clients of which the server holds both kinds of share (always empty)."""
        return self.shares["seed"] & self.shares["key"]


@dataclass(frozen=True)
class SecureSum:
    """The result: the exact sum of the survivors' weighted records (dequantized, float64;
    ``dtypes`` are the records' own)."""

    arrays: Params
    dtypes: dict[str, np.dtype]
    scalars: dict[str, float]
    clipped: float
    survivors: list[int]
    rho: float = 0.0  # distributed DP: this release's zCDP parameter (0 without noise)
    tau: float = 0.0  # ... and its slack on delta


class SecAggRound:
    """One secure-aggregation session over the clients that trained (``participants``)."""

    def __init__(
        self,
        params: SecAggParams,
        round_number: int,
        participants: Sequence[int],
        weights: Mapping[int, float],
        layout: Layout,
        clip_norm: float,
        *,
        require_identities: bool = False,
        noise_std: float = 0.0,
    ) -> None:
        if len(set(participants)) < MIN_CLIENTS:
            raise SecAggAbort(
                f"secure aggregation needs at least {MIN_CLIENTS} clients, got "
                f"{len(set(participants))}: a sum of one record is that record"
            )
        if noise_std > 0 and layout.scalars:
            raise ConfigError(
                f"distributed DP: the summed scalars {list(layout.scalars)} would reach the "
                "server without noise; remove the stages that add them"
            )
        self.params, self.round, self.layout = params, round_number, layout
        self.clip_norm = clip_norm
        self.participants = sorted(int(c) for c in participants)
        self.weights = {int(c): float(w) for c, w in weights.items()}
        self.require_identities = require_identities
        self.noise_std = noise_std  # distributed DP: stddev of the noise on the sum
        self.context = os.urandom(32)  # fresh per session: binds every key and ciphertext
        self.graph_seed = os.urandom(32)  # announced before any key is seen
        self.degree = params.degree(len(self.participants))
        self.graph = neighbours(self.participants, self.degree, self.graph_seed)
        self.threshold = threshold_for(self.degree + 1, params.threshold)
        self.transcript = Transcript()
        self.keys: dict[int, bytes] = {}
        self.identities: dict[int, np.ndarray] = {}
        self.outbox: dict[int, dict[int, np.ndarray]] = {}  # receiver -> sender -> ciphertext
        self.senders: dict[int, list[int]] = {}  # whose shares each client got (its masks)
        self.masked: dict[int, np.ndarray] = {}
        self.seed_shares: dict[int, dict[int, bytes]] = {}
        self.key_shares: dict[int, dict[int, bytes]] = {}
        self.dtype = ring.ring_dtype(params.ring_bits)
        # Ring words of the arrays: the rotation pads them to whole blocks.
        self.array_words = (
            rotation_shape(layout.array_size, ROTATION_BLOCK)[1]
            if params.rotation
            else layout.array_size
        )
        # The clipped bit is summed only without noise (it would be released un-noised).
        self.reports_clipped = noise_std == 0
        self.words = self.array_words + len(layout.scalars) + int(self.reports_clipped)
        self.shared_bytes = 0  # bytes of the per-client task payloads sent so far

    # Tasks -----------------------------------------------------------------------------------
    def _task(self, stage: str, cid: int, seed: int, shared: Params, **scalars: float) -> Task:
        self.shared_bytes += sum(int(a.nbytes) for a in shared.values())
        return Task(stage, self.round, cid, seed, shared, scalars)

    def tasks(self, stage: str, seeds: Mapping[int, int]) -> list[Task]:
        """The tasks of ``stage`` for the clients still in the session; aborts when fewer
        than the threshold remain."""
        alive = self._alive(stage)
        if len(alive) < self.threshold:
            raise SecAggAbort(
                f"secure aggregation: {len(alive)} clients left before {stage}, fewer than "
                f"the threshold {self.threshold}; the round is aborted and the model unchanged"
            )
        build = {ADVERTISE: self._advertise, SHARE: self._share, MASK: self._mask}
        if stage == UNMASK:
            return [self._unmask(c, seeds[c]) for c in alive]
        return [build[stage](c, seeds[c]) for c in alive]

    def _alive(self, stage: str) -> list[int]:
        previous = {ADVERTISE: None, SHARE: ADVERTISE, MASK: SHARE, UNMASK: MASK}[stage]
        if previous is None:
            return self.participants
        return sorted(self.transcript.replied.get(previous, []))

    def _advertise(self, cid: int, seed: int) -> Task:
        shared: Params = {
            "participants": np.array(self.participants, np.int64),
            "graph_seed": np.frombuffer(self.graph_seed, np.uint8).copy(),
            "context": np.frombuffer(self.context, np.uint8).copy(),
        }
        return self._task(
            ADVERTISE,
            cid,
            seed,
            shared,
            **{"secagg.degree": self.degree, "secagg.t": self.threshold},
        )

    def _share(self, cid: int, seed: int) -> Task:
        ids = [c for c in self.graph[cid] if c in self.keys]
        shared = {
            "neighbours": np.array(ids, np.int64),
            "neighbour_keys": _rows(
                [np.frombuffer(self.keys[c], np.uint8) for c in ids], PUBLIC_KEYS_BYTES
            ),
        }
        if self.require_identities:
            shared["neighbour_identities"] = _rows(
                [self.identities[c] for c in ids], IDENTITY_BYTES
            )
        return self._task(SHARE, cid, seed, shared)

    def _mask(self, cid: int, seed: int) -> Task:
        inbox = self.outbox.get(cid, {})
        senders = sorted(c for c in inbox if c in self.transcript.replied[SHARE])
        self.senders[cid] = senders
        shared = {
            "senders": np.array(senders, np.int64),
            "ciphertexts": _rows([inbox[c] for c in senders], CIPHERTEXT_BYTES),
        }
        return self._task(MASK, cid, seed, shared, **self.mask_params(cid).scalars())

    def mask_params(self, cid: int) -> MaskParams:
        clients = len(self.transcript.replied.get(SHARE, []))  # at most this many inputs
        p = self.params
        each = self.noise_std / math.sqrt(clients)  # each client's share of the noise
        # Values up to the clip norm plus ten noise stddevs: the sum wraps with probability
        # below 1e-20 per coordinate.
        bound = self.clip_norm
        if p.rotation:  # each rotated coordinate is far below the norm (w.h.p.)
            size = rotation_shape(self.layout.array_size, ROTATION_BLOCK)[0]
            bound = ring.rotated_bound(self.clip_norm, size)
        bits = ring.frac_bits(p.ring_bits, bound + 10 * each, clients, p.min_frac_bits)
        # Summed scalars (a clipped bit, a count) are integers: the largest that n of can
        # sum without wrapping, up to the configured bound (a 16-bit ring holds small ones).
        scalar_bound = min(p.scalar_bound, 2.0 ** (p.ring_bits - 1) // (clients + 1) - 1)
        return MaskParams(
            weight=self.weights[cid],
            clip_norm=self.clip_norm,
            ring_bits=p.ring_bits,
            array_bits=bits,
            scalar_bits=ring.frac_bits(p.ring_bits, scalar_bound, clients, 0),
            scalar_bound=scalar_bound,
            noise_units=each * 2.0**bits,
            rotation_block=ROTATION_BLOCK if p.rotation else 0,
        )

    def _unmask(self, cid: int, seed: int) -> Task:
        survivors = set(self.masked)
        holds = set(self.senders[cid]) | {cid}
        shared = {
            "survivors": np.array(sorted(holds & survivors), np.int64),
            "dropouts": np.array(sorted(holds - survivors), np.int64),
        }
        return self._task(UNMASK, cid, seed, shared)

    # Replies ---------------------------------------------------------------------------------
    def check(self, stage: str, record: Record) -> str | None:
        """Why this reply must be rejected, or None."""
        cid, a = record.client_id, record.arrays
        expected = {
            ADVERTISE: {"keys", "identity"} if self.require_identities else {"keys"},
            SHARE: {"receivers", "ciphertexts"},
            MASK: {"masked"},
            UNMASK: {"seed_owners", "seed_shares", "key_owners", "key_shares"},
        }[stage]
        if set(a) != expected:
            return f"{stage}: arrays {sorted(a)}, expected {sorted(expected)}"
        try:
            if stage == ADVERTISE:
                _shape(a["keys"], np.uint8, (PUBLIC_KEYS_BYTES,), "keys")
                if self.require_identities:
                    self._check_identity(cid, a["keys"].tobytes(), a["identity"])
            elif stage == SHARE:
                want = [c for c in self.graph[cid] if c in self.keys]
                _shape(a["receivers"], np.int64, (len(want),), "receivers")
                if a["receivers"].tolist() != want:
                    return f"{stage}: shares addressed to the wrong clients"
                _shape(a["ciphertexts"], np.uint8, (len(want), CIPHERTEXT_BYTES), "ciphertexts")
            elif stage == MASK:
                _shape(a["masked"], self.dtype, (self.words,), "masked input")
            else:
                holds = set(self.senders[cid]) | {cid}
                owners = sorted(holds & set(self.masked)), sorted(holds - set(self.masked))
                for kind, want in zip(("seed", "key"), owners, strict=True):
                    if a[f"{kind}_owners"].tolist() != want:
                        return f"{stage}: {kind} shares of the wrong clients"
                    _shape(a[f"{kind}_shares"], np.uint8, (len(want), shamir.SHARE_BYTES), kind)
        except crypto.SecAggError as exc:
            return f"{stage}: {exc}"
        return None

    def _check_identity(self, cid: int, keys: bytes, identity: np.ndarray) -> None:
        _shape(identity, np.uint8, (IDENTITY_BYTES,), "identity")
        unpack_identity(identity)

    def accept(self, stage: str, record: Record) -> None:
        cid, a = record.client_id, record.arrays
        self.transcript.replied.setdefault(stage, []).append(cid)
        if stage == ADVERTISE:
            self.keys[cid] = a["keys"].tobytes()
            if "identity" in a:
                self.identities[cid] = a["identity"].copy()
        elif stage == SHARE:
            for receiver, ciphertext in zip(a["receivers"].tolist(), a["ciphertexts"], strict=True):
                self.outbox.setdefault(int(receiver), {})[cid] = ciphertext.copy()
        elif stage == MASK:
            self.masked[cid] = a["masked"].copy()
        else:
            for kind, store in (("seed", self.seed_shares), ("key", self.key_shares)):
                for owner, share in zip(
                    a[f"{kind}_owners"].tolist(), a[f"{kind}_shares"], strict=True
                ):
                    store.setdefault(int(owner), {})[cid] = share.tobytes()
                    self.transcript.shares[kind].add(int(owner))

    # The sum ---------------------------------------------------------------------------------
    def result(self) -> SecureSum:
        """Remove every mask and decode the survivors' sum; SecAggAbort if any secret cannot
        be recovered."""
        survivors = sorted(self.masked)
        if len(survivors) < max(self.threshold, MIN_CLIENTS):
            raise SecAggAbort(
                f"secure aggregation: {len(survivors)} masked inputs, fewer than the threshold "
                f"{self.threshold}; the round is aborted and the model unchanged"
            )
        total = np.zeros(self.words, self.dtype)
        for cid in survivors:
            total += self.masked[cid]
        for cid in survivors:
            seed = self._recover(self.seed_shares, cid, "self-mask seed")
            total -= crypto.mask(crypto.self_mask_key(seed, self.context), len(total), self.dtype)
        # Dropouts whose pairwise masks some survivor added: only their keys are needed.
        dropped = sorted({c for s in survivors for c in self.senders[s]} - set(survivors))
        for cid in dropped:
            raw = self._recover(self.key_shares, cid, "mask key")
            if crypto.public_of(raw) != self.keys[cid][32:]:
                raise SecAggAbort(f"the recovered mask key of client {cid} does not match its key")
            s_sk = crypto.private_key(raw)
            for other in survivors:
                if cid not in self.senders[other]:
                    continue
                key = crypto.pair_mask_key(s_sk, self.keys[other][32:], self.context)
                pair = crypto.mask(key, len(total), self.dtype)
                if other < cid:  # the survivor added +mask; remove it
                    total -= pair
                else:
                    total += pair
        params = self.mask_params(survivors[0])
        n = self.array_words
        array_values = ring.decode(total[:n], params.array_bits, params.ring_bits)
        if self.params.rotation:
            rotation = rotation_seed(self.context)
            unrotated = unrotate(
                array_values[None], [rotation], self.layout.array_size, ROTATION_BLOCK
            )
            array_values = unrotated[0].astype(np.float64)
        values = np.concatenate(
            [array_values, ring.decode(total[n:], params.scalar_bits, params.ring_bits)]
        )
        if not self.reports_clipped:
            values = np.append(values, 0.0)
        arrays, scalars, clipped = self.layout.unflatten(values)
        dtypes = {name: dtype for name, _, dtype in self.layout.arrays}
        privacy = self._privacy(params, len(survivors))
        return SecureSum(arrays, dtypes, scalars, clipped, survivors, *privacy)

    def _privacy(self, params: MaskParams, contributors: int) -> tuple[float, float]:
        """(zCDP rho, tau) of this release under distributed DP (``release_rho``: replace-one
        adjacency, the clip norm plus what stochastic rounding can add per record)."""
        if params.noise_units <= 0:
            return 0.0, 0.0
        units = 2.0**params.array_bits
        tau = discrete_gaussian.sum_distance(params.noise_units, contributors)
        rho = discrete_gaussian.release_rho(
            self.clip_norm * units, self.array_words, contributors, params.noise_units
        )
        return rho, tau

    def _recover(self, store: dict[int, dict[int, bytes]], owner: int, what: str) -> bytes:
        shares = store.get(owner, {})
        if len(shares) < self.threshold:
            raise SecAggAbort(
                f"secure aggregation: {len(shares)} shares of client {owner}'s {what} arrived, "
                f"fewer than the threshold {self.threshold}; the round is aborted and the "
                "model unchanged"
            )
        try:
            return shamir.combine(shares, self.threshold)
        except shamir.ShareError as exc:
            raise SecAggAbort(f"secure aggregation: {exc}") from None


def _rows(rows: Sequence[np.ndarray], width: int) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, width), np.uint8)


def _shape(arr: object, dtype: type | np.dtype, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(dtype) or arr.shape != shape:
        got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise crypto.SecAggError(f"{what}: expected {np.dtype(dtype)} {shape}, got {got}")
