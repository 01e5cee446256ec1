"""The SecAgg+ round: its steps, its parameters, and the names of what travels.

After the fit exchange (each client trains and *keeps* its record), four exchanges follow,
every message routed through the server:

1. ``secagg/advertise``: the server sends the participants, the graph seed and a fresh
   session context; each client answers with two X25519 public keys (signed in deployment).
   The server checks the keys (canonical, not of low order, not another client's) and, in
   deployment, the signature (the run's CA, the client's own name) before relaying them.
2. ``secagg/share``: the server forwards each client its neighbours' keys; the client
   Shamir-shares its self-mask seed ``b`` and its mask private key among its neighbourhood
   (itself included) and answers with one AES-GCM ciphertext per neighbour and a SHA-256
   digest of every share it dealt.
3. ``secagg/mask``: the server forwards the ciphertexts addressed to each client with their
   digests, its aggregation weight and the ring parameters; the client answers with its
   record clipped, weighted, encoded in the ring, plus its self mask and its signed pairwise
   masks with every neighbour whose share checked out, and names the neighbours whose share
   did not (``refused``). The server settles these disputes by excluding the fewest clients
   that end them; the excluded become dropouts.
4. ``secagg/unmask``: the server names which of each client's neighbours survived; the
   client answers with its shares of the survivors' ``b`` and of the dropouts' mask keys,
   never both kinds for one client. The server checks each share against its dealer's
   digest, removes the masks, and decodes the sum, which must be one that inputs clipped to
   the clip norm can produce.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fedforge.core.errors import ConfigError, FedforgeError
from fedforge.secagg.graph import default_degree
from fedforge.secagg.ring import ring_dtype

ADVERTISE = "secagg/advertise"
SHARE = "secagg/share"
MASK = "secagg/mask"
UNMASK = "secagg/unmask"
STEPS = (ADVERTISE, SHARE, MASK, UNMASK)

SESSION = "secagg/"  # prefix of the session's entries in a client's state
PUBLIC_KEYS_BYTES = 64  # c_pk | s_pk
IDENTITY_BYTES = 2 + 72 + 2 + 4096  # signature and certificate, each length-prefixed
# A share ciphertext: nonce | (sender, receiver, seed share, key share) | tag.
SHARE_PLAINTEXT_BYTES = 8 + 8 + 66 + 66
CIPHERTEXT_BYTES = 12 + SHARE_PLAINTEXT_BYTES + 16
SHARE_KINDS = ("seed", "key")  # a dealer's digest row: (seed share, key share), 32 bytes each
DIGEST_ROW = (len(SHARE_KINDS), 32)


ROTATION_BLOCK = 4096
MIN_CLIENTS = 2  # a "sum" of one record is that record: never unmasked


def rotation_seed(context: bytes) -> int:
    """The session's 128-bit rotation seed, from its context (both sides know it)."""
    return int.from_bytes(
        hashlib.sha256(b"fedforge-secagg/rotation/" + context).digest()[:16], "little"
    )


class SecAggAbort(FedforgeError):
    """The round cannot complete securely; the model is unchanged. ``culprits``: clients
    shown to have broken the protocol (id -> why), whom a retry leaves out; ``impossible``:
    the unmasked sum is one no clipped inputs produce (someone masked a crafted input)."""

    def __init__(
        self, message: str, culprits: dict[int, str] | None = None, *, impossible: bool = False
    ) -> None:
        super().__init__(message)
        self.culprits = dict(culprits or {})
        self.impossible = impossible


@dataclass(frozen=True)
class SecAggParams:
    """Server-side settings of secure aggregation.

    ``security`` scales the graph degree ``k = security * log2(n)`` (``complete``: every
    client is every client's neighbour, classic SecAgg); a secret is shared among the
    ``k + 1`` clients of a neighbourhood with threshold ``t = floor(threshold * (k + 1)) + 1``
    (0.5: a strict majority). Records are clipped to ``clip_norm`` (the clip stage's norm when
    there is one) and encoded in a ``ring_bits`` ring; summed scalars may be up to
    ``scalar_bound``. ``min_frac_bits`` is the least fixed-point precision accepted.
    ``rotation``: records are randomly rotated first (randomized Hadamard, blocks of
    ``ROTATION_BLOCK``, the same rotation for every client of a session, undone on the sum),
    which shrinks each coordinate's range so a 16-bit ring keeps enough precision.
    """

    ring_bits: int = 32
    security: float = 3.0
    complete: bool = False
    threshold: float = 0.5
    clip_norm: float = 10.0
    scalar_bound: float = 65536.0
    min_frac_bits: int = 8
    rotation: bool = False

    def __post_init__(self) -> None:
        ring_dtype(self.ring_bits)
        if not 0.5 <= self.threshold < 1:
            raise ConfigError(
                f"secagg.threshold must be in [0.5, 1) (a strict majority or more), got "
                f"{self.threshold}"
            )
        if not self.security > 0 or not self.clip_norm > 0 or not self.scalar_bound >= 1:
            raise ConfigError("secagg: security and clip_norm must be > 0, scalar_bound >= 1")

    def degree(self, num_clients: int) -> int:
        if self.complete:
            return max(num_clients - 1, 0)
        return default_degree(num_clients, self.security)


def threshold_for(holders: int, fraction: float) -> int:
    """Shares needed to recover a secret held by ``holders`` clients."""
    return min(int(fraction * holders) + 1, holders)


def least_threshold(holders: int) -> int:
    """The smallest threshold a client accepts: a strict majority of its neighbourhood."""
    return threshold_for(holders, 0.5)
