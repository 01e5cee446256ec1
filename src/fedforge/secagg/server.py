"""The server side of SecAgg+: builds each step's tasks, checks every reply, routes the
messages, and recovers the exact sum of the survivors' encoded records.

Every reply is checked against what this client must send at this step (array names,
dtypes, shapes, addressees; keys and signatures, shares against their dealers' digests: see
``verify.py``); a reply that fails is rejected, its client is excluded (named, with the
reason, in ``excluded``) and becomes a dropout, which the protocol tolerates. So do the
clients excluded to settle disputes over shares. The transcript records which kind of share
of which client the server received: never both kinds for one client.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedforge.compress.rotation import rotation_shape, unrotate
from fedforge.core.errors import ConfigError
from fedforge.core.params import Params
from fedforge.core.records import Record, Task
from fedforge.privacy import discrete_gaussian
from fedforge.secagg import crypto, ring, shamir
from fedforge.secagg.graph import neighbours
from fedforge.secagg.masking import MaskParams, Masks, add_masks
from fedforge.secagg.protocol import (
    ADVERTISE,
    CIPHERTEXT_BYTES,
    DIGEST_ROW,
    IDENTITY_BYTES,
    MASK,
    MIN_CLIENTS,
    PUBLIC_KEYS_BYTES,
    ROTATION_BLOCK,
    SHARE,
    SHARE_KINDS,
    UNMASK,
    SecAggAbort,
    SecAggParams,
    rotation_seed,
    threshold_for,
)
from fedforge.secagg.records import Layout, SecureSum, Transcript
from fedforge.secagg.session import unpack_identity
from fedforge.secagg.verify import identity_problem, key_problem, settle_disputes, sum_problem


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
        ca_pem: bytes | None = None,
        names: Mapping[int, str] | None = None,
        describe: Callable[[int], str] = str,
    ) -> None:
        """``ca_pem``: the run's CA, with which the server verifies the signed keys itself
        (deployment); ``names``: each client's certificate name, which must be the one that
        signed its keys; ``describe``: a client's name in messages."""
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
        self.ca_pem = ca_pem
        self.names = dict(names or {})
        self.describe = describe
        self.noise_std = noise_std  # distributed DP: stddev of the noise on the sum
        self.context = os.urandom(32)  # fresh per session: binds every key and ciphertext
        self.graph_seed = os.urandom(32)  # announced before any key is seen
        self.degree = params.degree(len(self.participants))
        self.graph = neighbours(self.participants, self.degree, self.graph_seed)
        self.threshold = threshold_for(self.degree + 1, params.threshold)
        self.transcript = Transcript()
        self.keys: dict[int, bytes] = {}
        self.advertised_by: dict[bytes, int] = {}  # each advertised public key's client
        self.identities: dict[int, np.ndarray] = {}
        self.outbox: dict[int, dict[int, np.ndarray]] = {}  # receiver -> sender -> ciphertext
        self.senders: dict[int, list[int]] = {}  # whose shares each client got (its masks)
        self.masked: dict[int, np.ndarray] = {}
        self.seed_shares: dict[int, dict[int, bytes]] = {}
        self.key_shares: dict[int, dict[int, bytes]] = {}
        self.digests: dict[int, dict[int, np.ndarray]] = {}  # dealer -> holder -> digest row
        self.refusals: dict[int, list[int]] = {}  # client -> neighbours whose share it refused
        self.excluded: dict[int, str] = {}  # client -> why the server excluded it
        self.settled = False  # the disputes of the mask step are settled
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
        if stage == UNMASK:
            self._settle()
        replied = self.transcript.replied.get(previous, [])
        return sorted(c for c in replied if c not in self.excluded)

    def exclude(self, cid: int, reason: str) -> None:
        """Leave ``cid`` out of the rest of the session (its reply broke the protocol). Until
        the unmask step its masked input is dropped too; after it, the input stays (removing
        it would need both kinds of its shares) and only what it sends is discarded."""
        self.excluded.setdefault(int(cid), reason)
        if not self.settled:
            self.masked.pop(int(cid), None)

    def _settle(self) -> None:
        """After the mask step: exclude the fewest clients that end every dispute over a
        share; the excluded become dropouts, whose pairwise masks the survivors remove."""
        if self.settled:
            return
        # Disputes with a client already out of the sum are moot: nobody masked with it.
        live = {
            c: [other for other in refused if other in self.masked]
            for c, refused in self.refusals.items()
            if c in self.masked
        }
        for cid, reason in settle_disputes(live, self.describe).items():
            self.exclude(cid, f"{MASK}: {reason}")
        self.settled = True

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
        shared_keys = set(self.transcript.replied[SHARE]) - set(self.excluded)
        senders = sorted(c for c in inbox if c in shared_keys)
        self.senders[cid] = senders
        digests = [self.digests[c][cid] for c in senders]
        shared = {
            "senders": np.array(senders, np.int64),
            "ciphertexts": _rows([inbox[c] for c in senders], CIPHERTEXT_BYTES),
            "share_digests": (
                np.stack(digests) if digests else np.zeros((0, *DIGEST_ROW), np.uint8)
            ),
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
            SHARE: {"receivers", "ciphertexts", "share_digests"},
            MASK: {"masked", "refused"},
            UNMASK: {"seed_owners", "seed_shares", "key_owners", "key_shares"},
        }[stage]
        if set(a) != expected:
            return f"{stage}: arrays {sorted(a)}, expected {sorted(expected)}"
        try:
            problem = {
                ADVERTISE: self._check_advertise,
                SHARE: self._check_share,
                MASK: self._check_mask,
                UNMASK: self._check_unmask,
            }[stage](cid, a)
        except crypto.SecAggError as exc:
            problem = str(exc)
        return None if problem is None else f"{stage}: {problem}"

    def _check_advertise(self, cid: int, a: Params) -> str | None:
        _shape(a["keys"], np.uint8, (PUBLIC_KEYS_BYTES,), "keys")
        keys = a["keys"].tobytes()
        owners = {self.advertised_by.get(half) for half in (keys[:32], keys[32:])}
        others = sorted(c for c in owners if c is not None and c != cid)
        problem = key_problem(keys, {c: self.keys[c] for c in others})
        if problem is None and self.require_identities:
            _shape(a["identity"], np.uint8, (IDENTITY_BYTES,), "identity")
            unpack_identity(a["identity"])
            if self.ca_pem is not None:

                def statement(name: str) -> bytes:
                    return crypto.key_statement(self.context, self.round, cid, name, keys)

                problem = identity_problem(
                    self.ca_pem, a["identity"], statement, self.names.get(cid)
                )
        return problem

    def _check_share(self, cid: int, a: Params) -> str | None:
        want = [c for c in self.graph[cid] if c in self.keys]
        _shape(a["receivers"], np.int64, (len(want),), "receivers")
        if a["receivers"].tolist() != want:
            return "shares addressed to the wrong clients"
        _shape(a["ciphertexts"], np.uint8, (len(want), CIPHERTEXT_BYTES), "ciphertexts")
        _shape(a["share_digests"], np.uint8, (len(want) + 1, *DIGEST_ROW), "share digests")
        return None

    def _check_mask(self, cid: int, a: Params) -> str | None:
        _shape(a["masked"], self.dtype, (self.words,), "masked input")
        refused = a["refused"]
        if not isinstance(refused, np.ndarray) or refused.dtype != np.int64 or refused.ndim != 1:
            return "refused must be a 1-D int64 array"
        named = refused.tolist()
        if len(set(named)) != len(named) or not set(named) <= set(self.senders[cid]):
            return "it refused shares it was not sent"
        return None

    def _check_unmask(self, cid: int, a: Params) -> str | None:
        holds = set(self.senders[cid]) | {cid}
        owners = sorted(holds & set(self.masked)), sorted(holds - set(self.masked))
        for index, (kind, want) in enumerate(zip(SHARE_KINDS, owners, strict=True)):
            if a[f"{kind}_owners"].tolist() != want:
                return f"{kind} shares of the wrong clients"
            _shape(a[f"{kind}_shares"], np.uint8, (len(want), shamir.SHARE_BYTES), kind)
            for owner, share in zip(want, a[f"{kind}_shares"], strict=True):
                digest = crypto.share_digest(
                    self.context, self.round, owner, cid, kind, share.tobytes()
                )
                if digest != self.digests[owner][cid][index].tobytes():
                    return f"its {kind} share of {self.describe(owner)} is not the one dealt"
        return None

    def accept(self, stage: str, record: Record) -> None:
        cid, a = record.client_id, record.arrays
        self.transcript.replied.setdefault(stage, []).append(cid)
        if stage == ADVERTISE:
            self.keys[cid] = a["keys"].tobytes()
            for half in (self.keys[cid][:32], self.keys[cid][32:]):
                self.advertised_by.setdefault(half, cid)
            if "identity" in a:
                self.identities[cid] = a["identity"].copy()
        elif stage == SHARE:
            for receiver, ciphertext in zip(a["receivers"].tolist(), a["ciphertexts"], strict=True):
                self.outbox.setdefault(int(receiver), {})[cid] = ciphertext.copy()
            holders = [cid, *a["receivers"].tolist()]
            self.digests[cid] = dict(zip(holders, a["share_digests"].copy(), strict=True))
        elif stage == MASK:
            self.masked[cid] = a["masked"].copy()
            refused = a["refused"].tolist()
            if refused:  # it masked without them: their pairwise masks are not in its input
                self.refusals[cid] = refused
                self.senders[cid] = [c for c in self.senders[cid] if c not in refused]
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
        be recovered (naming its owner as the culprit when the shares it dealt disagree), or
        if the sum is one no clipped inputs can produce."""
        survivors = sorted(self.masked)
        if len(survivors) < max(self.threshold, MIN_CLIENTS):
            raise SecAggAbort(
                f"secure aggregation: {len(survivors)} masked inputs, fewer than the threshold "
                f"{self.threshold}; the round is aborted and the model unchanged"
            )
        total = np.zeros(self.words, self.dtype)
        for cid in survivors:
            total += self.masked[cid]
        masks: Masks = {}  # what to take off the sum, one keystream per key
        for cid in survivors:
            seed = self._recover(self.seed_shares, cid, "self-mask seed")
            masks.setdefault(crypto.self_mask_key(seed, self.context), []).append((0, -1))
        # Dropouts whose pairwise masks some survivor added: only their keys are needed.
        dropped = sorted({c for s in survivors for c in self.senders[s]} - set(survivors))
        for cid in dropped:
            raw = self._recover(self.key_shares, cid, "mask key")
            if crypto.public_of(raw) != self.keys[cid][32:]:
                why = "dealt shares of a mask key that is not the one it advertised"
                raise SecAggAbort(
                    f"secure aggregation: {self.describe(cid)} {why}; the round is aborted "
                    "and the model unchanged",
                    {cid: f"{UNMASK}: {why}"},
                )
            s_sk = crypto.private_key(raw)
            for other in survivors:
                if cid not in self.senders[other]:
                    continue
                key = crypto.pair_mask_key(s_sk, self.keys[other][32:], self.context)
                # The survivor added +mask when its id is the lower one: remove it.
                masks.setdefault(key, []).append((0, -1 if other < cid else 1))
        add_masks([total], masks)
        params = self.mask_params(survivors[0])
        n = self.array_words
        array_values = ring.decode(total[:n], params.array_bits, params.ring_bits)
        scalar_values = ring.decode(total[n:], params.scalar_bits, params.ring_bits)
        self._check_sum(array_values, scalar_values, params, survivors, dropped)
        if self.params.rotation:
            rotation = rotation_seed(self.context)
            unrotated = unrotate(
                array_values[None], [rotation], self.layout.array_size, ROTATION_BLOCK
            )
            array_values = unrotated[0].astype(np.float64)
        values = np.concatenate([array_values, scalar_values])
        if not self.reports_clipped:
            values = np.append(values, 0.0)
        arrays, scalars, clipped = self.layout.unflatten(values)
        dtypes = {name: dtype for name, _, dtype in self.layout.arrays}
        privacy = self._privacy(params, len(survivors))
        return SecureSum(arrays, dtypes, scalars, clipped, survivors, *privacy)

    def _check_sum(
        self,
        arrays: np.ndarray,
        scalars: np.ndarray,
        params: MaskParams,
        survivors: list[int],
        dropped: list[int],
    ) -> None:
        """Refuse a sum that the survivors' clipped, weighted inputs cannot add up to, naming
        the dealers whose shares disagree (a secret recovered from some of them is wrong)."""
        clipped = float(scalars[-1]) if self.reports_clipped else None
        problem = sum_problem(
            arrays,
            scalars[:-1] if self.reports_clipped else scalars,
            clipped,
            total_weight=sum(self.weights[c] for c in survivors),
            clip_norm=self.clip_norm,
            contributors=len(survivors),
            unit=2.0**-params.array_bits,
            scalar_unit=2.0**-params.scalar_bits,
            scalar_bound=params.scalar_bound,
            noise_std=self.noise_std,
        )
        if problem is None:
            return
        culprits = {
            owner: f"{UNMASK}: the shares it dealt of its {what} disagree"
            for store, owners, what in (
                (self.seed_shares, survivors, "self-mask seed"),
                (self.key_shares, dropped, "mask key"),
            )
            for owner in owners
            if not _consistent(store[owner], self.threshold)
        }
        cause = (
            ", ".join(f"{self.describe(c)}: {why}" for c, why in culprits.items())
            if culprits
            else "a client masked a crafted input or share"
        )
        raise SecAggAbort(
            f"secure aggregation: the unmasked sum is impossible for honest inputs: {problem}; "
            f"{cause}: the round is refused and the model unchanged",
            culprits,
            impossible=True,
        )

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
        try:  # every share matched its dealer's digest: a bad one is the dealer's
            return shamir.combine(shares, self.threshold)
        except shamir.ShareError as exc:
            why = f"the shares it dealt of its {what} disagree ({exc})"
            raise SecAggAbort(
                f"secure aggregation: {self.describe(owner)}: {why}; the round is aborted "
                "and the model unchanged",
                {owner: f"{UNMASK}: {why}"},
            ) from None


def _consistent(shares: Mapping[int, bytes], threshold: int) -> bool:
    """Whether the shares lie on one polynomial (checked only once a sum is impossible)."""
    try:
        shamir.combine(shares, threshold, consistent=True)
    except shamir.ShareError:
        return False
    return True


def _rows(rows: Sequence[np.ndarray], width: int) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, width), np.uint8)


def _shape(arr: object, dtype: type | np.dtype, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(dtype) or arr.shape != shape:
        got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise crypto.SecAggError(f"{what}: expected {np.dtype(dtype)} {shape}, got {got}")
