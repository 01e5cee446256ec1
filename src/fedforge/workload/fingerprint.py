"""The architecture fingerprint server and clients compare in the handshake: every tensor
of the model's state (name, dtype, shape), the SHA-256 of its frozen weights (a LoRA base,
which never travels: each side proves it holds the same one) and the settings that give the
data its meaning (``Workload.schema``), hashed. A client whose fingerprint differs is
refused with both fingerprints and the first entry that differs, before it takes part in a
round."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedforge.train.torch_model import frozen_digest

MAX_ENTRIES = 100_000  # a client's architecture listing is refused beyond this
MAX_ENTRY_CHARS = 512


@dataclass(frozen=True)
class Fingerprint:
    """The entries (one line per tensor or schema setting) and their digest."""

    entries: tuple[str, ...]

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.entries).encode()).hexdigest()[:16]

    def difference(self, other: Fingerprint, mine: str, theirs: str) -> str | None:
        """None when equal; else the first differing entry, ``mine`` and ``theirs`` naming
        the two sides."""
        if self.entries == other.entries:
            return None
        for a, b in zip(self.entries, other.entries, strict=False):
            if a != b:
                return f"{mine} has {a!r} where {theirs} has {b!r}"
        if len(self.entries) > len(other.entries):
            return f"{theirs} lacks {self.entries[len(other.entries)]!r}"
        return f"{mine} lacks {other.entries[len(self.entries)]!r}"


def fingerprint(module: torch.nn.Module, schema: Mapping[str, str] | None = None) -> Fingerprint:
    """The fingerprint of ``module``'s state, its frozen weights and the data ``schema``."""
    entries = [
        f"{name} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
        for name, t in module.state_dict().items()
    ]
    frozen = frozen_digest(module)
    if frozen is not None:
        entries.append(f"frozen weights sha256 {frozen}")
    entries += [f"schema {key} = {value}" for key, value in sorted((schema or {}).items())]
    return Fingerprint(tuple(entries))


def received(entries: Sequence[str]) -> Fingerprint | None:
    """A fingerprint received from a peer, or None when it is not a plausible one."""
    if not 0 < len(entries) <= MAX_ENTRIES or any(len(e) > MAX_ENTRY_CHARS for e in entries):
        return None
    return Fingerprint(tuple(entries))
