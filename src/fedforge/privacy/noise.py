"""Gaussian noise that cannot be predicted: an AES-256-CTR keystream turned into normals.

By default the key comes from the operating system (``os.urandom``), so nobody, the run's
seed included, can predict or replay the noise. For reproducible research the key can
instead be derived from the run seed and the noise's coordinates (round, attempt, client):
the same numbers on every runtime, and labelled as *seeded* in the history and the report.

Uniforms take 53 random bits each; normals come from the Box-Muller transform. Noise is
added in float64. (Floating-point Gaussian samplers leak through their low-order bits in
theory, Mironov 2012; secure aggregation's discrete noise avoids that.)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from fedforge.core.keystream import keystream_words


def keystream_uniforms(key: bytes, count: int) -> np.ndarray:
    """``count`` uniforms in (0, 1] from the AES-256-CTR keystream of ``key``."""
    words = keystream_words(key, count, np.uint64)
    return ((words >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53


def gaussian_from_key(key: bytes, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Normals of standard deviation ``std`` (float64), a deterministic function of ``key``."""
    size = int(np.prod(shape, dtype=np.int64))
    pairs = (size + 1) // 2
    u = keystream_uniforms(key, 2 * pairs)
    radius = np.sqrt(-2.0 * np.log(u[:pairs]))
    angle = 2.0 * np.pi * u[pairs:]
    normals = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]
    result: np.ndarray = (normals * std).reshape(shape)
    return result


@dataclass(frozen=True)
class NoiseSource:
    """Where noise keys come from: OS entropy (default) or a seed, for reproducible runs."""

    seed: int | None = None

    @property
    def seeded(self) -> bool:
        return self.seed is not None

    def describe(self) -> str:
        if self.seed is None:
            return "os-entropy (AES-256-CTR keyed from os.urandom)"
        return "SEEDED from the run seed: reproducible and predictable, for research only"

    def key(self, purpose: str, *coords: int) -> bytes:
        """A fresh 256-bit key; seeded: SHA-256 of the seed, purpose and coordinates."""
        if self.seed is None:
            return os.urandom(32)
        text = ":".join([purpose, str(self.seed), *(str(c) for c in coords)])
        return hashlib.sha256(b"fedforge-noise:" + text.encode()).digest()

    def gaussian(
        self, shape: tuple[int, ...], std: float, purpose: str, *coords: int
    ) -> np.ndarray:
        return gaussian_from_key(self.key(purpose, *coords), shape, std)
